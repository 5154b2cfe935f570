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
/// every `CLAIM_LOOP_MAX_WAIT` and maintenance every second, when they are well.
const STALE_AFTER: Duration = Duration::from_secs(30);
/// How long `/healthz` waits for the database.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the loops of the daemon tell about themselves.
pub struct Health {
    base: Instant,
    /// Workers started and not shutting down.
    ready: AtomicBool,
    /// Milliseconds after `base` at which each loop last passed; 0 before it first did.
    claim_loop: AtomicU64,
    maintenance: AtomicU64,
    claims: FailureStreak,
    maintenance_passes: FailureStreak,
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
            maintenance: AtomicU64::new(0),
            claims: FailureStreak::default(),
            maintenance_passes: FailureStreak::default(),
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

    pub fn maintenance_passed(&self) {
        self.maintenance.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Records whether a claim reached the database and came back.
    pub fn claim_result(&self, result: Result<(), &dyn std::fmt::Display>) {
        self.claims.record(self.now_ms(), result);
    }

    /// Records whether a maintenance pass succeeded.
    pub fn maintenance_result(&self, result: Result<(), &dyn std::fmt::Display>) {
        self.maintenance_passes.record(self.now_ms(), result);
    }

    fn now_ms(&self) -> u64 {
        (self.base.elapsed().as_millis() as u64).max(1)
    }

    /// Why the workers are not alive, if they are not.
    fn workers_problem(&self) -> Option<String> {
        let now = self.now_ms();
        for (name, at) in [
            ("claim loop", self.claim_loop.load(Ordering::Relaxed)),
            ("maintenance loop", self.maintenance.load(Ordering::Relaxed)),
        ] {
            if at == 0 {
                return Some(format!("{name} has not started"));
            }
            let age = Duration::from_millis(now.saturating_sub(at));
            if age > STALE_AFTER {
                return Some(format!("{name} has not passed for {}s", age.as_secs()));
            }
        }
        for (name, streak) in [
            ("claims", &self.claims),
            ("maintenance passes", &self.maintenance_passes),
        ] {
            if let Some((age, error)) = streak.failing_for(now, self.failing_after) {
                return Some(format!(
                    "{name} have failed for {}s; last error: {error}",
                    age.as_secs()
                ));
            }
        }
        None
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

/// Alive: the database answers and the worker loops pass. 503 with the reason otherwise.
async fn healthz(State(s): State<MonitorState>) -> (StatusCode, String) {
    match tokio::time::timeout(DATABASE_TIMEOUT, s.store.ping()).await {
        Err(_) => return unhealthy("database did not answer within 2s".into()),
        Ok(Err(e)) => return unhealthy(format!("database unreachable: {e}")),
        Ok(Ok(())) => {}
    }
    match s.health.workers_problem() {
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
}
