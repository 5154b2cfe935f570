//! The life of one claimed message: check it, hold it on a limit or count it in the quota,
//! wait for the account's rate, send it, and write down what happened. Every path ends in
//! `Store::finish_many` (through `record.rs`, which writes in groups) with a readable reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use secrecy::SecretString;

use super::limits::database_trouble;
use super::rate::AccountRuntime;
use crate::domain::clock::Clock;
use crate::domain::content_rules::{self, ContentRules, Overlong};
use crate::domain::errcode::{ErrcodeClass, UserErrcode, UserErrcodes, classify};
use crate::domain::message::{MessageKind, RawMessage, TemplateMessage};
use crate::domain::quota::periods;
use crate::domain::retry::{RetryDecision, RetryPolicy};
use crate::domain::subscribe::SubscribeSettings;
use crate::domain::text::{ECHO_CHARS, echo, loggable, loggable_within};
use crate::metrics::Metrics;
use crate::monitor::Health;
use crate::store::{ConsentTaken, Outcome, Refusal, Reserved, Store};
use crate::wechat::api::{ApiReply, WechatApi};
use crate::wechat::token::TokenManager;

/// Token rejections retried at once within one attempt before it counts as a failure.
const TOKEN_RETRIES: usize = 2;

/// Everything a message task shares with the others.
pub struct Dispatcher {
    pub store: Store,
    pub api: WechatApi,
    pub tokens: Arc<TokenManager>,
    pub accounts: HashMap<String, Arc<AccountRuntime>>,
    pub retry: RetryPolicy,
    /// `[subscribe]`: consent policy, its wait, the monthly limit per template.
    pub subscribe: SubscribeSettings,
    pub owner: String,
    pub lease: Duration,
    pub http_timeout: Duration,
    pub not_authorised_pause: Duration,
    /// Where quota months and days begin.
    pub timezone: Tz,
    pub clock: Arc<Clock>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Writes outcomes in groups.
    pub completions: super::Completions,
    /// Reserves quota in groups.
    pub reservations: super::Reservations,
    /// One permit per request to WeChat in flight (`workers.concurrency`).
    pub requests: tokio::sync::Semaphore,
    /// WeChat's display rules for keyword values, and what a value over them gets.
    pub content_rules: ContentRules,
    pub overlong: Overlong,
    /// What WeChat's post-2014 errcodes mean for one user or row, and how long their
    /// effects last (`[errcodes]`).
    pub user_errcodes: UserErrcodes,
    /// The least time between two sends to one user (`limits.per_user_interval_secs`).
    pub per_user_interval: Option<chrono::Duration>,
    /// `order = "per_user"`: how long a row that is not final holds back its recipient's later
    /// rows (`workers.order_hold_max_secs`).
    pub per_user_order: Option<chrono::Duration>,
}

/// A row that passed `admit`: its account, its message (values within the content rules),
/// when its doubt began, and the parameters whose values were cut.
pub(super) struct Admitted<'d> {
    pub runtime: &'d AccountRuntime,
    pub message: TemplateMessage,
    pub doubt_since: DateTime<Utc>,
    pub cut: Vec<String>,
}

/// What a request came back with: the outcome, and the consent a subscription notification
/// took just before its request.
struct Sent {
    outcome: Outcome,
    consent: Option<ConsentTaken>,
}

/// Whether an attempt that ended so may have delivered its message. Such an attempt keeps what
/// it spent (its quota count, its consent); any other gives both back: nothing reached the
/// user.
fn may_have_reached(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Sent { .. } | Outcome::SentEarlier { .. } | Outcome::Unknown { .. } => true,
        Outcome::Retry { in_doubt, .. }
        | Outcome::Wait { in_doubt, .. }
        | Outcome::Release { in_doubt, .. } => *in_doubt,
        Outcome::Failed { .. } | Outcome::Expired { .. } | Outcome::Hold { .. } => false,
    }
}

impl Dispatcher {
    /// Sends per second this daemon may make now, all accounts together.
    pub fn rate_allowance(&self) -> usize {
        self.accounts
            .values()
            .map(|a| a.share_per_second() as usize)
            .sum()
    }

