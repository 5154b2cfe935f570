//! What WeChat's errcodes mean for a queued message (the table in shared/wechat/NOTES.md).

/// How the daemon reacts to an errcode from the template send API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrcodeClass {
    /// 0: accepted.
    Accepted,
    /// -1 busy, 45011 per-minute API limit: try again later with the same client_msg_id.
    Transient,
    /// 40001, 40014, 42001: the access token is no longer good; refresh it and retry.
    TokenRejected,
    /// 45009: the account's daily API limit; hold the account until the next day.
    DailyLimit,
    /// 48001, 48004: the API is not authorised or banned; hold the account until an operator acts.
    NotAuthorised,
    /// Everything else, including codes this table does not know: retrying cannot help, and a
    /// code we do not understand must not turn into a loop of resends.
    Permanent,
}

/// What an errcode that WeChat added after 2014 means for one user or one row, before
/// `classify` is asked. Which codes mean what is a setting (`[errcodes]`), since WeChat
/// documents only some of them (docs/todays-wechat.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserErrcode {
    /// The user refused this template (43101): later rows to the pair are not sent.
    Refused,
    /// Too many sends to this user (43117, unconfirmed): this row waits, others go on.
    TooFrequent,
    /// WeChat refused the send as a duplicate (40241, unconfirmed).
    Duplicate,
}

/// The codes of each `UserErrcode` and what follows from them: `[errcodes]` in the
/// configuration (codes WeChat does not document are settings, so a wrong guess is mended in
/// the file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserErrcodes {
    /// The user refused the template: later rows to the same openid and template fail
    /// without a request.
    pub refused: Vec<i64>,
    /// How long a refusal stands (the user can accept the template again).
    pub refusal_days: u32,
    /// Too many sends to one user: the row waits `too_frequent_wait_secs`, without using up
    /// an attempt.
    pub too_frequent: Vec<i64>,
    pub too_frequent_wait_secs: u64,
    /// WeChat refused the send as a duplicate: sent already if the row was in doubt, else
    /// failed.
    pub duplicate: Vec<i64>,
}

impl Default for UserErrcodes {
    fn default() -> Self {
        UserErrcodes {
            refused: vec![43101],
            refusal_days: 30,
            too_frequent: vec![43117],
            too_frequent_wait_secs: 60,
            duplicate: vec![40241],
        }
    }
}

impl UserErrcodes {
    pub fn refusal_lasts(&self) -> chrono::Duration {
        chrono::Duration::days(self.refusal_days.into())
    }

    pub fn too_frequent_wait(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.too_frequent_wait_secs.min(i64::MAX as u64) as i64)
    }

    pub fn meaning(&self, errcode: i64) -> Option<UserErrcode> {
        if self.refused.contains(&errcode) {
            Some(UserErrcode::Refused)
        } else if self.too_frequent.contains(&errcode) {
            Some(UserErrcode::TooFrequent)
        } else if self.duplicate.contains(&errcode) {
            Some(UserErrcode::Duplicate)
        } else {
            None
        }
    }
}

pub fn classify(errcode: i64) -> ErrcodeClass {
    match errcode {
        0 => ErrcodeClass::Accepted,
        -1 | 45011 => ErrcodeClass::Transient,
        40001 | 40014 | 42001 => ErrcodeClass::TokenRejected,
        45009 => ErrcodeClass::DailyLimit,
        48001 | 48004 => ErrcodeClass::NotAuthorised,
        _ => ErrcodeClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errcodes_follow_the_settings() {
        let codes = UserErrcodes::default();
        assert_eq!(codes.meaning(43101), Some(UserErrcode::Refused));
        assert_eq!(codes.meaning(43117), Some(UserErrcode::TooFrequent));
        assert_eq!(codes.meaning(40241), Some(UserErrcode::Duplicate));
        assert_eq!(codes.meaning(-1), None);
        let moved = UserErrcodes {
            too_frequent: vec![45047],
            ..UserErrcodes::default()
        };
        assert_eq!(moved.meaning(43117), None);
        assert_eq!(moved.meaning(45047), Some(UserErrcode::TooFrequent));
    }

    #[test]
    fn the_notes_table_is_followed() {
        assert_eq!(classify(0), ErrcodeClass::Accepted);
        assert_eq!(classify(-1), ErrcodeClass::Transient);
        for code in [40001, 40014, 42001] {
            assert_eq!(classify(code), ErrcodeClass::TokenRejected, "{code}");
        }
        assert_eq!(classify(45009), ErrcodeClass::DailyLimit);
        for code in [48001, 48004] {
            assert_eq!(classify(code), ErrcodeClass::NotAuthorised, "{code}");
        }
        for code in [
            40003, 40036, 40037, 43004, 43019, 47001, 47003, 50002, 99999,
        ] {
            assert_eq!(classify(code), ErrcodeClass::Permanent, "{code}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every i64 has a class, and only the codes of the table are anything but Permanent:
        /// an unknown code (a future one, a garbled one) never loops as a retry.
        #[test]
        fn every_errcode_is_classified_and_unknown_ones_are_permanent(code in any::<i64>()) {
            let class = classify(code);
            let known = [0, -1, 45011, 40001, 40014, 42001, 45009, 48001, 48004];
            prop_assert_eq!(class == ErrcodeClass::Permanent, !known.contains(&code));
        }
    }

    #[test]
    fn the_extremes_are_permanent() {
        for code in [i64::MIN, i64::MIN + 1, -2, 1, i64::MAX] {
            assert_eq!(classify(code), ErrcodeClass::Permanent, "{code}");
        }
    }
}
