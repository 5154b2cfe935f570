//! The account's limits, checked for each message before its request leaves: its template must
//! be in use (taken into use when there is room), its data must fit the template, and its send
//! must fit the template's month and the account's day. A row that must wait is held.

use chrono::{DateTime, Utc};

use super::Dispatcher;
use super::record::ReservationRequest;
use crate::domain::message::{MessageKind, RawMessage, TemplateMessage};
use crate::domain::quota::{Periods, periods};
use crate::domain::template::check_data;
use crate::store::{CountTerms, HeldFor, Outcome, QuotaReservation, Reserved, TemplateUse};

/// How often a row held for template room looks again (an operator may have edited the
/// templates table by SQL; `templates deactivate` wakes them at once).
const TEMPLATE_RECHECK: chrono::Duration = chrono::Duration::seconds(30);

/// The periods a row's send is counted in.
pub struct Counted {
    pub month: String,
    pub day: String,
}

impl Dispatcher {
    /// The terms on which the claim may count `raw` in its own transaction: only for a row
    /// that `attempt` would count next without asking the database anything else (an account
    /// of this daemon, readable, not suppressed, expired or in doubt, not counted before, its
    /// template in use and its data fitting). The others are counted by their task.
    pub fn countable(&self, raw: &RawMessage, claimed_at: DateTime<Utc>) -> Option<CountTerms> {
        // A subscription notification is counted by its task, after its consent is taken.
        let ready = raw.quota_month.is_none()
            && raw.quota_day.is_none()
            && !raw.in_doubt
            && raw.template_in_use == Some(true)
            && raw.kind() == MessageKind::Template;
        if !ready {
            return None;
        }
        // The same checks `attempt` makes first, so the two cannot disagree.
        let super::dispatch::Admitted {
            runtime, message, ..
        } = self.admit(raw, claimed_at).ok()?;
        let limits = runtime.limits();
        if let Some(content) = &raw.template_content {
            check_data(&message.template_id, content, &message.body["data"]).ok()?;
        }
        Some(CountTerms {
            template_id: message.template_id,
            monthly_limit: limits.monthly_per_template,
            daily_limit: limits.daily_per_account,
        })
    }

    /// Everything a row must pass before quota or a request is spent on it; `Err` is the
    /// outcome to record instead. `reserved` is the claim's reservation, when it counted the
    /// row (with the periods of `claimed_at`).
    pub(super) async fn check_limits(
        &self,
        raw: &RawMessage,
        message: &TemplateMessage,
        claimed_at: DateTime<Utc>,
        reserved: Option<Reserved>,
    ) -> Result<Counted, Outcome> {
        if let Some(reserved) = reserved {
            let p = periods(claimed_at, self.timezone);
            return self.reservation_result(raw, &message.template_id, p, Ok(reserved));
        }
        let now = self.clock.now();
        // Counted by an earlier attempt, which passed every check below before its request left
        // and may have reached WeChat: it goes out again as it is, never held (a hold would end
        // its doubt, and a resend outside the window could reach the user twice).
        if let (Some(month), Some(day)) = (&raw.quota_month, &raw.quota_day) {
            return Ok(Counted {
                month: month.clone(),
                day: day.clone(),
            });
        }
        let limits = self.accounts[&raw.account].limits();
        let template_id = message.template_id.as_str();
        // Template slots are a rule of template messages; subscription templates have none.
        let subscribe = message.kind == MessageKind::Subscribe;
        if !subscribe && raw.template_in_use != Some(true) {
            if !limits.auto_activate_templates {
                return Err(hold_for_room(
                    now,
                    format!(
                        "template {template_id} is not in use (auto_activate_templates is off): activate it with `wechat-outbox templates activate`"
                    ),
                ));
            }
            match self
                .store
                .take_template_into_use(&raw.account, template_id, limits.active_templates, now)
                .await
            {
                Ok(TemplateUse::InUse) => {}
                Ok(TemplateUse::NoRoom { in_use }) => {
                    return Err(hold_for_room(
                        now,
                        format!(
                            "template {template_id} is not in use and the account already uses {in_use} of its {} templates; it is sent once one is deactivated",
                            limits.active_templates
                        ),
                    ));
                }
                Err(e) => return Err(database_trouble(raw, e)),
            }
        }
        // A subscription notification's data was checked in `admit`, before any consent wait.
        if !subscribe
            && let Some(content) = &raw.template_content
            && let Err(reason) = check_data(template_id, content, &message.body["data"])
        {
            return Err(Outcome::Failed {
                errcode: None,
                reason,
            });
        }
        let p = periods(now, self.timezone);
        let request = ReservationRequest {
            owner: self.owner.clone(),
            id: raw.id,
            account: raw.account.clone(),
            template_id: template_id.to_string(),
            month: p.month.clone(),
            day: p.day.clone(),
            monthly_limit: self.monthly_limit(message.kind, &limits),
            daily_limit: limits.daily_per_account,
            now,
        };
        let reserved = self.reservations.reserve(request).await;
        self.reservation_result(raw, template_id, p, reserved)
    }