    /// Handles one claimed row to its outcome and records it. `started` turns true just before
    /// the request leaves, so that a row released at shutdown knows whether it may have arrived.
    #[tracing::instrument(skip_all, fields(id = raw.id, account = %loggable(&raw.account), attempt = raw.attempts))]
    pub async fn handle(
        &self,
        raw: RawMessage,
        reserved: Option<Reserved>,
        claimed_at: DateTime<Utc>,
        started: Arc<AtomicBool>,
    ) {
        let outcome = self.attempt(&raw, reserved, claimed_at, &started).await;
        self.record(raw.id, &raw.account, outcome, claimed_at).await;
    }

    /// Writes the outcome, retrying while the database is unreachable: the lease keeps the row
    /// ours for a while, and after that the rescuer hands it on, so nothing is lost either way.
    pub async fn record(
        &self,
        id: i64,
        account: &str,
        outcome: Outcome,
        attempt_began: DateTime<Utc>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .completions
                .finish(id, &outcome, self.clock.now(), attempt_began)
                .await
            {
                Ok(true) => {
                    log_outcome(&outcome);
                    self.metrics.outcome(account, &outcome);
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
        reserved: Option<Reserved>,
        claimed_at: DateTime<Utc>,
        started: &AtomicBool,
    ) -> Outcome {
        let Admitted {
            runtime,
            message,
            doubt_since,
            cut,
        } = match self.admit(raw, claimed_at) {
            Ok(admitted) => admitted,
            Err(outcome) => return outcome,
        };
        if !cut.is_empty() {
            // Parameter names are the app's, and a row may name thousands: the line holds their
            // count and the start of the list, escaped, never the values.
            let names = loggable_within(&cut.join(", "), ECHO_CHARS);
            tracing::info!(id = raw.id, count = cut.len(), parameters = %names, "values cut to WeChat's 20 characters");
            self.metrics.values_cut(&raw.account, cut.len() as u64);
        }
        let counted = match self.check_limits(raw, &message, claimed_at, reserved).await {
            Ok(counted) => counted,
            Err(outcome) => return outcome,
        };

        runtime.until_ready().await;
        if let Some(lost) = self.keep_lease(raw.id, claimed_at).await {
            return lost;
        }
        let sent = self.send(raw, &message, doubt_since, started).await;
        if !may_have_reached(&sent.outcome) {
            self.uncount(raw, &message.template_id, &counted).await;
            self.give_back_consent(raw, &message, sent.consent).await;
        }
        sent.outcome
    }

    /// The retry policy of the row's kind: a subscription notification's has no
    /// de-duplication window (bizsend takes no `client_msg_id`).
    fn retry_of(&self, raw: &RawMessage) -> RetryPolicy {
        match raw.kind() {
            MessageKind::Subscribe => self.retry.without_dedup(),
            MessageKind::Template => self.retry.clone(),
        }
    }

    /// The checks that end a row before its limits are looked at: an account of this daemon,
    /// a readable message within WeChat's content rules, a recipient still subscribed, not
    /// expired, and (in doubt) still within the de-duplication window.
    pub(super) fn admit(
        &self,
        raw: &RawMessage,
        claimed_at: DateTime<Utc>,
    ) -> Result<Admitted<'_>, Outcome> {
        let Some(runtime) = self.accounts.get(&raw.account) else {
            let mut names: Vec<_> = self.accounts.keys().map(String::as_str).collect();
            names.sort();
            return Err(Outcome::Failed {
                errcode: None,
                reason: format!(
                    "account {:?} is not configured in this daemon (configured: {})",
                    echo(&raw.account),
                    names.join(", ")
                ),
            });
        };
        let mut message = match TemplateMessage::from_raw(raw) {
            Ok(message) => message,
            Err(reason) => {
                return Err(Outcome::Failed {
                    errcode: None,
                    reason,
                });
            }
        };
        // The same input gives the same cut, so a resend in doubt sends what the first did.
        // Subscription values were held to their types' rules instead (`from_raw`).
        let cut = match message.kind {
            MessageKind::Template => {
                content_rules::apply(&mut message.body["data"], self.content_rules, self.overlong)
                    .map_err(|reason| Outcome::Failed {
                    errcode: None,
                    reason,
                })?
            }
            // Checked against the synced template here, not with the limits: a row that can
            // never be sent must not first wait days for a consent.
            MessageKind::Subscribe => {
                if let Some(content) = &raw.template_content {
                    crate::domain::template::check_data(
                        &message.template_id,
                        content,
                        &message.body["data"],
                    )
                    .map_err(|reason| Outcome::Failed {
                        errcode: None,
                        reason,
                    })?;
                }
                Vec::new()
            }
        };
        // A subscription notification reaches users who do not follow the account (in 服务通知):
        // that is what it is for.
        if raw.suppressed && message.kind == MessageKind::Template {
            return Err(Outcome::Failed {
                errcode: None,
                reason: crate::domain::lifecycle::reason::SUPPRESSED.into(),
            });
        }
        // A row in doubt asks WeChat again: its earlier attempt may have reached the user, and
        // failing it as "not sent" would say otherwise.
        if raw.refused && !raw.in_doubt {
            return Err(Outcome::Failed {
                errcode: None,
                reason: crate::domain::lifecycle::reason::REFUSED.into(),
            });
        }
        // Judged at the claim, as `countable` judged it: a row the claim counted is never
        // expired here.
        if raw.expires_at.is_some_and(|at| at <= claimed_at) {
            return Err(Outcome::Expired {
                reason: crate::domain::lifecycle::reason::EXPIRED.into(),
            });
        }
        // Doubt that arises in this attempt began when it was claimed.
        let doubt_since = raw.in_doubt_since.unwrap_or(claimed_at);
        if raw.in_doubt
            && !self
                .retry_of(raw)
                .resend_is_safe(doubt_since, self.clock.now())
        {
            return Err(Outcome::Unknown {
                errcode: None,
                reason: crate::domain::lifecycle::reason::in_doubt(message.kind).into(),
            });
        }
        Ok(Admitted {
            runtime,
            message,
            doubt_since,
            cut,
        })
    }

    /// Posts the message, refreshing a rejected token and resending at once (twice at most).
    async fn send(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        doubt_since: DateTime<Utc>,
        started: &AtomicBool,
    ) -> Sent {
        let mut in_doubt = raw.in_doubt;
        let mut consent = None;
        let _slot = self.requests.acquire().await.expect("never closed");
        for round in 0..=TOKEN_RETRIES {
            let token = match self.tokens.get(&raw.account).await {
                Ok(token) => token,
                Err(e) => {
                    let outcome =
                        self.retry_later(raw, doubt_since, None, format!("{e:#}"), in_doubt);
                    return Sent { outcome, consent };
                }
            };
            // Paced at the last moment, with the request slot and the token in hand, so that a
            // turn is not taken long before its send (once: a resend after a token refresh is
            // the same turn).
            if round == 0
                && let Some(waits) = self.pace(raw, message).await
            {
                return Sent {
                    outcome: waits,
                    consent,
                };
            }
            // The consent too is taken at the last moment: nothing that can stop the request
            // from leaving (a wait, a shutdown) comes between taking it and sending.
            if round == 0 {
                match self.consent_for(raw, message).await {
                    Ok(taken) => consent = taken,
                    Err(outcome) => {
                        return Sent { outcome, consent };
                    }
                }
            }
            let began_at = self.clock.now();
            started.store(true, Ordering::SeqCst);
            let request_began = std::time::Instant::now();
            let request = self
                .api
                .send_message(message.kind, &token, &message.body)
                .await;
            let reply = match request {
                Ok(reply) => {
                    self.metrics
                        .send_request(&raw.account, request_began.elapsed());
                    reply
                }
                Err(e) => {
                    // It may have been accepted: keep it counted.
                    in_doubt |= e.may_have_reached;
                    let outcome = self.retry_later(raw, doubt_since, None, e.detail, in_doubt);
                    return Sent { outcome, consent };
                }
            };
            if classify(reply.errcode) == ErrcodeClass::TokenRejected {
                self.token_rejected(&raw.account, &token, reply.errcode)
                    .await;
                continue;
            }
            // A duplicate answered to a resend in doubt stays counted (the first one got
            // through), and so does a row in doubt told to wait (43117 may be the first
            // attempt's doing): see `may_have_reached`.
            let outcome = self
                .judge(raw, message, doubt_since, began_at, reply, in_doubt)
                .await;
            return Sent { outcome, consent };
        }
        let reason = "the access token was rejected again after refreshing".to_string();
        Sent {
            outcome: self.retry_later(raw, doubt_since, Some(40001), reason, in_doubt),
            consent,
        }
    }

    async fn token_rejected(&self, account: &str, token: &SecretString, errcode: i64) {
        tracing::info!(errcode, "access token rejected; refreshing");
        if let Err(e) = self.tokens.rejected(account, token).await {
            tracing::warn!(error = %format!("{e:#}"), "token refresh failed");
        }
    }

    /// Reads WeChat's errcode into an outcome.
    async fn judge(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        doubt_since: DateTime<Utc>,
        began_at: DateTime<Utc>,
        reply: ApiReply,
        in_doubt: bool,
    ) -> Outcome {
        let ApiReply {
            errcode,
            errmsg,
            msgid,
        } = reply;
        let described = format!("errcode {errcode}: {errmsg}");
        if let Some(meaning) = self.user_errcodes.meaning(errcode) {
            if meaning == UserErrcode::Refused && message.kind == MessageKind::Subscribe {
                return self
                    .without_consent(raw, message, errcode, described, in_doubt, began_at)
                    .await;
            }
            return self
                .for_this_user(raw, message, meaning, errcode, described, in_doubt)
                .await;
        }
        match classify(errcode) {
            // Accepted without a msgid still went out; only its delivery event cannot be joined.
            ErrcodeClass::Accepted => Outcome::Sent { msgid },
            ErrcodeClass::Transient | ErrcodeClass::TokenRejected => {
                self.retry_later(raw, doubt_since, Some(errcode), described, in_doubt)
            }
            ErrcodeClass::Permanent => {
                if errcode == 40037 && message.kind == MessageKind::Template {
                    self.retire_unknown_template(&raw.account, &message.template_id, &described)
                        .await;
                }
                Outcome::Failed {
                    errcode: Some(errcode),
                    reason: described,
                }
            }
            // The account's template messages are not held back by what WeChat says about
            // its subscription notifications (an account without the feature answers 48001).
            ErrcodeClass::NotAuthorised if message.kind == MessageKind::Subscribe => {
                Outcome::Failed {
                    errcode: Some(errcode),
                    reason: format!(
                        "{described} (WeChat does not let this account send subscription \
                         notifications; its template messages go on)"
                    ),
                }
            }
            ErrcodeClass::DailyLimit if message.kind == MessageKind::Subscribe => {
                let until = periods(self.clock.now(), self.timezone).day_ends;
                Outcome::Wait {
                    until,
                    errcode: Some(errcode),
                    reason: format!(
                        "{described} (WeChat's daily limit of subscription notifications; this \
                         row waits until {} UTC, template messages go on)",
                        until.format("%Y-%m-%d %H:%M")
                    ),
                    in_doubt,
                }
            }
            ErrcodeClass::DailyLimit | ErrcodeClass::NotAuthorised => {
                let now = self.clock.now();
                let until = if classify(errcode) == ErrcodeClass::DailyLimit {
                    periods(now, self.timezone).day_ends
                } else {
                    now + chrono::Duration::from_std(self.not_authorised_pause).unwrap_or_default()
                };
                let reason = format!("account paused until {until}: {described}");
                if let Err(e) = self
                    .store
                    .pause_account(&raw.account, until, errcode, &reason, now)
                    .await
                {
                    tracing::error!(error = %e, "cannot record the account pause");
                }
                tracing::warn!(account = %loggable(&raw.account), %until, errcode, "account paused");
                Outcome::Release {
                    errcode: Some(errcode),
                    reason,
                    in_doubt,
                }
            }
        }
    }

    /// Per-user pacing: takes the user's turn, or says how long the row waits for it. A row in
    /// doubt goes at once: it is the same message again, and must go within the window.
    async fn pace(&self, raw: &RawMessage, message: &TemplateMessage) -> Option<Outcome> {
        let interval = self.per_user_interval?;
        if raw.in_doubt {
            return None;
        }
        let now = self.clock.now();
        let turn = self
            .store
            .take_recipient_turn(&raw.account, &message.touser, now, interval)
            .await;
        match turn {
            Ok(None) => None,
            Ok(Some(until)) => Some(Outcome::Wait {
                until,
                errcode: None,
                reason: format!(
                    "paced: this user got a send less than {} s ago \
                     (limits.per_user_interval_secs); waits for their turn",
                    interval.num_seconds()
                ),
                in_doubt: false,
            }),
            Err(e) => Some(database_trouble(raw, e)),
        }
    }

    /// An errcode about this user or this row only; the account goes on sending.
    async fn for_this_user(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        meaning: UserErrcode,
        errcode: i64,
        described: String,
        in_doubt: bool,
    ) -> Outcome {
        let now = self.clock.now();
        match meaning {
            UserErrcode::Refused => {
                let expires_at = now + self.user_errcodes.refusal_lasts();
                let refusal = Refusal {
                    account: &raw.account,
                    openid: &message.touser,
                    template_id: &message.template_id,
                    outbox_id: raw.id,
                    refused_at: now,
                    expires_at,
                };
                if let Err(e) = self.store.record_refusal(&refusal).await {
                    tracing::warn!(error = %e, "could not record the user's refusal; later rows will ask WeChat again");
                }
                Outcome::Failed {
                    errcode: Some(errcode),
                    reason: format!(
                        "{described} (the user refused this template; later rows to this user \
                         and template are not sent until {} UTC, see report_refusals)",
                        expires_at.format("%Y-%m-%d %H:%M")
                    ),
                }
            }
            UserErrcode::TooFrequent => {
                let until = now + self.user_errcodes.too_frequent_wait();
                Outcome::Wait {
                    until,
                    errcode: Some(errcode),
                    reason: format!(
                        "{described} (too many sends to this user; this row waits until {} \
                         UTC without using up an attempt, other users go on)",
                        until.format("%Y-%m-%d %H:%M:%S")
                    ),
                    in_doubt,
                }
            }
            UserErrcode::Duplicate if in_doubt => Outcome::SentEarlier {
                errcode,
                reason: format!(
                    "{described} (WeChat refused a resend as a duplicate: the earlier attempt, \
                     whose answer was lost, got through; sent, without a msgid)"
                ),
            },
            UserErrcode::Duplicate => Outcome::Failed {
                errcode: Some(errcode),
                reason: format!(
                    "{described} (WeChat refused it as a duplicate of a message it had just sent \
                     to this user)"
                ),
            },
        }
    }

    /// WeChat does not know the template: it goes out of use, freeing its place.
    async fn retire_unknown_template(&self, account: &str, template_id: &str, described: &str) {
        let note = format!("WeChat answered {described}");
        if let Err(e) = self
            .store
            .retire_template(account, template_id, &note, self.clock.now())
            .await
        {
            tracing::warn!(error = %e, "could not mark the template out of use");
        }
    }

    fn retry_later(
        &self,
        raw: &RawMessage,
        doubt_since: DateTime<Utc>,
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    ) -> Outcome {
        let attempts = raw.attempts.max(1) as u32;
        match self
            .retry_of(raw)
            .after_failure(attempts, doubt_since, in_doubt, self.clock.now())
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
                reason: format!(
                    "{}; last error: {reason}",
                    crate::domain::lifecycle::reason::in_doubt(raw.kind())
                ),
            },
        }
    }

    /// Before a request leaves, make sure the lease outlives it; a row that waited long at the
    /// rate limiter may otherwise be rescued by another daemon while in flight.
    async fn keep_lease(&self, id: i64, claimed_at: DateTime<Utc>) -> Option<Outcome> {
        let lease = chrono::Duration::from_std(self.lease).unwrap_or_default();
        let needed = chrono::Duration::from_std(self.http_timeout * 2).unwrap_or_default();
        let now = self.clock.now();
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
        Outcome::SentEarlier { reason, .. } => {
            tracing::info!(reason = %loggable(reason), "sent by an earlier attempt")
        }
        Outcome::Wait { until, reason, .. } => {
            tracing::info!(%until, reason = %loggable(reason), "waits for this user")
        }
        Outcome::Retry { at, reason, .. } => {
            tracing::info!(%at, reason = %loggable(reason), "will retry")
        }
        Outcome::Release { reason, .. } => tracing::info!(reason = %loggable(reason), "released"),
        Outcome::Hold { reason, .. } => tracing::info!(reason = %loggable(reason), "held"),
        Outcome::Failed { reason, .. } => tracing::warn!(reason = %loggable(reason), "failed"),
        Outcome::Expired { reason } => tracing::warn!(reason = %loggable(reason), "expired"),
        Outcome::Unknown { reason, .. } => {
            tracing::warn!(reason = %loggable(reason), "outcome unknown")
        }
    }
}
