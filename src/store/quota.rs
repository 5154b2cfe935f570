//! Quota: a group's sends counted (`reserve.rs` decides, each dialect locks and adds), a send
//! WeChat refused given back, and held rows released when their time comes or room appears.

use chrono::{DateTime, Utc};

use super::{Reserved, Store, StoreResult, Time, on_backend};
use crate::domain::quota::{ACCOUNT_SCOPE, template_scope};

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

/// An account's limits as they bear on its held rows, for `Store::release_holds_with_room`.
pub struct HoldLimits<'a> {
    pub account: &'a str,
    /// Templates in use at once; `None` when auto-activation is off (room alone takes no row
    /// into use, so rows held for room wait for the operator).
    pub active_templates: Option<u32>,
    pub monthly_per_template: u32,
    pub daily_per_account: u32,
}

impl Store {
    /// Counts each row's send in its template's month and its account's day, unless either is
    /// full, and records the periods on the row (guarded by the lease); one transaction for the
    /// group, a result per row in order, each row all or nothing. On an error nothing was
    /// reserved.
    ///
    /// A few statements per counter rather than per row: mark the rows still ours, lock each
    /// counter once (in the order of `reserve::counter_pairs`, so daemons cannot deadlock),
    /// grant rows in order while both counters have room, add what was granted, and unmark the
    /// rows that must wait.
    pub async fn reserve_quota_many(
        &self,
        items: &[QuotaReservation<'_>],
    ) -> StoreResult<Vec<Reserved>> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let results = dialect::reserve_in(&mut tx, items).await?;
            tx.commit().await?;
            Ok(results)
        })
    }

    /// Uncounts a send WeChat refused, and forgets the periods on the row. Only the holder of
    /// the row's lease may, and a count never goes below zero.
    pub async fn release_quota(&self, r: &QuotaReservation<'_>) -> StoreResult<()> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let unmarked = sqlx::query(
                "UPDATE outbox SET quota_month = NULL, quota_day = NULL
                 WHERE id = $1 AND status = 'sending' AND lease_owner = $2
                   AND quota_month IS NOT NULL",
            )
            .bind(r.id)
            .bind(r.owner)
            .execute(&mut *tx)
            .await?;
            if unmarked.rows_affected() == 1 {
                let scope = template_scope(r.template_id);
                // In the reservations' lock order (the day, then the month), so that a
                // give-back and a reservation cannot deadlock on Postgres.
                for (scope, period) in [(ACCOUNT_SCOPE, r.day), (scope.as_str(), r.month)] {
                    sqlx::query(
                        "UPDATE quota_usage SET used = used - 1, updated_at = $4
                         WHERE account = $1 AND scope = $2 AND period = $3 AND used > 0",
                    )
                    .bind(r.account)
                    .bind(scope)
                    .bind(period)
                    .bind(Time(r.now))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Quota rows of the given month and day: (account, scope, period, used).
    pub async fn quota_usage(
        &self,
        month: &str,
        day: &str,
    ) -> StoreResult<Vec<(String, String, String, i64)>> {
        on_backend!(self, |pool, _d| {
            sqlx::query_as(
                "SELECT account, scope, period, CAST(used AS BIGINT) FROM quota_usage
                 WHERE period IN ($1, $2) ORDER BY account, scope",
            )
            .bind(month)
            .bind(day)
            .fetch_all(pool)
            .await
        })
    }

    /// Returns held rows whose time has come to `pending`.
    pub async fn release_due_holds(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            let done = sqlx::query(
                "UPDATE outbox SET status = 'pending', held_for = NULL, updated_at = $1
                 WHERE status = 'held' AND next_attempt_at <= $1",
            )
            .bind(Time(now))
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })
    }

    /// Returns held rows to `pending` when what they wait for has room now: a send given back,
    /// a limit raised or a template taken out of use frees room while the rows are held until
    /// the period ends (and a hold written just after a give-back would otherwise miss it).
    /// The claim checks their limits again, so the quota is never exceeded.
    ///
    /// Two statements (see each dialect's `release_holds_with_room`): rows held for a
    /// template's month, up to the room each template has; rows held for the account's day or
    /// for room among templates, up to that room, and every row held for room whose template
    /// is in use now. Each in claim order, so that the rows released are the ones the claim
    /// takes, and no more than can go.
    pub async fn release_holds_with_room(
        &self,
        limits: &[HoldLimits<'_>],
        month: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, |pool, dialect| {
            // A read through the partial index `outbox_held` first: no held row, no write.
            let any_held: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'held')")
                    .fetch_one(pool)
                    .await?;
            if !any_held {
                return Ok(0);
            }
            let mut tx = dialect::begin_write(pool).await?;
            let released =
                dialect::release_holds_with_room(&mut tx, limits, month, day, Time(now)).await?;
            tx.commit().await?;
            Ok(released)
        })
    }
}
