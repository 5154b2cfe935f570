//! The life of a row after its claim: how an attempt ends (`Outcome`) and the columns that
//! writes, what a held row waits for (`HeldFor`), how a quota reservation ended (`Reserved`),
//! how WeChat's delivery event ends a sent row (`delivery_status`), and the reasons the daemon
//! writes into `last_error`. The statuses themselves are `super::status::Status`.

use chrono::{DateTime, Utc};

use super::status::Status;

/// How an attempt ended, as written to the row by `Store::finish_many`.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// WeChat accepted the message.
    Sent {
        msgid: Option<i64>,
    },
    /// WeChat refused a resend of a row in doubt as a duplicate (40241): the earlier attempt
    /// got through. Sent, without a msgid; `errcode` and `reason` say why.
    SentEarlier {
        errcode: i64,
        reason: String,
    },
    /// Permanent: a refused row or errcode, or attempts exhausted.
    Failed {
        errcode: Option<i64>,
        reason: String,
    },
    Expired {
        reason: String,
    },
    /// It may have reached the user, and resending could reach them twice.
    Unknown {
        errcode: Option<i64>,
        reason: String,
    },
    /// Back to `pending`, due again at `at`.
    Retry {
        at: DateTime<Utc>,
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    },
    /// Back to `pending` now without counting the attempt (account paused, daemon stopping).
    Release {
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    },
    /// Back to `pending`, due again at `until`, without counting the attempt: WeChat asked
    /// for fewer sends to this user (43117).
    Wait {
        until: DateTime<Utc>,
        errcode: Option<i64>,
        reason: String,
        in_doubt: bool,
    },
    /// `held` on a limit until `until`, without counting the attempt.
    Hold {
        until: DateTime<Utc>,
        held_for: HeldFor,
        reason: String,
    },
}

/// What a held row waits for (the `held_for` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldFor {
    /// Room among the account's templates in use.
    Template,
    MonthlyQuota,
    DailyQuota,
    /// A subscription notification waits for the user's consent (`consents`).
    Consent,
}

impl HeldFor {
    pub fn as_str(self) -> &'static str {
        match self {
            HeldFor::Template => "template",
            HeldFor::MonthlyQuota => "monthly quota",
            HeldFor::DailyQuota => "daily quota",
            HeldFor::Consent => "consent",
        }
    }
}

/// How a quota reservation for one row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Granted,
    /// The template's month is full; nothing was taken.
    MonthFull,
    /// The account's day is full; nothing was taken.
    DayFull,
    /// The row is no longer this daemon's; nothing was taken.
    LeaseLost,
}

/// The column values an `Outcome` writes; the same for both backends.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeColumns {
    pub status: Status,
    pub msgid: Option<i64>,
    /// Whether `sent_at` becomes the time of the outcome.
    pub sent: bool,
    /// `None` keeps the row's `next_attempt_at`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub errcode: Option<i64>,
    pub error: Option<String>,
    /// Whether this attempt may have reached WeChat. `false` does not clear the doubt of an
    /// earlier attempt while the row waits: `finish_many` keeps it.
    pub in_doubt: bool,
    /// 1 when the attempt the claim counted is given back.
    pub refund_attempt: i32,
    pub held_for: Option<HeldFor>,
}

