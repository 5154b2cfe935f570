//! The worker pool: claims due rows in batches, holds up to `concurrency + claim_ahead` of them
//! (at most `concurrency` with a request to WeChat in flight; the others are having their quota
//! counted or their outcome written, so a free request slot never waits for a commit). The
//! table's upkeep (rescuing expired leases, expiring overdue rows, releasing held rows) is done
//! by services (src/services/).
//!
//! No transaction or lock is held across an HTTP call: a claim is one short transaction that
//! sets a lease (and counts the quota of the rows it can tell are ready), and each outcome is
//! another.

mod claim;
mod consent;
pub mod dispatch;
mod limits;
pub mod rate;
mod record;

pub use claim::{CLAIM_LOOP_MAX_WAIT, Pool, PoolSettings};
pub use dispatch::Dispatcher;
pub use rate::AccountRuntime;
pub use record::{Completions, Reservations};

/// Tells systemd (when run under it with `Type=notify`) how the daemon is doing; a no-op
/// elsewhere.
pub fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
