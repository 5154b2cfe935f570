//! When a failed attempt is tried again, and when it must stop.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What to do with a row whose attempt ended without a definite answer from WeChat once it is
/// too late for `client_msg_id` to stop a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InDoubtPolicy {
    /// Mark it `unknown`: the user may have it, and must not get it twice.
    Unknown,
    /// Send it again: the user may get it twice, but will not miss it.
    Resend,
}

/// Capped exponential backoff with jitter, and the limits around it.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// How long after the first attempt a resend is still de-duplicated by WeChat
    /// (10 minutes by WeChat's word; configured a little shorter).
    pub dedup_window: Duration,
    pub in_doubt: InDoubtPolicy,
}

/// The next step for a row after an attempt that can be retried.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    RetryAt(DateTime<Utc>),
    /// No attempts left, and nothing can have reached WeChat.
    GiveUp,
    /// A retry would fall outside the de-duplication window of a request that may have arrived.
    Unknown,
}

impl RetryPolicy {
    /// The policy for a request nothing de-duplicates (subscription notifications: bizsend
    /// takes no `client_msg_id`): a row in doubt is never resent, unless `in_doubt = "resend"`.
    pub fn without_dedup(&self) -> RetryPolicy {
        RetryPolicy {
            dedup_window: Duration::ZERO,
            ..self.clone()
        }
    }

    /// The delay before attempt `attempts + 1`: `base · 2^(attempts-1)`, capped, with the upper
    /// half jittered so that rows failed together do not return together.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(30);
        let full = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Decides what follows a retryable failure of attempt number `attempts`.
    pub fn after_failure(
        &self,
        attempts: u32,
        doubt_since: DateTime<Utc>,
        in_doubt: bool,
        now: DateTime<Utc>,
    ) -> RetryDecision {
        if attempts >= self.max_attempts {
            return if in_doubt && self.in_doubt == InDoubtPolicy::Unknown {
                RetryDecision::Unknown
            } else {
                RetryDecision::GiveUp
            };
        }
        let at = now + self.delay(attempts);
        if in_doubt && !self.resend_is_safe(doubt_since, at) {
            return RetryDecision::Unknown;
        }
        RetryDecision::RetryAt(at)
    }

    /// Whether a resend at `at` of a request that may have arrived, sent in an attempt begun at
    /// `doubt_since`, is still covered by
    /// WeChat's `client_msg_id` de-duplication (or the operator chose to resend regardless).
    pub fn resend_is_safe(&self, doubt_since: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        self.in_doubt == InDoubtPolicy::Resend || at - doubt_since < self.window()
    }

    pub fn window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.dedup_window).unwrap_or(chrono::Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            dedup_window: Duration::from_secs(570),
            in_doubt: InDoubtPolicy::Unknown,
        }
    }

    #[test]
    fn delay_doubles_within_jitter_and_is_capped() {
        let p = policy();
        for _ in 0..200 {
            let d1 = p.delay(1);
            assert!(
                d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
                "{d1:?}"
            );
            let d3 = p.delay(3);
            assert!(
                d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4),
                "{d3:?}"
            );
            let d40 = p.delay(40);
            assert!(
                d40 >= Duration::from_secs(5) && d40 <= Duration::from_secs(10),
                "{d40:?}"
            );
        }
    }

    #[test]
    fn attempts_exhausted_give_up_or_unknown_when_in_doubt() {
        let p = policy();
        let now = Utc::now();
        assert_eq!(p.after_failure(5, now, false, now), RetryDecision::GiveUp);
        assert_eq!(p.after_failure(5, now, true, now), RetryDecision::Unknown);
        let resend = RetryPolicy {
            in_doubt: InDoubtPolicy::Resend,
            ..policy()
        };
        assert_eq!(
            resend.after_failure(5, now, true, now),
            RetryDecision::GiveUp
        );
    }

    #[test]
    fn an_in_doubt_row_is_not_resent_outside_the_window() {
        let p = policy();
        let now = Utc::now();
        let long_ago = now - chrono::Duration::seconds(569);
        assert_eq!(
            p.after_failure(2, long_ago, true, now),
            RetryDecision::Unknown
        );
        assert!(matches!(
            p.after_failure(2, long_ago, false, now),
            RetryDecision::RetryAt(_)
        ));
        assert!(matches!(
            p.after_failure(2, now, true, now),
            RetryDecision::RetryAt(_)
        ));
    }
}
