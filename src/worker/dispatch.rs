//! The life of one claimed message: check it, wait for the account's rate, send it, and write
//! down what happened. Every path ends in `Store::finish` with a readable reason.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Datelike, FixedOffset, TimeZone, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::Account;
use crate::domain::errcode::{ErrcodeClass, classify};
use crate::domain::message::{RawMessage, TemplateMessage};
use crate::domain::retry::{RetryDecision, RetryPolicy};
use crate::store::{Outcome, Store};
use crate::wechat::api::{ApiReply, WechatApi};
use crate::wechat::token::TokenManager;

/// Token rejections retried at once within one attempt before it counts as a failure.
const TOKEN_RETRIES: usize = 2;

/// What one account needs at send time.
pub struct AccountRuntime {
    pub account: Account,
    pub limiter: DefaultDirectRateLimiter,
}

impl AccountRuntime {
    pub fn new(account: Account) -> AccountRuntime {
        let rate = NonZeroU32::new(account.rate_per_second).unwrap_or(NonZeroU32::MIN);
        AccountRuntime {
            account,
            limiter: RateLimiter::direct(Quota::per_second(rate)),
        }
    }
}

/// Everything a message task shares with the others.
pub struct Dispatcher {
    pub store: Store,
    pub api: WechatApi,
    pub tokens: TokenManager,
    pub accounts: std::collections::HashMap<String, AccountRuntime>,
    pub retry: RetryPolicy,
    pub owner: String,
    pub lease: Duration,
    pub http_timeout: Duration,
    pub not_authorised_pause: Duration,
}

impl Dispatcher {
    /// Handles one claimed row to its outcome and records it. `started` turns true just before
    /// the request leaves, so that a row released at shutdown knows whether it may have arrived.
    #[tracing::instrument(skip_all, fields(id = raw.id, account = %raw.account, attempt = raw.attempts))]
    pub async fn handle(
        &self,
        raw: RawMessage,
        claimed_at: DateTime<Utc>,
        started: Arc<AtomicBool>,
    ) {
        let outcome = self.attempt(&raw, claimed_at, &started).await;
        self.record(raw.id, outcome).await;
    }

