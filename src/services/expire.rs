//! Rows whose `expires_at` passed before they could be sent become `expired`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Service;
use crate::store::Store;

pub struct ExpireOverdue {
    pub store: Store,
}

impl Service for ExpireOverdue {
    /// Rows expired.
    type Report = u64;

    fn name(&self) -> &'static str {
        "expire"
    }

    fn interval(&self) -> Duration {
        super::MAINTENANCE_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        super::MAINTENANCE_FAILED
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<u64> {
        let rows = self.store.expire_overdue(now).await?;
        if rows > 0 {
            tracing::info!(rows, "rows expired before they could be sent");
        }
        Ok(rows)
    }
}
