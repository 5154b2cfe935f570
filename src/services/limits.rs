//! Records the limits each account runs with in `account_limits`, for `report_quota`: hourly,
//! so that the timezone's UTC offset follows a DST change, and after a reload (SIGHUP). Only
//! reports read them, so a database that refuses the write (locked by another process, say)
//! must not stop the daemon: the service tries again in 10 s.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Service, Time};
use crate::store::{AccountLimitsRow, Store};
use crate::worker::AccountRuntime;

/// How often the timezone offset in `account_limits` is brought up to date (a DST change).
const LIMITS_REFRESH: Duration = Duration::from_secs(3600);
const LIMITS_RETRY: Duration = Duration::from_secs(10);

pub struct RecordLimits {
    pub store: Store,
    pub accounts: Arc<Vec<Arc<AccountRuntime>>>,
    /// `limits.timezone` as configured, and as parsed.
    pub zone_name: String,
    pub timezone: chrono_tz::Tz,
}

impl Service for RecordLimits {
    type Report = ();

    fn name(&self) -> &'static str {
        "limits"
    }

    fn interval(&self) -> Duration {
        LIMITS_REFRESH
    }

    fn retry_after(&self) -> Duration {
        LIMITS_RETRY
    }

    fn failure_message(&self) -> &'static str {
        "cannot record the account limits yet"
    }

    fn time(&self) -> Time {
        Time::Wall
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        record_limits(
            &self.store,
            &self.accounts,
            &self.zone_name,
            self.timezone,
            now,
        )
        .await
    }
}

/// Writes the limits the accounts run with at `now`, for `report_quota`.
pub async fn record_limits(
    store: &Store,
    accounts: &[Arc<AccountRuntime>],
    zone_name: &str,
    timezone: chrono_tz::Tz,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    use chrono::{Offset, TimeZone};
    let offset = timezone.offset_from_utc_datetime(&now.naive_utc()).fix();
    let rows: Vec<AccountLimitsRow> = accounts
        .iter()
        .map(|a| {
            let limits = a.limits();
            AccountLimitsRow {
                account: a.account.name.clone(),
                active_templates: limits.active_templates,
                monthly_per_template: limits.monthly_per_template,
                daily_per_account: limits.daily_per_account,
                rate_per_second: limits.rate_per_second,
                timezone: zone_name.to_string(),
                utc_offset_minutes: offset.local_minus_utc() / 60,
            }
        })
        .collect();
    store.record_limits(&rows, now).await?;
    Ok(())
}