impl Outcome {
    pub fn columns(&self, now: DateTime<Utc>) -> OutcomeColumns {
        let base = |status, errcode: &Option<i64>, reason: &str| OutcomeColumns {
            status,
            msgid: None,
            sent: false,
            next_attempt_at: None,
            errcode: *errcode,
            error: Some(reason::bounded(reason)),
            in_doubt: false,
            refund_attempt: 0,
            held_for: None,
        };
        match self {
            Outcome::Sent { msgid } => OutcomeColumns {
                msgid: *msgid,
                sent: true,
                error: None,
                ..base(Status::Sent, &Some(0), "")
            },
            Outcome::SentEarlier { errcode, reason } => OutcomeColumns {
                sent: true,
                ..base(Status::Sent, &Some(*errcode), reason)
            },
            Outcome::Failed { errcode, reason } => base(Status::Failed, errcode, reason),
            Outcome::Expired { reason } => base(Status::Expired, &None, reason),
            Outcome::Unknown { errcode, reason } => OutcomeColumns {
                in_doubt: true,
                ..base(Status::Unknown, errcode, reason)
            },
            Outcome::Retry {
                at,
                errcode,
                reason,
                in_doubt,
            } => OutcomeColumns {
                next_attempt_at: Some(*at),
                in_doubt: *in_doubt,
                ..base(Status::Pending, errcode, reason)
            },
            Outcome::Release {
                errcode,
                reason,
                in_doubt,
            } => OutcomeColumns {
                next_attempt_at: Some(now),
                in_doubt: *in_doubt,
                refund_attempt: 1,
                ..base(Status::Pending, errcode, reason)
            },
            Outcome::Wait {
                until,
                errcode,
                reason,
                in_doubt,
            } => OutcomeColumns {
                next_attempt_at: Some(*until),
                in_doubt: *in_doubt,
                refund_attempt: 1,
                ..base(Status::Pending, errcode, reason)
            },
            Outcome::Hold {
                until,
                held_for,
                reason,
            } => OutcomeColumns {
                next_attempt_at: Some(*until),
                refund_attempt: 1,
                held_for: Some(*held_for),
                ..base(Status::Held, &None, reason)
            },
        }
    }
}

/// The status a `sent` row takes from the `Status` of its TEMPLATESENDJOBFINISH event:
/// `success` → delivered; `failed:user block` (any `failed…block…`) → blocked; any other
/// `failed…` → undelivered; anything else leaves the row `sent` (`None`). Case-insensitive, as
/// WeChat's spelling has varied.
pub fn delivery_status(event_status: &str) -> Option<Status> {
    let status = event_status.to_ascii_lowercase();
    if status == "success" {
        return Some(Status::Delivered);
    }
    let failure = status.strip_prefix("failed")?;
    Some(if failure.contains("block") {
        Status::Blocked
    } else {
        Status::Undelivered
    })
}

/// `delivery_status` as the join statement computes it, from the event's `j.status` and the
/// row's `outbox.status` (kept when the event says nothing we know). Both backends' joins
/// embed this text, and a store test runs it against `delivery_status` on each.
pub const DELIVERY_STATUS_SQL: &str = "CASE WHEN lower(j.status) = 'success' THEN 'delivered'
                 WHEN lower(j.status) LIKE 'failed%block%' THEN 'blocked'
                 WHEN lower(j.status) LIKE 'failed%' THEN 'undelivered'
                 ELSE outbox.status END";

/// The reasons the daemon writes into `last_error` (and `join_problem`), and their bound.
pub mod reason {
    /// How much of a reason is kept: enough to read, bounded whatever an app or WeChat sent.
    pub const MAX_CHARS: usize = 500;

    /// `text` cut to `MAX_CHARS` characters on a character boundary, marked `…`. Every reason
    /// written to a row passes here, since many echo input (an account name, a parameter,
    /// WeChat's errmsg).
    pub fn bounded(text: &str) -> String {
        crate::domain::text::cut(text, MAX_CHARS).into_owned()
    }

