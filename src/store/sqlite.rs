//! SQLite: the embedded default. WAL so apps read and insert while the daemon writes; every
//! write transaction is `BEGIN IMMEDIATE`, so a busy database waits (`busy_timeout`) instead of
//! failing a lock upgrade. Times are UTC text `YYYY-MM-DD HH:MM:SS.SSS` (`super::time`).
//!
//! What SQLite does differently from Postgres, under the same names as in `postgres.rs`:
//! statements over a group of rows read it from one JSON array (`jsonb_each`), not arrays;
//! partial indexes are matched on their exact wording; the planner is steered with
//! `MATERIALIZED` and `CROSS JOIN` rather than `LATERAL`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::claim::{PerUserSql, per_user_condition, per_user_index};
use super::record::errcode_column;
use super::reserve::{self, CounterKey};
use super::time::ts;
use super::wal_index::WalIndex;
use super::{
    ClaimRequest, Claimed, Countable, Finish, HoldLimits, QuotaReservation, Reserved, RowReader,
    StoreResult, StoreSettings, Time,
};
use crate::domain::lifecycle::DELIVERY_STATUS_SQL;
use crate::domain::message::RawMessage;

/// How often the watcher looks at the WAL index header for a commit.
const WATCH_INTERVAL: Duration = Duration::from_millis(2);
/// How often it asks the database instead when the WAL index cannot be read.
const WATCH_FALLBACK_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// For the watcher's own connection; boxed to keep `Store` small.
    options: Arc<SqliteConnectOptions>,
    /// The connection of the daemon's busiest writers (the claim and the grouped outcomes),
    /// taken in turn; `None` until first used or after an error. One connection, not the
    /// pool's: SQLite empties a connection's page cache whenever another connection has
    /// written since its last transaction, so writers taking turns on pooled connections
    /// each read their pages again (from the WAL, copied) for every group. And queued here,
    /// the next writer starts the moment the last commits, where SQLite's busy handler would
    /// sleep 1, 2, 5, 10 … ms between looks. Apps and the services still meet the busy handler.
    writer: Arc<tokio::sync::Mutex<Option<SqliteConnection>>>,
    /// How long a writer's turn may wait for an app's lock (`database.busy_timeout_ms`).
    busy_timeout: Duration,
}

impl SqliteStore {
    pub async fn connect(settings: &StoreSettings) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(&settings.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a row marked sent survives a power cut, so it is never sent again.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(settings.busy_timeout)
            .foreign_keys(true)
            // A claim's rows come back in one go rather than 50 at a time, each 50 a hand-off
            // between SQLite's thread and the claim's task while the writer is held (issue 16:
            // +2 to +14 % drain in three alternated pairs).
            .row_buffer_size(1024);
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            // Nothing to ping: the database is a local file, and a ping is one more hand-off
            // to the connection's thread per use.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        Ok(SqliteStore {
            pool,
            options: Arc::new(options),
            writer: Arc::new(tokio::sync::Mutex::new(None)),
            busy_timeout: settings.busy_timeout,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await
    }

    /// Other processes (the apps) write to the file, so no in-process signal can be trusted.
    /// The watcher looks at the WAL index header every `WATCH_INTERVAL` (a read from the page
    /// cache); after a commit it asks its own connection for the newest row id and wakes the
    /// claim loop if an app inserted. The daemon's own commits change the header too; the id
    /// check keeps them from waking it. Rows that become due otherwise (an operator setting
    /// rows back to pending, a retry's time) are claimed within `poll_interval_ms`.
    pub async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut index = match WalIndex::open(self.options.get_filename()) {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the SQLite WAL index; asking the database every {WATCH_FALLBACK_INTERVAL:?}");
                None
            }
        };
        let mut newest: Option<i64> = None;
        let mut conn: Option<SqliteConnection> = None;
        loop {
            let interval = match (&index, &conn) {
                (_, None) if newest.is_some() => Duration::from_secs(1),
                (Some(_), _) => WATCH_INTERVAL,
                (None, _) => WATCH_FALLBACK_INTERVAL,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Some(i) = index.as_mut() {
                match i.changed() {
                    Ok(false) => continue,
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the SQLite WAL index any more; asking the database instead");
                        index = None;
                    }
                }
            }
            if conn.is_none() {
                conn = SqliteConnection::connect_with(&self.options).await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            match sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(id), 0) FROM outbox")
                .fetch_one(c)
                .await
            {
                Ok(id) => {
                    if newest.is_some_and(|newest| id > newest) {
                        wake.notify_one();
                    }
                    newest = Some(id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the SQLite file; polling only");
                    conn = None;
                }
            }
        }
    }
}

