//! PostgreSQL: for several daemons across machines. Claims take `FOR UPDATE SKIP LOCKED`, so
//! daemons never wait on each other's rows; the tables live in a configurable schema (set as
//! the connection's `search_path`) inside the app's own database.
//!
//! What Postgres does differently from SQLite, under the same names as in `sqlite.rs`:
//! statements over a group of rows take it as arrays (`unnest`), one round trip whatever its
//! size; the claim marks the quota periods in the same row version; the planner is steered
//! with `LATERAL … LIMIT 1` and by hiding partial indexes from generic plans; concurrent
//! writers are ordered with row and advisory locks.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::claim::{PerUserSql, per_user_condition, per_user_index};
use super::record::errcode_column;
use super::reserve::{self, CounterKey};
use super::{
    ClaimRequest, Claimed, Countable, Finish, HoldLimits, QuotaReservation, Reserved, RowReader,
    StoreResult, StoreSettings, Time,
};
use crate::domain::lifecycle::DELIVERY_STATUS_SQL;
use crate::domain::message::RawMessage;

/// The channel the insert trigger notifies; the payload is the schema.
const CHANNEL: &str = "wechat_outbox";

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: String,
}

impl PostgresStore {
    pub async fn connect(settings: &StoreSettings) -> StoreResult<PostgresStore> {
        let schema = settings.schema.clone();
        let options = PgConnectOptions::from_str(&settings.url)?
            .application_name("wechat-outbox")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            // Not a ping (a round trip) before every use: on the latency path that was two
            // more round trips per message (0.2-0.3 ms each here). A connection the server
            // closed fails its next statement instead, and every caller retries or releases.
            .test_before_acquire(false)
            .max_lifetime(settings.connection_lifetime)
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

    /// LISTEN for the insert trigger's notifications. They are lost while disconnected, so a
    /// reconnect wakes the dispatcher too, and it polls besides.
    pub async fn watch_for_rows(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
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
}

/// A transaction. Postgres orders concurrent writers by row locks (and
/// `lock_account_templates`), so nothing more is taken at its start.
pub(super) async fn begin_write(pool: &PgPool) -> StoreResult<Transaction<'static, Postgres>> {
    pool.begin().await
}

/// Holds the account's template lock for the rest of `tx`: one daemon at a time counts and
/// changes an account's templates, so two racing cannot take more than the limit into use.
pub(super) async fn lock_account_templates(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
) -> StoreResult<()> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('wechat_outbox.templates:' || $1, 0))",
    )
    .bind(account)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Autovacuum off hurts: every claimed row leaves a dead entry at the head of the claim's
/// index that each later claim walks (a 1M drain ran 20-30 % slower), and no ANALYZE makes
/// sessions plan again as the table grows (`StoreSettings::connection_lifetime` bounds that).
pub(super) async fn setting_warnings(pool: &PgPool) -> StoreResult<Vec<String>> {
    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
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

/// Report views' times, read with checked arithmetic (`Time`): a final row may keep a value
/// such as `infinity`.
pub(super) type ViewTime = Time;

/// The claim: due rows in priority order, through the partial index `outbox_claim`. A row not
/// counted before is marked with this claim's periods ($5, $6) at once, in the same row
/// version: the claim's transaction then counts it, or takes the mark off again (see
/// `PostgresStore::claim`). What comes back as `quota_month`/`quota_day` is what the row had
/// before, so a task can tell a row counted by an earlier attempt.
const CLAIM_TEXT: &str =
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
                                  WHERE p.account = outbox.account AND p.paused_until > $3){PER_USER}
                ORDER BY priority DESC, next_attempt_at, id
                LIMIT $4
                FOR UPDATE SKIP LOCKED) AS due
             WHERE o.id = due.id
             RETURNING o.id, o.account, o.touser, o.template_id, o.data, o.url, o.miniprogram,
                o.client_msg_id, o.expires_at, o.attempts, o.in_doubt_since, o.in_doubt,
                EXISTS (SELECT 1 FROM suppressed_openids s
                        WHERE s.account = o.account AND s.openid = o.touser) AS suppressed,
                EXISTS (SELECT 1 FROM refusals r WHERE r.account = o.account
                        AND r.openid = o.touser AND r.template_id = o.template_id
                        AND r.expires_at > $3) AS refused,
                due.counted_month AS quota_month, due.counted_day AS quota_day,
                (SELECT t.in_use FROM templates t WHERE t.account = o.account
                    AND t.template_id = o.template_id) AS template_in_use,
                o.kind, o.page,
                CASE WHEN o.kind = 'subscribe'
                     THEN (SELECT s.content FROM subscribe_templates s
                           WHERE s.account = o.account AND s.template_id = o.template_id)
                     ELSE (SELECT t.content FROM templates t WHERE t.account = o.account
                           AND t.template_id = o.template_id) END AS template_content,
                CASE WHEN o.kind = 'subscribe'
                     THEN (SELECT s.long_term FROM subscribe_templates s
                           WHERE s.account = o.account AND s.template_id = o.template_id
                             AND s.note IS NULL)
                     END AS long_term,
                CASE WHEN o.kind = 'subscribe'
                     THEN (SELECT f.t FROM (SELECT COALESCE(o.send_after, o.created_at) AS t) f
                           WHERE f.t >= '0001-01-01 00:00:00+00'
                             AND f.t < '10000-01-01 00:00:00+00') END AS first_due";

