//! Subscription notifications' store: the consent ledger (what each user allowed the account
//! to send, per template) and the account's subscription templates.
//!
//! A one-time consent allows one send: the dispatcher takes it before the request and gives it
//! back when WeChat refuses the message; a long-term one serves until the user withdraws it.
//! Pushes write the ledger in `record_push` (see `pushes.rs`), in the push's transaction.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// One-time consents a ledger entry holds at most, however often a popup is accepted.
pub const MAX_GRANTED: i64 = 1000;

/// What a push says about one template for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentChange {
    /// Accepted in a popup: one more one-time send allowed.
    Granted,
    /// Accepted again in the notification settings: long-term sends resume (no one-time send).
    Resumed,
    /// Rejected in a popup or in the settings: nothing may be sent until accepted again.
    Withdrawn,
}

/// What `take_consent` found for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentTaken {
    /// One one-time consent used for this send.
    OneTime,
    /// The template is long-term and the user accepted it.
    LongTerm,
    /// No consent to send: the user never accepted, used it up, or rejected.
    Missing { rejected: bool },
}

/// A subscription template as `/wxaapi/newtmpl/gettemplate` lists it.
#[derive(Debug, Clone)]
pub struct SyncedSubscribeTemplate {
    pub template_id: String,
    pub title: String,
    pub content: String,
    pub example: String,
    pub long_term: bool,
}

/// Whose consent, for which template.
#[derive(Debug, Clone, Copy)]
pub struct ConsentKey<'a> {
    pub account: &'a str,
    pub openid: &'a str,
    pub template_id: &'a str,
}

impl ConsentChange {
    /// The ledger's status after the change, and whether it allows one more one-time send.
    pub(super) fn columns(self) -> (&'static str, bool) {
        match self {
            ConsentChange::Granted => ("accept", true),
            ConsentChange::Resumed => ("accept", false),
            ConsentChange::Withdrawn => ("reject", false),
        }
    }
}

/// What someone said about one consent: the user in a push (`source` 'popup' or 'change'), or
/// WeChat by a 43101 ('wechat'), which yields to an answer given after `unless_after` (the
/// request's start).
pub(super) struct Answer<'a> {
    pub key: ConsentKey<'a>,
    pub change: ConsentChange,
    pub source: &'a str,
    pub now: DateTime<Utc>,
    pub unless_after: Option<DateTime<Utc>>,
}

/// Records an `Answer` (`answer!` binds it): the status it gives, one more one-time send for a
/// popup's accept (none after a reject, at most `MAX_GRANTED`), none left after a reject.
pub(super) const RECORD_ANSWER: &str = "INSERT INTO consents (account, openid, template_id,
            status, granted, used, source, updated_at, answered_at)
     VALUES ($1, $2, $3, $6, CASE WHEN $7 THEN 1 ELSE 0 END, 0, $5, $4, $4)
     ON CONFLICT (account, openid, template_id) DO UPDATE SET status = excluded.status,
        granted = CASE WHEN excluded.status = 'reject' THEN 0
                       WHEN NOT $7 THEN consents.granted
                       WHEN consents.status = 'reject' THEN 1
                       WHEN consents.granted < $8 THEN consents.granted + 1
                       ELSE $8 END,
        source = excluded.source, updated_at = excluded.updated_at,
        answered_at = excluded.answered_at
     WHERE $9 IS NULL OR consents.answered_at IS NULL OR consents.answered_at <= $9";

/// `RECORD_ANSWER` with an `Answer`'s values bound, for any backend's executor.
macro_rules! answer {
    ($answer:expr) => {{
        let a: &$crate::store::consents::Answer<'_> = $answer;
        let (status, grants) = a.change.columns();
        sqlx::query($crate::store::consents::RECORD_ANSWER)
            .bind(a.key.account)
            .bind(a.key.openid)
            .bind(a.key.template_id)
            .bind(Time(a.now))
            .bind(a.source)
            .bind(status)
            .bind(grants)
            .bind($crate::store::consents::MAX_GRANTED)
            .bind(a.unless_after.map(Time))
    }};
}
pub(super) use answer;

/// Rows held for this user's consent to this template look again now (`$1`-`$4` as above).
pub(super) const WAKE_HELD_FOR_CONSENT: &str = "UPDATE outbox SET next_attempt_at = $4
     WHERE status = 'held' AND held_for = 'consent' AND account = $1 AND template_id = $3
       AND touser = $2 AND next_attempt_at > $4";