impl SqliteStore {
    /// Runs `write` on the writers' connection, opening it first if needed. The connection
    /// has no busy handler: while another connection (an app's) holds the lock, its
    /// statements fail with `SQLITE_BUSY` having done nothing, and `write` runs them again
    /// after `BusyLooks::wait_after`. After an error the connection is closed, so that one
    /// left in a bad state is not used again.
    async fn with_writer<T>(
        &self,
        write: impl AsyncFnOnce(&mut SqliteConnection, &mut BusyLooks) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let asked = std::time::Instant::now();
        let mut writer = self.writer.lock().await;
        let waited_us = asked.elapsed().as_micros() as u64;
        let conn = match writer.as_mut() {
            Some(conn) => conn,
            None => {
                let options = (*self.options).clone().busy_timeout(Duration::ZERO);
                writer.insert(SqliteConnection::connect_with(&options).await?)
            }
        };
        let mut looks = BusyLooks::new(self.busy_timeout);
        let result = write(conn, &mut looks).await;
        if result.is_err() {
            *writer = None;
        }
        let held_us = asked.elapsed().as_micros() as u64 - waited_us;
        tracing::debug!(waited_us, held_us, busy_looks = looks.count, "writer turn");
        result
    }
}

/// Waiting for the write lock another connection (an app's) holds, on a connection without
/// a busy handler. SQLite's own handler sleeps 1, 2, 5, 10, 15, 20 … ms between looks; an
/// app's insert holds the lock for one commit (a fraction of a millisecond here), and at
/// 1,000 inserts a second each of those long sleeps is likely to end during the next one:
/// the claim waited tens of milliseconds (issue 16: p99 insert → sent 37-42 ms at 1,000/s).
pub(super) struct BusyLooks {
    began: std::time::Instant,
    timeout: Duration,
    count: u32,
}

/// How long a writer waits between looks at first: about an app's commit.
const LOCK_LOOK_INTERVAL: Duration = Duration::from_micros(100);
/// After this long of short looks, one per millisecond (the runtime's timer).
const SHORT_LOOKS_FOR: Duration = Duration::from_millis(20);

impl BusyLooks {
    fn new(timeout: Duration) -> BusyLooks {
        BusyLooks {
            began: std::time::Instant::now(),
            timeout,
            count: 0,
        }
    }

