//! Rows of daemons that died: a row in `sending` whose lease expired goes back to `pending`,
//! in doubt (it may have reached WeChat), so that it is resent with the same `client_msg_id`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Service;
use crate::store::Store;

pub struct RescueLeases {
    pub store: Store,
}

impl Service for RescueLeases {
    /// Rows rescued.
    type Report = u64;

    fn name(&self) -> &'static str {
        "rescue"
    }

    fn interval(&self) -> Duration {
        super::MAINTENANCE_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        super::MAINTENANCE_FAILED
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<u64> {
        let rows = self.store.rescue_expired_leases(now).await?;
        if rows > 0 {
            // A daemon died: worth an alert.
            tracing::warn!(rows, "rescued rows whose lease expired");
        }
        Ok(rows)
    }
}
