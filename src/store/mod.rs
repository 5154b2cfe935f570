//! The only place SQL lives: one `Store` with two backends, chosen once from the URL scheme.
//!
//! Not `sqlx::Any` and not generic over the database: the SQL differs (placeholders, time types,
//! `SKIP LOCKED`), so each backend states its own queries and both honour the same contract,
//! which the integration tests run against each.

pub mod postgres;
mod reserve;
pub mod sqlite;
mod wal_index;

use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::domain::message::RawMessage;
use crate::domain::status::Status;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

pub type StoreResult<T> = Result<T, sqlx::Error>;

/// How an attempt ended, as written to the row by `Store::finish_many`.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// WeChat accepted the message.
    Sent {
        msgid: Option<i64>,
    },
    /// Permanent: a refused row or errcode, or attempts exhausted.
    Failed {
        errcode: Option<i64>,
        reason: String,
    },
    Expired {
        reason: String,
    },
    /// It may have reached the user, and resending could reach them twice.
    Unknown {
        errcode: Option<i64>,
        reason: String,
    },
    /// Back to `pending`, due again at `at`.
    Retry {
        at: DateTime<Utc>,
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    },
    /// Back to `pending` now without counting the attempt (account paused, daemon stopping).
    Release {
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    },
    /// `held` on a limit until `until`, without counting the attempt.
    Hold {
        until: DateTime<Utc>,
        held_for: HeldFor,
        reason: String,
    },
}

/// What a held row waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldFor {
    /// Room among the account's templates in use.
    Template,
    MonthlyQuota,
    DailyQuota,
}

impl HeldFor {
    pub fn as_str(self) -> &'static str {
        match self {
            HeldFor::Template => "template",
            HeldFor::MonthlyQuota => "monthly quota",
            HeldFor::DailyQuota => "daily quota",
        }
    }
}

/// One outcome to write: the row, what happened, when, and when its attempt began.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: i64,
    pub outcome: Outcome,
    pub now: DateTime<Utc>,
    pub attempt_began: DateTime<Utc>,
}

/// The column values an `Outcome` writes; shared by both backends.
pub(crate) struct OutcomeColumns {
    pub status: Status,
    pub msgid: Option<i64>,
    pub sent: bool,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub errcode: Option<i64>,
    pub error: Option<String>,
    pub in_doubt: bool,
    pub refund_attempt: i32,
    pub held_for: Option<HeldFor>,
}

impl Outcome {
    pub(crate) fn columns(&self, now: DateTime<Utc>) -> OutcomeColumns {
        let base = |status, errcode: &Option<i64>, reason: &str| OutcomeColumns {
            status,
            msgid: None,
            sent: false,
            next_attempt_at: None,
            errcode: *errcode,
            error: Some(bounded(reason)),
            in_doubt: false,
            refund_attempt: 0,
            held_for: None,
        };
        match self {
            Outcome::Sent { msgid } => OutcomeColumns {
                msgid: *msgid,
                sent: true,
                error: None,
                ..base(Status::Sent, &Some(0), "")
            },
            Outcome::Failed { errcode, reason } => base(Status::Failed, errcode, reason),
            Outcome::Expired { reason } => base(Status::Expired, &None, reason),
            Outcome::Unknown { errcode, reason } => OutcomeColumns {
                in_doubt: true,
                ..base(Status::Unknown, errcode, reason)
            },
            Outcome::Retry {
                at,
                errcode,
                reason,
                in_doubt,
            } => OutcomeColumns {
                next_attempt_at: Some(*at),
                in_doubt: *in_doubt,
                ..base(Status::Pending, errcode, reason)
            },
            Outcome::Release {
                errcode,
                reason,
                in_doubt,
            } => OutcomeColumns {
                next_attempt_at: Some(now),
                in_doubt: *in_doubt,
                refund_attempt: 1,
                ..base(Status::Pending, errcode, reason)
            },
            Outcome::Hold {
                until,
                held_for,
                reason,
            } => OutcomeColumns {
                next_attempt_at: Some(*until),
                refund_attempt: 1,
                held_for: Some(*held_for),
                ..base(Status::Held, &None, reason)
            },
        }
    }
}