/// The claim as it runs: without the per-user condition, or with it (`$7`, the oldest first
/// due time that still holds later rows back).
static CLAIM: LazyLock<String> = LazyLock::new(|| CLAIM_TEXT.replace("{PER_USER}", ""));
static CLAIM_PER_USER: LazyLock<String> = LazyLock::new(|| {
    let condition = per_user_condition(&PerUserSql {
        now: "$3",
        since: "$7",
        first_due,
        probe_from: "outbox e",
        same_recipient: "AND md5(e.touser) = md5(outbox.touser)",
    });
    CLAIM_TEXT.replace("{PER_USER}", &condition)
});

/// The recipient index keys `touser` by its md5: a btree entry holds at most about 2.7 kB,
/// and an app's row may hold any text there; keyed by the text itself, a long one would fail
/// the app's INSERT (and the daemon's claim) instead of failing its own row.
const PER_USER_INDEX_KEY: &str = "account, md5(touser)";

/// A row's first due time (`order = "per_user"`).
fn first_due(row: &str) -> String {
    format!("COALESCE({row}.send_after, {row}.created_at)")
}

/// Creates the per-user index without blocking the apps' inserts (`CONCURRENTLY`, which
/// cannot run in a transaction), one daemon at a time (an advisory lock: two concurrent builds
/// of one index wait on each other). A build that was cut off (a killed daemon) leaves an
/// invalid index that `IF NOT EXISTS` would keep, unused by the planner yet kept up by every
/// write: it is dropped and built again.
pub(super) async fn create_per_user_index(pool: &PgPool) -> StoreResult<()> {
    const LOCK: &str = "hashtext('wechat-outbox: outbox_recipient_open')";
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(AssertSqlSafe(format!("SELECT pg_advisory_lock({LOCK})")))
        .execute(&mut *conn)
        .await?;
    let built = async {
        let invalid: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                            WHERE c.relname = 'outbox_recipient_open'
                              AND c.relnamespace = current_schema()::regnamespace
                              AND NOT i.indisvalid)",
        )
        .fetch_one(&mut *conn)
        .await?;
        if invalid {
            sqlx::raw_sql("DROP INDEX CONCURRENTLY IF EXISTS outbox_recipient_open")
                .execute(&mut *conn)
                .await?;
        }
        let sql = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {}",
            per_user_index(PER_USER_INDEX_KEY)
        );
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
    .await;
    sqlx::raw_sql(AssertSqlSafe(format!("SELECT pg_advisory_unlock({LOCK})")))
        .execute(&mut *conn)
        .await?;
    built
}

/// When a row in flight was claimed, for the start of its doubt: the claim's `updated_at`, or
/// the time of the statement (`$1`) if an app wrote something else there (`infinity` would fail
/// the whole statement on `outbox_in_doubt_since_in_range`).
pub(super) const CLAIMED_AT: &str =
    "CASE WHEN updated_at BETWEEN '0001-01-01 00:00:00+00' AND $1 THEN updated_at ELSE $1 END";

