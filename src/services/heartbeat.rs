//! Liveness: each daemon beats a heartbeat row, and the accounts' send rate is re-divided
//! (`AccountRuntime`'s share, worker/rate.rs) when the number of live daemons changes. The
//! row is removed at shutdown, so that the others take up the rate at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Service, Time};
use crate::store::Store;
use crate::worker::AccountRuntime;
use crate::worker::rate::HEARTBEAT_INTERVAL;

pub struct Heartbeat {
    store: Store,
    owner: String,
    accounts: Arc<Vec<Arc<AccountRuntime>>>,
    /// Among how many live daemons the rate is divided now.
    sharing: AtomicU32,
}

impl Heartbeat {
    pub fn new(store: Store, owner: String, accounts: Arc<Vec<Arc<AccountRuntime>>>) -> Self {
        Heartbeat {
            store,
            owner,
            accounts,
            sharing: AtomicU32::new(1),
        }
    }
}

impl Service for Heartbeat {
    /// The live daemons the rate is divided among.
    type Report = u32;

    fn name(&self) -> &'static str {
        "heartbeat"
    }

    fn interval(&self) -> Duration {
        HEARTBEAT_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        "heartbeat failed; keeping the current rate share"
    }

    /// Other daemons write their beats in their own real time.
    fn time(&self) -> Time {
        Time::Wall
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<u32> {
        let alive_since =
            now - chrono::Duration::from_std(HEARTBEAT_INTERVAL * 3).unwrap_or_default();
        let alive = self.store.heartbeat(&self.owner, now, alive_since).await?;
        let alive = u32::try_from(alive.max(1)).unwrap_or(u32::MAX);
        if alive != self.sharing.load(Ordering::Relaxed) {
            tracing::info!(
                daemons = alive,
                "re-dividing the send rate among live daemons"
            );
            for account in self.accounts.iter() {
                account.share_with(alive);
            }
            self.sharing.store(alive, Ordering::Relaxed);
        }
        Ok(alive)
    }

    async fn stop(&self) {
        if let Err(e) = self.store.remove_daemon(&self.owner).await {
            tracing::warn!(error = %e, "could not remove this daemon's heartbeat row");
        }
    }
}
