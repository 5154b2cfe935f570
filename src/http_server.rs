//! Serving an axum router on a configured address until shutdown: the callback endpoint and
//! the monitor endpoint both start this way.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `listen` (named `setting` in errors) and serves `router` until `shutdown`; returns the
/// bound address and the serving task.
pub async fn spawn(
    setting: &'static str,
    listen: &str,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("{setting} {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, setting, "endpoint stopped");
        }
    });
    Ok((addr, task))
}
