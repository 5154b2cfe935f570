//! SQLite: the embedded default. WAL so apps read and insert while the daemon writes; every
//! write transaction is `BEGIN IMMEDIATE`, so a busy database waits (`busy_timeout`) instead of
//! failing a lock upgrade. Times are UTC text `YYYY-MM-DD HH:MM:SS.SSS` (see the migration).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::reserve::{self, CounterKey};
use super::wal_index::WalIndex;
use super::{
    AccountLimitsRow, ClaimRequest, Claimed, Countable, EXPIRED, Finish, GAVE_UP_IN_DOUBT,
    HoldLimits, InboundEvent, JoinCounts, JoinPass, LEASE_EXPIRED, MISSING_FROM_LIST,
    OPENID_MISMATCH, PRUNABLE, QuotaReservation, RELEASED_AT_SHUTDOWN, Reserved, RowCount,
    RowReader, StoreResult, StoredToken, SyncedTemplate, TemplateRow, TemplateUse, TokenLease,
};
use crate::config::Config;
use crate::domain::message::RawMessage;
use crate::domain::quota::{ACCOUNT_SCOPE, template_scope};

/// How often the watcher looks at the WAL index header for a commit.
const WATCH_INTERVAL: Duration = Duration::from_millis(2);
/// How often it asks the database instead when the WAL index cannot be read.
const WATCH_FALLBACK_INTERVAL: Duration = Duration::from_millis(10);

const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// A time in the text form the schema stores and compares.
pub fn ts(time: DateTime<Utc>) -> String {
    time.format(TIME_FORMAT).to_string()
}

/// Reads a stored time; `None` for anything else.
pub fn parse_ts(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// The claim: due rows in priority order, through the partial index `outbox_claim`.
/// `LIMIT ?4 + 0`, not `LIMIT ?4`: SQLite plans a bare bound LIMIT by its value and recompiles
/// the statement whenever the value changes, which for a claim of "as many as there is room
/// for" was every time (measured: 3-4 % of the daemon's CPU, parsing and planning).
const CLAIM: &str = "UPDATE outbox SET status = 'sending', lease_owner = ?1, lease_expires_at = ?2,
                    attempts = min(attempts, 999999) + 1,
                    updated_at = ?3
             WHERE id IN (
                SELECT id FROM outbox
                WHERE status = 'pending' AND next_attempt_at <= ?3
                  AND (send_after IS NULL OR send_after <= ?3)
                  AND NOT EXISTS (SELECT 1 FROM account_pauses p
                                  WHERE p.account = outbox.account AND p.paused_until > ?3)
                ORDER BY priority DESC, next_attempt_at, id
                LIMIT ?4 + 0)
             RETURNING id, CAST(account AS BLOB) AS account, CAST(touser AS BLOB) AS touser,
                CAST(template_id AS BLOB) AS template_id, CAST(data AS BLOB) AS data,
                CAST(url AS BLOB) AS url, CAST(miniprogram AS BLOB) AS miniprogram,
                CAST(client_msg_id AS BLOB) AS client_msg_id, expires_at, attempts,
                in_doubt_since, in_doubt,
                EXISTS (SELECT 1 FROM suppressed_openids s
                        WHERE s.account = outbox.account AND s.openid = outbox.touser) AS suppressed,
                quota_month, quota_day,
                (SELECT t.in_use FROM templates t WHERE t.account = outbox.account
                    AND t.template_id = outbox.template_id) AS template_in_use,
                (SELECT t.content FROM templates t WHERE t.account = outbox.account
                    AND t.template_id = outbox.template_id) AS template_content";

/// When a row in flight was claimed, for the start of its doubt: the claim's `updated_at`, or
/// the time of the statement (`?1`) if an app wrote something that is not a time there.
const CLAIMED_AT: &str = "CASE WHEN strftime('%Y-%m-%d %H:%M:%f', updated_at) <= ?1
    THEN strftime('%Y-%m-%d %H:%M:%f', updated_at) ELSE ?1 END";

/// The join pass: each unjoined template event to its sent row by account, msgid and openid
/// (see Postgres' twin). `CROSS JOIN` keeps the events as the outer loop and `MATERIALIZED`
/// keeps SQLite from flattening the pairs into the update, where it chose to build an
/// automatic index over all of `outbox` instead.
const JOIN_EVENTS_TO_ROWS: &str = "WITH j AS MATERIALIZED (
                SELECT e.status AS status, e.create_time AS create_time, o.id AS id
                FROM inbound_events e CROSS JOIN outbox o
                WHERE e.joined_at IS NULL AND e.given_up_at IS NULL
                  AND e.event = 'TEMPLATESENDJOBFINISH' AND (?2 IS NULL OR e.id = ?2)
                  AND o.account = e.account AND o.msgid = e.msgid AND o.touser = e.from_user
                  AND o.status = 'sent')
             UPDATE outbox SET status = CASE WHEN lower(j.status) = 'success' THEN 'delivered'
                              WHEN lower(j.status) LIKE 'failed%block%' THEN 'blocked'
                              WHEN lower(j.status) LIKE 'failed%' THEN 'undelivered'
                              ELSE outbox.status END,
                    delivery_status = j.status,
                    delivered_at = CASE WHEN j.create_time BETWEEN 0 AND 253402300799
                        THEN strftime('%Y-%m-%d %H:%M:%f', j.create_time, 'unixepoch') ELSE ?1 END,
                    updated_at = ?1
             FROM j
             WHERE outbox.id = j.id AND outbox.status = 'sent'";

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// For the watcher's own connection; boxed to keep `Store` small.
    options: Arc<SqliteConnectOptions>,
}