    /// After `e`: if it is `SQLITE_BUSY` and `database.busy_timeout_ms` has not passed, waits
    /// a moment to look again; any other error is given back.
    async fn wait_after(&mut self, e: sqlx::Error) -> StoreResult<()> {
        let waited = self.began.elapsed();
        if !is_busy(&e) || waited >= self.timeout {
            return Err(e);
        }
        self.count += 1;
        if waited < SHORT_LOOKS_FOR {
            // The runtime's timer cannot wait less than a millisecond; a blocking thread can.
            let _ = tokio::task::spawn_blocking(|| std::thread::sleep(LOCK_LOOK_INTERVAL)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// SQLite's `SQLITE_BUSY` (5) or one of its extended codes.
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == 5)
}

/// A write transaction. `BEGIN IMMEDIATE` takes the write lock at once: a deferred one that
/// read first would fail with SQLITE_BUSY on its first write instead of waiting.
pub(super) async fn begin_write(pool: &SqlitePool) -> StoreResult<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Nothing to take: `begin_write` already serialises every writer, daemons included.
pub(super) async fn lock_account_templates(
    _tx: &mut Transaction<'_, Sqlite>,
    _account: &str,
) -> StoreResult<()> {
    Ok(())
}

/// No server, no settings to warn about.
pub(super) async fn setting_warnings(_pool: &SqlitePool) -> StoreResult<Vec<String>> {
    Ok(Vec::new())
}

/// Report views' times: sqlx's own reading, which takes every text form SQLite's date
/// functions produce (the views compute some).
pub(super) type ViewTime = DateTime<Utc>;

/// The claim: due rows in priority order, through the partial index `outbox_claim`. No
/// `SKIP LOCKED` (one writer at a time), and the quota of claimed rows is counted by
/// `reserve_in` in the same transaction rather than marked by the claim as on Postgres.
/// `LIMIT $4 + 0`, not `LIMIT $4`: SQLite plans a bare bound LIMIT by its value and recompiles
/// the statement whenever the value changes, which for a claim of "as many as there is room
/// for" was every time (measured: 3-4 % of the daemon's CPU, parsing and planning).
const CLAIM_TEXT: &str = "UPDATE outbox SET status = 'sending', lease_owner = $1, lease_expires_at = $2,
                    attempts = min(attempts, 999999) + 1,
                    updated_at = $3
             WHERE id IN (
                SELECT id FROM outbox
                WHERE status = 'pending' AND next_attempt_at <= $3
                  AND (send_after IS NULL OR send_after <= $3)
                  AND NOT EXISTS (SELECT 1 FROM account_pauses p
                                  WHERE p.account = outbox.account AND p.paused_until > $3){PER_USER}
                ORDER BY priority DESC, next_attempt_at, id
                LIMIT $4 + 0)
             RETURNING id, CAST(account AS BLOB) AS account, CAST(touser AS BLOB) AS touser,
                CAST(template_id AS BLOB) AS template_id, CAST(data AS BLOB) AS data,
                CAST(url AS BLOB) AS url, CAST(miniprogram AS BLOB) AS miniprogram,
                CAST(client_msg_id AS BLOB) AS client_msg_id, expires_at, attempts,
                in_doubt_since, in_doubt,
                EXISTS (SELECT 1 FROM suppressed_openids s
                        WHERE s.account = outbox.account AND s.openid = outbox.touser) AS suppressed,
                EXISTS (SELECT 1 FROM refusals r WHERE r.account = outbox.account
                        AND r.openid = outbox.touser AND r.template_id = outbox.template_id
                        AND r.expires_at > $3) AS refused,
                quota_month, quota_day,
                (SELECT t.in_use FROM templates t WHERE t.account = outbox.account
                    AND t.template_id = outbox.template_id) AS template_in_use,
                CAST(kind AS BLOB) AS kind, CAST(page AS BLOB) AS page,
                CASE WHEN kind = 'subscribe'
                     THEN (SELECT s.content FROM subscribe_templates s
                           WHERE s.account = outbox.account AND s.template_id = outbox.template_id)
                     ELSE (SELECT t.content FROM templates t WHERE t.account = outbox.account
                           AND t.template_id = outbox.template_id) END AS template_content,
                CASE WHEN kind = 'subscribe'
                     THEN (SELECT s.long_term FROM subscribe_templates s
                           WHERE s.account = outbox.account AND s.template_id = outbox.template_id
                             AND s.note IS NULL)
                     END AS long_term,
                CASE WHEN kind = 'subscribe'
                     THEN COALESCE(strftime('%Y-%m-%d %H:%M:%f', send_after),
                                   strftime('%Y-%m-%d %H:%M:%f', created_at)) END
                     AS first_due";

/// The claim as it runs: without the per-user condition, or with it (`$5`, the oldest first
/// due time that still holds later rows back).
static CLAIM: LazyLock<String> = LazyLock::new(|| CLAIM_TEXT.replace("{PER_USER}", ""));
static CLAIM_PER_USER: LazyLock<String> = LazyLock::new(|| {
    let condition = per_user_condition(&PerUserSql {
        now: "$3",
        since: "$5",
        first_due,
        // Named: with some statistics SQLite chose to scan the whole table for each candidate
        // row (seen in `plans_use_their_indexes`), which a large table cannot afford.
        probe_from: "outbox AS e INDEXED BY outbox_recipient_open",
        same_recipient: "",
    });
    CLAIM_TEXT.replace("{PER_USER}", &condition)
});

/// A row's first due time (`order = "per_user"`): `created_at` read as a time, since an app may
/// have written it in another form (an offset, an epoch number), and text that is no time is
/// NULL, which neither holds back nor is held back.
fn first_due(row: &str) -> String {
    format!("COALESCE({row}.send_after, strftime('%Y-%m-%d %H:%M:%f', {row}.created_at))")
}

pub(super) async fn create_per_user_index(pool: &SqlitePool) -> StoreResult<()> {
    // SQLite keeps a long key in overflow pages: the text itself is the key.
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS {}",
        per_user_index("account, touser")
    );
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

/// When a row in flight was claimed, for the start of its doubt: the claim's `updated_at`, or
/// the time of the statement (`$1`) if an app wrote something that is not a time there.
pub(super) const CLAIMED_AT: &str = "CASE WHEN strftime('%Y-%m-%d %H:%M:%f', updated_at) <= $1
    THEN strftime('%Y-%m-%d %H:%M:%f', updated_at) ELSE $1 END";

/// Pending rows in doubt for too long (`$1` now, `$2` the doubt's limit, `$3` the reason).
/// `in_doubt = 1`, where Postgres says `in_doubt`: SQLite matches the partial index
/// `outbox_in_doubt` only on the words of its own WHERE, and would scan the table otherwise.
pub(super) const GIVE_UP_IN_DOUBT: &str = "UPDATE outbox SET status = 'unknown',
            last_error = CASE WHEN kind = 'subscribe' THEN $4 ELSE $3 END, updated_at = $1
     WHERE status = 'pending' AND in_doubt = 1 AND in_doubt_since <= $2";

/// Forgets up to `$2` remembered pushes received before `$1`. By `rowid`: SQLite has no
/// `ctid`, and needs no `SKIP LOCKED` under its one writer.
pub(super) const FORGET_REPLAYS: &str =
    "DELETE FROM callback_replays WHERE rowid IN (SELECT rowid FROM callback_replays
         WHERE received_at < $1 LIMIT $2)";

/// The join pass: each unjoined template event to its sent row by account, msgid and openid.
/// `CROSS JOIN` keeps the events as the outer loop and `MATERIALIZED` keeps SQLite from
/// flattening the pairs into the update, where it chose to build an automatic index over all
/// of `outbox` instead (Postgres says the same with `LATERAL … LIMIT 1`). An event time
/// outside years 1970-9999 falls back to the time of the pass.
pub(super) static JOIN_EVENTS_TO_ROWS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH j AS MATERIALIZED (
            SELECT e.status AS status, e.create_time AS create_time, o.id AS id
            FROM inbound_events e CROSS JOIN outbox o
            WHERE e.joined_at IS NULL AND e.given_up_at IS NULL
              AND e.event IN {} AND ($2 IS NULL OR e.id = $2)
              AND o.account = e.account AND o.msgid = e.msgid AND o.touser = e.from_user
              AND o.status = 'sent')
         UPDATE outbox SET status = {DELIVERY_STATUS_SQL},
                delivery_status = j.status,
                delivered_at = CASE WHEN j.create_time BETWEEN 0 AND 253402300799
                    THEN strftime('%Y-%m-%d %H:%M:%f', j.create_time, 'unixepoch') ELSE $1 END,
                updated_at = $1
         FROM j
         WHERE outbox.id = j.id AND outbox.status = 'sent'",
        delivery_events!()
    )
});

