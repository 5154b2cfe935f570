//! Retention: terminal rows and stored pushes older than `retention.keep_days` are deleted
//! (`retention::prune_due`), every `retention.interval_secs`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Service;
use crate::config::RetentionSettings;
use crate::retention::prune_due;
use crate::store::Store;

pub struct Prune {
    pub store: Store,
    pub settings: RetentionSettings,
}

impl Service for Prune {
    /// Rows and pushes deleted.
    type Report = (u64, u64);

    fn name(&self) -> &'static str {
        "prune"
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.settings.interval_secs)
    }

    fn failure_message(&self) -> &'static str {
        "pruning failed; trying again later"
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<(u64, u64)> {
        let (rows, pushes) = prune_due(&self.store, &self.settings, now).await?;
        if (rows, pushes) != (0, 0) {
            tracing::info!(
                rows,
                pushes,
                keep_days = self.settings.keep_days,
                "pruned old rows and pushes"
            );
        }
        Ok((rows, pushes))
    }
}
