//! Retention: terminal rows and stored pushes older than `retention.keep_days` are deleted in
//! small batches, so that pruning never blocks sends for long. Waiting rows are never deleted.
//! Refusals (43101) are deleted once expired.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::RetentionSettings;
use crate::store::{Store, StoreResult};

/// A pause between batches, leaving the database to the senders.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Deletes everything due at `now`, batch by batch; returns (rows, pushes) deleted. The
/// daemon runs it every `interval_secs` (services/prune.rs); `wechat-outbox prune` once.
pub async fn prune_due(
    store: &Store,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
) -> StoreResult<(u64, u64)> {
    let cutoff = now - chrono::Duration::days(i64::from(settings.keep_days));
    // Expired refusals no longer stop a row; they go with the rest of what is old. A failure
    // here must not stop the pruning of rows.
    if let Err(e) = store.forget_expired_refusals(now).await {
        tracing::warn!(error = %e, "could not delete expired refusals; trying at the next prune");
    }
    if let Err(e) = store.forget_past_turns(now).await {
        tracing::warn!(error = %e, "could not delete past recipient turns; trying at the next prune");
    }
    let mut total = (0, 0);
    loop {
        let (rows, pushes) = store.prune(cutoff, settings.batch_size).await?;
        total = (total.0 + rows, total.1 + pushes);
        if rows < u64::from(settings.batch_size) && pushes < u64::from(settings.batch_size) {
            return Ok(total);
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}
