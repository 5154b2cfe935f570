//! Keeping the `templates` table in step with WeChat's list of the account's templates: at
//! start and every `templates.sync_interval_secs` (services/template_sync.rs), and on
//! `wechat-outbox templates sync`.

use anyhow::{Context, Result, bail};

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