/// The shared access token of one account, as stored.
#[derive(Clone)]
pub struct StoredToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Asks for a token refresh lease: granted when no other daemon holds one and the stored token
/// is missing, expires before `refresh_before`, or is the `failing` one.
pub struct TokenLease<'a> {
    pub account: &'a str,
    pub owner: &'a str,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    pub refresh_before: DateTime<Utc>,
    pub failing: Option<&'a str>,
}

/// One accepted push from WeChat, as stored in `inbound_events`.
#[derive(Debug, Clone, Default)]
pub struct InboundEvent {
    pub account: String,
    /// Equal for WeChat's retries of one push; unique per account.
    pub dedup_key: String,
    pub msg_type: Option<String>,
    pub event: Option<String>,
    pub from_user: Option<String>,
    pub to_user: Option<String>,
    pub create_time: Option<i64>,
    pub msgid: Option<i64>,
    pub status: Option<String>,
    pub raw_xml: String,
}

impl InboundEvent {
    /// What the event does to the account's suppression list.
    pub(crate) fn suppression(&self) -> Option<bool> {
        match (self.msg_type.as_deref(), self.event.as_deref()) {
            (Some("event"), Some("unsubscribe")) => Some(true),
            (Some("event"), Some("subscribe")) => Some(false),
            _ => None,
        }
    }
}

/// The `timestamp` and `nonce` a push was signed with, and a hash of its body. Remembered for
/// twice the timestamp window (a timestamp may run ahead of our clock by the window), in the
/// database so that daemons behind one load balancer share it: plain mode's signature covers
/// no body, so without this one observed URL would carry any number of forged bodies.
#[derive(Debug, Clone)]
pub struct SignedPush {
    pub timestamp: String,
    pub nonce: String,
    /// Hex sha1 of the body as received.
    pub body_sha1: String,
    /// Remembered pushes received before this are deleted, a bounded few with each push.
    pub forget_before: DateTime<Utc>,
}

/// What became of a push given to `Store::record_push`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    New,
    /// Stored before: WeChat's retry (the same dedup key, or the same timestamp, nonce and body).
    Repeat,
    /// Its timestamp and nonce came before with another body: refused, nothing stored.
    Replayed,
}

/// Old entries of `callback_replays` deleted per push: more than one, so the table shrinks
/// after a burst; bounded, so a push never waits on a long delete.
pub(crate) const REPLAYS_FORGOTTEN_PER_PUSH: i64 = 100;

/// One pass of the join of delivery events.
pub struct JoinPass<'a> {
    pub now: DateTime<Utc>,
    /// Events received before this that have not joined are given up on.
    pub received_before: DateTime<Utc>,
    /// The window, as the reason given for them says it.
    pub window: &'a str,
    /// Only this event (for a pass that isolates an event the batch cannot join).
    pub only: Option<i64>,
}

impl JoinPass<'_> {
    pub(crate) fn no_row_problem(&self) -> String {
        format!(
            "no sent row with this MsgID within {} of its arrival",
            self.window
        )
    }
}

/// What one join pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinCounts {
    /// Rows that took their delivery status from an event.
    pub joined: u64,
    /// Events whose FromUserName is not the touser of the row with their MsgID.
    pub mismatched: u64,
    /// Events given up on after the window.
    pub given_up: u64,
}

/// One claim: whose, how many rows at most, until when, and the quota periods of `now` (the
/// ones its counted rows are counted in).
pub struct ClaimRequest<'a> {
    pub owner: &'a str,
    pub limit: usize,
    pub lease_until: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub month: &'a str,
    pub day: &'a str,
}

/// What a claimed row is counted against when the claim may count it at once.
pub struct CountTerms {
    pub template_id: String,
    pub monthly_limit: u32,
    pub daily_limit: u32,
}

