//! The per-account send rate, shared by the cluster: each live daemon (a heartbeat row in the
//! database, beaten by services/heartbeat.rs) takes an equal share of `rate_per_second`,
//! re-divided when one joins or dies.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::{Account, Limits};

/// How often a daemon says it is alive; three missed beats and it no longer counts.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// What one account needs at send time.
pub struct AccountRuntime {
    pub account: Account,
    /// The limits in force: `account.limits` at start, replaced by a reload (SIGHUP).
    limits: RwLock<Limits>,
    limiter: RwLock<Arc<DefaultDirectRateLimiter>>,
    /// This daemon's share of the rate, whole sends per second rounded up.
    share_per_second: AtomicU32,
    /// Among how many live daemons the rate is divided now.
    sharing: AtomicU32,
    /// Held while a limiter is built and stored.
    rebuilding: std::sync::Mutex<()>,
    /// WeChat's own daily cap as last read (0: not read), in force when the limits say the
    /// cap follows WeChat.
    wechat_daily: AtomicU64,
}

impl AccountRuntime {
    pub fn new(account: Account) -> AccountRuntime {
        let limiter = RwLock::new(Arc::new(limiter_for(account.limits.rate_per_second, 1)));
        let share_per_second = AtomicU32::new(account.limits.rate_per_second.max(1));
        AccountRuntime {
            limits: RwLock::new(account.limits),
            account,
            limiter,
            share_per_second,
            sharing: AtomicU32::new(1),
            rebuilding: std::sync::Mutex::new(()),
            wechat_daily: AtomicU64::new(0),
        }
    }

    /// The account's limits in force now.
    pub fn limits(&self) -> Limits {
        let limits = *self.limits.read().unwrap_or_else(|p| p.into_inner());
        limits.with_wechat_daily(self.wechat_daily.load(Ordering::Relaxed))
    }

    /// WeChat's daily cap as `openapi/quota/get` answered it (services/wechat_quota.rs).
    pub fn set_wechat_daily(&self, daily_limit: u64) {
        self.wechat_daily.store(daily_limit, Ordering::Relaxed);
    }

    /// Puts new limits in force; the limiter is rebuilt (losing its state) only when the rate
    /// changed.
    pub fn set_limits(&self, limits: Limits) {
        let _rebuilding = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(
            &mut *self.limits.write().unwrap_or_else(|p| p.into_inner()),
            limits,
        );
        if old.rate_per_second != limits.rate_per_second {
            self.rebuild(self.sharing.load(Ordering::Relaxed));
        }
    }

    /// How many sends per second this daemon may make for the account now.
    pub fn share_per_second(&self) -> u32 {
        self.share_per_second.load(Ordering::Relaxed)
    }

    /// Waits until this daemon's share of the account's rate allows one more send.
    pub async fn until_ready(&self) {
        let limiter = self.limiter.read().expect("limiter lock").clone();
        limiter.until_ready().await;
    }

    /// Divides the rate among `daemons` live daemons (the heartbeat, services/heartbeat.rs).
    pub(crate) fn share_with(&self, daemons: u32) {
        let _rebuilding = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        self.rebuild(daemons);
    }

    /// Builds the limiter for `daemons` from the rate in force; callers hold `rebuilding`, so
    /// that a reload and a heartbeat cannot each store a limiter built from what the other
    /// replaced.
    fn rebuild(&self, daemons: u32) {
        let rate = self.limits().rate_per_second.max(1);
        let limiter = limiter_for(rate, daemons);
        self.sharing.store(daemons.max(1), Ordering::Relaxed);
        *self.limiter.write().expect("limiter lock") = Arc::new(limiter);
        self.share_per_second
            .store(rate.div_ceil(daemons.max(1)), Ordering::Relaxed);
    }
}

/// `rate / daemons` sends per second, with a burst of the same size (at least one).
fn limiter_for(rate: u32, daemons: u32) -> DefaultDirectRateLimiter {
    let daemons = daemons.max(1);
    let per_second = f64::from(rate.max(1)) / f64::from(daemons);
    let burst = NonZeroU32::new(per_second.floor() as u32).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(Duration::from_secs_f64(1.0 / per_second))
        .expect("a positive period")
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_allows_its_burst_and_no_more() {
        let limiter = limiter_for(30, 3);
        let granted = (0..100).filter(|_| limiter.check().is_ok()).count();
        assert_eq!(granted, 10, "a third of 30/s, burst 10");
        let slow = limiter_for(1, 4);
        assert_eq!(
            (0..10).filter(|_| slow.check().is_ok()).count(),
            1,
            "at least one"
        );
    }
}
