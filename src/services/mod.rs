//! The daemon's background jobs ("services") and the one runner that schedules them.
//!
//! Each job is a small type that does one pass ([`Service::run_once`]) and says how often it
//! runs; the [`Runner`] owns the loop, the sleep, the shutdown, the failure log line and the
//! job's record in [`Health`] (its last success and its failure streak), so that `/healthz`
//! names any job that stops succeeding. The claim loop and the HTTP servers are not services:
//! they are not passes on a timer.

pub mod expire;
pub mod heartbeat;
pub mod join;
pub mod limits;
pub mod prune;
pub mod release;
pub mod rescue;
pub mod settle;
pub mod template_sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::clock::Clock;
use crate::domain::text::escape_control;
use crate::monitor::{Health, ServiceHealth};

pub use expire::ExpireOverdue;
pub use heartbeat::Heartbeat;
pub use join::JoinEvents;
pub use limits::RecordLimits;
pub use prune::Prune;
pub use release::ReleaseHeld;
pub use rescue::RescueLeases;
pub use settle::SettleInDoubt;
pub use template_sync::TemplateSync;

/// How often the maintenance services (rescue, release, expire, settle) pass.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// What a maintenance service logs when its pass fails.
const MAINTENANCE_FAILED: &str = "maintenance step failed; trying again";

/// Which clock a service's `now` is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    /// The daemon's clock, which tests move to turn a quota period: for jobs about the rows.
    Daemon,
    /// Real time: for jobs that compare with times other processes write (heartbeats, pushes).
    Wall,
}

/// One background job.
pub trait Service: Send + Sync + 'static {
    /// What one pass did, for the tests that call `run_once` (the service logs it itself).
    type Report: std::fmt::Debug + Send;

    /// A short name, for the log and for `/healthz`.
    fn name(&self) -> &'static str;

    /// The pause after a pass that succeeded.
    fn interval(&self) -> Duration;

    /// The pause after a pass that failed; the interval unless the service says otherwise.
    fn retry_after(&self) -> Duration {
        self.interval()
    }

    /// The log message (a warning) when a pass fails; the error goes in its `error` field.
    fn failure_message(&self) -> &'static str;

    /// Where `now` comes from.
    fn time(&self) -> Time {
        Time::Daemon
    }

    /// A hint that wakes the service before its interval is over.
    fn wake(&self) -> Option<Arc<Notify>> {
        None
    }

    /// One pass at `now`.
    fn run_once(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = anyhow::Result<Self::Report>> + Send;

    /// Called once at shutdown, after the last pass.
    fn stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Runs each service on its own task, under one tracker and one cancellation token.
pub struct Runner {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    health: Arc<Health>,
    clock: Arc<Clock>,
}

impl Runner {
    pub fn new(health: Arc<Health>, clock: Arc<Clock>, shutdown: CancellationToken) -> Runner {
        Runner {
            tracker: TaskTracker::new(),
            shutdown,
            health,
            clock,
        }
    }

    /// Starts `service`: a first pass now, then one every interval, until shutdown.
    pub fn start<S: Service>(&self, service: S) {
        let service = Arc::new(service);
        let record = self
            .health
            .register_service(service.name(), service.interval());
        self.spawn(service, record, None);
    }

    /// Runs a first pass of `service` before returning (its result is recorded and logged like
    /// any other), then starts it with its next pass an interval later.
    pub async fn start_after_first_pass<S: Service>(&self, service: S) {
        let service = Arc::new(service);
        let record = self
            .health
            .register_service(service.name(), service.interval());
        let wait = pass(&*service, &self.health, &record, &self.clock).await;
        self.spawn(service, record, Some(wait));
    }

    fn spawn<S: Service>(
        &self,
        service: Arc<S>,
        record: Arc<ServiceHealth>,
        mut wait: Option<Duration>,
    ) {
        let (health, clock, shutdown) = (
            self.health.clone(),
            self.clock.clone(),
            self.shutdown.clone(),
        );
        self.tracker.spawn(async move {
            let wake = service.wake();
            loop {
                if let Some(wait) = wait {
                    let woken = async {
                        match &wake {
                            Some(wake) => wake.notified().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                        _ = woken => {}
                    }
                }
                wait = Some(pass(&*service, &health, &record, &clock).await);
            }
            service.stop().await;
        });
    }

    /// Waits until every service has stopped (after the shutdown token is cancelled).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// One pass: runs it, logs a failure, records the result; returns the pause before the next.
async fn pass<S: Service>(
    service: &S,
    health: &Health,
    record: &ServiceHealth,
    clock: &Clock,
) -> Duration {
    let now = match service.time() {
        Time::Daemon => clock.now(),
        Time::Wall => Utc::now(),
    };
    match service.run_once(now).await {
        Ok(_) => {
            health.service_result(record, Ok(()));
            service.interval()
        }
        Err(e) => {
            let error = loggable_error(&e);
            tracing::warn!(service = service.name(), error = %error, "{}", service.failure_message());
            health.service_result(record, Err(&error));
            service.retry_after()
        }
    }
}

/// An error as a log line may carry it: errors can echo outside input (a value a database
/// refused, WeChat's errmsg), so it is bounded and its control characters escaped.
pub fn loggable_error(error: &anyhow::Error) -> String {
    escape_control(&crate::store::bounded(&format!("{error:#}"))).into_owned()
}