    /// On rows whose daemon stopped holding them.
    pub const LEASE_EXPIRED: &str = "the daemon sending it stopped (lease expired); it may have reached WeChat, so it is \
         resent with the same client_msg_id while WeChat still de-duplicates";
    pub const RELEASED_AT_SHUTDOWN: &str = "released at shutdown while in flight; it may have reached WeChat, so it is resent with \
         the same client_msg_id while WeChat still de-duplicates";
    pub const EXPIRED: &str = "expires_at passed before it could be sent";
    /// On templates (`note`) that WeChat no longer lists.
    pub const MISSING_FROM_LIST: &str = "missing from WeChat's template list at the last sync";
    /// On events whose openid does not match their row.
    pub const OPENID_MISMATCH: &str =
        "FromUserName is not the touser of the row with this MsgID; the row was left as it was";
    pub const SUPPRESSED: &str =
        "the user unsubscribed from the account (suppressed_openids); not sent";
    /// On rows waiting for a template an operator deleted at WeChat (`templates delete`).
    pub const TEMPLATE_DELETED: &str =
        "its template was deleted at WeChat by an operator (templates delete); not sent";
    /// On rows to a user who refused their template (the `refusals` table).
    pub const REFUSED: &str = "the user refused this template (WeChat answered 43101 to an \
         earlier row; see report_refusals): not sent, no quota spent";
    /// On subscription notifications whose request may have reached WeChat: bizsend takes no
    /// client_msg_id, so nothing would stop a resend from reaching the user twice.
    pub const SUBSCRIBE_IN_DOUBT: &str = "the request may have reached WeChat, and bizsend \
         de-duplicates nothing (no client_msg_id), so it is not resent (retry.in_doubt = \
         \"resend\" would)";
    /// Why a row in doubt is not resent, by its kind.
    pub fn in_doubt(kind: crate::domain::message::MessageKind) -> &'static str {
        match kind {
            crate::domain::message::MessageKind::Template => GAVE_UP_IN_DOUBT,
            crate::domain::message::MessageKind::Subscribe => SUBSCRIBE_IN_DOUBT,
        }
    }
    pub const GAVE_UP_IN_DOUBT: &str = "an earlier attempt may have reached WeChat and the client_msg_id de-duplication window \
         has passed, so it is not resent";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_events_end_a_sent_row_as_the_platform_spells_them() {
        for (event, status) in [
            ("success", Some(Status::Delivered)),
            ("SUCCESS", Some(Status::Delivered)),
            ("failed:user block", Some(Status::Blocked)),
            ("Failed: User Block", Some(Status::Blocked)),
            ("failed: system failed", Some(Status::Undelivered)),
            ("failed", Some(Status::Undelivered)),
            ("successful", None),
            ("", None),
            ("blocked", None),
        ] {
            assert_eq!(delivery_status(event), status, "{event:?}");
        }
    }

    #[test]
    fn every_outcome_leaves_the_status_its_name_says() {
        let now = Utc::now();
        let reason = || "r".to_string();
        let cases = [
            (Outcome::Sent { msgid: Some(1) }, Status::Sent),
            (
                Outcome::Failed {
                    errcode: None,
                    reason: reason(),
                },
                Status::Failed,
            ),
            (Outcome::Expired { reason: reason() }, Status::Expired),
            (
                Outcome::SentEarlier {
                    errcode: 40241,
                    reason: reason(),
                },
                Status::Sent,
            ),
            (
                Outcome::Wait {
                    until: now,
                    errcode: Some(43117),
                    reason: reason(),
                    in_doubt: false,
                },
                Status::Pending,
            ),
            (
                Outcome::Unknown {
                    errcode: None,
                    reason: reason(),
                },
                Status::Unknown,
            ),
            (
                Outcome::Retry {
                    at: now,
                    errcode: Some(-1),
                    reason: reason(),
                    in_doubt: false,
                },
                Status::Pending,
            ),
            (
                Outcome::Hold {
                    until: now,
                    held_for: HeldFor::DailyQuota,
                    reason: reason(),
                },
                Status::Held,
            ),
        ];
        for (outcome, status) in cases {
            let columns = outcome.columns(now);
            assert_eq!(columns.status, status, "{outcome:?}");
            assert_eq!(columns.status.is_terminal(), status.is_terminal());
        }
    }

    #[test]
    fn a_reason_is_bounded_however_long_its_input() {
        let reason = reason::bounded(&"界".repeat(10_000));
        assert_eq!(
            reason.chars().count(),
            reason::MAX_CHARS + 1,
            "the text and its mark"
        );
        assert!(reason.ends_with(crate::domain::text::CUT_MARK));
    }
}
