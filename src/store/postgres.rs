//! PostgreSQL: for several daemons across machines. Claims take `FOR UPDATE SKIP LOCKED`, so
//! daemons never wait on each other's rows; the tables live in a configurable schema (set as
//! the connection's `search_path`) inside the app's own database.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::reserve::{self, CounterKey};
use super::{
    AccountLimitsRow, ClaimRequest, Claimed, Countable, EXPIRED, Finish, GAVE_UP_IN_DOUBT,
    HoldLimits, InboundEvent, JoinCounts, JoinPass, LEASE_EXPIRED, MISSING_FROM_LIST,
    OPENID_MISMATCH, PRUNABLE, QuotaReservation, RELEASED_AT_SHUTDOWN, Reserved, RowCount,
    RowReader, StoreResult, StoredToken, SyncedTemplate, TemplateRow, TemplateUse, TokenLease,
};
use crate::config::Config;
use crate::domain::message::RawMessage;
use crate::domain::quota::{ACCOUNT_SCOPE, template_scope};

/// The channel the insert trigger notifies; the payload is the schema.
const CHANNEL: &str = "wechat_outbox";

/// The claim: due rows in priority order, through the partial index `outbox_claim`. A row not
/// counted before is marked with this claim's periods ($5, $6) at once, in the same row
/// version: the claim's transaction then counts it, or takes the mark off again (see
/// `PostgresStore::claim`). What comes back as `quota_month`/`quota_day` is what the row had
/// before, so a task can tell a row counted by an earlier attempt.
const CLAIM: &str =
    "UPDATE outbox AS o SET status = 'sending', lease_owner = $1, lease_expires_at = $2,
                    attempts = LEAST(o.attempts, 999999) + 1,
                    updated_at = $3,
                    quota_month = COALESCE(o.quota_month, $5),
                    quota_day = CASE WHEN o.quota_month IS NULL THEN $6 ELSE o.quota_day END
             FROM (
                SELECT id, quota_month AS counted_month, quota_day AS counted_day FROM outbox
                WHERE status = 'pending' AND next_attempt_at <= $3
                  AND (send_after IS NULL OR send_after <= $3)
                  AND NOT EXISTS (SELECT 1 FROM account_pauses p
                                  WHERE p.account = outbox.account AND p.paused_until > $3)
                ORDER BY priority DESC, next_attempt_at, id
                LIMIT $4
                FOR UPDATE SKIP LOCKED) AS due
             WHERE o.id = due.id
             RETURNING o.id, o.account, o.touser, o.template_id, o.data, o.url, o.miniprogram,
                o.client_msg_id, o.expires_at, o.attempts, o.in_doubt_since, o.in_doubt,
                EXISTS (SELECT 1 FROM suppressed_openids s
                        WHERE s.account = o.account AND s.openid = o.touser) AS suppressed,
                due.counted_month AS quota_month, due.counted_day AS quota_day,
                (SELECT t.in_use FROM templates t WHERE t.account = o.account
                    AND t.template_id = o.template_id) AS template_in_use,
                (SELECT t.content FROM templates t WHERE t.account = o.account
                    AND t.template_id = o.template_id) AS template_content";

/// When a row in flight was claimed, for the start of its doubt: the claim's `updated_at`, or
/// the time of the statement (`$1`) if an app wrote something else there (`infinity` would fail
/// the whole statement on `outbox_in_doubt_since_in_range`).
const CLAIMED_AT: &str =
    "CASE WHEN updated_at BETWEEN '0001-01-01 00:00:00+00' AND $1 THEN updated_at ELSE $1 END";

