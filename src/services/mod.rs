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
pub mod wechat_quota;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::clock::Clock;
use crate::domain::lifecycle::reason;
use crate::domain::text::loggable_within;
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
pub use wechat_quota::WechatQuota;

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
    loggable_within(&format!("{error:#}"), reason::MAX_CHARS)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts its passes and stops; fails every pass when told to.
    struct Counting {
        passes: Arc<AtomicUsize>,
        stopped: Arc<AtomicUsize>,
        fail: bool,
        interval: Duration,
        wake: Option<Arc<Notify>>,
    }

    impl Counting {
        fn new(fail: bool, interval: Duration) -> Counting {
            Counting {
                passes: Arc::default(),
                stopped: Arc::default(),
                fail,
                interval,
                wake: None,
            }
        }
    }

    impl Service for Counting {
        type Report = usize;

        fn name(&self) -> &'static str {
            "counting"
        }

        fn interval(&self) -> Duration {
            self.interval
        }

        fn failure_message(&self) -> &'static str {
            "counting failed"
        }

        fn wake(&self) -> Option<Arc<Notify>> {
            self.wake.clone()
        }

        async fn run_once(&self, _now: DateTime<Utc>) -> anyhow::Result<usize> {
            let n = self.passes.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail {
                anyhow::bail!("pass {n} refused\nwith a second line");
            }
            Ok(n)
        }

        async fn stop(&self) {
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn runner(failing_after: Duration) -> (Runner, Arc<Health>, CancellationToken) {
        let health = Arc::new(Health::new(failing_after));
        let shutdown = CancellationToken::new();
        let runner = Runner::new(health.clone(), Arc::default(), shutdown.clone());
        (runner, health, shutdown)
    }

    #[tokio::test]
    async fn a_service_that_keeps_failing_is_retried_and_named_by_health() {
        let (runner, health, shutdown) = runner(Duration::from_millis(50));
        let service = Counting::new(true, Duration::from_millis(10));
        let (passes, stopped) = (service.passes.clone(), service.stopped.clone());
        runner.start(service);
        assert_eq!(
            health.services_problem(),
            None,
            "not yet past its allowance"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let problem = health.services_problem().expect("failing for 200 ms");
        assert!(
            problem.starts_with("counting: no successful pass for 0 s: pass "),
            "{problem}"
        );
        assert!(
            problem.ends_with(r"refused\nwith a second line"),
            "escaped: {problem}"
        );
        assert!(passes.load(Ordering::SeqCst) >= 5, "retried each interval");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), runner.wait())
            .await
            .expect("services stop at shutdown");
        assert_eq!(stopped.load(Ordering::SeqCst), 1, "stop called once");
    }

    #[tokio::test]
    async fn a_service_that_succeeds_stays_healthy() {
        let (runner, health, shutdown) = runner(Duration::from_millis(50));
        runner.start(Counting::new(false, Duration::from_millis(10)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(health.services_problem(), None);
        shutdown.cancel();
        runner.wait().await;
    }

    #[tokio::test]
    async fn the_first_pass_can_run_before_start_returns_and_a_wake_runs_another() {
        let (runner, _health, shutdown) = runner(Duration::from_secs(30));
        let mut service = Counting::new(false, Duration::from_secs(3600));
        let wake = Arc::new(Notify::new());
        service.wake = Some(wake.clone());
        let passes = service.passes.clone();
        runner.start_after_first_pass(service).await;
        assert_eq!(
            passes.load(Ordering::SeqCst),
            1,
            "one pass before returning"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            passes.load(Ordering::SeqCst),
            1,
            "then it waits its interval"
        );
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            passes.load(Ordering::SeqCst),
            2,
            "a wake-up runs a pass at once"
        );
        shutdown.cancel();
        runner.wait().await;
    }
}