/// The join's second step: the events whose row took their status are marked joined, with
/// the row's id. Correlated subqueries, which SQLite runs per event through `outbox_msgid`.
pub(super) const MARK_EVENTS_JOINED: &str = concat!(
    "UPDATE inbound_events SET joined_at = $1,
            outbox_id = (SELECT o.id FROM outbox o
                         WHERE o.account = inbound_events.account
                           AND o.msgid = inbound_events.msgid
                           AND o.touser = inbound_events.from_user)
     WHERE joined_at IS NULL AND given_up_at IS NULL AND event IN ",
    delivery_events!(),
    "
       AND ($2 IS NULL OR id = $2)
       AND EXISTS (SELECT 1 FROM outbox o
                   WHERE o.account = inbound_events.account
                     AND o.msgid = inbound_events.msgid
                     AND o.touser = inbound_events.from_user
                     AND o.delivery_status IS NOT NULL)"
);

/// The claim and, in its transaction, the quota of the rows `countable` gives terms for.
/// App-written text comes back as bytes so that one row with invalid UTF-8 cannot break the
/// claim of the others: it is failed with a reason instead.
pub(super) async fn claim(
    store: &SqliteStore,
    request: &ClaimRequest<'_>,
    countable: Countable<'_>,
) -> StoreResult<Vec<Claimed>> {
    store
        .with_writer(async |conn, looks| {
            let mut tx = loop {
                match conn.begin_with("BEGIN IMMEDIATE").await {
                    Ok(tx) => break tx,
                    Err(e) => looks.wait_after(e).await?,
                }
            };
            let sql = match request.per_user_since {
                None => &CLAIM,
                Some(_) => &CLAIM_PER_USER,
            };
            let mut claim = sqlx::query(sql.as_str())
                .bind(request.owner)
                .bind(Time(request.lease_until))
                .bind(Time(request.now))
                .bind(request.limit as i64);
            if let Some(since) = request.per_user_since {
                claim = claim.bind(Time(since));
            }
            let rows = claim.fetch_all(&mut *tx).await?;
            let rows: Vec<RawMessage> = rows
                .into_iter()
                .map(raw_message)
                .collect::<StoreResult<_>>()?;
            let terms = reserve::terms(&rows, countable);
            let items = reserve::claim_reservations(request, &rows, &terms);
            let results = reserve_in(&mut tx, &items).await?;
            tx.commit().await?;
            Ok(reserve::claimed(rows, &terms, results))
        })
        .await
}