/// The join pass's first statement: each unjoined template event to its sent row, matched by
/// account, msgid **and** openid (an event whose FromUserName is not the row's touser never
/// changes the row). `$2` limits the pass to one event (`NULL`: all). An event time outside
/// years 1970-9999 (only stored before intake checked it) falls back to the time of the pass,
/// so that `to_timestamp` cannot fail the statement.
const JOIN_EVENTS_TO_ROWS: &str = "WITH j AS MATERIALIZED (
                SELECT e.status, e.create_time, o.id
                FROM inbound_events e
                CROSS JOIN LATERAL (SELECT o.id FROM outbox o
                                    WHERE o.account = e.account AND o.msgid = e.msgid
                                      AND o.touser = e.from_user AND o.status = 'sent'
                                    LIMIT 1) o
                WHERE e.joined_at IS NULL AND e.given_up_at IS NULL
                  AND e.event = 'TEMPLATESENDJOBFINISH'
                  AND ($2::bigint IS NULL OR e.id = $2))
             UPDATE outbox SET status = CASE WHEN lower(j.status) = 'success' THEN 'delivered'
                              WHEN lower(j.status) LIKE 'failed%block%' THEN 'blocked'
                              WHEN lower(j.status) LIKE 'failed%' THEN 'undelivered'
                              ELSE outbox.status END,
                    delivery_status = j.status,
                    delivered_at = CASE WHEN j.create_time BETWEEN 0 AND 253402300799
                                        THEN to_timestamp(j.create_time) ELSE $1 END,
                    updated_at = $1
             FROM j
             WHERE outbox.id = j.id AND outbox.status = 'sent'";

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: String,
}

