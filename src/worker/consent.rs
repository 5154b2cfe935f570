//! A subscription notification's consent: taken from the ledger before its quota and request
//! are spent, given back when the message does not go out, and waited for (held) when the
//! user has given none yet.

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
        claimed_at: DateTime<Utc>,
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
        let deadline = raw.first_due.unwrap_or(claimed_at) + wait;
        let template = echo(&message.template_id);
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

    /// Gives back a consent taken for a message that did not go out (held for quota, refused
    /// by WeChat, lease lost). A failed write leaves the consent used: the safe side.
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