/// Decides, for each claimed row, whether the claim counts it (see `Store::claim`).
pub type Countable<'f> = &'f (dyn Fn(&RawMessage) -> Option<CountTerms> + Sync);

/// A claimed row, and its reservation when the claim counted it.
pub struct Claimed {
    pub raw: RawMessage,
    pub reserved: Option<Reserved>,
}

/// A quota reservation for one row: its month and day counters, taken together or not at all.
pub struct QuotaReservation<'a> {
    pub owner: &'a str,
    pub id: i64,
    pub account: &'a str,
    pub template_id: &'a str,
    pub month: &'a str,
    pub day: &'a str,
    pub monthly_limit: u32,
    pub daily_limit: u32,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Granted,
    /// The template's month is full; nothing was taken.
    MonthFull,
    /// The account's day is full; nothing was taken.
    DayFull,
    /// The row is no longer this daemon's; nothing was taken.
    LeaseLost,
}

/// An account's limits as they bear on its held rows, for `Store::release_holds_with_room`.
pub struct HoldLimits<'a> {
    pub account: &'a str,
    /// Templates in use at once; `None` when auto-activation is off (room alone takes no row
    /// into use, so rows held for room wait for the operator).
    pub active_templates: Option<u32>,
    pub monthly_per_template: u32,
    pub daily_per_account: u32,
}

/// Whether a template could be taken into use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateUse {
    InUse,
    /// `in_use` templates are in use already: the limit.
    NoRoom {
        in_use: i64,
    },
}

/// An account's limits as the daemon runs them, for `report_quota`.
#[derive(Debug, Clone)]
pub struct AccountLimitsRow {
    pub account: String,
    pub limits: crate::config::Limits,
    pub timezone: String,
    /// The timezone's offset from UTC at the time of writing.
    pub utc_offset_minutes: i32,
}

/// Rows counted by account, status and, for held rows, what they wait for.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RowCount {
    pub account: String,
    pub status: String,
    pub held_for: Option<String>,
    pub rows: i64,
}

/// A template as listed by `wechat-outbox templates list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TemplateRow {
    pub account: String,
    pub template_id: String,
    pub title: Option<String>,
    pub in_use: bool,
    pub note: Option<String>,
}

/// A template as WeChat lists it.
#[derive(Debug, Clone)]
pub struct SyncedTemplate {
    pub template_id: String,
    pub title: String,
    pub content: String,
}

#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

