//! Access tokens shared by every daemon of an account through the database.
//!
//! One daemon at a time refreshes (a lease row in `access_tokens`); the others wait for the new
//! token to appear. A token WeChat rejects is replaced only if it is still the current one, so a
//! burst of rejections becomes one refresh, not a burst of refreshes that knock each other out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use super::api::{ApiReply, TokenError, TransportError, WechatApi};
use crate::config::{Account, TokenEndpoint};
use crate::domain::errcode::{ErrcodeClass, classify};
use crate::metrics::Metrics;
use crate::store::{Store, StoredToken, TokenLease};

/// Refresh this long before expiry. WeChat renews stable tokens 5 minutes before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long one daemon may hold the right to refresh before another may take over.
const REFRESH_LEASE: Duration = Duration::from_secs(30);
/// How long a caller waits for another daemon's refresh before giving up for this attempt.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(35);
const WAIT_STEP: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Cached {
    token: SecretString,
    expires_at: DateTime<Utc>,
}

/// Per account: the token in memory, and a lock so that one task of this daemon asks the
/// database (and WeChat) at a time.
struct Slot {
    account: Account,
    cached: Mutex<Option<Cached>>,
}

pub struct TokenManager {
    store: Store,
    api: WechatApi,
    endpoint: TokenEndpoint,
    owner: String,
    slots: HashMap<String, Arc<Slot>>,
    /// Tokens this daemon fetched from WeChat.
    refreshes: AtomicU64,
    metrics: Arc<Metrics>,
}

impl TokenManager {
    pub fn new(
        store: Store,
        api: WechatApi,
        endpoint: TokenEndpoint,
        owner: String,
        accounts: &[Account],
        metrics: Arc<Metrics>,
    ) -> TokenManager {
        let slots = accounts
            .iter()
            .map(|a| {
                let slot = Slot {
                    account: a.clone(),
                    cached: Mutex::new(None),
                };
                (a.name.clone(), Arc::new(slot))
            })
            .collect();
        TokenManager {
            store,
            api,
            endpoint,
            owner,
            slots,
            refreshes: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// A token for `account` that is good for at least a little while.
    pub async fn get(&self, account: &str) -> Result<SecretString> {
        let slot = self.slot(account)?;
        let now = Utc::now();
        let mut cached = slot.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| fresh(c.expires_at, now)) {
            return Ok(c.token.clone());
        }
        let token = self.obtain(&slot.account, None).await?;
        *cached = Some(token.clone());
        Ok(token.token)
    }

    /// Runs one call of an operator's command or a background job with the account's token,
    /// refreshing the token once if WeChat rejects it. (A send has its own loop: it must
    /// record how the attempt ended.)
    pub async fn with_token<T, F>(
        &self,
        account: &str,
        call: impl Fn(SecretString) -> F,
    ) -> Result<Result<T, ApiReply>>
    where
        F: Future<Output = std::result::Result<std::result::Result<T, ApiReply>, TransportError>>,
    {
        for _ in 0..2 {
            let token = self.get(account).await?;
            match call(token.clone()).await? {
                Err(reply) if classify(reply.errcode) == ErrcodeClass::TokenRejected => {
                    self.rejected(account, &token).await?
                }
                answer => return Ok(answer),
            }
        }
        bail!("the access token was rejected again after refreshing")
    }

    /// WeChat rejected `failing`: replace it, unless someone already has.
    pub async fn rejected(&self, account: &str, failing: &SecretString) -> Result<()> {
        let slot = self.slot(account)?;
        let mut cached = slot.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && c.token.expose_secret() != failing.expose_secret()
        {
            return Ok(()); // another task of this daemon already replaced it
        }
        let token = self
            .obtain(&slot.account, Some(failing.expose_secret()))
            .await?;
        *cached = Some(token);
        Ok(())
    }

    fn slot(&self, account: &str) -> Result<Arc<Slot>> {
        self.slots
            .get(account)
            .cloned()
            .ok_or_else(|| anyhow!("account {account:?} is not configured"))
    }

    /// Takes the stored token if it is usable (and not the failing one); otherwise refreshes it
    /// under the database lease, or waits for the daemon that holds the lease.
    async fn obtain(&self, account: &Account, failing: Option<&str>) -> Result<Cached> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OTHERS;
        loop {
            let now = Utc::now();
            if let Some(stored) = self.store.load_token(&account.name).await?
                && fresh(stored.expires_at, now)
                && Some(stored.token.as_str()) != failing
            {
                return Ok(Cached {
                    token: SecretString::from(stored.token),
                    expires_at: stored.expires_at,
                });
            }
            let lease = TokenLease {
                account: &account.name,
                owner: &self.owner,
                now,
                lease_until: now + REFRESH_LEASE,
                refresh_before: now + REFRESH_MARGIN,
                failing,
            };
            if self.store.lease_token_refresh(&lease).await? {
                let fetched = self.fetch(account, failing).await;
                self.metrics.token_refresh(&account.name, fetched.is_ok());
                return match fetched {
                    Ok(token) => {
                        let stored = StoredToken {
                            token: token.token.expose_secret().to_string(),
                            expires_at: token.expires_at,
                        };
                        self.store
                            .save_token(&account.name, &self.owner, &stored, Utc::now())
                            .await?;
                        Ok(token)
                    }
                    Err(e) => {
                        self.store
                            .release_token_lease(&account.name, &self.owner)
                            .await?;
                        Err(e.into())
                    }
                };
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no access token for account {:?}: another daemon holds the refresh",
                    account.name
                );
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
    }

    async fn fetch(&self, account: &Account, failing: Option<&str>) -> Result<Cached, TokenError> {
        let issued = match self.endpoint {
            TokenEndpoint::Classic => {
                self.api
                    .classic_token(&account.appid, &account.secret)
                    .await?
            }
            TokenEndpoint::Stable => {
                let issued = self
                    .api
                    .stable_token(&account.appid, &account.secret, false)
                    .await?;
                // The stable endpoint hands back the same token while it thinks it valid; force
                // a new one (20 a day) only when that is the very token WeChat just rejected.
                if failing == Some(issued.token.expose_secret()) {
                    self.refreshes.fetch_add(1, Ordering::Relaxed);
                    self.api
                        .stable_token(&account.appid, &account.secret, true)
                        .await?
                } else {
                    issued
                }
            }
        };
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(account = %account.name, expires_in = issued.expires_in.as_secs(), "access token refreshed");
        let lifetime = chrono::Duration::from_std(issued.expires_in).unwrap_or_default();
        Ok(Cached {
            token: issued.token,
            expires_at: Utc::now() + lifetime,
        })
    }
}

fn fresh(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    expires_at - now > chrono::Duration::from_std(REFRESH_MARGIN).unwrap_or_default()
}
