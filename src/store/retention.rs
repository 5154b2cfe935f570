//! Deleting what is old and final, in bounded batches.

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{Store, StoreResult, Time, on_backend};
use crate::domain::status::Status;

impl Store {
    /// Deletes up to `batch` terminal rows last changed before `cutoff`, and as many stored
    /// pushes received before it; returns how many of each. A waiting row is never deleted,
    /// however old. Quota rows of the last 400 days stay for the reports. Call again until it
    /// returns (0, 0).
    pub async fn prune(&self, cutoff: DateTime<Utc>, batch: u32) -> StoreResult<(u64, u64)> {
        let batch = i64::from(batch);
        let terminal = Status::terminal_sql_list();
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                     WHERE status IN {terminal} AND updated_at < $1 LIMIT $2)"
            )))
            .bind(Time(cutoff))
            .bind(batch)
            .execute(pool)
            .await?;
            let events = sqlx::query(
                "DELETE FROM inbound_events WHERE id IN (SELECT id FROM inbound_events
                     WHERE received_at < $1 LIMIT $2)",
            )
            .bind(Time(cutoff))
            .bind(batch)
            .execute(pool)
            .await?;
            // The dashboard's log of attempts, by age (a row's attempts are no newer than its last
            // change), batch after batch until none is left: it is not counted in what this
            // returns, so the caller's loop would not come back for it.
            loop {
                let attempts = sqlx::query(
                    "DELETE FROM outbox_attempts WHERE id IN (SELECT id FROM outbox_attempts
                         WHERE at < $1 LIMIT $2)",
                )
                .bind(Time(cutoff))
                .bind(batch)
                .execute(pool)
                .await?;
                if attempts.rows_affected() < batch as u64 {
                    break;
                }
            }
            // Ledger entries that allow nothing (rejected, or one-time consents used up) and
            // have not changed since the cutoff: what is left of them is the reason text a
            // missing entry gives too. Consents in force are kept, however old.
            loop {
                let consents = sqlx::query(
                    "DELETE FROM consents WHERE (account, openid, template_id) IN (
                         SELECT c.account, c.openid, c.template_id FROM consents c
                         WHERE c.updated_at < $1
                           AND (c.status = 'reject'
                                OR (c.granted = 0
                                    AND NOT EXISTS (SELECT 1 FROM subscribe_templates t
                                                    WHERE t.account = c.account
                                                      AND t.template_id = c.template_id
                                                      AND t.long_term)))
                         LIMIT $2)",
                )
                .bind(Time(cutoff))
                .bind(batch)
                .execute(pool)
                .await?;
                if consents.rows_affected() < batch as u64 {
                    break;
                }
            }
            sqlx::query("DELETE FROM quota_usage WHERE updated_at < $1")
                .bind(Time(cutoff - chrono::Duration::days(400)))
                .execute(pool)
                .await?;
            Ok((rows.rows_affected(), events.rows_affected()))
        })
    }
}
