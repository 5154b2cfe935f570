//! Quota periods: calendar months and days in the configured timezone (Beijing time by
//! default), named as the quota rows name them.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The periods a send at one moment counts in, and when each ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    /// `2026-11`
    pub month: String,
    /// `2026-11-27`
    pub day: String,
    pub month_ends: DateTime<Utc>,
    pub day_ends: DateTime<Utc>,
}

pub fn periods(now: DateTime<Utc>, tz: Tz) -> Periods {
    let local = now.with_timezone(&tz).date_naive();
    let first_of_next_month = if local.month() == 12 {
        NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
    }
    .expect("a valid date");
    let tomorrow = local.succ_opt().expect("a valid date");
    Periods {
        month: local.format("%Y-%m").to_string(),
        day: local.format("%Y-%m-%d").to_string(),
        month_ends: start_of(first_of_next_month, tz, now),
        day_ends: start_of(tomorrow, tz, now),
    }
}

/// Midnight at the start of `date` in `tz`, in UTC (the earliest, where a DST change makes
/// midnight ambiguous; Asia/Shanghai has none).
fn start_of(date: NaiveDate, tz: Tz, fallback: DateTime<Utc>) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    tz.from_local_datetime(&midnight)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(fallback + chrono::Duration::days(1))
}

/// The quota row scope of a template's monthly count.
pub fn template_scope(template_id: &str) -> String {
    format!("template:{template_id}")
}

/// The quota row scope of an account's daily count.
pub const ACCOUNT_SCOPE: &str = "account";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_periods_turn_at_16_00_utc() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let before = periods("2026-11-30T15:59:59Z".parse().unwrap(), tz);
        assert_eq!(
            (before.month.as_str(), before.day.as_str()),
            ("2026-11", "2026-11-30")
        );
        assert_eq!(
            before.month_ends,
            "2026-11-30T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let after = periods("2026-11-30T16:00:00Z".parse().unwrap(), tz);
        assert_eq!(
            (after.month.as_str(), after.day.as_str()),
            ("2026-12", "2026-12-01")
        );
        let december = periods("2026-12-15T00:00:00Z".parse().unwrap(), tz);
        assert_eq!(
            december.month_ends,
            "2026-12-31T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            december.day_ends,
            "2026-12-15T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn other_timezones_follow_their_own_calendar() {
        let utc: Tz = "UTC".parse().unwrap();
        let p = periods("2026-11-30T23:00:00Z".parse().unwrap(), utc);
        assert_eq!(p.month, "2026-11");
        assert_eq!(
            p.month_ends,
            "2026-12-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
