//! Users who refused a template (43101): the claim reads the pair's refusal with each row, so
//! that later rows fail without a request; entries expire, and `prune` deletes expired ones.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// A refusal WeChat answered for one row.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    pub account: &'a str,
    pub openid: &'a str,
    pub template_id: &'a str,
    pub outbox_id: i64,
    pub refused_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Store {
    /// Records (or renews) that the user refused the template.
    pub async fn record_refusal(&self, refusal: &Refusal<'_>) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "INSERT INTO refusals (account, openid, template_id, refused_at, expires_at,
                     outbox_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (account, openid, template_id) DO UPDATE SET
                     refused_at = excluded.refused_at, expires_at = excluded.expires_at,
                     outbox_id = excluded.outbox_id",
            )
            .bind(refusal.account)
            .bind(refusal.openid)
            .bind(refusal.template_id)
            .bind(Time(refusal.refused_at))
            .bind(Time(refusal.expires_at))
            .bind(refusal.outbox_id)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Deletes refusals that expired before `now`; returns how many.
    pub async fn forget_expired_refusals(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            Ok(sqlx::query("DELETE FROM refusals WHERE expires_at <= $1")
                .bind(Time(now))
                .execute(pool)
                .await?
                .rows_affected())
        })
    }
}
