//! The claim of due rows, and the leases that make a claimed row one daemon's.

use chrono::{DateTime, Utc};

use super::{Reserved, Store, StoreResult, Time, on_backend};
use crate::domain::message::RawMessage;

/// One claim: whose, how many rows at most, until when, and the quota periods of `now` (the
/// ones its counted rows are counted in).
pub struct ClaimRequest<'a> {
    pub owner: &'a str,
    pub limit: usize,
    pub lease_until: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub month: &'a str,
    pub day: &'a str,
    /// `order = "per_user"`: a row is claimed only when no earlier row to the same account
    /// and openid is still open, counting only earlier rows first due after this time.
    pub per_user_since: Option<DateTime<Utc>>,
}

/// The claim's extra condition under `order = "per_user"`: the candidate row (`outbox`) is
/// claimed only when no other open row to the same account and openid stands in its way:
/// - one being sent (`sending`), whatever its place: one request per recipient at a time;
/// - one before it in claim order — higher priority, or the same priority and an earlier first
///   due time, or the same and a smaller id — that is due already (a row scheduled for later
///   never holds back one due now), and that either is due to be claimed now (pending, its
///   `next_attempt_at` passed) or has waited (held, retry backoff) less than the hold: its
///   first due time is after `{since}` (`order_hold_max_secs` ago).
///
/// The first due time is `send_after`, else `created_at`: unlike `next_attempt_at` it does not
/// move on a retry, so a failing row keeps its place.
pub(super) fn per_user_condition(sql: &PerUserSql) -> String {
    let PerUserSql {
        now,
        since,
        first_due,
        probe_from,
        same_recipient,
    } = sql;
    let (e_due, o_due) = (first_due("e"), first_due("outbox"));
    format!(
        "
                  AND NOT EXISTS (SELECT 1 FROM {probe_from}
                      WHERE e.account = outbox.account AND e.touser = outbox.touser
                        {same_recipient}
                        AND e.status IN ('pending', 'held', 'sending') AND e.id <> outbox.id
                        AND (e.status = 'sending'
                             OR ({e_due} <= {now}
                                 AND (e.priority > outbox.priority
                                      OR (e.priority = outbox.priority
                                          AND ({e_due} < {o_due}
                                               OR ({e_due} = {o_due} AND e.id < outbox.id))))
                                 AND ((e.status = 'pending' AND e.next_attempt_at <= {now})
                                      OR {e_due} > {since}))))"
    )
}

/// What the per-user condition says differently on each backend.
pub(super) struct PerUserSql {
    /// The binds of the claim's time and of the hold's start (`order_hold_max_secs` ago).
    pub now: &'static str,
    pub since: &'static str,
    /// A row's first due time, as the backend reads it.
    pub first_due: fn(&str) -> String,
    /// `outbox` as the probe reads it, aliased `e`.
    pub probe_from: &'static str,
    /// A match beside `e.touser = outbox.touser` that lets the probe use the index's key.
    pub same_recipient: &'static str,
}

/// The index the per-user condition probes, `outbox_recipient_open ON outbox ({key}) WHERE …`:
/// open rows by recipient. Created when a daemon starts with `order = "per_user"` (not by a
/// migration: every daemon would otherwise pay for its upkeep on each insert and claim).
pub(super) fn per_user_index(key: &str) -> String {
    format!(
        "outbox_recipient_open ON outbox ({key})
         WHERE status IN ('pending', 'held', 'sending')"
    )
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

impl Store {
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
        on_backend!(
            self,
            backend | backend,
            dialect | dialect::claim(backend, request, countable).await
        )
    }

    /// Creates the index `order = "per_user"` needs, if it is missing.
    pub async fn prepare_per_user_order(&self) -> StoreResult<()> {
        on_backend!(self, |pool, dialect| dialect::create_per_user_index(pool)
            .await)
    }

    /// How the database would run the claim now (its `EXPLAIN`), to check that it reads the
    /// claim index rather than the table, however many rows wait.
    /// With `per_user_since`, the statement of `order = "per_user"`.
    pub async fn claim_plan(
        &self,
        now: DateTime<Utc>,
        per_user_since: Option<DateTime<Utc>>,
    ) -> StoreResult<String> {
        on_backend!(self, |pool, dialect| dialect::claim_plan(
            pool,
            now,
            per_user_since
        )
        .await)
    }

    /// Extends the lease of a row `owner` still holds; false if it no longer does.
    pub async fn extend_lease(
        &self,
        owner: &str,
        id: i64,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_backend!(self, |pool, _d| {
            let done = sqlx::query(
                "UPDATE outbox SET lease_expires_at = $1
                 WHERE id = $2 AND status = 'sending' AND lease_owner = $3",
            )
            .bind(Time(lease_until))
            .bind(id)
            .bind(owner)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }
}
