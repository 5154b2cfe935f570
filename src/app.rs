//! Wiring: the store, the WeChat client, the token manager, the worker pool and the background
//! services (src/services/), under one cancellation token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::callback::{self, CallbackState};
use crate::config::{Config, Order};
use crate::domain::clock::Clock;
use crate::domain::retry::InDoubtPolicy;
use crate::metrics::Metrics;
use crate::monitor::{self, Health};
use crate::services::limits::record_limits;
use crate::services::{
    ExpireOverdue, Heartbeat, JoinEvents, Prune, RecordLimits, ReleaseHeld, RescueLeases, Runner,
    SettleInDoubt, TemplateSync, WechatQuota,
};
use crate::store::Store;
use crate::wechat::api::WechatApi;
use crate::wechat::token::TokenManager;
use crate::worker::{AccountRuntime, Completions, Dispatcher, Pool, PoolSettings, Reservations};

/// A started daemon.
pub struct Running {
    /// Where the callback endpoint listens, if enabled.
    pub callback_addr: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if enabled.
    pub monitor_addr: Option<SocketAddr>,
    /// Where the dashboard is served, if enabled.
    pub dashboard_addr: Option<SocketAddr>,
    /// The daemon's clock; tests move it to turn a quota period.
    pub clock: Arc<Clock>,
    /// Puts re-read limits in force (SIGHUP).
    pub limits: LimitsReloader,
    done: tokio::task::JoinHandle<()>,
}

/// Puts the limits of a re-read configuration in force in the running daemon, without a
/// restart: `monthly_per_template`, `daily_per_account`, `active_templates`,
/// `auto_activate_templates` and `rate_per_second`, per account. Held rows that the new limits
/// make room for move on within a second (maintenance). Every other setting is not re-read;
/// accounts added or removed and a new timezone are named in the log as needing a restart.
#[derive(Clone)]
pub struct LimitsReloader {
    store: Store,
    runtimes: Arc<Vec<Arc<AccountRuntime>>>,
    zone_name: String,
    timezone: chrono_tz::Tz,
}

impl LimitsReloader {
    /// Applies `config`'s limits; returns how many accounts' limits changed. The limits are in
    /// force even when recording them for `report_quota` fails (the hourly refresh retries).
    pub async fn reload(&self, config: &Config) -> usize {
        let accounts = match config.accounts() {
            Ok(accounts) => accounts,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "SIGHUP: accounts not reloaded");
                return 0;
            }
        };
        let mut changed = 0;
        for runtime in self.runtimes.iter() {
            let name = &runtime.account.name;
            let Some(account) = accounts.iter().find(|a| &a.name == name) else {
                tracing::warn!(account = %name, "account gone from the configuration: it keeps running until a restart");
                continue;
            };
            if account.limits != runtime.limits() {
                runtime.set_limits(account.limits);
                tracing::info!(account = %name, limits = ?account.limits, "limits reloaded");
                changed += 1;
            }
        }
        for account in &accounts {
            if !self.runtimes.iter().any(|r| r.account.name == account.name) {
                tracing::warn!(account = %account.name, "new account in the configuration: it starts with a restart");
            }
        }
        if config.limits.timezone != self.zone_name {
            tracing::warn!("limits.timezone changed: it takes effect with a restart");
        }
        let recorded = record_limits(
            &self.store,
            &self.runtimes,
            &self.zone_name,
            self.timezone,
            chrono::Utc::now(),
        );
        if let Err(e) = recorded.await {
            tracing::warn!(error = %format!("{e:#}"), "limits in force but not recorded for report_quota yet");
        }
        changed
    }
}

/// Re-reads `path` and reloads the limits on every SIGHUP (`systemctl reload`) that `hangup`
/// receives, until `shutdown`. A file that does not load is refused with the reason, and
/// nothing changes.
pub fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    path: std::path::PathBuf,
    reloader: LimitsReloader,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => {}
            }
            match Config::load(&path) {
                Ok(config) => {
                    let changed = reloader.reload(&config).await;
                    tracing::info!(accounts = changed, "SIGHUP: configuration re-read");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration not reloaded")
                }
            }
        }
    });
}

impl Running {
    /// Waits until the daemon has drained and stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> Result<()> {
        self.done
            .await
            .map_err(|e| anyhow::anyhow!("daemon task failed: {e}"))
    }
}