impl PostgresStore {
    pub async fn connect(config: &Config) -> StoreResult<PostgresStore> {
        let schema = config.database_schema.clone();
        let options = PgConnectOptions::from_str(&config.database_url)?
            .application_name("wechat-outbox")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(config.database.max_connections)
            // Not a ping (a round trip) before every use: on the latency path that was two
            // more round trips per message (0.2-0.3 ms each here). A connection the server
            // closed fails its next statement instead, and every caller retries or releases.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PostgresStore { pool, schema })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        // The schema name was validated as a plain lowercase identifier in Config::validate.
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema);
        sqlx::query(AssertSqlSafe(create))
            .execute(&self.pool)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&self.pool).await
    }

    pub(super) async fn claim_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        let steps: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {CLAIM}")))
            .bind("plan")
            .bind(now)
            .bind(now)
            .bind(64_i64)
            .bind("2026-11")
            .bind("2026-11-28")
            .fetch_all(&self.pool)
            .await?;
        Ok(steps.join("\n"))
    }

    pub(super) async fn join_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        let sql = AssertSqlSafe(format!("EXPLAIN {JOIN_EVENTS_TO_ROWS}"));
        let steps: Vec<String> = sqlx::query_scalar(sql)
            .bind(now)
            .bind(None::<i64>)
            .fetch_all(&self.pool)
            .await?;
        Ok(steps.join("\n"))
    }

    pub async fn claim(
        &self,
        request: &ClaimRequest<'_>,
        countable: Countable<'_>,
    ) -> StoreResult<Vec<Claimed>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(CLAIM)
            .bind(request.owner)
            .bind(request.lease_until)
            .bind(request.now)
            .bind(request.limit as i64)
            .bind(request.month)
            .bind(request.day)
            .fetch_all(&mut *tx)
            .await?;
        let rows: Vec<RawMessage> = rows
            .into_iter()
            .map(raw_message)
            .collect::<StoreResult<_>>()?;
        let terms = reserve::terms(&rows, countable);
        let items = reserve::claim_reservations(request, &rows, &terms);
        // Every row is ours and already marked by the claim: count them.
        let marked = vec![true; items.len()];
        let now = request.now;
        let results = reserve::count(&mut PgCounters { tx: &mut tx, now }, &items, &marked).await?;
        let claimed = reserve::claimed(rows, &terms, results);
        // The claim's marks stay only on the rows it counted.
        let unmark: Vec<i64> = claimed
            .iter()
            .filter(|c| c.raw.quota_month.is_none() && c.reserved != Some(Reserved::Granted))
            .map(|c| c.raw.id)
            .collect();
        if !unmark.is_empty() {
            sqlx::query(
                "UPDATE outbox SET quota_month = NULL, quota_day = NULL WHERE id = ANY($1)",
            )
            .bind(unmark)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// One statement for the whole group: the outcomes travel as arrays and `unnest` turns them
    /// back into rows, so a group costs one round trip and one commit whatever its size.
    ///
    /// `(status = 'sending') IS TRUE` in the group statements hides the `outbox_leases` partial
    /// index from the planner on purpose. With it visible, the generic plan a kept statement
    /// gets after five runs (which cannot see how many ids the arrays hold) walked every row
    /// being sent and re-read the arrays for each: 5-8 ms for a group of 83, and the busiest
    /// step of a drain. Hidden, each id is looked up by primary key: 0.75 ms
    /// (docs/benchmarks.md).
    pub(super) async fn finish_many(
        &self,
        owner: &str,
        items: &[Finish],
    ) -> StoreResult<Vec<bool>> {
        let columns: Vec<_> = items.iter().map(|i| i.outcome.columns(i.now)).collect();
        let updated: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox AS o SET status = v.status, msgid = COALESCE(v.msgid, o.msgid),
                    sent_at = CASE WHEN v.sent THEN v.now ELSE o.sent_at END,
                    next_attempt_at = COALESCE(v.next_attempt_at, o.next_attempt_at),
                    last_errcode = v.errcode, last_error = v.error, in_doubt = v.in_doubt,
                    attempts = o.attempts - v.refund, lease_owner = NULL, lease_expires_at = NULL,
                    updated_at = v.now, held_for = v.held_for,
                    in_doubt_since = CASE WHEN v.in_doubt
                                          THEN COALESCE(o.in_doubt_since, v.began) END
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::boolean[],
                         $5::timestamptz[], $6::integer[], $7::text[], $8::boolean[],
                         $9::integer[], $10::timestamptz[], $11::text[], $12::timestamptz[])
                  AS v(id, status, msgid, sent, next_attempt_at, errcode, error, in_doubt,
                       refund, now, held_for, began)
             WHERE o.id = v.id AND (o.status = 'sending') IS TRUE AND o.lease_owner = $13
             RETURNING o.id",
        )
        .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
        .bind(
            columns
                .iter()
                .map(|c| c.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(columns.iter().map(|c| c.msgid).collect::<Vec<_>>())
        .bind(columns.iter().map(|c| c.sent).collect::<Vec<_>>())
        .bind(
            columns
                .iter()
                .map(|c| c.next_attempt_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            columns
                .iter()
                .map(|c| c.errcode.map(errcode_column))
                .collect::<Vec<_>>(),
        )
        .bind(columns.iter().map(|c| c.error.clone()).collect::<Vec<_>>())
        .bind(columns.iter().map(|c| c.in_doubt).collect::<Vec<_>>())
        .bind(columns.iter().map(|c| c.refund_attempt).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.now).collect::<Vec<_>>())
        .bind(
            columns
                .iter()
                .map(|c| c.held_for.map(|h| h.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|i| i.attempt_began).collect::<Vec<_>>())
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
            "UPDATE outbox SET lease_expires_at = $1
             WHERE id = $2 AND status = 'sending' AND lease_owner = $3",
        )
        .bind(lease_until)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn rescue_expired_leases(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'pending', in_doubt = true,
                    in_doubt_since = COALESCE(in_doubt_since, {CLAIMED_AT}), lease_owner = NULL,
                    lease_expires_at = NULL, next_attempt_at = $1, last_error = $2, updated_at = $1
             WHERE status = 'sending' AND lease_expires_at < $1"
        )))
        .bind(now)
        .bind(LEASE_EXPIRED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn release_owned(&self, owner: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'pending', in_doubt = true,
                    in_doubt_since = COALESCE(in_doubt_since, {CLAIMED_AT}), lease_owner = NULL,
                    lease_expires_at = NULL, next_attempt_at = $1, last_error = $2, updated_at = $1
             WHERE status = 'sending' AND lease_owner = $3"
        )))
        .bind(now)
        .bind(RELEASED_AT_SHUTDOWN)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn expire_overdue(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'expired', last_error = $2, updated_at = $1
             WHERE status IN ('pending', 'held') AND expires_at <= $1",
        )
        .bind(now)
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
            "UPDATE outbox SET status = 'unknown', last_error = $3, updated_at = $1
             WHERE status = 'pending' AND in_doubt AND in_doubt_since <= $2",
        )
        .bind(now)
        .bind(first_attempt_before)
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
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account) DO UPDATE SET paused_until = excluded.paused_until,
                errcode = excluded.errcode, reason = excluded.reason,
                created_at = excluded.created_at",
        )
        .bind(account)
        .bind(until)
        .bind(errcode_column(errcode))
        .bind(super::bounded(reason))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn setting_warnings(&self) -> StoreResult<Vec<String>> {
        let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(&self.pool)
            .await?;
        Ok(if autovacuum == "on" {
            Vec::new()
        } else {
            vec![
                "autovacuum is off on this PostgreSQL server: claimed rows leave dead entries in \
                 the claim index that every later claim reads, so claims slow down as rows are \
                 sent; turn it on (docs/operations.md)"
                    .to_string(),
            ]
        })
    }

    pub(super) async fn load_token(&self, account: &str) -> StoreResult<Option<StoredToken>> {
        let row: Option<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT access_token, expires_at FROM access_tokens
             WHERE account = $1 AND access_token IS NOT NULL AND expires_at IS NOT NULL",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(token, expires_at)| StoredToken { token, expires_at }))
    }

    pub(super) async fn lease_token_refresh(&self, lease: &TokenLease<'_>) -> StoreResult<bool> {
        sqlx::query("INSERT INTO access_tokens (account) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(lease.account)
            .execute(&self.pool)
            .await?;
        let done = sqlx::query(
            "UPDATE access_tokens SET refresh_owner = $2, refresh_lease_until = $3
             WHERE account = $1
               AND (refresh_lease_until IS NULL OR refresh_lease_until < $4)
               AND (access_token IS NULL OR expires_at <= $5 OR access_token = $6)",
        )
        .bind(lease.account)
        .bind(lease.owner)
        .bind(lease.lease_until)
        .bind(lease.now)
        .bind(lease.refresh_before)
        .bind(lease.failing)
        .execute(&self.pool)
        .await?;
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
            "UPDATE access_tokens SET access_token = $3, expires_at = $4, refreshed_at = $5,
                    refresh_owner = NULL, refresh_lease_until = NULL
             WHERE account = $1 AND refresh_owner = $2",
        )
        .bind(account)
        .bind(owner)
        .bind(&token.token)
        .bind(token.expires_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn release_token_lease(&self, account: &str, owner: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE access_tokens SET refresh_owner = NULL, refresh_lease_until = NULL
             WHERE account = $1 AND refresh_owner = $2",
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
        let mut tx = self.pool.begin().await?;
        let first = sqlx::query(
            "INSERT INTO callback_replays (account, timestamp_param, nonce, body_sha1, received_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account, timestamp_param, nonce) DO NOTHING",
        )
        .bind(&e.account)
        .bind(&signed.timestamp)
        .bind(&signed.nonce)
        .bind(&signed.body_sha1)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            let body_sha1: String = sqlx::query_scalar(
                "SELECT body_sha1 FROM callback_replays
                 WHERE account = $1 AND timestamp_param = $2 AND nonce = $3",
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
            "DELETE FROM callback_replays WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM callback_replays WHERE received_at < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
        )
        .bind(signed.forget_before)
        .bind(super::REPLAYS_FORGOTTEN_PER_PUSH)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO inbound_events (account, dedup_key, msg_type, event, from_user, to_user,
                    create_time, msgid, status, raw_xml, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
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
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted && let (Some(suppress), Some(openid)) = (e.suppression(), &e.from_user) {
            let change = if suppress {
                sqlx::query(
                    "INSERT INTO suppressed_openids (account, openid, since) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&e.account)
                .bind(openid)
                .bind(now)
            } else {
                sqlx::query("DELETE FROM suppressed_openids WHERE account = $1 AND openid = $2")
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

    /// Every statement goes from the unjoined events (few, and bounded by the window) to their
    /// rows through `outbox_msgid`, one `LATERAL … LIMIT 1` probe per event, so no plan can
    /// start from `outbox`. Written as a plain join they were planned the other way round when
    /// the statistics dated from a backlog without msgids: the pass walked every sent row's
    /// msgid once per event, every second (135 ms for two events over 500k sent rows).
    pub(super) async fn join_delivery_events(
        &self,
        pass: &JoinPass<'_>,
    ) -> StoreResult<JoinCounts> {
        let mut tx = self.pool.begin().await?;
        let joined = sqlx::query(JOIN_EVENTS_TO_ROWS)
            .bind(pass.now)
            .bind(pass.only)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(
            "UPDATE inbound_events e SET joined_at = $1, outbox_id = j.outbox_id
             FROM (SELECT u.id, o.id AS outbox_id
                   FROM inbound_events u
                   CROSS JOIN LATERAL (SELECT o.id FROM outbox o
                                       WHERE o.account = u.account AND o.msgid = u.msgid
                                         AND o.touser = u.from_user
                                         AND o.delivery_status IS NOT NULL
                                       LIMIT 1) o
                   WHERE u.joined_at IS NULL AND u.given_up_at IS NULL
                     AND u.event = 'TEMPLATESENDJOBFINISH'
                     AND ($2::bigint IS NULL OR u.id = $2)) AS j
             WHERE e.id = j.id",
        )
        .bind(pass.now)
        .bind(pass.only)
        .execute(&mut *tx)
        .await?;
        let mismatched = sqlx::query(
            "UPDATE inbound_events e SET given_up_at = $1, join_problem = $3
             WHERE e.joined_at IS NULL AND e.given_up_at IS NULL
               AND e.event = 'TEMPLATESENDJOBFINISH' AND ($2::bigint IS NULL OR e.id = $2)
               AND EXISTS (SELECT 1 FROM outbox o WHERE o.account = e.account AND o.msgid = e.msgid)
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.account = e.account
                               AND o.msgid = e.msgid AND o.touser = e.from_user)",
        )
        .bind(pass.now)
        .bind(pass.only)
        .bind(OPENID_MISMATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let given_up = sqlx::query(
            "UPDATE inbound_events SET given_up_at = $1, join_problem = $4
             WHERE joined_at IS NULL AND given_up_at IS NULL
               AND event = 'TEMPLATESENDJOBFINISH' AND ($2::bigint IS NULL OR id = $2)
               AND received_at < $3",
        )
        .bind(pass.now)
        .bind(pass.only)
        .bind(pass.received_before)
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
             ORDER BY received_at LIMIT $1",
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
            "UPDATE inbound_events SET given_up_at = $2, join_problem = $3
             WHERE id = $1 AND joined_at IS NULL",
        )
        .bind(id)
        .bind(now)
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
        let mut tx = self.pool.begin().await?;
        let results = reserve_in(&mut tx, items).await?;
        tx.commit().await?;
        Ok(results)
    }

    pub(super) async fn release_quota(&self, r: &QuotaReservation<'_>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let unmarked = sqlx::query(
            "UPDATE outbox SET quota_month = NULL, quota_day = NULL
             WHERE id = $1 AND status = 'sending' AND lease_owner = $2 AND quota_month IS NOT NULL",
        )
        .bind(r.id)
        .bind(r.owner)
        .execute(&mut *tx)
        .await?;
        // Only the holder of the lease may give the row's count back.
        if unmarked.rows_affected() == 1 {
            let scope = template_scope(r.template_id);
            // In the reservations' lock order (the day, then the month), so the two cannot
            // deadlock.
            for (scope, period) in [(ACCOUNT_SCOPE, r.day), (scope.as_str(), r.month)] {
                sqlx::query(
                    "UPDATE quota_usage SET used = used - 1, updated_at = $4
                     WHERE account = $1 AND scope = $2 AND period = $3 AND used > 0",
                )
                .bind(r.account)
                .bind(scope)
                .bind(period)
                .bind(r.now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A transaction holding the account's template lock (one daemon at a time counts and
    /// changes an account's templates), and whether the template is in use.
    async fn change_template(
        &self,
        account: &str,
        template_id: &str,
    ) -> StoreResult<(Transaction<'static, Postgres>, Option<bool>)> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('wechat_outbox.templates:' || $1, 0))",
        )
        .bind(account)
        .execute(&mut *tx)
        .await?;
        let in_use = sqlx::query_scalar(
            "SELECT in_use FROM templates WHERE account = $1 AND template_id = $2",
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
            sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE account = $1 AND in_use")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?;
        if count >= i64::from(limit) {
            return Ok(TemplateUse::NoRoom { in_use: count });
        }
        sqlx::query(
            "INSERT INTO templates (account, template_id, in_use, in_use_since) VALUES ($1, $2, true, $3)
             ON CONFLICT (account, template_id) DO UPDATE SET in_use = true,
                in_use_since = excluded.in_use_since, note = NULL",
        )
        .bind(account)
        .bind(template_id)
        .bind(now)
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
            "INSERT INTO templates (account, template_id, in_use, note) VALUES ($1, $2, false, $3)
             ON CONFLICT (account, template_id) DO UPDATE SET in_use = false, note = excluded.note",
        )
        .bind(account)
        .bind(template_id)
        .bind(note)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = $2
             WHERE status = 'held' AND held_for = 'template' AND account = $1",
        )
        .bind(account)
        .bind(now)
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
        let mut tx = self.pool.begin().await?;
        for t in listed {
            sqlx::query(
                "INSERT INTO templates (account, template_id, title, content, last_seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account, template_id) DO UPDATE SET title = excluded.title,
                    content = excluded.content, last_seen_at = excluded.last_seen_at, note = NULL",
            )
            .bind(account)
            .bind(&t.template_id)
            .bind(&t.title)
            .bind(&t.content)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE templates SET note = $3
             WHERE account = $1 AND (last_seen_at IS NULL OR last_seen_at < $2) AND note IS NULL",
        )
        .bind(account)
        .bind(now)
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
            "SELECT account, scope, period, CAST(used AS BIGINT) FROM quota_usage
             WHERE period IN ($1, $2) ORDER BY account, scope",
        )
        .bind(month)
        .bind(day)
        .fetch_all(&self.pool)
        .await
    }

    pub(super) async fn release_due_holds(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', held_for = NULL, updated_at = $1
             WHERE status = 'held' AND next_attempt_at <= $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Two statements: rows held for a template's month, up to the room each template has;
    /// rows held for the account's day or for room among templates, up to that room, and every
    /// row held for room whose template is in use now. Two, not one: the month's rows are
    /// looked up by template, and one join with an `OR` on the template would walk every held
    /// row of the account each second. Each in claim order, so that the rows
    /// released are the ones the claim takes, and no more than can go: releasing every held row
    /// whenever one send was given back would make each of them go round the claim once more.
    pub(super) async fn release_holds_with_room(
        &self,
        limits: &[HoldLimits<'_>],
        month: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // A read through the partial index `outbox_held` first: no held row, no write.
        let any_held: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'held')")
                .fetch_one(&self.pool)
                .await?;
        if !any_held {
            return Ok(0);
        }
        let accounts: Vec<&str> = limits.iter().map(|l| l.account).collect();
        let active: Vec<Option<i64>> = limits
            .iter()
            .map(|l| l.active_templates.map(i64::from))
            .collect();
        let monthly: Vec<i64> = limits
            .iter()
            .map(|l| l.monthly_per_template.into())
            .collect();
        let daily: Vec<i64> = limits.iter().map(|l| l.daily_per_account.into()).collect();
        let months = sqlx::query(
            "UPDATE outbox o SET status = 'pending', held_for = NULL, next_attempt_at = $4,
                    updated_at = $4
             FROM (SELECT id FROM (
                     SELECT h.id, l.monthly - q.used AS room,
                            ROW_NUMBER() OVER (PARTITION BY h.account, h.template_id
                                               ORDER BY h.priority DESC, h.id) AS n
                     FROM unnest($1::text[], $2::bigint[]) AS l(account, monthly)
                     JOIN quota_usage q ON q.account = l.account AND q.period = $3
                                       AND q.scope LIKE 'template:%' AND q.used < l.monthly
                     JOIN outbox h ON h.status = 'held' AND h.account = l.account
                                  AND h.held_for = 'monthly quota'
                                  AND h.template_id = substr(q.scope, 10)) ranked
                   WHERE n <= room) r
             WHERE o.id = r.id AND o.status = 'held'",
        )
        .bind(&accounts)
        .bind(&monthly)
        .bind(month)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let others = sqlx::query(
            "UPDATE outbox o SET status = 'pending', held_for = NULL, next_attempt_at = $5,
                    updated_at = $5
             FROM (SELECT id FROM (
                     SELECT h.id, room.room,
                            ROW_NUMBER() OVER (PARTITION BY h.account, h.held_for
                                               ORDER BY h.priority DESC, h.id) AS n
                     FROM (SELECT l.account, 'daily quota' AS held_for,
                                  l.daily - COALESCE((SELECT q.used FROM quota_usage q
                                                      WHERE q.account = l.account
                                                        AND q.scope = 'account'
                                                        AND q.period = $4), 0) AS room
                           FROM unnest($1::text[], $3::bigint[]) AS l(account, daily)
                           UNION ALL
                           SELECT l.account, 'template',
                                  l.active - (SELECT count(*) FROM templates t
                                              WHERE t.account = l.account AND t.in_use)
                           FROM unnest($1::text[], $2::bigint[]) AS l(account, active)
                           WHERE l.active IS NOT NULL) room
                     JOIN outbox h ON h.status = 'held' AND h.account = room.account
                                  AND h.held_for = room.held_for
                     WHERE room.room > 0) ranked
                   WHERE n <= room
                   UNION
                   SELECT h.id FROM templates t
                   JOIN outbox h ON h.status = 'held' AND h.account = t.account
                                AND h.held_for = 'template' AND h.template_id = t.template_id
                   WHERE t.in_use AND t.account = ANY($1)) r
             WHERE o.id = r.id AND o.status = 'held'",
        )
        .bind(&accounts)
        .bind(&active)
        .bind(&daily)
        .bind(day)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(months.rows_affected() + others.rows_affected())
    }

    pub(super) async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> StoreResult<i64> {
        sqlx::query(
            "INSERT INTO daemons (owner, started_at, heartbeat_at) VALUES ($1, $2, $2)
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM daemons WHERE heartbeat_at < $1")
            .bind(alive_since - chrono::Duration::hours(1))
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT COUNT(*) FROM daemons WHERE heartbeat_at >= $1")
            .bind(alive_since)
            .fetch_one(&self.pool)
            .await
    }

    pub(super) async fn remove_daemon(&self, owner: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM daemons WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn prune(&self, cutoff: DateTime<Utc>, batch: i64) -> StoreResult<(u64, u64)> {
        // Terminal statuses only: a waiting row is never deleted, however old.
        let rows = format!(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                 WHERE status IN {PRUNABLE} AND updated_at < $1 LIMIT $2)"
        );
        let rows = sqlx::query(AssertSqlSafe(rows))
            .bind(cutoff)
            .bind(batch)
            .execute(&self.pool)
            .await?;
        let events = sqlx::query(
            "DELETE FROM inbound_events WHERE id IN (SELECT id FROM inbound_events
                 WHERE received_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM quota_usage WHERE updated_at < $1")
            .bind(cutoff - chrono::Duration::days(400))
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
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
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
            .bind(now)
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

    /// LISTEN for the insert trigger's notifications. They are lost while disconnected, so a
    /// reconnect wakes the dispatcher too, and it polls besides.
    pub(super) async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let listener = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(CHANNEL).await?;
                wake.notify_one();
                loop {
                    match listener.try_recv().await? {
                        Some(n) if n.payload() == self.schema => wake.notify_one(),
                        Some(_) => {}
                        None => wake.notify_one(),
                    }
                }
            };
            let result: StoreResult<()> = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = listener => result,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// errcodes are small integers; the column is INTEGER.
fn errcode_column(errcode: i64) -> i32 {
    i32::try_from(errcode).unwrap_or(i32::MAX)
}

/// The counter statements of a reservation, inside its transaction.
/// Reserves quota for `items` inside `tx` (see `reserve_quota_many`).
async fn reserve_in(
    tx: &mut Transaction<'_, Postgres>,
    items: &[QuotaReservation<'_>],
) -> StoreResult<Vec<Reserved>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let now = first.now;
    // Every row still ours gets its periods; the others lost their lease.
    let marked_ids: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox AS o SET quota_month = v.month, quota_day = v.day
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
              AS v(id, month, day, owner)
         WHERE o.id = v.id AND (o.status = 'sending') IS TRUE AND o.lease_owner = v.owner
         RETURNING o.id",
    )
    .bind(items.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(items.iter().map(|r| r.month).collect::<Vec<_>>())
    .bind(items.iter().map(|r| r.day).collect::<Vec<_>>())
    .bind(items.iter().map(|r| r.owner).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    let marked_ids: HashSet<i64> = marked_ids.into_iter().collect();
    let marked: Vec<bool> = items.iter().map(|r| marked_ids.contains(&r.id)).collect();
    let results = reserve::count(&mut PgCounters { tx, now }, items, &marked).await?;
    let waiting = reserve::waiting(items, &results);
    if !waiting.is_empty() {
        sqlx::query("UPDATE outbox SET quota_month = NULL, quota_day = NULL WHERE id = ANY($1)")
            .bind(waiting)
            .execute(&mut **tx)
            .await?;
    }
    Ok(results)
}

struct PgCounters<'t, 'c> {
    tx: &'t mut Transaction<'c, Postgres>,
    now: DateTime<Utc>,
}

impl reserve::Counters for PgCounters<'_, '_> {
    async fn lock_all(&mut self, keys: &[CounterKey]) -> StoreResult<HashMap<CounterKey, i64>> {
        // Rows are inserted (or found and locked) in the order of `ord`.
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "INSERT INTO quota_usage (account, scope, period, used, updated_at)
             SELECT k.account, k.scope, k.period, 0, $4
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
                  AS k(account, scope, period, ord)
             ORDER BY k.ord
             ON CONFLICT (account, scope, period) DO UPDATE SET used = quota_usage.used
             RETURNING account, scope, period, CAST(used AS BIGINT)",
        )
        .bind(keys.iter().map(|k| k.account.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.scope.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.period.as_str()).collect::<Vec<_>>())
        .bind(self.now)
        .fetch_all(&mut **self.tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(account, scope, period, used)| {
                (
                    CounterKey {
                        account,
                        scope,
                        period,
                    },
                    used,
                )
            })
            .collect())
    }

    async fn add_all(&mut self, adds: &[(CounterKey, i64)]) -> StoreResult<()> {
        sqlx::query(
            "UPDATE quota_usage AS q SET used = q.used + v.n, updated_at = $5
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                  AS v(account, scope, period, n)
             WHERE q.account = v.account AND q.scope = v.scope AND q.period = v.period",
        )
        .bind(
            adds.iter()
                .map(|(k, _)| k.account.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            adds.iter()
                .map(|(k, _)| k.scope.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            adds.iter()
                .map(|(k, _)| k.period.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(adds.iter().map(|(_, n)| *n).collect::<Vec<_>>())
        .bind(self.now)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }
}

fn raw_message(row: PgRow) -> StoreResult<RawMessage> {
    let id = row.try_get("id")?;
    let mut r = RowReader::new(&row);
    // Postgres guarantees valid UTF-8 in text; the byte path is SQLite's concern.
    let account = r.get::<Option<String>>("account").unwrap_or_default();
    let message = RawMessage {
        id,
        account,
        touser: r.get("touser"),
        template_id: r.get("template_id"),
        data: r.get("data"),
        url: r.get("url"),
        miniprogram: r.get("miniprogram"),
        client_msg_id: r.get("client_msg_id"),
        expires_at: r.get::<Option<CheckedTime>>("expires_at").map(|t| t.0),
        attempts: r.get("attempts"),
        in_doubt_since: r.get::<Option<CheckedTime>>("in_doubt_since").map(|t| t.0),
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

/// A `timestamptz` read with checked arithmetic. sqlx adds the microseconds to its epoch
/// unchecked, which panics on `infinity` or a year past chrono's 262142: one app's row then
/// crash-looped the daemon. This refuses such a value as an error instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CheckedTime(pub DateTime<Utc>);

impl From<CheckedTime> for DateTime<Utc> {
    fn from(time: CheckedTime) -> Self {
        time.0
    }
}

impl sqlx::Type<Postgres> for CheckedTime {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <DateTime<Utc> as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <DateTime<Utc> as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for CheckedTime {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        use sqlx::postgres::PgValueFormat;
        match value.format() {
            PgValueFormat::Binary => {
                // Microseconds since 2000-01-01 UTC; infinity is i64::MAX, -infinity i64::MIN.
                let micros: i64 = sqlx::Decode::<Postgres>::decode(value)?;
                let epoch = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("in range");
                epoch
                    .checked_add_signed(chrono::TimeDelta::microseconds(micros))
                    .filter(|_| micros != i64::MAX && micros != i64::MIN)
                    .map(CheckedTime)
                    .ok_or_else(|| {
                        "a time outside the range the daemon can read (infinity?)".into()
                    })
            }
            // Text is parsed by chrono, which reports an error rather than panicking.
            PgValueFormat::Text => Ok(CheckedTime(sqlx::Decode::<Postgres>::decode(value)?)),
        }
    }
}
