//! `/metrics`, `/healthz` and `/readyz` on their own address (`[monitor] listen`), apart from
//! the callback endpoint, which faces WeChat and the internet. docs/operations.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::store::Store;

/// A loop that has not passed for this long counts as stuck. The claim loop passes at least
/// every `CLAIM_LOOP_MAX_WAIT` when it is well.
const STALE_AFTER: Duration = Duration::from_secs(30);
/// How many of its intervals a service may go without a successful pass (at least
/// `failing_after`) before `/healthz` names it: a pass may be slow or fail once.
const SERVICE_INTERVALS: u32 = 3;
/// How long `/healthz` waits for the database.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the loops of the daemon tell about themselves.
pub struct Health {
    base: Instant,
    /// Workers started and not shutting down.
    ready: AtomicBool,
    /// Milliseconds after `base` at which the claim loop last passed; 0 before it first did.
    claim_loop: AtomicU64,
    claims: FailureStreak,
    /// The background services started (src/services/), each with its record.
    services: Mutex<Vec<Arc<ServiceHealth>>>,
    /// A loop whose every pass has failed for this long counts as failing: a row or a
    /// database that makes each claim roll back must not look healthy while nothing is sent.
    failing_after: Duration,
}

/// Since when a loop's passes have all failed (milliseconds after `Health::base`, 0 while the
/// last pass succeeded), and the last error.
#[derive(Default)]
struct FailureStreak {
    since: AtomicU64,
    last_error: Mutex<String>,
}