impl SqliteStore {
    pub async fn connect(config: &Config) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(&config.database_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a row marked sent survives a power cut, so it is never sent again.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_millis(config.database.busy_timeout_ms))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.database.max_connections)
            // Nothing to ping: the database is a local file, and a ping is one more hand-off
            // to the connection's thread per use.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        Ok(SqliteStore {
            pool,
            options: Arc::new(options),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await
    }

    pub(super) async fn claim_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        let steps = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {CLAIM}")))
            .bind("plan")
            .bind(ts(now))
            .bind(ts(now))
            .bind(64_i64)
            .fetch_all(&self.pool)
            .await?;
        plan_text(&steps)
    }

    pub(super) async fn join_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        let sql = AssertSqlSafe(format!("EXPLAIN QUERY PLAN {JOIN_EVENTS_TO_ROWS}"));
        let steps = sqlx::query(sql)
            .bind(ts(now))
            .bind(None::<i64>)
            .fetch_all(&self.pool)
            .await?;
        plan_text(&steps)
    }

    pub async fn claim(
        &self,
        request: &ClaimRequest<'_>,
        countable: Countable<'_>,
    ) -> StoreResult<Vec<Claimed>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // App-written text comes back as bytes so that one row with invalid UTF-8 cannot break
        // the claim of the others: it is failed with a reason instead.
        let rows = sqlx::query(CLAIM)
            .bind(request.owner)
            .bind(ts(request.lease_until))
            .bind(ts(request.now))
            .bind(request.limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let rows: Vec<RawMessage> = rows
            .into_iter()
            .map(raw_message)
            .collect::<StoreResult<_>>()?;
        let terms = reserve::terms(&rows, countable);
        let items = reserve::claim_reservations(request, &rows, &terms);
        let results = reserve_in(&mut tx, &items).await?;
        tx.commit().await?;
        Ok(reserve::claimed(rows, &terms, results))
    }

    /// A group of outcomes in one statement: the rows travel as one JSON array, read back with
    /// `jsonb_each`, so the group costs one call into SQLite (and one hand-off to its thread)
    /// rather than one per row.
    pub(super) async fn finish_many(
        &self,
        owner: &str,
        items: &[Finish],
    ) -> StoreResult<Vec<bool>> {
        let rows: Vec<FinishRow> = items.iter().map(FinishRow::new).collect();
        let updated: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox SET status = v.status, msgid = COALESCE(v.msgid, outbox.msgid),
                    sent_at = CASE WHEN v.sent THEN v.now ELSE outbox.sent_at END,
                    next_attempt_at = COALESCE(v.next_attempt_at, outbox.next_attempt_at),
                    last_errcode = v.errcode, last_error = v.error, in_doubt = v.in_doubt,
                    attempts = outbox.attempts - v.refund, lease_owner = NULL,
                    lease_expires_at = NULL, updated_at = v.now, held_for = v.held_for,
                    in_doubt_since = CASE WHEN v.in_doubt
                                          THEN COALESCE(outbox.in_doubt_since, v.began) END
             FROM (SELECT value ->> 'id' AS id, value ->> 'status' AS status,
                          value ->> 'msgid' AS msgid, value ->> 'sent' AS sent,
                          value ->> 'next_attempt_at' AS next_attempt_at,
                          value ->> 'errcode' AS errcode, value ->> 'error' AS error,
                          value ->> 'in_doubt' AS in_doubt, value ->> 'refund' AS refund,
                          value ->> 'now' AS now, value ->> 'held_for' AS held_for,
                          value ->> 'began' AS began
                   FROM jsonb_each(?1)) AS v
             WHERE outbox.id = v.id AND outbox.status = 'sending' AND outbox.lease_owner = ?2
             RETURNING id",
        )
        .bind(json_array(&rows))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        let updated: HashSet<i64> = updated.into_iter().collect();
        Ok(items.iter().map(|i| updated.contains(&i.id)).collect())
    }

    pub(super) async fn extend_lease(
        &self,
        owner: &str,
        id: i64,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE outbox SET lease_expires_at = ?1
             WHERE id = ?2 AND status = 'sending' AND lease_owner = ?3",
        )
        .bind(ts(lease_until))
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn rescue_expired_leases(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'pending', in_doubt = 1,
                    in_doubt_since = COALESCE(in_doubt_since, {CLAIMED_AT}), lease_owner = NULL,
                    lease_expires_at = NULL, next_attempt_at = ?1, last_error = ?2, updated_at = ?1
             WHERE status = 'sending' AND lease_expires_at < ?1"
        )))
        .bind(ts(now))
        .bind(LEASE_EXPIRED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn release_owned(&self, owner: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'pending', in_doubt = 1,
                    in_doubt_since = COALESCE(in_doubt_since, {CLAIMED_AT}), lease_owner = NULL,
                    lease_expires_at = NULL, next_attempt_at = ?1, last_error = ?2, updated_at = ?1
             WHERE status = 'sending' AND lease_owner = ?3"
        )))
        .bind(ts(now))
        .bind(RELEASED_AT_SHUTDOWN)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn expire_overdue(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'expired', last_error = ?2, updated_at = ?1
             WHERE status IN ('pending', 'held') AND expires_at <= ?1",
        )
        .bind(ts(now))
        .bind(EXPIRED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn give_up_in_doubt(
        &self,
        first_attempt_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'unknown', last_error = ?3, updated_at = ?1
             WHERE status = 'pending' AND in_doubt = 1 AND in_doubt_since <= ?2",
        )
        .bind(ts(now))
        .bind(ts(first_attempt_before))
        .bind(GAVE_UP_IN_DOUBT)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn pause_account(
        &self,
        account: &str,
        until: DateTime<Utc>,
        errcode: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO account_pauses (account, paused_until, errcode, reason, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (account) DO UPDATE SET paused_until = excluded.paused_until,
                errcode = excluded.errcode, reason = excluded.reason,
                created_at = excluded.created_at",
        )
        .bind(account)
        .bind(ts(until))
        .bind(errcode)
        .bind(super::bounded(reason))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn load_token(&self, account: &str) -> StoreResult<Option<StoredToken>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT access_token, expires_at FROM access_tokens
             WHERE account = ?1 AND access_token IS NOT NULL AND expires_at IS NOT NULL",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(token, expires)| {
            parse_ts(&expires).map(|expires_at| StoredToken { token, expires_at })
        }))
    }

    pub(super) async fn lease_token_refresh(&self, lease: &TokenLease<'_>) -> StoreResult<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO access_tokens (account) VALUES (?1) ON CONFLICT DO NOTHING")
            .bind(lease.account)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(
            "UPDATE access_tokens SET refresh_owner = ?2, refresh_lease_until = ?3
             WHERE account = ?1
               AND (refresh_lease_until IS NULL OR refresh_lease_until < ?4)
               AND (access_token IS NULL OR expires_at <= ?5 OR access_token = ?6)",
        )
        .bind(lease.account)
        .bind(lease.owner)
        .bind(ts(lease.lease_until))
        .bind(ts(lease.now))
        .bind(ts(lease.refresh_before))
        .bind(lease.failing)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn save_token(
        &self,
        account: &str,
        owner: &str,
        token: &StoredToken,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE access_tokens SET access_token = ?3, expires_at = ?4, refreshed_at = ?5,
                    refresh_owner = NULL, refresh_lease_until = NULL
             WHERE account = ?1 AND refresh_owner = ?2",
        )
        .bind(account)
        .bind(owner)
        .bind(&token.token)
        .bind(ts(token.expires_at))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn release_token_lease(&self, account: &str, owner: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE access_tokens SET refresh_owner = NULL, refresh_lease_until = NULL
             WHERE account = ?1 AND refresh_owner = ?2",
        )
        .bind(account)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn record_inbound(
        &self,
        e: &InboundEvent,
        signed: &super::SignedPush,
        now: DateTime<Utc>,
    ) -> StoreResult<super::Recorded> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let first = sqlx::query(
            "INSERT INTO callback_replays (account, timestamp_param, nonce, body_sha1, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (account, timestamp_param, nonce) DO NOTHING",
        )
        .bind(&e.account)
        .bind(&signed.timestamp)
        .bind(&signed.nonce)
        .bind(&signed.body_sha1)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            let body_sha1: String = sqlx::query_scalar(
                "SELECT body_sha1 FROM callback_replays
                 WHERE account = ?1 AND timestamp_param = ?2 AND nonce = ?3",
            )
            .bind(&e.account)
            .bind(&signed.timestamp)
            .bind(&signed.nonce)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(if body_sha1 == signed.body_sha1 {
                super::Recorded::Repeat
            } else {
                super::Recorded::Replayed
            });
        }
        sqlx::query(
            "DELETE FROM callback_replays WHERE rowid IN (SELECT rowid FROM callback_replays
                 WHERE received_at < ?1 LIMIT ?2)",
        )
        .bind(ts(signed.forget_before))
        .bind(super::REPLAYS_FORGOTTEN_PER_PUSH)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO inbound_events (account, dedup_key, msg_type, event, from_user, to_user,
                    create_time, msgid, status, raw_xml, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (account, dedup_key) DO NOTHING",
        )
        .bind(&e.account)
        .bind(&e.dedup_key)
        .bind(&e.msg_type)
        .bind(&e.event)
        .bind(&e.from_user)
        .bind(&e.to_user)
        .bind(e.create_time)
        .bind(e.msgid)
        .bind(&e.status)
        .bind(&e.raw_xml)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted && let (Some(suppress), Some(openid)) = (e.suppression(), &e.from_user) {
            let change = if suppress {
                sqlx::query(
                    "INSERT INTO suppressed_openids (account, openid, since) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&e.account)
                .bind(openid)
                .bind(ts(now))
            } else {
                sqlx::query("DELETE FROM suppressed_openids WHERE account = ?1 AND openid = ?2")
                    .bind(&e.account)
                    .bind(openid)
            };
            change.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(if inserted {
            super::Recorded::New
        } else {
            super::Recorded::Repeat
        })
    }

    /// Driven from the unjoined events (few, bounded by the window) to their rows by
    /// `outbox_msgid`, never the other way: left to itself, the planner walked every sent row's
    /// msgid each pass (see `super::postgres` for the same statements).
    pub(super) async fn join_delivery_events(
        &self,
        pass: &JoinPass<'_>,
    ) -> StoreResult<JoinCounts> {
        let now = ts(pass.now);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let joined = sqlx::query(JOIN_EVENTS_TO_ROWS)
            .bind(&now)
            .bind(pass.only)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(
            "UPDATE inbound_events SET joined_at = ?1,
                    outbox_id = (SELECT o.id FROM outbox o
                                 WHERE o.account = inbound_events.account
                                   AND o.msgid = inbound_events.msgid
                                   AND o.touser = inbound_events.from_user)
             WHERE joined_at IS NULL AND given_up_at IS NULL AND event = 'TEMPLATESENDJOBFINISH'
               AND (?2 IS NULL OR id = ?2)
               AND EXISTS (SELECT 1 FROM outbox o
                           WHERE o.account = inbound_events.account
                             AND o.msgid = inbound_events.msgid
                             AND o.touser = inbound_events.from_user
                             AND o.delivery_status IS NOT NULL)",
        )
        .bind(&now)
        .bind(pass.only)
        .execute(&mut *tx)
        .await?;
        let mismatched = sqlx::query(
            "UPDATE inbound_events SET given_up_at = ?1, join_problem = ?3
             WHERE joined_at IS NULL AND given_up_at IS NULL AND event = 'TEMPLATESENDJOBFINISH'
               AND (?2 IS NULL OR id = ?2)
               AND EXISTS (SELECT 1 FROM outbox o WHERE o.account = inbound_events.account
                           AND o.msgid = inbound_events.msgid)
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.account = inbound_events.account
                               AND o.msgid = inbound_events.msgid
                               AND o.touser = inbound_events.from_user)",
        )
        .bind(&now)
        .bind(pass.only)
        .bind(OPENID_MISMATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let given_up = sqlx::query(
            "UPDATE inbound_events SET given_up_at = ?1, join_problem = ?4
             WHERE joined_at IS NULL AND given_up_at IS NULL AND event = 'TEMPLATESENDJOBFINISH'
               AND (?2 IS NULL OR id = ?2) AND received_at < ?3",
        )
        .bind(&now)
        .bind(pass.only)
        .bind(ts(pass.received_before))
        .bind(pass.no_row_problem())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(JoinCounts {
            joined,
            mismatched,
            given_up,
        })
    }

    pub(super) async fn unjoined_events(&self, limit: i64) -> StoreResult<Vec<i64>> {
        sqlx::query_scalar(
            "SELECT id FROM inbound_events
             WHERE event = 'TEMPLATESENDJOBFINISH' AND joined_at IS NULL AND given_up_at IS NULL
             ORDER BY received_at LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    pub(super) async fn give_up_event(
        &self,
        id: i64,
        problem: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE inbound_events SET given_up_at = ?2, join_problem = ?3
             WHERE id = ?1 AND joined_at IS NULL",
        )
        .bind(id)
        .bind(ts(now))
        .bind(super::bounded(problem))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reserves quota for a group of rows in one transaction with a few statements per
    /// counter rather than per row: mark the rows still ours, lock each counter once (in the
    /// order of `reserve::counter_pairs`, so daemons cannot deadlock), grant rows in order while
    /// both counters have room, add what was granted, and unmark the rows that must wait.
    pub(super) async fn reserve_quota_many(
        &self,
        items: &[QuotaReservation<'_>],
    ) -> StoreResult<Vec<Reserved>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let results = reserve_in(&mut tx, items).await?;
        tx.commit().await?;
        Ok(results)
    }

    pub(super) async fn release_quota(&self, r: &QuotaReservation<'_>) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let unmarked = sqlx::query(
            "UPDATE outbox SET quota_month = NULL, quota_day = NULL
             WHERE id = ?1 AND status = 'sending' AND lease_owner = ?2 AND quota_month IS NOT NULL",
        )
        .bind(r.id)
        .bind(r.owner)
        .execute(&mut *tx)
        .await?;
        // Only the holder of the lease may give the row's count back.
        if unmarked.rows_affected() == 1 {
            let scope = template_scope(r.template_id);
            for (scope, period) in [(ACCOUNT_SCOPE, r.day), (scope.as_str(), r.month)] {
                sqlx::query(
                    "UPDATE quota_usage SET used = used - 1, updated_at = ?4
                     WHERE account = ?1 AND scope = ?2 AND period = ?3 AND used > 0",
                )
                .bind(r.account)
                .bind(scope)
                .bind(period)
                .bind(ts(r.now))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A write transaction (BEGIN IMMEDIATE serialises it with every other writer, daemons
    /// included), and whether the template is in use.
    async fn change_template(
        &self,
        account: &str,
        template_id: &str,
    ) -> StoreResult<(Transaction<'static, Sqlite>, Option<bool>)> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let in_use = sqlx::query_scalar(
            "SELECT in_use FROM templates WHERE account = ?1 AND template_id = ?2",
        )
        .bind(account)
        .bind(template_id)
        .fetch_optional(&mut *tx)
        .await?;
        Ok((tx, in_use))
    }

    pub(super) async fn take_template_into_use(
        &self,
        account: &str,
        template_id: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<TemplateUse> {
        let (mut tx, in_use) = self.change_template(account, template_id).await?;
        if in_use == Some(true) {
            return Ok(TemplateUse::InUse);
        }
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE account = ?1 AND in_use")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?;
        if count >= i64::from(limit) {
            return Ok(TemplateUse::NoRoom { in_use: count });
        }
        sqlx::query(
            "INSERT INTO templates (account, template_id, in_use, in_use_since) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (account, template_id) DO UPDATE SET in_use = 1,
                in_use_since = excluded.in_use_since, note = NULL",
        )
        .bind(account)
        .bind(template_id)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(TemplateUse::InUse)
    }

    pub(super) async fn retire_template(
        &self,
        account: &str,
        template_id: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let (mut tx, was_in_use) = self.change_template(account, template_id).await?;
        sqlx::query(
            "INSERT INTO templates (account, template_id, in_use, note) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT (account, template_id) DO UPDATE SET in_use = 0, note = excluded.note",
        )
        .bind(account)
        .bind(template_id)
        .bind(note)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = ?2
             WHERE status = 'held' AND held_for = 'template' AND account = ?1",
        )
        .bind(account)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(was_in_use == Some(true))
    }

    pub(super) async fn sync_templates(
        &self,
        account: &str,
        listed: &[SyncedTemplate],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for t in listed {
            sqlx::query(
                "INSERT INTO templates (account, template_id, title, content, last_seen_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account, template_id) DO UPDATE SET title = excluded.title,
                    content = excluded.content, last_seen_at = excluded.last_seen_at, note = NULL",
            )
            .bind(account)
            .bind(&t.template_id)
            .bind(&t.title)
            .bind(&t.content)
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE templates SET note = ?3
             WHERE account = ?1 AND (last_seen_at IS NULL OR last_seen_at < ?2) AND note IS NULL",
        )
        .bind(account)
        .bind(ts(now))
        .bind(MISSING_FROM_LIST)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn list_templates(&self) -> StoreResult<Vec<TemplateRow>> {
        sqlx::query_as(
            "SELECT account, template_id, title, in_use, note FROM templates
             ORDER BY account, in_use DESC, template_id",
        )
        .fetch_all(&self.pool)
        .await
    }

    pub(super) async fn quota_usage(
        &self,
        month: &str,
        day: &str,
    ) -> StoreResult<Vec<(String, String, String, i64)>> {
        sqlx::query_as(
            "SELECT account, scope, period, used FROM quota_usage WHERE period IN (?1, ?2)
             ORDER BY account, scope",
        )
        .bind(month)
        .bind(day)
        .fetch_all(&self.pool)
        .await
    }

    pub(super) async fn release_due_holds(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', held_for = NULL, updated_at = ?1
             WHERE status = 'held' AND next_attempt_at <= ?1",
        )
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The twin of Postgres' statements (see there), with the limits as a JSON array.
    pub(super) async fn release_holds_with_room(
        &self,
        limits: &[HoldLimits<'_>],
        month: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // A read first: no held row, no write lock taken.
        let any_held: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'held')")
                .fetch_one(&self.pool)
                .await?;
        if !any_held {
            return Ok(0);
        }
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let months = sqlx::query(
            "WITH released AS MATERIALIZED (
                SELECT id FROM (
                    SELECT h.id AS id, (l.value ->> 'monthly') - q.used AS room,
                           ROW_NUMBER() OVER (PARTITION BY h.account, h.template_id
                                              ORDER BY h.priority DESC, h.id) AS n
                    FROM json_each(?1) l
                    JOIN quota_usage q ON q.account = l.value ->> 'account' AND q.period = ?2
                                      AND q.scope LIKE 'template:%'
                                      AND q.used < l.value ->> 'monthly'
                    JOIN outbox h ON h.status = 'held' AND h.account = q.account
                                 AND h.held_for = 'monthly quota'
                                 AND h.template_id = substr(q.scope, 10))
                WHERE n <= room)
             UPDATE outbox SET status = 'pending', held_for = NULL, next_attempt_at = ?3,
                    updated_at = ?3
             WHERE id IN (SELECT id FROM released) AND status = 'held'",
        )
        .bind(&limits)
        .bind(month)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let others = sqlx::query(
            "WITH room AS MATERIALIZED (
                SELECT l.value ->> 'account' AS account, 'daily quota' AS held_for,
                       (l.value ->> 'daily')
                         - COALESCE((SELECT q.used FROM quota_usage q
                                     WHERE q.account = l.value ->> 'account'
                                       AND q.scope = 'account' AND q.period = ?2), 0) AS room
                FROM json_each(?1) l
                UNION ALL
                SELECT l.value ->> 'account', 'template',
                       (l.value ->> 'active')
                         - (SELECT count(*) FROM templates t
                            WHERE t.account = l.value ->> 'account' AND t.in_use)
                FROM json_each(?1) l
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
                  AND t.account IN (SELECT l.value ->> 'account' FROM json_each(?1) l))
             UPDATE outbox SET status = 'pending', held_for = NULL, next_attempt_at = ?3,
                    updated_at = ?3
             WHERE id IN (SELECT id FROM released) AND status = 'held'",
        )
        .bind(&limits)
        .bind(day)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(months.rows_affected() + others.rows_affected())
    }

    pub(super) async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> StoreResult<i64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO daemons (owner, started_at, heartbeat_at) VALUES (?1, ?2, ?2)
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(owner)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM daemons WHERE heartbeat_at < ?1")
            .bind(ts(alive_since - chrono::Duration::hours(1)))
            .execute(&mut *tx)
            .await?;
        let alive: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM daemons WHERE heartbeat_at >= ?1")
                .bind(ts(alive_since))
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(alive)
    }

    pub(super) async fn remove_daemon(&self, owner: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM daemons WHERE owner = ?1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn prune(&self, cutoff: DateTime<Utc>, batch: i64) -> StoreResult<(u64, u64)> {
        // Terminal statuses only: a waiting row is never deleted, however old.
        let rows = format!(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                 WHERE status IN {PRUNABLE} AND updated_at < ?1 LIMIT ?2)"
        );
        let rows = sqlx::query(AssertSqlSafe(rows))
            .bind(ts(cutoff))
            .bind(batch)
            .execute(&self.pool)
            .await?;
        let events = sqlx::query(
            "DELETE FROM inbound_events WHERE id IN (SELECT id FROM inbound_events
                 WHERE received_at < ?1 LIMIT ?2)",
        )
        .bind(ts(cutoff))
        .bind(batch)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM quota_usage WHERE updated_at < ?1")
            .bind(ts(cutoff - chrono::Duration::days(400)))
            .execute(&self.pool)
            .await?;
        Ok((rows.rows_affected(), events.rows_affected()))
    }

    pub(super) async fn record_limits(
        &self,
        rows: &[AccountLimitsRow],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        for row in rows {
            sqlx::query(
                "INSERT INTO account_limits (account, active_templates, monthly_per_template,
                     daily_per_account, rate_per_second, timezone, utc_offset_minutes, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (account) DO UPDATE SET
                     active_templates = excluded.active_templates,
                     monthly_per_template = excluded.monthly_per_template,
                     daily_per_account = excluded.daily_per_account,
                     rate_per_second = excluded.rate_per_second,
                     timezone = excluded.timezone,
                     utc_offset_minutes = excluded.utc_offset_minutes,
                     updated_at = excluded.updated_at",
            )
            .bind(&row.account)
            .bind(i64::from(row.limits.active_templates))
            .bind(i64::from(row.limits.monthly_per_template))
            .bind(i64::from(row.limits.daily_per_account))
            .bind(i64::from(row.limits.rate_per_second))
            .bind(&row.timezone)
            .bind(row.utc_offset_minutes)
            .bind(ts(now))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn row_counts(&self) -> StoreResult<Vec<RowCount>> {
        sqlx::query_as(
            "SELECT account, status, held_for, COUNT(*) AS rows
             FROM outbox GROUP BY account, status, held_for",
        )
        .fetch_all(&self.pool)
        .await
    }

    pub(super) async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn status_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        sqlx::query_as("SELECT status, COUNT(*) FROM outbox GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await
    }

    /// Other processes (the apps) write to the file, so no in-process signal can be trusted.
    /// The watcher looks at the WAL index header every `WATCH_INTERVAL` (a read from the page
    /// cache); after a commit it asks its own connection for the newest row id and wakes the
    /// claim loop if an app inserted. The daemon's own commits change the header too; the id
    /// check keeps them from waking it. Rows that become due otherwise (an operator setting
    /// rows back to pending, a retry's time) are claimed within `poll_interval_ms`.
    pub(super) async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
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

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// The counter statements of a reservation, inside its transaction.
/// Reserves quota for `items` inside `tx` (see `reserve_quota_many`).
async fn reserve_in(
    tx: &mut Transaction<'_, Sqlite>,
    items: &[QuotaReservation<'_>],
) -> StoreResult<Vec<Reserved>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let now = first.now;
    // Every row still ours gets its periods; the others lost their lease.
    let rows: Vec<MarkRow> = items.iter().map(MarkRow::new).collect();
    let marked: HashSet<i64> = sqlx::query_scalar(
        "UPDATE outbox SET quota_month = v.month, quota_day = v.day
         FROM (SELECT value ->> 'id' AS id, value ->> 'owner' AS owner,
                      value ->> 'month' AS month, value ->> 'day' AS day
               FROM jsonb_each(?1)) AS v
         WHERE outbox.id = v.id AND outbox.status = 'sending' AND outbox.lease_owner = v.owner
         RETURNING id",
    )
    .bind(json_array(&rows))
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let marked: Vec<bool> = items.iter().map(|r| marked.contains(&r.id)).collect();
    let results = reserve::count(&mut SqliteCounters { tx, now }, items, &marked).await?;
    let waiting = reserve::waiting(items, &results);
    if !waiting.is_empty() {
        sqlx::query(
            "UPDATE outbox SET quota_month = NULL, quota_day = NULL
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_array(&waiting))
        .execute(&mut **tx)
        .await?;
    }
    Ok(results)
}

struct SqliteCounters<'t, 'c> {
    tx: &'t mut Transaction<'c, Sqlite>,
    now: DateTime<Utc>,
}

/// One statement per counter: in-process, a prepared single-row statement costs less than
/// one that reads the group from JSON (measured: the JSON form drained 5-10 % slower).
impl reserve::Counters for SqliteCounters<'_, '_> {
    async fn lock_all(&mut self, keys: &[CounterKey]) -> StoreResult<HashMap<CounterKey, i64>> {
        // The transaction holds SQLite's write lock already: this creates missing rows and
        // reads the counts.
        let mut used = HashMap::with_capacity(keys.len());
        for key in keys {
            let count: i64 = sqlx::query_scalar(
                "INSERT INTO quota_usage (account, scope, period, used, updated_at)
                 VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (account, scope, period) DO UPDATE SET used = quota_usage.used
                 RETURNING CAST(used AS BIGINT)",
            )
            .bind(&key.account)
            .bind(&key.scope)
            .bind(&key.period)
            .bind(ts(self.now))
            .fetch_one(&mut **self.tx)
            .await?;
            used.insert(key.clone(), count);
        }
        Ok(used)
    }

    async fn add_all(&mut self, adds: &[(CounterKey, i64)]) -> StoreResult<()> {
        for (key, n) in adds {
            sqlx::query(
                "UPDATE quota_usage SET used = used + ?4, updated_at = ?5
                 WHERE account = ?1 AND scope = ?2 AND period = ?3",
            )
            .bind(&key.account)
            .bind(&key.scope)
            .bind(&key.period)
            .bind(n)
            .bind(ts(self.now))
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
    errcode: Option<i64>,
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
            errcode: c.errcode,
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
    let mut time = |column: &str| -> Option<DateTime<Utc>> {
        let text: Option<String> = r.get(column);
        let time = text.as_deref().map(parse_ts);
        if time == Some(None) {
            r.note(format_args!("{column} is not a time"));
        }
        time.flatten()
    };
    let expires_at = time("expires_at");
    let in_doubt_since = time("in_doubt_since");
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
        quota_month: r.get("quota_month"),
        quota_day: r.get("quota_day"),
        template_in_use: r.get("template_in_use"),
        template_content: r.get("template_content"),
    };
    Ok(RawMessage {
        unreadable: r.problem,
        ..message
    })
}
