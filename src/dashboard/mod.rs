//! The web dashboard (`[dashboard]`, docs/dashboard.md): the outbox at a glance, messages by
//! filter, one message's story, held rows, errors, templates, and (with `actions = true`) a
//! few safe actions, each written to `dashboard_audit`.
//!
//! Server-rendered HTML (askama: compiled, escaping by default), one small script that
//! refreshes the figures, charts as inline SVG drawn here: everything is in the binary and
//! nothing is fetched at run time. It reads the same views as `wechat-outbox report`.

mod access;
mod actions;
mod charts;
mod overview;
mod pages;
mod show;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use axum::Router;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;

pub use access::Access;

/// What every page needs.
pub struct Dashboard {
    store: Store,
    /// Times are shown in `limits.timezone`.
    timezone: chrono_tz::Tz,
    zone_name: String,
    /// The configured accounts, for the filters.
    accounts: Vec<String>,
    actions: bool,
    mask_openids: bool,
    access: Access,
    overview: Arc<overview::Cache>,
    /// Pages reading the database at once, at most [`READERS`].
    queries: Arc<tokio::sync::Semaphore>,
}

/// Pages that read the database at once: under `run` the pool is the senders' too.
const READERS: usize = 2;

impl Dashboard {
    pub fn new(config: &Config, store: Store) -> Result<Dashboard> {
        let credentials = config.dashboard_credentials()?;
        let settings = &config.dashboard;
        Ok(Dashboard {
            store,
            timezone: config.timezone()?,
            zone_name: config.limits.timezone.clone(),
            accounts: config.accounts.iter().map(|a| a.name.clone()).collect(),
            actions: settings.actions,
            mask_openids: settings.mask_openids,
            access: Access::new(&settings.user, credentials)?,
            overview: Arc::new(overview::Cache::new(std::time::Duration::from_secs(
                settings.refresh_secs,
            ))),
            queries: Arc::new(tokio::sync::Semaphore::new(READERS)),
        })
    }
}

/// The dashboard's routes; the action routes only with `actions = true`.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    let mut router = Router::new()
        .route("/", get(pages::overview))
        .route("/messages", get(pages::messages))
        .route("/messages/{id}", get(pages::message))
        .route("/held", get(pages::held))
        .route("/errors", get(pages::errors))
        .route("/templates", get(pages::templates))
        .route("/audit", get(pages::audit))
        .route("/static/app.css", get(show::stylesheet))
        .route("/static/app.js", get(show::script));
    if dashboard.actions {
        router = router
            .route("/cancel", get(actions::confirm_cancel))
            .route("/actions/cancel", post(actions::cancel))
            .route("/actions/cancel-matching", post(actions::cancel_matching))
            .route("/actions/resend", post(actions::resend))
            .route("/actions/resume", post(actions::resume))
            .route(
                "/actions/template-out-of-use",
                post(actions::template_out_of_use),
            );
    }
    router
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            access::guard,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(access::MAX_FORM_BYTES))
        .with_state(dashboard)
}

/// Binds `[dashboard] listen` and serves until `shutdown`.
pub async fn spawn(
    config: &Config,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let dashboard = Arc::new(Dashboard::new(config, store)?);
    let (addr, task) = crate::http_server::spawn(
        "dashboard.listen",
        &config.dashboard.listen,
        router(dashboard),
        config.dashboard_limits(),
        shutdown,
    )
    .await?;
    tracing::info!(%addr, actions = config.dashboard.actions, "dashboard listening");
    Ok((addr, task))
}

/// `wechat-outbox dashboard`: the dashboard alone, sending nothing, until SIGTERM or SIGINT.
pub async fn serve_alone(config: Config) -> Result<()> {
    let store = Store::connect(&config.store_settings()).await?;
    store.migrate().await?;
    let shutdown = CancellationToken::new();
    crate::app::cancel_on_signal(shutdown.clone());
    let (addr, task) = spawn(&config, store.clone(), shutdown).await?;
    println!("dashboard on http://{addr}/");
    let _ = task.await;
    store.close().await;
    Ok(())
}
