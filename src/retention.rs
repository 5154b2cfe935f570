//! Retention: terminal rows and stored pushes older than `retention.keep_days` are deleted in
//! small batches, so that pruning never blocks sends for long. Waiting rows are never deleted.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;
use crate::domain::clock::Clock;
use crate::store::{Store, StoreResult};

/// A pause between batches, leaving the database to the senders.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Deletes everything due now, batch by batch; returns (rows, pushes) deleted.
pub async fn prune_due(
    store: &Store,
    settings: &RetentionSettings,
    clock: &Clock,
) -> StoreResult<(u64, u64)> {
    let cutoff = clock.now() - chrono::Duration::days(i64::from(settings.keep_days));
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

/// Prunes every `interval_secs` until `shutdown`.
pub async fn prune_loop(
    store: Store,
    settings: RetentionSettings,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
) {
    loop {
        match prune_due(&store, &settings, &clock).await {
            Ok((0, 0)) => {}
            Ok((rows, pushes)) => tracing::info!(
                rows,
                pushes,
                keep_days = settings.keep_days,
                "pruned old rows and pushes"
            ),
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(settings.interval_secs)) => {}
        }
    }
}
