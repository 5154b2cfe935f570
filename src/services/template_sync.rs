//! Keeps the `templates` table in step with WeChat's template list of each account: once at
//! start, before the workers (so that no row skips the data check because it raced the first
//! sync), then every `templates.sync_interval_secs`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use chrono::{DateTime, Utc};

use super::Service;
use crate::domain::clock::Clock;
use crate::domain::text::loggable;
use crate::store::Store;
use crate::templates::{sync_account, sync_subscribe_account};
use crate::wechat::api::WechatApi;
use crate::wechat::token::TokenManager;

pub struct TemplateSync {
    pub store: Store,
    pub api: WechatApi,
    pub tokens: Arc<TokenManager>,
    pub accounts: Vec<String>,
    /// Stamps each list when it is written, after WeChat answered.
    pub clock: Arc<Clock>,
    pub interval: Duration,
    /// Whether subscription templates are synced too (`subscribe.sync_templates`).
    pub subscribe: bool,
}

impl Service for TemplateSync {
    /// Templates WeChat listed, over the accounts that synced.
    type Report = usize;

    fn name(&self) -> &'static str {
        "templates"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn failure_message(&self) -> &'static str {
        "template sync failed"
    }

    /// Every account is tried; the pass fails, naming them, if any did (the daemon keeps
    /// sending with what the table already knows).
    async fn run_once(&self, _now: DateTime<Utc>) -> anyhow::Result<usize> {
        let mut listed = 0;
        let mut failed = Vec::new();
        for account in &self.accounts {
            match sync_account(&self.store, &self.api, &self.tokens, account, &self.clock).await {
                Ok(n) => {
                    tracing::info!(%account, templates = n, "template list synced");
                    listed += n;
                }
                Err(e) => failed.push(format!("account {account}: {e:#}")),
            }
            if !self.subscribe {
                continue;
            }
            let synced =
                sync_subscribe_account(&self.store, &self.api, &self.tokens, account, &self.clock);
            match synced.await {
                Ok(Ok(n)) => {
                    tracing::info!(%account, templates = n, "subscription templates synced");
                    listed += n;
                }
                // An account without subscription notifications: not a failure of the pass.
                Ok(Err(reply)) => tracing::info!(
                    %account,
                    errcode = reply.errcode,
                    errmsg = %loggable(&reply.errmsg),
                    "subscription templates not listed by WeChat"
                ),
                Err(e) => failed.push(format!("account {account} (subscription templates): {e:#}")),
            }
        }
        if failed.is_empty() {
            Ok(listed)
        } else {
            Err(anyhow!(failed.join("; ")))
        }
    }
}
