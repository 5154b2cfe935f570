//! What becomes of a claimed row: its attempt's outcome, and the rows maintenance moves on
//! (leases that expired, rows past `expires_at`, doubt that lasted too long, paused accounts).

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{Outcome, Store, StoreResult, Time, bounded, on_backend};
use crate::domain::lifecycle::reason;

/// One outcome to write: the row, what happened, when, and when its attempt began.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: i64,
    pub outcome: Outcome,
    pub now: DateTime<Utc>,
    pub attempt_began: DateTime<Utc>,
}

/// Puts rows in flight back to `pending` in doubt (`$1` now, `$2` the reason), for rows
/// matching `rows` ; their doubt began when they were claimed (the dialect's `CLAIMED_AT`).
fn back_in_doubt(claimed_at: &str, rows: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!(
        "UPDATE outbox SET status = 'pending', in_doubt = true,
                in_doubt_since = COALESCE(in_doubt_since, {claimed_at}), lease_owner = NULL,
                lease_expires_at = NULL, next_attempt_at = $1, last_error = $2, updated_at = $1
         WHERE status = 'sending' AND {rows}
         RETURNING id"
    ))
}

impl Store {
    /// Writes attempts' outcomes, each only if `owner` still holds the row's lease, in one
    /// transaction (one commit, one fsync); for each, whether the row was still ours. All or
    /// none: on an error nothing was written. `attempt_began` is when an attempt was claimed: if
    /// its outcome leaves the row in doubt for the first time, the de-duplication window
    /// started then. Doubt an earlier attempt left is kept while the row waits (pending or
    /// held), whatever the outcome says; only a final outcome ends it.
    pub async fn finish_many(&self, owner: &str, items: &[Finish]) -> StoreResult<Vec<bool>> {
        on_backend!(
            self,
            backend | backend,
            dialect | dialect::finish_many(backend, owner, items).await
        )
    }

    /// Returns rows whose lease expired (their daemon died) to `pending`, marked in doubt.
    pub async fn rescue_expired_leases(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let ids: Vec<i64> = on_backend!(self, |pool, dialect| {
            sqlx::query_scalar(back_in_doubt(dialect::CLAIMED_AT, "lease_expires_at < $1"))
                .bind(Time(now))
                .bind(reason::LEASE_EXPIRED)
                .fetch_all(pool)
                .await?
        });
        self.log_doubt(&ids, now, reason::LEASE_EXPIRED).await;
        Ok(ids.len() as u64)
    }

    /// Releases every row `owner` still holds, marked in doubt; for shutdown.
    pub async fn release_owned(&self, owner: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        let ids: Vec<i64> = on_backend!(self, |pool, dialect| {
            sqlx::query_scalar(back_in_doubt(dialect::CLAIMED_AT, "lease_owner = $3"))
                .bind(Time(now))
                .bind(reason::RELEASED_AT_SHUTDOWN)
                .bind(owner)
                .fetch_all(pool)
                .await?
        });
        self.log_doubt(&ids, now, reason::RELEASED_AT_SHUTDOWN)
            .await;
        Ok(ids.len() as u64)
    }

    /// Logs rows put back in doubt (a rare path: a daemon died or stopped mid-request), so that
    /// the dashboard never offers to send them again. Best effort: the rows are what counts.
    async fn log_doubt(&self, ids: &[i64], now: DateTime<Utc>, why: &str) {
        if ids.is_empty() {
            return;
        }
        let attempts: Vec<_> = ids
            .iter()
            .map(|&outbox_id| super::AttemptLog {
                outbox_id,
                at: now,
                status: "pending",
                errcode: None,
                error: Some(why),
                in_doubt: true,
            })
            .collect();
        if let Err(e) = self.log_attempts(&attempts).await {
            tracing::warn!(error = %e, "attempts in doubt not logged for the dashboard");
        }
    }

    /// Marks waiting rows whose `expires_at` has passed as `expired`.
    pub async fn expire_overdue(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            let done = sqlx::query(
                "UPDATE outbox SET status = 'expired', held_for = NULL, last_error = $2,
                        updated_at = $1
                 WHERE status IN ('pending', 'held') AND expires_at <= $1",
            )
            .bind(Time(now))
            .bind(reason::EXPIRED)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })
    }

    /// Marks pending in-doubt rows first attempted before `first_attempt_before` as `unknown`,
    /// each with its kind's reason (a subscription notification has no de-duplication at all).
    pub async fn give_up_in_doubt(
        &self,
        first_attempt_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, |pool, dialect| {
            let done = sqlx::query(dialect::GIVE_UP_IN_DOUBT)
                .bind(Time(now))
                .bind(Time(first_attempt_before))
                .bind(reason::GAVE_UP_IN_DOUBT)
                .bind(reason::SUBSCRIBE_IN_DOUBT)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Stops claims of `account`'s rows until `until` (WeChat refused the account as a whole).
    pub async fn pause_account(
        &self,
        account: &str,
        until: DateTime<Utc>,
        errcode: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "INSERT INTO account_pauses (account, paused_until, errcode, reason, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account) DO UPDATE SET paused_until = excluded.paused_until,
                    errcode = excluded.errcode, reason = excluded.reason,
                    created_at = excluded.created_at",
            )
            .bind(account)
            .bind(Time(until))
            .bind(errcode_column(errcode))
            .bind(bounded(reason))
            .bind(Time(now))
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}

/// errcodes are small integers; the columns are INTEGER (32 bits on Postgres).
pub(crate) fn errcode_column(errcode: i64) -> i32 {
    i32::try_from(errcode).unwrap_or(i32::MAX)
}
