//! A subscription notification's consent: taken from the ledger just before its request
//! leaves (in `send`, after its quota, rate and pacing), given back unless the attempt may have
//! reached WeChat, and waited for (held) when the user has given none yet.

use chrono::{DateTime, Utc};

use super::Dispatcher;
use super::limits::database_trouble;
use crate::domain::message::{MessageKind, RawMessage, TemplateMessage};
use crate::domain::subscribe::ConsentPolicy;
use crate::domain::text::echo;
use crate::store::{ConsentKey, ConsentTaken, HeldFor, Outcome};

impl Dispatcher {
    /// The consent this row is sent under: `None` for a template message, for a resend in
    /// doubt (its first attempt took one) and, under `consent = "trust"`, when the ledger has
    /// none. `Err`: the outcome instead (held for consent, or failed once the wait is over).
    pub(super) async fn consent_for(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
    ) -> Result<Option<ConsentTaken>, Outcome> {
        if message.kind != MessageKind::Subscribe || raw.in_doubt {
            return Ok(None);
        }
        let now = self.clock.now();
        let taken = self
            .store
            .take_consent(key(raw, message), raw.long_term == Some(true), now)
            .await
            .map_err(|e| database_trouble(raw, e))?;
        let ConsentTaken::Missing { rejected } = taken else {
            return Ok(Some(taken));
        };
        if self.subscribe.consent == ConsentPolicy::Trust {
            return Ok(None);
        }
        let why = if rejected {
            "the user rejected it"
        } else {
            "none in the ledger, or a one-time consent used up"
        };
        let wait = self.subscribe.consent_wait();
        let template = echo(&message.template_id);
        // The wait counts from a time of the row's own; one that is no time (an app wrote
        // `infinity` or an odd text) or runs past chrono's range ends it now, with that reason,
        // rather than letting each claim start the wait again.
        let Some(deadline) = raw.first_due.and_then(|due| due.checked_add_signed(wait)) else {
            return Err(Outcome::Failed {
                errcode: None,
                reason: format!(
                    "no consent from the user to subscription template {template} ({why}), and \
                     send_after / created_at is not a time the wait for one can count from: not \
                     sent"
                ),
            });
        };
        if now >= deadline {
            return Err(Outcome::Failed {
                errcode: None,
                reason: format!(
                    "no consent from the user to subscription template {template} ({why}) within \
                     {} s of the row being due (subscribe.consent_wait_secs): not sent, see \
                     report_consents",
                    wait.num_seconds()
                ),
            });
        }
        let local = deadline
            .with_timezone(&self.timezone)
            .format("%Y-%m-%d %H:%M %Z");
        Err(Outcome::Hold {
            until: deadline,
            held_for: HeldFor::Consent,
            reason: format!(
                "waits for the user's consent to subscription template {template} ({why}); sent \
                 when WeChat pushes an accept, else failed at {local} \
                 (subscribe.consent_wait_secs); see report_consents"
            ),
        })
    }

    /// WeChat answered that the user has no consent (43101). The ledger learns it, unless the
    /// user answered a popup since the request left; a resend in doubt (`in_doubt =
    /// "resend"`) is told so because its first attempt may have used the consent: it ends
    /// `unknown`, and the ledger is left alone.
    pub(super) async fn without_consent(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        errcode: i64,
        described: String,
        in_doubt: bool,
        began_at: DateTime<Utc>,
    ) -> Outcome {
        if in_doubt {
            return Outcome::Unknown {
                errcode: Some(errcode),
                reason: format!(
                    "{described} (to a resend of a request that may have reached WeChat: the \
                     first may have used the consent, and the user may have it)"
                ),
            };
        }
        let learned = self
            .store
            .learn_refusal(key(raw, message), self.clock.now(), began_at)
            .await;
        if let Err(e) = learned {
            tracing::warn!(error = %e, "could not record the refusal in the consent ledger");
        }
        Outcome::Failed {
            errcode: Some(errcode),
            reason: format!(
                "{described} (the user has no consent to this subscription template: refused, \
                 or a one-time consent used up; the ledger says so now, see report_consents)"
            ),
        }
    }

    /// Gives back a consent taken for a message that did not reach WeChat (refused with an
    /// errcode, a connection that never got there). A failed write leaves the consent used:
    /// the safe side.
    pub(super) async fn give_back_consent(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        taken: Option<ConsentTaken>,
    ) {
        let Some(taken) = taken else { return };
        let given_back = self
            .store
            .give_back_consent(key(raw, message), taken, self.clock.now())
            .await;
        if let Err(e) = given_back {
            tracing::warn!(error = %e, "could not give back a consent; it stays used");
        }
    }
}

fn key<'a>(raw: &'a RawMessage, message: &'a TemplateMessage) -> ConsentKey<'a> {
    ConsentKey {
        account: &raw.account,
        openid: &message.touser,
        template_id: &message.template_id,
    }
}