/// Pending rows in doubt for too long (`$1` now, `$2` the doubt's limit, `$3` the reason),
/// through the partial index `outbox_in_doubt` (`WHERE status = 'pending' AND in_doubt`).
pub(super) const GIVE_UP_IN_DOUBT: &str = "UPDATE outbox SET status = 'unknown',
            last_error = CASE WHEN kind = 'subscribe' THEN $4 ELSE $3 END, updated_at = $1
     WHERE status = 'pending' AND in_doubt AND in_doubt_since <= $2";

/// Forgets up to `$2` remembered pushes received before `$1`. By `ctid` with `SKIP LOCKED`:
/// daemons receiving pushes at once each take other old rows instead of waiting on one
/// another's.
pub(super) const FORGET_REPLAYS: &str = "DELETE FROM callback_replays WHERE ctid = ANY(ARRAY(
         SELECT ctid FROM callback_replays WHERE received_at < $1
         LIMIT $2 FOR UPDATE SKIP LOCKED))";

/// The join pass's first statement: each unjoined template event to its sent row, matched by
/// account, msgid **and** openid (an event whose FromUserName is not the row's touser never
/// changes the row). `$2` limits the pass to one event (`NULL`: all). One `LATERAL … LIMIT 1`
/// probe of `outbox_msgid` per event, so that no plan can start from `outbox`: written as a
/// plain join it was planned the other way round when the statistics dated from a backlog
/// without msgids (135 ms a pass for two events over 500k sent rows). An event time outside
/// years 1970-9999 falls back to the time of the pass, so that `to_timestamp` cannot fail it.
pub(super) static JOIN_EVENTS_TO_ROWS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH j AS MATERIALIZED (
            SELECT e.status, e.create_time, o.id
            FROM inbound_events e
            CROSS JOIN LATERAL (SELECT o.id FROM outbox o
                                WHERE o.account = e.account AND o.msgid = e.msgid
                                  AND o.touser = e.from_user AND o.status = 'sent'
                                LIMIT 1) o
            WHERE e.joined_at IS NULL AND e.given_up_at IS NULL
              AND e.event IN {}
              AND ($2::bigint IS NULL OR e.id = $2))
         UPDATE outbox SET status = {DELIVERY_STATUS_SQL},
                delivery_status = j.status,
                delivered_at = CASE WHEN j.create_time BETWEEN 0 AND 253402300799
                                    THEN to_timestamp(j.create_time) ELSE $1 END,
                updated_at = $1
         FROM j
         WHERE outbox.id = j.id AND outbox.status = 'sent'",
        delivery_events!()
    )
});

/// The join's second step: the events whose row took their status are marked joined, with
/// the row's id, by the same `LATERAL` probe per event.
pub(super) const MARK_EVENTS_JOINED: &str = concat!(
    "UPDATE inbound_events e SET joined_at = $1, outbox_id = j.outbox_id
     FROM (SELECT u.id, o.id AS outbox_id
           FROM inbound_events u
           CROSS JOIN LATERAL (SELECT o.id FROM outbox o
                               WHERE o.account = u.account AND o.msgid = u.msgid
                                 AND o.touser = u.from_user
                                 AND o.delivery_status IS NOT NULL
                               LIMIT 1) o
           WHERE u.joined_at IS NULL AND u.given_up_at IS NULL
             AND u.event IN ",
    delivery_events!(),
    "
             AND ($2::bigint IS NULL OR u.id = $2)) AS j
     WHERE e.id = j.id"
);

pub(super) async fn claim_plan(
    pool: &PgPool,
    now: DateTime<Utc>,
    per_user_since: Option<DateTime<Utc>>,
) -> StoreResult<String> {
    let sql = match per_user_since {
        None => &CLAIM,
        Some(_) => &CLAIM_PER_USER,
    };
    let mut explain = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", **sql)))
        .bind("plan")
        .bind(now)
        .bind(now)
        .bind(64_i64)
        .bind("2026-11")
        .bind("2026-11-28");
    if let Some(since) = per_user_since {
        explain = explain.bind(since);
    }
    let steps: Vec<String> = explain.fetch_all(pool).await?;
    Ok(steps.join("\n"))
}

