//! Keeping the `templates` table in step with WeChat's list of the account's templates: at
//! start, every `templates.sync_interval_secs`, and on `wechat-outbox templates sync`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::domain::clock::Clock;
use crate::domain::errcode::{ErrcodeClass, classify};
use crate::store::{Store, SyncedTemplate};
use crate::wechat::api::WechatApi;
use crate::wechat::token::TokenManager;

/// Fetches one account's template list and records it; returns how many WeChat listed.
pub async fn sync_account(
    store: &Store,
    api: &WechatApi,
    tokens: &TokenManager,
    account: &str,
    clock: &Clock,
) -> Result<usize> {
    for _ in 0..2 {
        let token = tokens.get(account).await?;
        let listed = api
            .private_templates(&token)
            .await
            .context("listing templates")?;
        match listed {
            Ok(list) => {
                let synced: Vec<SyncedTemplate> = list
                    .into_iter()
                    .map(|t| SyncedTemplate {
                        template_id: t.template_id,
                        title: t.title,
                        content: t.content,
                    })
                    .collect();
                store.sync_templates(account, &synced, clock.now()).await?;
                return Ok(synced.len());
            }
            Err(reply) if classify(reply.errcode) == ErrcodeClass::TokenRejected => {
                tokens.rejected(account, &token).await?
            }
            Err(reply) => bail!(
                "WeChat refused the template list: errcode {}: {}",
                reply.errcode,
                reply.errmsg
            ),
        }
    }
    bail!("the access token was rejected again after refreshing")
}

/// Syncs every account once; failures are logged, as the daemon can send with what the table
/// already knows. Run before the workers start, so that no row skips the data check because
/// it raced the first sync.
pub async fn sync_all(
    store: &Store,
    api: &WechatApi,
    tokens: &TokenManager,
    accounts: &[String],
    clock: &Clock,
) {
    for account in accounts {
        match sync_account(store, api, tokens, account, clock).await {
            Ok(n) => tracing::info!(%account, templates = n, "template list synced"),
            Err(e) => tracing::warn!(%account, error = %format!("{e:#}"), "template sync failed"),
        }
    }
}

/// Syncs every account every `interval` after the first `sync_all`, until `shutdown`.
pub async fn sync_loop(
    store: Store,
    api: WechatApi,
    tokens: Arc<TokenManager>,
    accounts: Vec<String>,
    clock: Arc<Clock>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        sync_all(&store, &api, &tokens, &accounts, &clock).await;
    }
}