pub(super) async fn claim_plan(
    pool: &SqlitePool,
    now: DateTime<Utc>,
    per_user_since: Option<DateTime<Utc>>,
) -> StoreResult<String> {
    let sql = match per_user_since {
        None => &CLAIM,
        Some(_) => &CLAIM_PER_USER,
    };
    let mut explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", **sql)))
        .bind("plan")
        .bind(Time(now))
        .bind(Time(now))
        .bind(64_i64);
    if let Some(since) = per_user_since {
        explain = explain.bind(Time(since));
    }
    let steps = explain.fetch_all(pool).await?;
    plan_text(&steps)
}

pub(super) async fn join_plan(pool: &SqlitePool, now: DateTime<Utc>) -> StoreResult<String> {
    let sql = AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", *JOIN_EVENTS_TO_ROWS));
    let steps = sqlx::query(sql)
        .bind(Time(now))
        .bind(None::<i64>)
        .fetch_all(pool)
        .await?;
    plan_text(&steps)
}

/// The outcomes of a group, each with its lease checked.
const FINISH_MANY: &str = "UPDATE outbox SET status = v.status, msgid = COALESCE(v.msgid, outbox.msgid),
                sent_at = CASE WHEN v.sent THEN v.now ELSE outbox.sent_at END,
                next_attempt_at = COALESCE(v.next_attempt_at, outbox.next_attempt_at),
                last_errcode = v.errcode, last_error = v.error,
                in_doubt = (v.in_doubt OR (outbox.in_doubt = 1 AND v.status IN ('pending', 'held'))),
                attempts = outbox.attempts - v.refund, lease_owner = NULL,
                lease_expires_at = NULL, updated_at = v.now, held_for = v.held_for,
                in_doubt_since = CASE WHEN (v.in_doubt OR (outbox.in_doubt = 1 AND v.status IN ('pending', 'held')))
                                      THEN COALESCE(outbox.in_doubt_since, v.began) END
         FROM (SELECT value ->> 'id' AS id, value ->> 'status' AS status,
                      value ->> 'msgid' AS msgid, value ->> 'sent' AS sent,
                      value ->> 'next_attempt_at' AS next_attempt_at,
                      value ->> 'errcode' AS errcode, value ->> 'error' AS error,
                      value ->> 'in_doubt' AS in_doubt, value ->> 'refund' AS refund,
                      value ->> 'now' AS now, value ->> 'held_for' AS held_for,
                      value ->> 'began' AS began
               FROM jsonb_each($1)) AS v
         WHERE outbox.id = v.id AND outbox.status = 'sending' AND outbox.lease_owner = $2
         RETURNING id";

