//! `/metrics`, `/healthz` and `/readyz` on their own address (`[monitor] listen`), apart from
//! the callback endpoint, which faces WeChat and the internet. docs/operations.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
}

impl Default for Health {
    fn default() -> Self {
        Health {
            base: Instant::now(),
            ready: AtomicBool::new(false),
            claim_loop: AtomicU64::new(0),
            maintenance: AtomicU64::new(0),
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