impl FailureStreak {
    fn record(&self, now_ms: u64, result: Result<(), &dyn std::fmt::Display>) {
        match result {
            Ok(()) => self.since.store(0, Ordering::Relaxed),
            Err(e) => {
                let _ =
                    self.since
                        .compare_exchange(0, now_ms, Ordering::Relaxed, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    crate::domain::lifecycle::reason::bounded(&e.to_string());
            }
        }
    }

    fn failing_for(&self, now_ms: u64, limit: Duration) -> Option<(Duration, String)> {
        let since = self.since.load(Ordering::Relaxed);
        let age = Duration::from_millis(now_ms.saturating_sub(since));
        (since != 0 && age > limit).then(|| {
            let error = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
            (age, error.clone())
        })
    }

    fn last_error(&self) -> Option<String> {
        (self.since.load(Ordering::Relaxed) != 0).then(|| {
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }
}

/// One service's record: when its last pass succeeded (its start, before the first), and its
/// failure streak.
pub struct ServiceHealth {
    name: &'static str,
    /// How long it may go without a successful pass.
    allowance: Duration,
    last_success: AtomicU64,
    streak: FailureStreak,
}

impl ServiceHealth {
    /// Why the service is not well at `now_ms`, if it is not.
    fn problem(&self, now_ms: u64) -> Option<String> {
        let age =
            Duration::from_millis(now_ms.saturating_sub(self.last_success.load(Ordering::Relaxed)));
        if age <= self.allowance {
            return None;
        }
        let mut problem = format!("{}: no successful pass for {} s", self.name, age.as_secs());
        if let Some(error) = self.streak.last_error() {
            problem.push_str(": ");
            problem.push_str(&error);
        }
        Some(problem)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(30))
    }
}

impl Health {
    pub fn new(failing_after: Duration) -> Health {
        Health {
            base: Instant::now(),
            ready: AtomicBool::new(false),
            claim_loop: AtomicU64::new(0),
            claims: FailureStreak::default(),
            services: Mutex::new(Vec::new()),
            failing_after,
        }
    }
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn claim_loop_passed(&self) {
        self.claim_loop.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Records whether a claim reached the database and came back.
    pub fn claim_result(&self, result: Result<(), &dyn std::fmt::Display>) {
        self.claims.record(self.now_ms(), result);
    }

    /// Starts watching a service that passes every `interval`: from now on, `/healthz` fails
    /// when it goes longer than `max(failing_after, 3 × interval)` without a successful pass.
    pub fn register_service(&self, name: &'static str, interval: Duration) -> Arc<ServiceHealth> {
        let record = Arc::new(ServiceHealth {
            name,
            allowance: self
                .failing_after
                .max(interval.saturating_mul(SERVICE_INTERVALS)),
            last_success: AtomicU64::new(self.now_ms()),
            streak: FailureStreak::default(),
        });
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
        record
    }

    /// Records whether a pass of a service succeeded.
    pub fn service_result(
        &self,
        service: &ServiceHealth,
        result: Result<(), &dyn std::fmt::Display>,
    ) {
        let now = self.now_ms();
        if result.is_ok() {
            service.last_success.store(now, Ordering::Relaxed);
        }
        service.streak.record(now, result);
    }

    fn now_ms(&self) -> u64 {
        (self.base.elapsed().as_millis() as u64).max(1)
    }

    /// Why the workers are not alive, if they are not.
    fn workers_problem(&self) -> Option<String> {
        let now = self.now_ms();
        let at = self.claim_loop.load(Ordering::Relaxed);
        if at == 0 {
            return Some("claim loop has not started".into());
        }
        let age = Duration::from_millis(now.saturating_sub(at));
        if age > STALE_AFTER {
            return Some(format!("claim loop has not passed for {}s", age.as_secs()));
        }
        if let Some((age, error)) = self.claims.failing_for(now, self.failing_after) {
            return Some(format!(
                "claims have failed for {}s; last error: {error}",
                age.as_secs()
            ));
        }
        None
    }

    /// Why a service is not well, if one is not: the first one found, in the order started.
    pub(crate) fn services_problem(&self) -> Option<String> {
        let now = self.now_ms();
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.iter().find_map(|s| s.problem(now))
    }

    /// Why the daemon is not alive, if it is not: its claim loop, then its services.
    pub fn problem(&self) -> Option<String> {
        self.workers_problem().or_else(|| self.services_problem())
    }
}

#[derive(Clone)]
struct MonitorState {
    store: Store,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub fn router(store: Store, metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(MonitorState {
            store,
            metrics,
            health,
        })
}

async fn metrics_text(State(s): State<MonitorState>) -> impl IntoResponse {
    let text = s.metrics.render(&s.store).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Alive: the database answers, the claim loop passes and every service succeeds within its
/// allowance. 503 with the reason otherwise.
async fn healthz(State(s): State<MonitorState>) -> (StatusCode, String) {
    match tokio::time::timeout(DATABASE_TIMEOUT, s.store.ping()).await {
        Err(_) => return unhealthy("database did not answer within 2s".into()),
        Ok(Err(e)) => return unhealthy(format!("database unreachable: {e}")),
        Ok(Ok(())) => {}
    }
    match s.health.problem() {
        Some(problem) => unhealthy(problem),
        None => (StatusCode::OK, "ok\n".into()),
    }
}

/// Ready: migrations ran, the first template sync finished and the workers run; not while
/// starting or draining.
async fn readyz(State(s): State<MonitorState>) -> (StatusCode, &'static str) {
    if s.health.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

fn unhealthy(reason: String) -> (StatusCode, String) {
    tracing::warn!(%reason, "health check failed");
    (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_streak_counts_from_its_first_failure_and_ends_on_success() {
        let streak = FailureStreak::default();
        let limit = Duration::from_secs(30);
        streak.record(1_000, Err(&"first"));
        streak.record(20_000, Err(&"second"));
        assert_eq!(
            streak.failing_for(30_000, limit),
            None,
            "29 s is not yet failing"
        );
        let (age, error) = streak.failing_for(31_001, limit).expect("failing");
        assert_eq!((age.as_secs(), error.as_str()), (30, "second"));
        streak.record(31_500, Ok(()));
        assert_eq!(streak.failing_for(90_000, limit), None);
        streak.record(95_000, Err(&"again"));
        assert_eq!(
            streak.failing_for(110_000, limit),
            None,
            "a new streak starts over"
        );
    }

    fn service(name: &'static str, allowance_secs: u64) -> ServiceHealth {
        ServiceHealth {
            name,
            allowance: Duration::from_secs(allowance_secs),
            last_success: AtomicU64::new(1_000),
            streak: FailureStreak::default(),
        }
    }

    #[test]
    fn a_service_is_a_problem_once_its_last_success_is_older_than_its_allowance() {
        let join = service("join", 30);
        assert_eq!(join.problem(31_000), None, "30 s is within the allowance");
        assert_eq!(
            join.problem(31_001).as_deref(),
            Some("join: no successful pass for 30 s"),
            "a pass that never ends is a problem too"
        );
        join.streak.record(5_000, Err(&"database is locked"));
        assert_eq!(
            join.problem(43_000).as_deref(),
            Some("join: no successful pass for 42 s: database is locked")
        );
        join.last_success.store(43_500, Ordering::Relaxed);
        join.streak.record(43_500, Ok(()));
        assert_eq!(join.problem(60_000), None);
    }

    #[test]
    fn a_service_may_miss_a_few_intervals_and_at_least_failing_after() {
        let health = Health::new(Duration::from_secs(30));
        let join = health.register_service("join", Duration::from_secs(1));
        let prune = health.register_service("prune", Duration::from_secs(3600));
        assert_eq!(join.allowance, Duration::from_secs(30));
        assert_eq!(prune.allowance, Duration::from_secs(3 * 3600));
        assert_eq!(health.services_problem(), None, "healthy when started");
        let error: &dyn std::fmt::Display = &"refused";
        health.service_result(&join, Err(error));
        assert_eq!(
            health.services_problem(),
            None,
            "a failure is not yet a problem"
        );
    }
}