/// A group of outcomes in one statement: the rows travel as one JSON array, read back with
/// `jsonb_each`, so the group costs one call into SQLite (and one hand-off to its thread)
/// rather than one per row.
pub(super) async fn finish_many(
    store: &SqliteStore,
    owner: &str,
    items: &[Finish],
) -> StoreResult<Vec<bool>> {
    let rows = json_array(&items.iter().map(FinishRow::new).collect::<Vec<_>>());
    let updated: Vec<i64> = store
        .with_writer(async |conn, looks| {
            // One statement, its own transaction: the lock is held for it alone.
            loop {
                let updated = sqlx::query_scalar(FINISH_MANY)
                    .bind(&rows)
                    .bind(owner)
                    .fetch_all(&mut *conn)
                    .await;
                match updated {
                    Err(e) => looks.wait_after(e).await?,
                    updated => break updated,
                }
            }
        })
        .await?;
    Ok(super::written(items, |i| i.id, updated))
}

/// Reserves quota for `items` inside `tx` (see `Store::reserve_quota_many`).
pub(super) async fn reserve_in(
    tx: &mut Transaction<'_, Sqlite>,
    items: &[QuotaReservation<'_>],
) -> StoreResult<Vec<Reserved>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    reserve::reserve(&mut SqliteCounters { tx, now: first.now }, items).await
}

/// The two statements of `Store::release_holds_with_room`, with the limits as one JSON array.
pub(super) async fn release_holds_with_room(
    tx: &mut Transaction<'_, Sqlite>,
    limits: &[HoldLimits<'_>],
    month: &str,
    day: &str,
    now: Time,
) -> StoreResult<u64> {
    let limits = json_array(
        &limits
            .iter()
            .map(|l| {
                serde_json::json!({
                    "account": l.account,
                    "active": l.active_templates,
                    "monthly": l.monthly_per_template,
                    "daily": l.daily_per_account,
                })
            })
            .collect::<Vec<_>>(),
    );
    let months = sqlx::query(
        "WITH released AS MATERIALIZED (
            SELECT id FROM (
                SELECT h.id AS id, (l.value ->> 'monthly') - q.used AS room,
                       ROW_NUMBER() OVER (PARTITION BY h.account, h.template_id
                                          ORDER BY h.priority DESC, h.id) AS n
                FROM json_each($1) l
                JOIN quota_usage q ON q.account = l.value ->> 'account' AND q.period = $2
                                  AND q.scope LIKE 'template:%'
                                  AND q.used < l.value ->> 'monthly'
                JOIN outbox h ON h.status = 'held' AND h.account = q.account
                             AND h.held_for = 'monthly quota'
                             -- Subscription notifications have their own month
                             -- (subscribe.monthly_per_template): released when it ends.
                             AND h.kind = 'template'
                             AND h.template_id = substr(q.scope, 10))
            WHERE n <= room)
         UPDATE outbox SET status = 'pending', held_for = NULL, next_attempt_at = $3,
                updated_at = $3
         WHERE id IN (SELECT id FROM released) AND status = 'held'",
    )
    .bind(&limits)
    .bind(month)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let others = sqlx::query(
        "WITH room AS MATERIALIZED (
            SELECT l.value ->> 'account' AS account, 'daily quota' AS held_for,
                   (l.value ->> 'daily')
                     - COALESCE((SELECT q.used FROM quota_usage q
                                 WHERE q.account = l.value ->> 'account'
                                   AND q.scope = 'account' AND q.period = $2), 0) AS room
            FROM json_each($1) l
            UNION ALL
            SELECT l.value ->> 'account', 'template',
                   (l.value ->> 'active')
                     - (SELECT count(*) FROM templates t
                        WHERE t.account = l.value ->> 'account' AND t.in_use)
            FROM json_each($1) l
            WHERE l.value ->> 'active' IS NOT NULL),
         released AS MATERIALIZED (
            SELECT id FROM (
                SELECT h.id AS id, room.room AS room,
                       ROW_NUMBER() OVER (PARTITION BY h.account, h.held_for
                                          ORDER BY h.priority DESC, h.id) AS n
                FROM room JOIN outbox h ON h.status = 'held' AND h.account = room.account
                                       AND h.held_for = room.held_for
                WHERE room.room > 0)
            WHERE n <= room
            UNION
            SELECT h.id FROM templates t
            JOIN outbox h ON h.status = 'held' AND h.account = t.account
                         AND h.held_for = 'template' AND h.template_id = t.template_id
            WHERE t.in_use
              AND t.account IN (SELECT l.value ->> 'account' FROM json_each($1) l))
         UPDATE outbox SET status = 'pending', held_for = NULL, next_attempt_at = $3,
                updated_at = $3
         WHERE id IN (SELECT id FROM released) AND status = 'held'",
    )
    .bind(&limits)
    .bind(day)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(months.rows_affected() + others.rows_affected())
}