/// Runs the daemon until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Connects, migrates, binds the callback endpoint and starts the workers; returns once all
/// of that succeeded, so that a bad setting fails here, at start.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running> {
    let accounts = config.accounts()?;
    // A dashboard with actions or an open address and no login fails the start.
    if config.dashboard.enabled {
        config.dashboard_credentials()?;
    }
    let accounts_for_callback = accounts.clone();
    let store = Store::connect(&config.store_settings()).await?;
    let metrics = Arc::new(Metrics::new(accounts.iter().map(|a| a.name.clone())));
    let health = Arc::new(Health::new(Duration::from_secs(
        config.monitor.failing_after_secs,
    )));
    // Past the soft limit, accepts fail with EMFILE and the database pool cannot grow.
    let needed = config.open_files_needed();
    if let Some(limit) = crate::http_server::open_files_limit()
        && limit < needed
    {
        tracing::warn!(
            limit,
            needed,
            "the open-files limit (RLIMIT_NOFILE) is below what the connection caps and pools \
             may take: raise LimitNOFILE= or lower callback.max_connections"
        );
    }
    // Served from before the migrations, so that `/readyz` answers "not ready" while they run.
    let monitor = if config.monitor.enabled {
        let router = monitor::router(store.clone(), metrics.clone(), health.clone());
        let (addr, task) = crate::http_server::spawn(
            "monitor.listen",
            &config.monitor.listen,
            router,
            config.monitor_limits(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!(%addr, "monitor endpoint listening on /metrics, /healthz, /readyz");
        Some((addr, task))
    } else {
        None
    };
    store.migrate().await?;
    if config.workers.order == Order::PerUser {
        store
            .prepare_per_user_order()
            .await
            .context("creating the index order = \"per_user\" needs")?;
    }
    for warning in store.setting_warnings().await? {
        tracing::warn!("{warning}");
    }
    let timezone = config.timezone()?;
    let owner = instance_id();
    let http_timeout = Duration::from_millis(config.api.timeout_ms);
    let api = WechatApi::new(&config.api.base_url, http_timeout)?;
    let tokens = Arc::new(TokenManager::new(
        store.clone(),
        api.clone(),
        config.api.token_endpoint,
        owner.clone(),
        &accounts,
        metrics.clone(),
    ));
    let clock = Arc::new(Clock::default());
    let runtimes: Arc<Vec<Arc<AccountRuntime>>> = Arc::new(
        accounts
            .into_iter()
            .map(|a| Arc::new(AccountRuntime::new(a)))
            .collect(),
    );
    let services = Runner::new(health.clone(), clock.clone(), shutdown.clone());
    // Once before the workers start, so that no row skips the data check because it raced
    // the first sync; then every interval.
    services
        .start_after_first_pass(TemplateSync {
            store: store.clone(),
            api: api.clone(),
            tokens: tokens.clone(),
            accounts: runtimes.iter().map(|r| r.account.name.clone()).collect(),
            clock: clock.clone(),
            interval: Duration::from_secs(config.templates.sync_interval_secs),
            subscribe: config.subscribe.sync_templates,
        })
        .await;
    let wechat_quota = WechatQuota {
        store: store.clone(),
        api: api.clone(),
        tokens: tokens.clone(),
        accounts: runtimes.clone(),
        zone_name: config.limits.timezone.clone(),
        timezone,
    };
    // A cap that follows WeChat is read before the first send.
    if runtimes.iter().any(|r| r.limits().daily_follows_wechat) {
        services.start_after_first_pass(wechat_quota).await;
    } else {
        services.start(wechat_quota);
    }
    services.start(Prune {
        store: store.clone(),
        settings: config.retention.clone(),
    });
    services.start(Heartbeat::new(
        store.clone(),
        owner.clone(),
        runtimes.clone(),
    ));
    let dispatcher = Arc::new(Dispatcher {
        store: store.clone(),
        api,
        tokens,
        accounts: runtimes
            .iter()
            .map(|r| (r.account.name.clone(), r.clone()))
            .collect::<HashMap<_, _>>(),
        timezone,
        clock: clock.clone(),
        retry: config.retry_policy(),
        subscribe: config.subscribe.clone(),
        owner: owner.clone(),
        lease: Duration::from_secs(config.workers.lease_secs),
        http_timeout,
        not_authorised_pause: Duration::from_secs(config.retry.not_authorised_pause_secs),
        metrics: metrics.clone(),
        health: health.clone(),
        completions: Completions::spawn(store.clone(), owner.clone()),
        reservations: Reservations::spawn(store.clone()),
        requests: Semaphore::new(config.workers.concurrency),
        content_rules: config.templates.content_rules,
        overlong: config.templates.overlong,
        user_errcodes: config.errcodes.clone(),
        per_user_order: (config.workers.order == Order::PerUser)
            .then(|| chrono::Duration::seconds(config.workers.order_hold_max_secs as i64)),
        per_user_interval: (config.limits.per_user_interval_secs > 0)
            .then(|| chrono::Duration::seconds(config.limits.per_user_interval_secs as i64)),
    });
    let joined = Arc::new(Notify::new());
    let callback = if config.callback.enabled {
        let state = Arc::new(CallbackState::new(
            store.clone(),
            &accounts_for_callback,
            config.callback.timestamp_window_secs,
            joined.clone(),
            metrics.clone(),
        ));
        let (addr, task) = callback::spawn(
            &config.callback.listen,
            state,
            config.callback.max_body_bytes,
            config.callback_limits(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!(%addr, "callback endpoint listening on /wechat/{{account}}");
        Some((addr, task))
    } else {
        None
    };
    services.start(JoinEvents::new(
        store.clone(),
        joined,
        metrics.clone(),
        Duration::from_secs(config.callback.join_window_secs),
    ));
    let reloader = LimitsReloader {
        store: store.clone(),
        runtimes: runtimes.clone(),
        zone_name: config.limits.timezone.clone(),
        timezone,
    };
    services.start(RecordLimits {
        store: store.clone(),
        accounts: runtimes.clone(),
        zone_name: config.limits.timezone.clone(),
        timezone,
    });
    let wake = Arc::new(Notify::new());
    let watcher = {
        let (store, wake, shutdown) = (store.clone(), wake.clone(), shutdown.clone());
        tokio::spawn(async move { store.watch_for_rows(wake, shutdown).await })
    };
    let settings = PoolSettings {
        concurrency: config.workers.concurrency,
        claim_ahead: config.workers.claim_ahead,
        batch_size: config.workers.batch_size,
        poll_interval: Duration::from_millis(config.workers.poll_interval_ms),
        shutdown_grace: Duration::from_secs(config.workers.shutdown_grace_secs),
        watchdog: sd_notify::watchdog_enabled(),
    };
    tracing::info!(
        backend = store.backend_name(),
        %owner,
        concurrency = config.workers.concurrency,
        claim_ahead = settings.claim_ahead,
        accounts = dispatcher.accounts.len(),
        "wechat-outbox started"
    );
    // The dashboard is not needed to send: an address it cannot bind (taken by another
    // program after an upgrade, say) is logged and the daemon runs on. Its settings were
    // checked above, with the rest.
    let dashboard = if config.dashboard.enabled {
        match crate::dashboard::spawn(&config, store.clone(), shutdown.clone()).await {
            Ok(served) => Some(served),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "dashboard not served; the daemon runs on without it");
                None
            }
        }
    } else {
        None
    };
    let callback_addr = callback.as_ref().map(|(addr, _)| *addr);
    let dashboard_addr = dashboard.as_ref().map(|(addr, _)| *addr);
    let monitor_addr = monitor.as_ref().map(|(addr, _)| *addr);
    // The table's upkeep, each step on its own: one that fails (a value it cannot handle, a
    // lock timeout) must not keep the others from running.
    services.start(RescueLeases {
        store: store.clone(),
    });
    services.start(ReleaseHeld {
        store: store.clone(),
        accounts: runtimes.clone(),
        timezone,
    });
    services.start(ExpireOverdue {
        store: store.clone(),
    });
    if dispatcher.retry.in_doubt == InDoubtPolicy::Unknown {
        services.start(SettleInDoubt {
            store: store.clone(),
            window: dispatcher.retry.window(),
        });
    }
    // Migrations ran, the endpoint listens, the workers start now: ready.
    crate::worker::notify_systemd(sd_notify::NotifyState::Ready);
    health.set_ready(true);
    let servers: Vec<_> = callback
        .into_iter()
        .chain(monitor)
        .chain(dashboard)
        .map(|(_, task)| task)
        .collect();
    let done = tokio::spawn(async move {
        Pool::new(dispatcher, settings, wake).run(shutdown).await;
        services.wait().await;
        for task in std::iter::once(watcher).chain(servers) {
            let _ = task.await;
        }
        store.close().await;
        tracing::info!("wechat-outbox stopped");
    });
    Ok(Running {
        callback_addr,
        monitor_addr,
        dashboard_addr,
        clock,
        limits: reloader,
        done,
    })
}

/// Applies migrations and returns; `wechat-outbox migrate`.
pub async fn migrate(config: &Config) -> Result<()> {
    let store = Store::connect(&config.store_settings()).await?;
    store.migrate().await?;
    store.close().await;
    Ok(())
}

/// Names this daemon in lease columns: host, process and a random part (pids repeat).
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}
