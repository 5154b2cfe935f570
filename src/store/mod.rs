//! The only place SQL lives: one `Store` over two backends, chosen once from the URL scheme.
//!
//! Each statement is written once where the dialects agree — `$N` placeholders (SQLite's
//! driver reads them too) and `Time` for times — in the file of what it does:
//!
//! | file | what |
//! |---|---|
//! | `claim.rs` | the claim, leases |
//! | `record.rs` | an attempt's outcome; rows moved on by maintenance (rescue, expiry, doubt) |
//! | `quota.rs` | quota give-backs, held rows released (`reserve.rs`: counting a group) |
//! | `templates.rs` | templates in use, WeChat's list |
//! | `tokens.rs` | the shared access token and its refresh lease |
//! | `pushes.rs` | WeChat's pushes, and their join to the sent rows |
//! | `daemons.rs` | heartbeats of live daemons |
//! | `pacing.rs` | per-user pacing: each recipient's next allowed send |
//! | `refusals.rs` | users who refused a template (43101) |
//! | `wechat_quota.rs` | WeChat's own quota figures, beside the daemon's |
//! | `retention.rs` | pruning final rows |
//! | `reports.rs` | report views, metrics' counts, the limits in force |
//!
//! `on_backend!` compiles that one text of code once per backend. What truly differs —
//! connecting, the claim, statements that take a group of rows (arrays on Postgres, JSON on
//! SQLite), planner hints, locking — sits in `sqlite.rs` and `postgres.rs` under the same
//! names, each with the reason it differs. Not `sqlx::Any` and not generic over the database:
//! the per-backend code is checked against each driver's concrete types.

/// The events that report a sent row's delivery: a template message's, and a subscription
/// notification's (one per `<List>` item). Migration 0013's `inbound_events_unjoined` index
/// has the same words, which SQLite needs to see to use it.
macro_rules! delivery_events {
    () => {
        "('TEMPLATESENDJOBFINISH', 'subscribe_msg_sent_event')"
    };
}

mod claim;
mod consents;
mod daemons;
mod dashboard;
mod pacing;
pub mod postgres;
mod pushes;
mod quota;
mod record;
mod refusals;
mod reports;
mod reserve;
mod retention;
pub mod sqlite;
mod templates;
pub mod time;
mod tokens;
mod wal_index;
mod wechat_quota;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use claim::{ClaimRequest, Claimed, CountTerms, Countable};
pub use consents::{ConsentChange, ConsentKey, ConsentTaken, MAX_GRANTED, SyncedSubscribeTemplate};
pub use dashboard::{
    ATTEMPTS_KEPT, ActivityCount, AttemptLine, AttemptLog, AuditEntry, AuditLine, DashboardTable,
    JoinedEvent, MessageDetail, MessageFilter, MessageLine, PAGE_ROWS, Page, Resend,
};
pub use postgres::PostgresStore;
pub use pushes::{InboundEvent, JoinCounts, JoinPass, Recorded, SignedPush};
pub use quota::{HoldLimits, QuotaReservation};
pub use record::Finish;
pub(crate) use record::errcode_column;
pub use refusals::Refusal;
pub use reports::{AccountLimitsRow, RowCount, ViewRows};
pub use sqlite::SqliteStore;
pub use templates::{SyncedTemplate, TemplateRow, TemplateUse};
pub use time::Time;
pub use tokens::{StoredToken, TokenLease};
pub use wechat_quota::WechatQuotaReading;

/// The lifecycle types that `Store`'s methods take and return.
pub use crate::domain::lifecycle::{HeldFor, Outcome, Reserved};

pub type StoreResult<T> = Result<T, sqlx::Error>;

/// What the store needs to connect: its own settings, taken from the configuration.
#[derive(Clone)]
pub struct StoreSettings {
    /// `sqlite://PATH` (created if missing) or `postgres://…`.
    pub url: String,
    /// Postgres: the schema that holds the tables (created by `migrate`).
    pub schema: String,
    pub max_connections: u32,
    /// SQLite: how long a write waits for another process's lock before it reports busy.
    pub busy_timeout: Duration,
    /// Postgres: how long one connection serves before it is replaced. A statement a
    /// connection has run five times may get a generic plan, costed for the table as it was
    /// then and kept until the table's statistics change, which with autovacuum off they never
    /// do: a plan made on a young table read the whole table for each outcome group (issue
    /// 16). A new connection plans again. Planning every group anew instead cost 10 % of a
    /// 50k drain (one more round trip a group), and planning every statement 0.55 ms a claim.
    pub connection_lifetime: Duration,
}

impl StoreSettings {
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres:") || self.url.starts_with("postgresql:")
    }
}

/// The URL may hold a password: never printed.
impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("busy_timeout", &self.busy_timeout)
            .field("connection_lifetime", &self.connection_lifetime)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Runs `$body` with `$pool` bound to the backend's pool and `$dialect` naming its module
/// (`sqlite` or `postgres`), compiled once for each: the code is written once, and each copy
/// is checked against its driver's types. `$dialect::` reaches what differs.
macro_rules! on_backend {
    // The backend itself rather than its pool, for the statements that need more of it (the
    // SQLite writers' gate).
    ($store:expr, backend |$backend:ident, $dialect:ident| $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($backend) => {
                #[allow(unused_imports)]
                use $crate::store::sqlite as $dialect;
                $body
            }
            $crate::store::Store::Postgres($backend) => {
                #[allow(unused_imports)]
                use $crate::store::postgres as $dialect;
                $body
            }
        }
    };
    ($store:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite(backend) => {
                #[allow(unused_imports)]
                use $crate::store::sqlite as $dialect;
                let $pool = backend.pool();
                $body
            }
            $crate::store::Store::Postgres(backend) => {
                #[allow(unused_imports)]
                use $crate::store::postgres as $dialect;
                let $pool = backend.pool();
                $body
            }
        }
    };
}
pub(crate) use on_backend;

