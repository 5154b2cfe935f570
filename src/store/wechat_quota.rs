//! WeChat's own count of the account's template sends today (`openapi/quota/get`), kept beside
//! the daemon's count of the same day for `report_quota` and `wechat-outbox quota`.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// One reading of WeChat's figures, with the daemon's own count at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WechatQuotaReading {
    pub account: String,
    pub daily_limit: i64,
    pub used: i64,
    pub remain: i64,
    /// The daemon's count for the same day (`quota_usage`) when WeChat was read.
    pub own_used: i64,
    pub read_at: DateTime<Utc>,
}

impl Store {
    /// Keeps the latest reading of the account's figures.
    pub async fn record_wechat_quota(&self, reading: &WechatQuotaReading) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "INSERT INTO wechat_quota (account, daily_limit, used, remain, own_used, read_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (account) DO UPDATE SET daily_limit = excluded.daily_limit,
                     used = excluded.used, remain = excluded.remain,
                     own_used = excluded.own_used, read_at = excluded.read_at",
            )
            .bind(&reading.account)
            .bind(reading.daily_limit)
            .bind(reading.used)
            .bind(reading.remain)
            .bind(reading.own_used)
            .bind(Time(reading.read_at))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// The latest reading of every account that has one.
    pub async fn wechat_quota(&self) -> StoreResult<Vec<WechatQuotaReading>> {
        on_backend!(self, |pool, _d| {
            let rows: Vec<(String, i64, i64, i64, i64, Time)> = sqlx::query_as(
                "SELECT account, daily_limit, used, remain, own_used, read_at
                 FROM wechat_quota ORDER BY account",
            )
            .fetch_all(pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(
                    |(account, daily_limit, used, remain, own_used, read_at)| WechatQuotaReading {
                        account,
                        daily_limit,
                        used,
                        remain,
                        own_used,
                        read_at: read_at.0,
                    },
                )
                .collect())
        })
    }
}
