//! Reads WeChat's own figures for the account's template sends today (`openapi/quota/get`), at
//! start and hourly: kept for `report_quota` and `wechat-outbox quota`, put in force as the
//! daily cap of accounts with `daily_per_account = "wechat"`, and compared with the daemon's
//! own count of the day, since a difference means another system sends on the account.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use chrono::{DateTime, Utc};

use super::Service;
use super::limits::record_limits;
use crate::domain::quota::{ACCOUNT_SCOPE, periods};
use crate::domain::text::{loggable, loggable_within};
use crate::store::{Store, WechatQuotaReading};
use crate::wechat::api::WechatApi;
use crate::wechat::token::TokenManager;
use crate::worker::AccountRuntime;

/// How often WeChat's figures are read.
const READ_INTERVAL: Duration = Duration::from_secs(3600);
const READ_RETRY: Duration = Duration::from_secs(300);

pub struct WechatQuota {
    pub store: Store,
    pub api: WechatApi,
    pub tokens: Arc<TokenManager>,
    pub accounts: Arc<Vec<Arc<AccountRuntime>>>,
    /// `limits.timezone` as configured, and as parsed.
    pub zone_name: String,
    pub timezone: chrono_tz::Tz,
}

impl Service for WechatQuota {
    /// The readings taken.
    type Report = Vec<WechatQuotaReading>;

    fn name(&self) -> &'static str {
        "wechat_quota"
    }

    fn interval(&self) -> Duration {
        READ_INTERVAL
    }

    fn retry_after(&self) -> Duration {
        READ_RETRY
    }

    fn failure_message(&self) -> &'static str {
        "cannot read WeChat's quota figures (openapi/quota/get); the daily cap stays as it was"
    }

    fn time(&self) -> super::Time {
        super::Time::Wall
    }

    /// Every account is read. The pass fails, naming them, only for accounts whose cap follows
    /// WeChat; for the others the figures are for the reports, and a failure is logged.
    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<Vec<WechatQuotaReading>> {
        let mut readings = Vec::new();
        let mut failed = Vec::new();
        for runtime in self.accounts.iter() {
            match self.read(runtime, now).await {
                Ok(reading) => readings.push(reading),
                Err(e) => {
                    // WeChat's errmsg is in it: escaped, and bounded.
                    let error =
                        loggable_within(&format!("account {}: {e:#}", runtime.account.name), 400);
                    if runtime.limits().daily_follows_wechat {
                        failed.push(error);
                    } else {
                        tracing::warn!(%error, "cannot read WeChat's quota figures for the reports");
                    }
                }
            }
        }
        // Caps that follow WeChat may have changed: report_quota shows the caps in force.
        if self
            .accounts
            .iter()
            .any(|a| a.limits().daily_follows_wechat)
        {
            record_limits(
                &self.store,
                &self.accounts,
                &self.zone_name,
                self.timezone,
                now,
            )
            .await?;
        }
        if failed.is_empty() {
            Ok(readings)
        } else {
            Err(anyhow!(failed.join("; ")))
        }
    }
}

/// How far WeChat's count and the daemon's may differ before it is logged: sends in flight
/// when either was read are counted by one and not yet the other.
fn differ(wechat: i64, own: i64) -> bool {
    (wechat - own).abs() > (own / 100).max(10)
}

impl WechatQuota {
    async fn read(
        &self,
        runtime: &AccountRuntime,
        now: DateTime<Utc>,
    ) -> anyhow::Result<WechatQuotaReading> {
        let account = &runtime.account.name;
        let answer = self
            .tokens
            .with_token(
                account,
                |token| async move { self.api.send_quota(&token).await },
            )
            .await?;
        let quota = match answer {
            Ok(quota) => quota,
            Err(reply) => {
                return Err(anyhow!(
                    "WeChat answered errcode {}: {}",
                    reply.errcode,
                    reply.errmsg
                ));
            }
        };
        let p = periods(now, self.timezone);
        let own_used = self
            .store
            .quota_usage(&p.month, &p.day)
            .await?
            .into_iter()
            .find(|(a, scope, period, _)| {
                a == account && scope == ACCOUNT_SCOPE && *period == p.day
            })
            .map_or(0, |(.., used)| used);
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let reading = WechatQuotaReading {
            account: account.clone(),
            daily_limit: clamp(quota.daily_limit),
            used: clamp(quota.used),
            remain: clamp(quota.remain),
            own_used,
            read_at: now,
        };
        self.store.record_wechat_quota(&reading).await?;
        // A zero is no figure: the last one stays in force.
        if quota.daily_limit > 0 {
            runtime.set_wechat_daily(quota.daily_limit);
        }
        if differ(reading.used, own_used) {
            tracing::warn!(
                account = %loggable(account),
                wechat_used = reading.used,
                own_used,
                "WeChat counts a different number of template sends today than this daemon's \
                 database: another system may send on this account (or limits.timezone is not \
                 Beijing time, WeChat's day)"
            );
        }
        tracing::info!(
            account = %loggable(account),
            daily_limit = reading.daily_limit,
            used = reading.used,
            remain = reading.remain,
            own_used,
            "WeChat's quota figures read"
        );
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_differences_are_sends_in_flight() {
        assert!(!differ(10, 0));
        assert!(differ(11, 0));
        assert!(!differ(100_500, 100_000), "1 %");
        assert!(differ(102_000, 100_000));
        assert!(differ(0, 50));
    }
}
