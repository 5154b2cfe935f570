//! Bar charts as inline SVG, drawn from counts: no script, no library, nothing an app wrote
//! (only numbers and times) inside.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::store::ActivityCount;

/// Bars of a chart: rows that reached WeChat (`sent` and its delivery outcomes) and rows that
/// ended without (failed, expired, cancelled, unknown), per bucket.
pub struct Series {
    pub label: &'static str,
    /// Start of each bucket, and its counts (reached, ended unsent).
    pub buckets: Vec<(DateTime<Utc>, u64, u64)>,
}

const REACHED: [&str; 4] = ["sent", "delivered", "blocked", "undelivered"];

impl Series {
    /// `buckets` buckets of `minutes` each, ending with the one holding `now`, for `account`.
    pub fn of(
        label: &'static str,
        activity: &[ActivityCount],
        account: &str,
        now: DateTime<Utc>,
        minutes: i64,
        buckets: usize,
    ) -> Series {
        let now_minute = now.timestamp().div_euclid(60);
        let now_bucket = now_minute.div_euclid(minutes);
        let first = now_bucket - buckets as i64 + 1;
        let mut counts = vec![(0u64, 0u64); buckets];
        // A clock ahead of ours may date a row in the future: not shown.
        for a in activity
            .iter()
            .filter(|a| a.account == account && a.minute <= now_minute)
        {
            let bucket = a.minute.div_euclid(minutes);
            if bucket < first || bucket > now_bucket {
                continue;
            }
            let slot = &mut counts[(bucket - first) as usize];
            if REACHED.contains(&a.status.as_str()) {
                slot.0 += a.rows.max(0) as u64;
            } else {
                slot.1 += a.rows.max(0) as u64;
            }
        }
        let buckets = counts
            .into_iter()
            .enumerate()
            .map(|(i, (reached, unsent))| {
                let start = (first + i as i64) * minutes * 60;
                let start = DateTime::from_timestamp(start, 0).unwrap_or(now);
                (start, reached, unsent)
            })
            .collect();
        Series { label, buckets }
    }

    pub fn total(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(a, b), (_, r, u)| (a + r, b + u))
    }

    /// The chart; `time` shows a bucket's start (in the dashboard's timezone).
    pub fn svg(&self, time: impl Fn(DateTime<Utc>) -> String) -> String {
        const W: f64 = 600.0;
        const H: f64 = 120.0;
        let max = self
            .buckets
            .iter()
            .map(|(_, r, u)| r + u)
            .max()
            .unwrap_or(0)
            .max(1);
        let width = W / self.buckets.len().max(1) as f64;
        let mut svg = format!(
            "<svg class=\"chart\" viewBox=\"0 0 {W} {}\" role=\"img\" aria-label=\"{}\">",
            H + 16.0,
            self.label
        );
        for (i, (start, reached, unsent)) in self.buckets.iter().enumerate() {
            let x = i as f64 * width;
            let h_reached = H * *reached as f64 / max as f64;
            let h_unsent = H * *unsent as f64 / max as f64;
            let _ = write!(
                svg,
                "<g><title>{}: {reached} sent, {unsent} ended unsent</title>\
                 <rect x=\"{x:.1}\" y=\"0\" width=\"{width:.1}\" height=\"{H}\" fill=\"transparent\"/>\
                 <rect class=\"reached\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h_reached:.1}\"/>\
                 <rect class=\"unsent\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h_unsent:.1}\"/></g>",
                time(*start),
                H - h_reached,
                (width - 1.0).max(0.5),
                H - h_reached - h_unsent,
                (width - 1.0).max(0.5),
            );
        }
        let first = self.buckets.first().map(|b| time(b.0)).unwrap_or_default();
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{}\">{first}</text><text x=\"{W}\" y=\"{}\" text-anchor=\"end\">now</text>\
             <text x=\"2\" y=\"12\">{max}</text></svg>",
            H + 14.0,
            H + 14.0,
        );
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(status: &str, minute: i64, rows: i64) -> ActivityCount {
        ActivityCount {
            account: "default".into(),
            status: status.into(),
            minute,
            rows,
        }
    }

    #[test]
    fn counts_fall_in_their_buckets_and_old_ones_fall_out() {
        let now = DateTime::from_timestamp(3_600 * 100 + 1_800, 0).unwrap();
        let minute = now.timestamp() / 60;
        let activity = [
            count("delivered", minute, 3),
            count("sent", minute - 1, 2),
            count("failed", minute - 1, 1),
            count("sent", minute - 60, 50),
            count("sent", minute + 5, 7),
        ];
        let hour = Series::of("last hour", &activity, "default", now, 1, 60);
        assert_eq!(hour.buckets.len(), 60);
        assert_eq!(hour.buckets[59].1, 3);
        assert_eq!((hour.buckets[58].1, hour.buckets[58].2), (2, 1));
        assert_eq!(hour.total(), (5, 1), "an hour ago and the future are out");
        let day = Series::of("last day", &activity, "default", now, 60, 24);
        assert_eq!(day.total(), (55, 1));
        assert_eq!(
            Series::of("x", &activity, "other", now, 1, 60).total(),
            (0, 0)
        );
        let svg = hour.svg(|t| t.format("%H:%M").to_string());
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<g>").count(), 60);
    }
}