macro_rules! on_backend {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

impl Store {
    /// Connects to the configured database. Migrations are not run here; see `migrate`.
    pub async fn connect(config: &Config) -> Result<Store> {
        if config.is_postgres() {
            let store = PostgresStore::connect(config)
                .await
                .context("cannot connect to PostgreSQL (database_url)")?;
            Ok(Store::Postgres(store))
        } else {
            let store = SqliteStore::connect(config)
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
        on_backend!(self, s => s.migrate().await).context("database migration failed")
    }

    /// Server settings that will hurt the daemon, as sentences for the log. On Postgres:
    /// autovacuum off, under which every claimed row leaves a dead entry at the head of the
    /// claim's index that each later claim walks (a 1M drain ran 20-30 % slower).
    pub async fn setting_warnings(&self) -> StoreResult<Vec<String>> {
        match self {
            Store::Sqlite(_) => Ok(Vec::new()),
            Store::Postgres(s) => s.setting_warnings().await,
        }
    }

    /// How the database would run the claim now (its `EXPLAIN`), to check that it reads the
    /// claim index rather than the table, however many rows wait.
    pub async fn claim_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        on_backend!(self, s => s.claim_plan(now).await)
    }

    /// How the database would run the join pass's update now (its `EXPLAIN`), to check that it
    /// starts from the unjoined events, not from the sent rows.
    pub async fn join_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        on_backend!(self, s => s.join_plan(now).await)
    }

    /// Claims up to `limit` due rows for `owner` until `lease_until`, counting an attempt each,
    /// and in the same transaction reserves quota for each row `countable` gives terms for
    /// (as `reserve_quota_many` would; all or nothing per row). One commit for both: a
    /// message ready to go waits for one commit fewer, and a busy pool writes one transaction
    /// fewer per group. Rows without terms come back with `None` and are counted later.
    pub async fn claim(
        &self,
        request: &ClaimRequest<'_>,
        countable: Countable<'_>,
    ) -> StoreResult<Vec<Claimed>> {
        on_backend!(self, s => s.claim(request, countable).await)
    }

    /// Writes attempts' outcomes, each only if `owner` still holds the row's lease, in one
    /// transaction (one commit, one fsync); for each, whether the row was still ours. All or
    /// none: on an error nothing was written. `attempt_began` is when an attempt was claimed: if
    /// its outcome leaves the row in doubt for the first time, the de-duplication window
    /// started then.
    pub async fn finish_many(&self, owner: &str, items: &[Finish]) -> StoreResult<Vec<bool>> {
        on_backend!(self, s => s.finish_many(owner, items).await)
    }

    /// Extends the lease of a row `owner` still holds; false if it no longer does.
    pub async fn extend_lease(
        &self,
        owner: &str,
        id: i64,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_backend!(self, s => s.extend_lease(owner, id, lease_until).await)
    }

    /// Returns rows whose lease expired (their daemon died) to `pending`, marked in doubt.
    pub async fn rescue_expired_leases(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, s => s.rescue_expired_leases(now).await)
    }

    /// Releases every row `owner` still holds, marked in doubt; for shutdown.
    pub async fn release_owned(&self, owner: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, s => s.release_owned(owner, now).await)
    }

    /// Marks pending rows whose `expires_at` has passed as `expired`.
    pub async fn expire_overdue(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, s => s.expire_overdue(now).await)
    }

    /// Marks pending in-doubt rows first attempted before `first_attempt_before` as `unknown`.
    pub async fn give_up_in_doubt(
        &self,
        first_attempt_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, s => s.give_up_in_doubt(first_attempt_before, now).await)
    }

    pub async fn pause_account(
        &self,
        account: &str,
        until: DateTime<Utc>,
        errcode: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, s => s.pause_account(account, until, errcode, reason, now).await)
    }

    pub async fn load_token(&self, account: &str) -> StoreResult<Option<StoredToken>> {
        on_backend!(self, s => s.load_token(account).await)
    }

    pub async fn lease_token_refresh(&self, lease: &TokenLease<'_>) -> StoreResult<bool> {
        on_backend!(self, s => s.lease_token_refresh(lease).await)
    }

    pub async fn save_token(
        &self,
        account: &str,
        owner: &str,
        token: &StoredToken,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, s => s.save_token(account, owner, token, now).await)
    }

    pub async fn release_token_lease(&self, account: &str, owner: &str) -> StoreResult<()> {
        on_backend!(self, s => s.release_token_lease(account, owner).await)
    }

    /// Stores a push from the callback endpoint once, and applies subscribe and unsubscribe to
    /// the suppression list, in one transaction; its signed timestamp and nonce are remembered
    /// in it too, and a second body under them is refused.
    pub async fn record_push(
        &self,
        event: &InboundEvent,
        signed: &SignedPush,
        now: DateTime<Utc>,
    ) -> StoreResult<Recorded> {
        on_backend!(self, s => s.record_inbound(event, signed, now).await)
    }

    /// Joins unjoined TEMPLATESENDJOBFINISH events to their sent rows by account, msgid and
    /// openid, and gives up on the events that cannot join: a FromUserName that is not the
    /// row's touser, or no sent row within the window. One transaction; safe to run from
    /// several daemons at once.
    pub async fn join_delivery_events(&self, pass: &JoinPass<'_>) -> StoreResult<JoinCounts> {
        on_backend!(self, s => s.join_delivery_events(pass).await)
    }

    /// The oldest template events still waiting to join, for a pass one event at a time.
    pub async fn unjoined_events(&self, limit: i64) -> StoreResult<Vec<i64>> {
        on_backend!(self, s => s.unjoined_events(limit).await)
    }

    /// Gives up on one event that cannot be joined, with the reason.
    pub async fn give_up_event(
        &self,
        id: i64,
        problem: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, s => s.give_up_event(id, problem, now).await)
    }

    /// Counts each row's send in its template's month and its account's day, unless either is
    /// full, and records the periods on the row (guarded by the lease); one transaction for the
    /// group, a result per row in order, each row all or nothing. On an error nothing was
    /// reserved.
    pub async fn reserve_quota_many(
        &self,
        items: &[QuotaReservation<'_>],
    ) -> StoreResult<Vec<Reserved>> {
        on_backend!(self, s => s.reserve_quota_many(items).await)
    }

    /// Uncounts a send WeChat refused, and forgets the periods on the row.
    pub async fn release_quota(&self, r: &QuotaReservation<'_>) -> StoreResult<()> {
        on_backend!(self, s => s.release_quota(r).await)
    }

    /// Takes a template into use if it is not and the account has room, atomically (two
    /// daemons racing cannot exceed `limit`).
    pub async fn take_template_into_use(
        &self,
        account: &str,
        template_id: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<TemplateUse> {
        on_backend!(self, s => s.take_template_into_use(account, template_id, limit, now).await)
    }

    /// Takes a template out of use with a note saying why, and wakes the account's rows held
    /// for room; false if it was not in use.
    pub async fn retire_template(
        &self,
        account: &str,
        template_id: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_backend!(self, s => s.retire_template(account, template_id, note, now).await)
    }

    /// Records WeChat's template list for an account; templates missing from it go out of use.
    pub async fn sync_templates(
        &self,
        account: &str,
        listed: &[SyncedTemplate],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, s => s.sync_templates(account, listed, now).await)
    }

    pub async fn list_templates(&self) -> StoreResult<Vec<TemplateRow>> {
        on_backend!(self, s => s.list_templates().await)
    }

    /// Quota rows of the given month and day: (account, scope, period, used).
    pub async fn quota_usage(
        &self,
        month: &str,
        day: &str,
    ) -> StoreResult<Vec<(String, String, String, i64)>> {
        on_backend!(self, s => s.quota_usage(month, day).await)
    }

    /// Returns held rows whose time has come to `pending`.
    pub async fn release_due_holds(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, s => s.release_due_holds(now).await)
    }

    /// Returns held rows to `pending` when what they wait for has room now: a send given back,
    /// a limit raised or a template taken out of use frees room while the rows are held until
    /// the period ends (and a hold written just after a give-back would otherwise miss it).
    /// The claim checks their limits again, so the quota is never exceeded.
    pub async fn release_holds_with_room(
        &self,
        limits: &[HoldLimits<'_>],
        month: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, s => s.release_holds_with_room(limits, month, day, now).await)
    }

    /// Records this daemon as alive; returns how many daemons beat since `alive_since`.
    pub async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> StoreResult<i64> {
        on_backend!(self, s => s.heartbeat(owner, now, alive_since).await)
    }

    pub async fn remove_daemon(&self, owner: &str) -> StoreResult<()> {
        on_backend!(self, s => s.remove_daemon(owner).await)
    }

    /// Deletes up to `batch` terminal rows last changed before `cutoff`, and as many stored
    /// pushes received before it; returns how many of each. Quota rows of the last 400 days stay
    /// for the reports. Call again until it returns (0, 0).
    pub async fn prune(&self, cutoff: DateTime<Utc>, batch: u32) -> StoreResult<(u64, u64)> {
        on_backend!(self, s => s.prune(cutoff, i64::from(batch)).await)
    }

    /// Reads a report view, each value as JSON; `view` and `order` come from `report::REPORTS`.
    pub async fn read_view(&self, view: &str, order: &str) -> StoreResult<crate::report::Report> {
        let sql = format!("SELECT * FROM {view} ORDER BY {order}");
        match self {
            Store::Sqlite(s) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(s.pool())
                    .await?;
                Ok(report_from::<_, DateTime<Utc>>(&rows))
            }
            Store::Postgres(s) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(s.pool())
                    .await?;
                Ok(report_from::<_, postgres::CheckedTime>(&rows))
            }
        }
    }

    /// Writes the limits this daemon runs its accounts with, for `report_quota`.
    pub async fn record_limits(
        &self,
        rows: &[AccountLimitsRow],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, s => s.record_limits(rows, now).await)
    }

    /// Rows by account, status and held reason, for `/metrics`.
    pub async fn row_counts(&self) -> StoreResult<Vec<RowCount>> {
        on_backend!(self, s => s.row_counts().await)
    }

    /// One round trip to the database, for `/healthz`.
    pub async fn ping(&self) -> StoreResult<()> {
        on_backend!(self, s => s.ping().await)
    }

    /// Rows per status, for the CLI and the demo.
    pub async fn status_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        on_backend!(self, s => s.status_counts().await)
    }

    /// Wakes `wake` when other connections commit new rows, until `shutdown`. A hint only:
    /// the dispatcher polls as well.
    pub async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        on_backend!(self, s => s.watch_for_rows(wake, shutdown).await)
    }

    pub async fn close(&self) {
        on_backend!(self, s => s.close().await)
    }
}

