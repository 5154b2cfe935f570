//! Held rows move on: those whose time has come (a retry after a pause, the next period), and
//! those whose limit has room again (a send given back, a limit raised by a reload).

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::Service;
use crate::domain::quota::periods;
use crate::store::{HoldLimits, Store};
use crate::worker::AccountRuntime;

pub struct ReleaseHeld {
    pub store: Store,
    /// Whose limits are read on each pass: a reload (SIGHUP) may have raised one.
    pub accounts: Arc<Vec<Arc<AccountRuntime>>>,
    pub timezone: Tz,
}

/// What one pass released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub due: u64,
    pub with_room: u64,
    /// Rows held for a consent the user has given since (a push that landed while the row was
    /// being held, after the push's own wake-up).
    pub consented: u64,
}

/// How far back a pass looks for consents given: far more than a hold takes to be written
/// after its claim (milliseconds; seconds with a slow database), so none is missed, and few
/// enough that a burst of popups costs each pass one probe per recent consent.
const CONSENTS_LOOKBACK: chrono::Duration = chrono::Duration::seconds(15);

impl Service for ReleaseHeld {
    type Report = Released;

    fn name(&self) -> &'static str {
        "release"
    }

    fn interval(&self) -> Duration {
        super::MAINTENANCE_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        super::MAINTENANCE_FAILED
    }

    /// Both steps run even when the first fails; the pass fails if either did.
    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<Released> {
        let current = periods(now, self.timezone);
        let limits: Vec<_> = self
            .accounts
            .iter()
            .map(|runtime| (runtime.account.name.as_str(), runtime.limits()))
            .collect();
        let hold_limits: Vec<HoldLimits> = limits
            .iter()
            .map(|(name, limits)| HoldLimits {
                account: name,
                active_templates: limits
                    .auto_activate_templates
                    .then_some(limits.active_templates),
                monthly_per_template: limits.monthly_per_template,
                daily_per_account: limits.daily_per_account,
            })
            .collect();
        let mut released = Released::default();
        let mut failed = Vec::new();
        // First, so that the rows it wakes are released by the next step of this pass.
        match self
            .store
            .wake_held_for_given_consent(now, now - CONSENTS_LOOKBACK)
            .await
        {
            Ok(rows) => released.consented = rows,
            Err(e) => failed.push(format!("wake rows held for a given consent: {e}")),
        }
        match self.store.release_due_holds(now).await {
            Ok(rows) => {
                if rows > 0 {
                    tracing::info!(rows, "held rows are due again");
                }
                released.due = rows;
            }
            Err(e) => failed.push(format!("release due holds: {e}")),
        }
        let with_room =
            self.store
                .release_holds_with_room(&hold_limits, &current.month, &current.day, now);
        match with_room.await {
            Ok(rows) => {
                if rows > 0 {
                    tracing::info!(rows, "held rows have room again");
                }
                released.with_room = rows;
            }
            Err(e) => failed.push(format!("release holds with room: {e}")),
        }
        if failed.is_empty() {
            Ok(released)
        } else {
            Err(anyhow!(failed.join("; ")))
        }
    }
}