struct SqliteCounters<'t, 'c> {
    tx: &'t mut Transaction<'c, Sqlite>,
    now: DateTime<Utc>,
}

/// The rows of a group as one JSON array (one call into SQLite), but one statement per
/// counter: in-process, a prepared single-row statement costs less than one that reads the
/// group from JSON (measured: the JSON form drained 5-10 % slower).
impl reserve::Counters for SqliteCounters<'_, '_> {
    async fn mark(&mut self, items: &[QuotaReservation<'_>]) -> StoreResult<Vec<i64>> {
        let rows: Vec<MarkRow> = items.iter().map(MarkRow::new).collect();
        sqlx::query_scalar(
            "UPDATE outbox SET quota_month = v.month, quota_day = v.day
             FROM (SELECT value ->> 'id' AS id, value ->> 'owner' AS owner,
                          value ->> 'month' AS month, value ->> 'day' AS day
                   FROM jsonb_each($1)) AS v
             WHERE outbox.id = v.id AND outbox.status = 'sending'
               AND outbox.lease_owner = v.owner
             RETURNING id",
        )
        .bind(json_array(&rows))
        .fetch_all(&mut **self.tx)
        .await
    }

    async fn unmark(&mut self, ids: Vec<i64>) -> StoreResult<()> {
        sqlx::query(
            "UPDATE outbox SET quota_month = NULL, quota_day = NULL
             WHERE id IN (SELECT value FROM json_each($1))",
        )
        .bind(json_array(&ids))
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn lock_all(&mut self, keys: &[CounterKey]) -> StoreResult<HashMap<CounterKey, i64>> {
        // The transaction holds SQLite's write lock already: this creates missing rows and
        // reads the counts.
        let mut used = HashMap::with_capacity(keys.len());
        for key in keys {
            let count: i64 = sqlx::query_scalar(
                "INSERT INTO quota_usage (account, scope, period, used, updated_at)
                 VALUES ($1, $2, $3, 0, $4)
                 ON CONFLICT (account, scope, period) DO UPDATE SET used = quota_usage.used
                 RETURNING CAST(used AS BIGINT)",
            )
            .bind(&key.account)
            .bind(&key.scope)
            .bind(&key.period)
            .bind(Time(self.now))
            .fetch_one(&mut **self.tx)
            .await?;
            used.insert(key.clone(), count);
        }
        Ok(used)
    }

    async fn add_all(&mut self, adds: &[(CounterKey, i64)]) -> StoreResult<()> {
        for (key, n) in adds {
            sqlx::query(
                "UPDATE quota_usage SET used = used + $4, updated_at = $5
                 WHERE account = $1 AND scope = $2 AND period = $3",
            )
            .bind(&key.account)
            .bind(&key.scope)
            .bind(&key.period)
            .bind(n)
            .bind(Time(self.now))
            .execute(&mut **self.tx)
            .await?;
        }
        Ok(())
    }
}

/// The steps of an `EXPLAIN QUERY PLAN`, one per line.
fn plan_text(steps: &[SqliteRow]) -> StoreResult<String> {
    let steps: Vec<String> = steps
        .iter()
        .map(|row| row.try_get::<String, _>("detail"))
        .collect::<Result<_, _>>()?;
    Ok(steps.join("\n"))
}

/// Rows for a set-based statement, as the JSON array its `jsonb_each` reads. `jsonb_each`,
/// not `json_each`: that one renders every element back to text for `value`, and each `->>`
/// parses it again (measured: 4-5 % of the daemon's CPU in a drain).
fn json_array<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).expect("plain values always serialise")
}