    /// What a reservation means for the row: counted in `p`, held, or given back.
    fn reservation_result(
        &self,
        raw: &RawMessage,
        template_id: &str,
        p: Periods,
        reserved: crate::store::StoreResult<Reserved>,
    ) -> Result<Counted, Outcome> {
        let limits = self.accounts[&raw.account].limits();
        match reserved {
            Ok(Reserved::Granted) => Ok(Counted {
                month: p.month,
                day: p.day,
            }),
            Ok(Reserved::MonthFull) => Err(self.hold_for_quota(
                HeldFor::MonthlyQuota,
                template_id,
                self.monthly_limit(raw.kind(), &limits),
                &p,
            )),
            Ok(Reserved::DayFull) => Err(self.hold_for_quota(
                HeldFor::DailyQuota,
                template_id,
                limits.daily_per_account,
                &p,
            )),
            Ok(Reserved::LeaseLost) => Err(Outcome::Release {
                errcode: None,
                reason: "lease lost before the quota was counted".into(),
                in_doubt: raw.in_doubt,
            }),
            Err(e) => Err(database_trouble(raw, e)),
        }
    }

    /// The monthly limit of one template of this kind: `limits.monthly_per_template` for
    /// template messages, `subscribe.monthly_per_template` (none by default) for subscription
    /// notifications.
    fn monthly_limit(&self, kind: MessageKind, limits: &crate::config::Limits) -> u32 {
        match kind {
            MessageKind::Template => limits.monthly_per_template,
            MessageKind::Subscribe => self.subscribe.monthly_limit(),
        }
    }

    /// Gives back the count of a send WeChat refused.
    pub(super) async fn uncount(&self, raw: &RawMessage, template_id: &str, counted: &Counted) {
        let reservation = self.reservation(
            raw,
            template_id,
            &counted.month,
            &counted.day,
            self.clock.now(),
        );
        if let Err(e) = self.store.release_quota(&reservation).await {
            // Counting too much is the safe side: the quota is never exceeded.
            tracing::warn!(error = %e, "could not give back a refused send's quota");
        }
    }

    fn reservation<'a>(
        &'a self,
        raw: &'a RawMessage,
        template_id: &'a str,
        month: &'a str,
        day: &'a str,
        now: DateTime<Utc>,
    ) -> QuotaReservation<'a> {
        let limits = self.accounts[&raw.account].limits();
        QuotaReservation {
            owner: &self.owner,
            id: raw.id,
            account: &raw.account,
            template_id,
            month,
            day,
            monthly_limit: limits.monthly_per_template,
            daily_limit: limits.daily_per_account,
            now,
        }
    }

    fn hold_for_quota(
        &self,
        held_for: HeldFor,
        template_id: &str,
        limit: u32,
        p: &Periods,
    ) -> Outcome {
        let (until, what) = match held_for {
            HeldFor::MonthlyQuota => (
                p.month_ends,
                format!(
                    "the monthly quota of template {template_id} ({limit} in {})",
                    p.month
                ),
            ),
            _ => (
                p.day_ends,
                format!("the account's daily quota ({limit} on {})", p.day),
            ),
        };
        let local = until
            .with_timezone(&self.timezone)
            .format("%Y-%m-%d %H:%M %Z");
        Outcome::Hold {
            until,
            held_for,
            reason: format!("{what} is used up; held until {local}"),
        }
    }
}

fn hold_for_room(now: DateTime<Utc>, reason: String) -> Outcome {
    Outcome::Hold {
        until: now + TEMPLATE_RECHECK,
        held_for: HeldFor::Template,
        reason,
    }
}

pub(super) fn database_trouble(raw: &RawMessage, e: sqlx::Error) -> Outcome {
    Outcome::Release {
        errcode: None,
        reason: format!("database unavailable while checking limits: {e}"),
        in_doubt: raw.in_doubt,
    }
}