impl Store {
    /// Wakes rows held for a consent that changed since `since` (a user's answer, a consent
    /// given back) and allows a send now: the push and the give-back wake the rows held when
    /// they land, and this catches a row whose hold was written just after (its claim saw no
    /// consent yet). Reads the few consents changed lately (`consents_changed`: long-term
    /// sends do not move `updated_at`), then probes each one's held rows
    /// (`outbox_held_for_consent`): never a walk over every held row.
    pub async fn wake_held_for_given_consent(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            let given: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT c.account, c.openid, c.template_id FROM consents c
                 WHERE c.updated_at > $1 AND c.status = 'accept'
                   AND (c.granted > 0
                        OR EXISTS (SELECT 1 FROM subscribe_templates t
                                   WHERE t.account = c.account
                                     AND t.template_id = c.template_id
                                     AND t.long_term AND t.note IS NULL))",
            )
            .bind(Time(since))
            .fetch_all(pool)
            .await?;
            let mut woken = 0;
            for (account, openid, template_id) in &given {
                woken += sqlx::query(WAKE_HELD_FOR_CONSENT)
                    .bind(account)
                    .bind(openid)
                    .bind(template_id)
                    .bind(Time(now))
                    .execute(pool)
                    .await?
                    .rows_affected();
            }
            Ok(woken)
        })
    }

    /// Takes the consent a send of this template to this user needs: a long-term one when the
    /// template is long-term (by the last sync) and accepted, else one one-time consent, taken
    /// atomically (two rows racing for one consent: one gets it).
    pub async fn take_consent(
        &self,
        key: ConsentKey<'_>,
        long_term: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<ConsentTaken> {
        on_backend!(self, |pool, _d| {
            if long_term {
                // `updated_at` stays: it marks what changes what the consent allows, and the
                // release pass reads the consents it marks lately.
                let taken = sqlx::query(
                    "UPDATE consents SET used = used + 1
                     WHERE account = $1 AND openid = $2 AND template_id = $3
                       AND status = 'accept'",
                )
                .bind(key.account)
                .bind(key.openid)
                .bind(key.template_id)
                .execute(pool)
                .await?;
                if taken.rows_affected() == 1 {
                    return Ok(ConsentTaken::LongTerm);
                }
            } else {
                let taken = sqlx::query(
                    "UPDATE consents SET granted = granted - 1, used = used + 1, updated_at = $4
                     WHERE account = $1 AND openid = $2 AND template_id = $3
                       AND status = 'accept' AND granted > 0",
                )
                .bind(key.account)
                .bind(key.openid)
                .bind(key.template_id)
                .bind(Time(now))
                .execute(pool)
                .await?;
                if taken.rows_affected() == 1 {
                    return Ok(ConsentTaken::OneTime);
                }
            }
            let status: Option<String> = sqlx::query_scalar(
                "SELECT status FROM consents
                 WHERE account = $1 AND openid = $2 AND template_id = $3",
            )
            .bind(key.account)
            .bind(key.openid)
            .bind(key.template_id)
            .fetch_optional(pool)
            .await?;
            Ok(ConsentTaken::Missing {
                rejected: status.as_deref() == Some("reject"),
            })
        })
    }

    /// Gives back a consent taken for a send WeChat refused (or that never left). A one-time
    /// consent given back wakes the user's other rows held for it, in the same transaction.
    pub async fn give_back_consent(
        &self,
        key: ConsentKey<'_>,
        taken: ConsentTaken,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        match taken {
            ConsentTaken::OneTime => {}
            // A long-term send only counted itself in `used`; nothing to give back.
            ConsentTaken::LongTerm => {
                return on_backend!(self, |pool, _d| {
                    sqlx::query(
                        "UPDATE consents SET used = CASE WHEN used > 0 THEN used - 1 ELSE 0 END
                         WHERE account = $1 AND openid = $2 AND template_id = $3",
                    )
                    .bind(key.account)
                    .bind(key.openid)
                    .bind(key.template_id)
                    .execute(pool)
                    .await?;
                    Ok(())
                });
            }
            ConsentTaken::Missing { .. } => return Ok(()),
        }
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            sqlx::query(
                "UPDATE consents SET
                    granted = CASE WHEN status = 'accept' AND granted < $4 THEN granted + 1
                                   ELSE granted END,
                    used = CASE WHEN used > 0 THEN used - 1 ELSE 0 END, updated_at = $5
                 WHERE account = $1 AND openid = $2 AND template_id = $3",
            )
            .bind(key.account)
            .bind(key.openid)
            .bind(key.template_id)
            .bind(MAX_GRANTED)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?;
            sqlx::query(WAKE_HELD_FOR_CONSENT)
                .bind(key.account)
                .bind(key.openid)
                .bind(key.template_id)
                .bind(Time(now))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// WeChat refused a send for want of consent (43101): the ledger learns the user has none,
    /// unless the user answered after `since` (the request's start): a popup answered while
    /// the request was in flight is the newer word. Sends (takes, give-backs) do not count.
    pub async fn learn_refusal(
        &self,
        key: ConsentKey<'_>,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> StoreResult<()> {
        let refused = Answer {
            key,
            change: ConsentChange::Withdrawn,
            source: "wechat",
            now,
            unless_after: Some(since),
        };
        on_backend!(self, |pool, _d| {
            answer!(&refused).execute(pool).await?;
            Ok(())
        })
    }

    /// Records WeChat's list of the account's subscription templates; those missing from it
    /// get a note.
    pub async fn sync_subscribe_templates(
        &self,
        account: &str,
        listed: &[SyncedSubscribeTemplate],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            for t in listed {
                sqlx::query(
                    "INSERT INTO subscribe_templates (account, template_id, title, content,
                            example, long_term, last_seen_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (account, template_id) DO UPDATE SET title = excluded.title,
                        content = excluded.content, example = excluded.example,
                        long_term = excluded.long_term, last_seen_at = excluded.last_seen_at,
                        note = NULL",
                )
                .bind(account)
                .bind(&t.template_id)
                .bind(&t.title)
                .bind(&t.content)
                .bind(&t.example)
                .bind(t.long_term)
                .bind(Time(now))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE subscribe_templates SET note = $3
                 WHERE account = $1 AND (last_seen_at IS NULL OR last_seen_at < $2)
                   AND note IS NULL",
            )
            .bind(account)
            .bind(Time(now))
            .bind(crate::domain::lifecycle::reason::MISSING_FROM_LIST)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