/// One outcome as `finish_many` reads it from JSON.
#[derive(serde::Serialize)]
struct FinishRow {
    id: i64,
    status: &'static str,
    msgid: Option<i64>,
    sent: bool,
    next_attempt_at: Option<String>,
    errcode: Option<i32>,
    error: Option<String>,
    in_doubt: bool,
    refund: i32,
    now: String,
    held_for: Option<&'static str>,
    began: String,
}

impl FinishRow {
    fn new(item: &Finish) -> FinishRow {
        let c = item.outcome.columns(item.now);
        FinishRow {
            id: item.id,
            status: c.status.as_str(),
            msgid: c.msgid,
            sent: c.sent,
            next_attempt_at: c.next_attempt_at.map(ts),
            errcode: c.errcode.map(errcode_column),
            error: c.error,
            in_doubt: c.in_doubt,
            refund: c.refund_attempt,
            now: ts(item.now),
            held_for: c.held_for.map(|h| h.as_str()),
            began: ts(item.attempt_began),
        }
    }
}

/// A row marked with the periods its quota is counted in, as `reserve_quota_many` reads it.
#[derive(serde::Serialize)]
struct MarkRow<'a> {
    id: i64,
    owner: &'a str,
    month: &'a str,
    day: &'a str,
}

impl<'a> MarkRow<'a> {
    fn new(r: &QuotaReservation<'a>) -> MarkRow<'a> {
        MarkRow {
            id: r.id,
            owner: r.owner,
            month: r.month,
            day: r.day,
        }
    }
}

fn raw_message(row: SqliteRow) -> StoreResult<RawMessage> {
    let id = row.try_get("id")?;
    let mut r = RowReader::new(&row);
    let account = r.text("account").unwrap_or_default();
    let expires_at = r.time("expires_at");
    let in_doubt_since = r.time("in_doubt_since");
    let message = RawMessage {
        id,
        account,
        touser: r.text("touser"),
        template_id: r.text("template_id"),
        data: r.text("data"),
        url: r.text("url"),
        miniprogram: r.text("miniprogram"),
        client_msg_id: r.text("client_msg_id"),
        expires_at,
        attempts: r.get("attempts"),
        in_doubt_since,
        in_doubt: r.get("in_doubt"),
        unreadable: None,
        suppressed: r.get("suppressed"),
        refused: r.get("refused"),
        quota_month: r.get("quota_month"),
        quota_day: r.get("quota_day"),
        template_in_use: r.get("template_in_use"),
        template_content: r.get("template_content"),
        kind: r.text("kind"),
        page: r.text("page"),
        first_due: r.time("first_due"),
        long_term: r.get("long_term"),
    };
    Ok(RawMessage {
        unreadable: r.problem,
        ..message
    })
}
