//! In-doubt rows whose `client_msg_id` de-duplication window has passed are marked `unknown`
//! instead of resent. Started only with `retry.in_doubt = "unknown"`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Service;
use crate::store::Store;

pub struct SettleInDoubt {
    pub store: Store,
    /// WeChat's de-duplication window (`RetryPolicy::window`).
    pub window: chrono::Duration,
}

impl Service for SettleInDoubt {
    /// Rows given up as unknown.
    type Report = u64;

    fn name(&self) -> &'static str {
        "settle"
    }

    fn interval(&self) -> Duration {
        super::MAINTENANCE_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        super::MAINTENANCE_FAILED
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<u64> {
        let before = now
            .checked_sub_signed(self.window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let rows = self.store.give_up_in_doubt(before, now).await?;
        if rows > 0 {
            // Messages given up as unknown: worth an alert.
            tracing::warn!(
                rows,
                "in-doubt rows past the de-duplication window marked unknown"
            );
        }
        Ok(rows)
    }
}