pub(super) async fn join_plan(pool: &PgPool, now: DateTime<Utc>) -> StoreResult<String> {
    let sql = AssertSqlSafe(format!("EXPLAIN {}", *JOIN_EVENTS_TO_ROWS));
    let steps: Vec<String> = sqlx::query_scalar(sql)
        .bind(now)
        .bind(None::<i64>)
        .fetch_all(pool)
        .await?;
    Ok(steps.join("\n"))
}

pub(super) async fn claim(
    store: &PostgresStore,
    request: &ClaimRequest<'_>,
    countable: Countable<'_>,
) -> StoreResult<Vec<Claimed>> {
    let mut tx = begin_write(&store.pool).await?;
    let sql = match request.per_user_since {
        None => &CLAIM,
        Some(_) => &CLAIM_PER_USER,
    };
    let mut claim = sqlx::query(sql.as_str())
        .bind(request.owner)
        .bind(request.lease_until)
        .bind(request.now)
        .bind(request.limit as i64)
        .bind(request.month)
        .bind(request.day);
    if let Some(since) = request.per_user_since {
        claim = claim.bind(since);
    }
    let rows = claim.fetch_all(&mut *tx).await?;
    let rows: Vec<RawMessage> = rows
        .into_iter()
        .map(raw_message)
        .collect::<StoreResult<_>>()?;
    let terms = reserve::terms(&rows, countable);
    let items = reserve::claim_reservations(request, &rows, &terms);
    // Every row is ours and already marked by the claim: count them.
    let marked = vec![true; items.len()];
    let mut counters = PgCounters {
        tx: &mut tx,
        now: request.now,
    };
    let results = reserve::count(&mut counters, &items, &marked).await?;
    let claimed = reserve::claimed(rows, &terms, results);
    // The claim's marks stay only on the rows it counted.
    let unmark: Vec<i64> = claimed
        .iter()
        .filter(|c| c.raw.quota_month.is_none() && c.reserved != Some(Reserved::Granted))
        .map(|c| c.raw.id)
        .collect();
    if !unmark.is_empty() {
        reserve::Counters::unmark(&mut counters, unmark).await?;
    }
    tx.commit().await?;
    Ok(claimed)
}

/// One statement for the whole group: the outcomes travel as arrays and `unnest` turns them
/// back into rows, so a group costs one round trip and one commit whatever its size.
///
/// The group statements check the row's state as a join condition, `(o.status = 'sending'
/// AND o.lease_owner = …) = (v.id IS NOT NULL)`, never as a condition on `outbox` alone, so
/// that the planner can neither use the `outbox_leases` partial index nor estimate how many
/// rows are being sent. With the index visible, the generic plan a kept statement gets after
/// five runs (which cannot see how many ids the arrays hold) walked every row being sent and
/// re-read the arrays for each: 5-8 ms for a group of 83. With the state a filter on `outbox`
/// (`(status = 'sending') IS TRUE`, which hid the index), statistics taken while no row was
/// being sent (an ANALYZE after the apps' inserts; 'sending' rows are always brief) make it
/// expect one such row; on a table small enough that reading it costs less than 256
/// primary-key lookups, it read the table and compared each of the ~600 rows in flight with
/// every element of the arrays: 50-70 ms per group, and 10k-row drains at half the speed of
/// 100k ones (issue 16). Now each id is looked up by primary key: under 1 ms
/// (docs/benchmarks.md).
pub(super) async fn finish_many(
    store: &PostgresStore,
    owner: &str,
    items: &[Finish],
) -> StoreResult<Vec<bool>> {
    let columns: Vec<_> = items.iter().map(|i| i.outcome.columns(i.now)).collect();
    let updated: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox AS o SET status = v.status, msgid = COALESCE(v.msgid, o.msgid),
                sent_at = CASE WHEN v.sent THEN v.now ELSE o.sent_at END,
                next_attempt_at = COALESCE(v.next_attempt_at, o.next_attempt_at),
                last_errcode = v.errcode, last_error = v.error,
                in_doubt = (v.in_doubt OR (o.in_doubt AND v.status IN ('pending', 'held'))),
                attempts = o.attempts - v.refund, lease_owner = NULL, lease_expires_at = NULL,
                updated_at = v.now, held_for = v.held_for,
                in_doubt_since = CASE WHEN (v.in_doubt OR (o.in_doubt AND v.status IN ('pending', 'held')))
                                      THEN COALESCE(o.in_doubt_since, v.began) END
         FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::boolean[],
                     $5::timestamptz[], $6::integer[], $7::text[], $8::boolean[],
                     $9::integer[], $10::timestamptz[], $11::text[], $12::timestamptz[])
              AS v(id, status, msgid, sent, next_attempt_at, errcode, error, in_doubt,
                   refund, now, held_for, began)
         WHERE o.id = v.id AND (o.status = 'sending' AND o.lease_owner = $13) = (v.id IS NOT NULL)
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
    .fetch_all(&store.pool)
    .await?;
    Ok(super::written(items, |i| i.id, updated))
}