    /// Writes the outcome, retrying while the database is unreachable: the lease keeps the row
    /// ours for a while, and after that the rescuer hands it on, so nothing is lost either way.
    pub async fn record(&self, id: i64, outcome: Outcome) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .store
                .finish(&self.owner, id, &outcome, Utc::now())
                .await
            {
                Ok(true) => {
                    log_outcome(&outcome);
                    return;
                }
                Ok(false) => {
                    tracing::warn!(
                        ?outcome,
                        "lease lost before the outcome was written; another daemon owns the row now"
                    );
                    return;
                }
                Err(e) if backoff < self.lease => {
                    tracing::warn!(error = %e, "cannot record the outcome yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, ?outcome, "gave up recording the outcome; the lease rescuer will return the row");
                    return;
                }
            }
        }
    }

    async fn attempt(
        &self,
        raw: &RawMessage,
        claimed_at: DateTime<Utc>,
        started: &AtomicBool,
    ) -> Outcome {
        let Some(runtime) = self.accounts.get(&raw.account) else {
            let mut names: Vec<_> = self.accounts.keys().map(String::as_str).collect();
            names.sort();
            return Outcome::Failed {
                errcode: None,
                reason: format!(
                    "account {:?} is not configured in this daemon (configured: {})",
                    raw.account,
                    names.join(", ")
                ),
            };
        };
        let message = match TemplateMessage::from_raw(raw) {
            Ok(message) => message,
            Err(reason) => {
                return Outcome::Failed {
                    errcode: None,
                    reason,
                };
            }
        };
        if raw.suppressed {
            let reason = crate::store::SUPPRESSED.into();
            return Outcome::Failed {
                errcode: None,
                reason,
            };
        }
        let now = Utc::now();
        if raw.expires_at.is_some_and(|at| at <= now) {
            return Outcome::Expired {
                reason: crate::store::EXPIRED.into(),
            };
        }
        let first_attempt_at = raw.first_attempt_at.unwrap_or(claimed_at);
        if raw.in_doubt && !self.retry.resend_is_safe(first_attempt_at, now) {
            return Outcome::Unknown {
                errcode: None,
                reason: crate::store::GAVE_UP_IN_DOUBT.into(),
            };
        }

        runtime.limiter.until_ready().await;
        if let Some(lost) = self.keep_lease(raw.id, claimed_at).await {
            return lost;
        }

        let mut in_doubt = raw.in_doubt;
        for _ in 0..=TOKEN_RETRIES {
            let token = match self.tokens.get(&raw.account).await {
                Ok(token) => token,
                Err(e) => {
                    return self.retry_later(
                        raw,
                        first_attempt_at,
                        None,
                        format!("{e:#}"),
                        in_doubt,
                    );
                }
            };
            started.store(true, Ordering::SeqCst);
            let reply = match self.api.send_template(&token, &message.body).await {
                Ok(reply) => reply,
                Err(e) => {
                    in_doubt |= e.may_have_reached;
                    return self.retry_later(raw, first_attempt_at, None, e.detail, in_doubt);
                }
            };
            match classify(reply.errcode) {
                ErrcodeClass::TokenRejected => {
                    tracing::info!(errcode = reply.errcode, "access token rejected; refreshing");
                    if let Err(e) = self.tokens.rejected(&raw.account, &token).await {
                        tracing::warn!(error = %format!("{e:#}"), "token refresh failed");
                    }
                }
                _ => {
                    return self
                        .judge(raw, runtime, first_attempt_at, reply, in_doubt)
                        .await;
                }
            }
        }
        self.retry_later(
            raw,
            first_attempt_at,
            Some(40001),
            "the access token was rejected again after refreshing".into(),
            in_doubt,
        )
    }

    /// Reads WeChat's errcode into an outcome.
    async fn judge(
        &self,
        raw: &RawMessage,
        runtime: &AccountRuntime,
        first_attempt_at: DateTime<Utc>,
        reply: ApiReply,
        in_doubt: bool,
    ) -> Outcome {
        let ApiReply {
            errcode,
            errmsg,
            msgid,
        } = reply;
        let described = format!("errcode {errcode}: {errmsg}");
        match classify(errcode) {
            // Accepted without a msgid still went out; only its delivery event cannot be joined.
            ErrcodeClass::Accepted => Outcome::Sent { msgid },
            ErrcodeClass::Transient | ErrcodeClass::TokenRejected => {
                self.retry_later(raw, first_attempt_at, Some(errcode), described, in_doubt)
            }
            ErrcodeClass::Permanent => Outcome::Failed {
                errcode: Some(errcode),
                reason: described,
            },
            ErrcodeClass::DailyLimit | ErrcodeClass::NotAuthorised => {
                let now = Utc::now();
                let until = if classify(errcode) == ErrcodeClass::DailyLimit {
                    next_beijing_midnight(now)
                } else {
                    now + chrono::Duration::from_std(self.not_authorised_pause).unwrap_or_default()
                };
                let reason = format!("account paused until {until}: {described}");
                let account = &runtime.account.name;
                if let Err(e) = self
                    .store
                    .pause_account(account, until, errcode, &reason, now)
                    .await
                {
                    tracing::error!(error = %e, "cannot record the account pause");
                }
                tracing::warn!(%account, %until, errcode, "account paused");
                Outcome::Release {
                    errcode: Some(errcode),
                    reason,
                    in_doubt,
                }
            }
        }
    }

    fn retry_later(
        &self,
        raw: &RawMessage,
        first_attempt_at: DateTime<Utc>,
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    ) -> Outcome {
        let attempts = raw.attempts.max(1) as u32;
        match self
            .retry
            .after_failure(attempts, first_attempt_at, in_doubt, Utc::now())
        {
            RetryDecision::RetryAt(at) => Outcome::Retry {
                at,
                errcode,
                reason,
                in_doubt,
            },
            RetryDecision::GiveUp => Outcome::Failed {
                errcode,
                reason: format!("gave up after {attempts} attempts; last error: {reason}"),
            },
            RetryDecision::Unknown => Outcome::Unknown {
                errcode,
                reason: format!("{}; last error: {reason}", crate::store::GAVE_UP_IN_DOUBT),
            },
        }
    }

    /// Before a request leaves, make sure the lease outlives it; a row that waited long at the
    /// rate limiter may otherwise be rescued by another daemon while in flight.
    async fn keep_lease(&self, id: i64, claimed_at: DateTime<Utc>) -> Option<Outcome> {
        let lease = chrono::Duration::from_std(self.lease).unwrap_or_default();
        let needed = chrono::Duration::from_std(self.http_timeout * 2).unwrap_or_default();
        let now = Utc::now();
        if claimed_at + lease - now > needed {
            return None;
        }
        match self.store.extend_lease(&self.owner, id, now + lease).await {
            Ok(true) => None,
            Ok(false) => Some(Outcome::Release {
                errcode: None,
                reason: "lease lost while waiting for the send rate".into(),
                in_doubt: false,
            }),
            Err(e) => Some(Outcome::Release {
                errcode: None,
                reason: format!("could not extend the lease: {e}"),
                in_doubt: false,
            }),
        }
    }
}

fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Sent { msgid } => tracing::info!(?msgid, "sent"),
        Outcome::Retry { at, reason, .. } => tracing::info!(%at, %reason, "will retry"),
        Outcome::Release { reason, .. } => tracing::info!(%reason, "released"),
        Outcome::Failed { reason, .. } => tracing::warn!(%reason, "failed"),
        Outcome::Expired { reason } => tracing::warn!(%reason, "expired"),
        Outcome::Unknown { reason, .. } => tracing::warn!(%reason, "outcome unknown"),
    }
}

/// WeChat's daily limits reset at midnight Beijing time (UTC+8, no daylight saving).
pub fn next_beijing_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let beijing = FixedOffset::east_opt(8 * 3600).expect("valid offset");
    let local = now.with_timezone(&beijing);
    let tomorrow = local.date_naive().succ_opt().unwrap_or(local.date_naive());
    beijing
        .with_ymd_and_hms(tomorrow.year(), tomorrow.month(), tomorrow.day(), 0, 0, 0)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now + chrono::Duration::days(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_midnight_is_16_00_utc() {
        let now = "2026-11-27T17:30:00Z".parse::<DateTime<Utc>>().unwrap(); // 01:30 on the 28th in Beijing
        assert_eq!(
            next_beijing_midnight(now),
            "2026-11-28T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let now = "2026-11-27T15:59:00Z".parse::<DateTime<Utc>>().unwrap(); // 23:59 on the 27th
        assert_eq!(
            next_beijing_midnight(now),
            "2026-11-27T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