/// Turns rows of any shape into JSON values, trying the types the report views produce. `T`
/// reads times: on Postgres one that cannot panic on a value such as `infinity`, which a row
/// in a final state may keep.
fn report_from<R, T>(rows: &[R]) -> crate::report::Report
where
    R: sqlx::Row,
    T: Into<DateTime<Utc>>,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use serde_json::Value;
    use sqlx::Column;
    let columns = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let value = |row: &R, i: usize| -> Value {
        if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<i32>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<T>, _>(i) {
            return v.map_or(Value::Null, |t| Value::from(t.into().to_rfc3339()));
        }
        row.try_get::<Option<String>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, Value::from)
    };
    let rows = rows
        .iter()
        .map(|row| (0..row.columns().len()).map(|i| value(row, i)).collect())
        .collect();
    crate::report::Report { columns, rows }
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

/// What went wrong reading a column, without the value (which may be anything an app wrote).
fn decode_problem(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// How much of a reason is kept: enough to read, bounded whatever an app or WeChat sent.
pub const MAX_REASON_CHARS: usize = 500;

/// `text` cut to `MAX_REASON_CHARS` characters on a character boundary, marked `…`. Every
/// reason written to `last_error` passes here, since many echo input (an account name, a
/// parameter, WeChat's errmsg).
pub fn bounded(text: &str) -> String {
    crate::domain::text::cut(text, MAX_REASON_CHARS).into_owned()
}

/// The reason written on rows whose daemon stopped holding them.
pub(crate) const LEASE_EXPIRED: &str = "the daemon sending it stopped (lease expired); it may have reached WeChat, so it is resent \
     with the same client_msg_id while WeChat still de-duplicates";
pub(crate) const RELEASED_AT_SHUTDOWN: &str = "released at shutdown while in flight; it may have reached WeChat, so it is resent with the \
     same client_msg_id while WeChat still de-duplicates";
pub(crate) const EXPIRED: &str = "expires_at passed before it could be sent";
pub(crate) const MISSING_FROM_LIST: &str = "missing from WeChat's template list at the last sync";
/// The statuses a row never leaves: what retention may delete. `sent` counts too, as a row
/// whose delivery event never came stays `sent`.
pub(crate) const PRUNABLE: &str =
    "('sent', 'failed', 'expired', 'cancelled', 'unknown', 'delivered', 'blocked', 'undelivered')";
pub(crate) const OPENID_MISMATCH: &str =
    "FromUserName is not the touser of the row with this MsgID; the row was left as it was";
pub(crate) const SUPPRESSED: &str =
    "the user unsubscribed from the account (suppressed_openids); not sent";
pub(crate) const GAVE_UP_IN_DOUBT: &str = "an earlier attempt may have reached WeChat and the client_msg_id de-duplication window has \
     passed, so it is not resent";