impl Store {
    /// Connects to the database. Migrations are not run here; see `migrate`.
    pub async fn connect(settings: &StoreSettings) -> Result<Store> {
        if settings.is_postgres() {
            let store = PostgresStore::connect(settings)
                .await
                .context("cannot connect to PostgreSQL (database_url)")?;
            Ok(Store::Postgres(store))
        } else {
            let store = SqliteStore::connect(settings)
                .await
                .context("cannot open the SQLite database (database_url)")?;
            Ok(Store::Sqlite(store))
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
            Store::Postgres(s) => s.migrate().await,
        }
        .context("database migration failed")
    }

    /// Server settings that will hurt the daemon, as sentences for the log (see each
    /// backend's `setting_warnings`).
    pub async fn setting_warnings(&self) -> StoreResult<Vec<String>> {
        on_backend!(self, |pool, dialect| dialect::setting_warnings(pool).await)
    }

    /// Wakes `wake` when other connections commit new rows, until `shutdown`. A hint only:
    /// the dispatcher polls as well.
    pub async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        match self {
            Store::Sqlite(s) => s.watch_for_rows(wake, shutdown).await,
            Store::Postgres(s) => s.watch_for_rows(wake, shutdown).await,
        }
    }

    /// One round trip to the database, for `/healthz`.
    pub async fn ping(&self) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query("SELECT 1").execute(pool).await?;
            Ok(())
        })
    }

    pub async fn close(&self) {
        on_backend!(self, |pool, _d| pool.close().await)
    }
}

/// Reads the columns of one claimed row without ever failing the claim: a value it cannot
/// read (a type an app forced in, a time outside chrono's range, text that is not UTF-8) is
/// noted with its column's name and read as the type's default, and the row then fails alone
/// with that reason (`RawMessage::unreadable`) while the rest of its batch is sent.
pub(crate) struct RowReader<'r, R> {
    row: &'r R,
    /// The first column that could not be read, and why.
    pub problem: Option<String>,
}

impl<'r, R: sqlx::Row> RowReader<'r, R>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
{
    pub fn new(row: &'r R) -> RowReader<'r, R> {
        RowReader { row, problem: None }
    }

    /// Notes the row's problem, unless an earlier column had one.
    pub fn note(&mut self, problem: impl std::fmt::Display) {
        self.problem
            .get_or_insert_with(|| bounded(&problem.to_string()));
    }

    pub fn get<T>(&mut self, column: &str) -> T
    where
        T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database> + Default,
    {
        match self.row.try_get::<T, _>(column) {
            Ok(value) => value,
            Err(e) => {
                self.note(format_args!(
                    "{column} cannot be read: {}",
                    decode_problem(&e)
                ));
                T::default()
            }
        }
    }

    /// A time column; `None` both when it is NULL and when it cannot be read (noted).
    pub fn time(&mut self, column: &str) -> Option<chrono::DateTime<chrono::Utc>>
    where
        Option<Time>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        self.get::<Option<Time>>(column).map(|t| t.0)
    }

    /// A text column as text where the driver reads it so, else as bytes (text that is not
    /// UTF-8 shown with replacement characters and noted): for reading what to show, on both
    /// backends.
    pub fn shown_text(&mut self, column: &str) -> Option<String>
    where
        Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        match self.row.try_get::<Option<String>, _>(column) {
            Ok(text) => text,
            Err(_) => self.text(column),
        }
    }

    /// An app-written text column read as bytes, so that text that is not UTF-8 fails its row.
    pub fn text(&mut self, column: &str) -> Option<String>
    where
        Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        let bytes: Option<Vec<u8>> = self.get(column);
        match String::from_utf8(bytes?) {
            Ok(text) => Some(text),
            Err(e) => {
                self.note(format_args!("{column} is not valid UTF-8"));
                Some(String::from_utf8_lossy(e.as_bytes()).into_owned())
            }
        }
    }
}

/// Whether `error` is the database refusing a value (a data exception, a constraint, a trigger's
/// RAISE), which happens again on every try, rather than a lock, a timeout or a lost connection,
/// which may not. Only the first kind may end an event's join for good.
pub fn is_data_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else {
        return false;
    };
    let Some(code) = e.code() else {
        return false;
    };
    if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        // SQLSTATE: data exception, integrity constraint (23514 check, 23505 unique, …),
        // raise_exception.
        return code.starts_with("22") || code.starts_with("23") || code == "P0001";
    }
    // SQLite's (extended) result code: TOOBIG, CONSTRAINT (RAISE included), MISMATCH.
    code.parse::<i32>()
        .is_ok_and(|sqlite| matches!(sqlite & 0xff, 18..=20))
}

/// For each item in order, whether a statement that returns the ids it wrote wrote its row
/// (a row whose lease was lost is not written).
pub(crate) fn written<T>(items: &[T], id: impl Fn(&T) -> i64, ids: Vec<i64>) -> Vec<bool> {
    let ids: std::collections::HashSet<i64> = ids.into_iter().collect();
    items.iter().map(|item| ids.contains(&id(item))).collect()
}

/// What went wrong reading a column, without the value (which may be anything an app wrote).
fn decode_problem(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Every reason written to a row passes here (see `lifecycle::reason::bounded`).
pub(crate) use crate::domain::lifecycle::reason::bounded;