/// Reserves quota for `items` inside `tx` (see `Store::reserve_quota_many`).
pub(super) async fn reserve_in(
    tx: &mut Transaction<'_, Postgres>,
    items: &[QuotaReservation<'_>],
) -> StoreResult<Vec<Reserved>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    reserve::reserve(&mut PgCounters { tx, now: first.now }, items).await
}

/// Each statement takes the whole group as arrays: one round trip however many rows and
/// counters it touches.
struct PgCounters<'t, 'c> {
    tx: &'t mut Transaction<'c, Postgres>,
    now: DateTime<Utc>,
}

impl reserve::Counters for PgCounters<'_, '_> {
    /// The row's state as a join condition, for the reason `finish_many` gives.
    async fn mark(&mut self, items: &[QuotaReservation<'_>]) -> StoreResult<Vec<i64>> {
        sqlx::query_scalar(
            "UPDATE outbox AS o SET quota_month = v.month, quota_day = v.day
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
                  AS v(id, month, day, owner)
             WHERE o.id = v.id
               AND (o.status = 'sending' AND o.lease_owner = v.owner) = (v.id IS NOT NULL)
             RETURNING o.id",
        )
        .bind(items.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(items.iter().map(|r| r.month).collect::<Vec<_>>())
        .bind(items.iter().map(|r| r.day).collect::<Vec<_>>())
        .bind(items.iter().map(|r| r.owner).collect::<Vec<_>>())
        .fetch_all(&mut **self.tx)
        .await
    }

    async fn unmark(&mut self, ids: Vec<i64>) -> StoreResult<()> {
        sqlx::query("UPDATE outbox SET quota_month = NULL, quota_day = NULL WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut **self.tx)
            .await?;
        Ok(())
    }

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

/// The two statements of `Store::release_holds_with_room`, with the limits as arrays. Two, not
/// one: the month's rows are looked up by template, and one join with an `OR` on the template
/// would walk every held row of the account each second.
pub(super) async fn release_holds_with_room(
    tx: &mut Transaction<'_, Postgres>,
    limits: &[HoldLimits<'_>],
    month: &str,
    day: &str,
    now: Time,
) -> StoreResult<u64> {
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
                              -- Subscription notifications have their own month
                              -- (subscribe.monthly_per_template): released when it ends.
                              AND h.kind = 'template'
                              AND h.template_id = substr(q.scope, 10)) ranked
               WHERE n <= room) r
         WHERE o.id = r.id AND o.status = 'held'",
    )
    .bind(&accounts)
    .bind(&monthly)
    .bind(month)
    .bind(now)
    .execute(&mut **tx)
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
    .execute(&mut **tx)
    .await?;
    Ok(months.rows_affected() + others.rows_affected())
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
        expires_at: r.time("expires_at"),
        attempts: r.get("attempts"),
        in_doubt_since: r.time("in_doubt_since"),
        in_doubt: r.get("in_doubt"),
        unreadable: None,
        suppressed: r.get("suppressed"),
        refused: r.get("refused"),
        quota_month: r.get("quota_month"),
        quota_day: r.get("quota_day"),
        template_in_use: r.get("template_in_use"),
        template_content: r.get("template_content"),
        kind: r.get("kind"),
        page: r.get("page"),
        first_due: r.time("first_due"),
        long_term: r.get("long_term"),
    };
    Ok(RawMessage {
        unreadable: r.problem,
        ..message
    })
}
