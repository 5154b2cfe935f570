//! The claim loop: claims due rows in batches while there is room, and gives each claimed row
//! to its own task (`dispatch.rs`) until shutdown.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Dispatcher, notify_systemd};

use crate::domain::message::RawMessage;
use crate::domain::quota::periods;
use crate::store::{ClaimRequest, Claimed, Outcome};

/// The longest the claim loop waits before passing again, so that `/healthz` can tell a
/// waiting loop from a stuck one.
pub const CLAIM_LOOP_MAX_WAIT: Duration = Duration::from_secs(5);
/// The longest pause after the database fails, before trying again.
const MAX_DB_BACKOFF: Duration = Duration::from_secs(5);

pub struct PoolSettings {
    /// Requests to WeChat in flight at once.
    pub concurrency: usize,
    /// Rows held beyond those, at most; fewer when the send rate would keep them waiting.
    pub claim_ahead: usize,
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    /// systemd's watchdog period (`WatchdogSec`), when the service has one.
    pub watchdog: Option<Duration>,
}

pub struct Pool {
    dispatcher: Arc<Dispatcher>,
    settings: PoolSettings,
    wake: Arc<Notify>,
}

impl Pool {
    pub fn new(dispatcher: Arc<Dispatcher>, settings: PoolSettings, wake: Arc<Notify>) -> Pool {
        Pool {
            dispatcher,
            settings,
            wake,
        }
    }

    /// Runs until `shutdown`, then stops claiming, lets in-flight messages finish within the
    /// grace period, and releases whatever is still in flight after it.
    pub async fn run(&self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        self.claim_loop(&tracker, &hard_stop, &shutdown).await;
        self.dispatcher.health.set_ready(false);
        notify_systemd(sd_notify::NotifyState::Stopping);

        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            tracing::info!(in_flight, grace = ?self.settings.shutdown_grace, "draining in-flight messages");
        }
        if tokio::time::timeout(self.settings.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still = tracker.len(),
                "grace period over; releasing in-flight messages"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        // Anything a task could not release itself (say, the database was down) goes back too.
        match self
            .dispatcher
            .store
            .release_owned(&self.dispatcher.owner, self.dispatcher.clock.now())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(rows = n, "released rows still held at shutdown"),
            Err(e) => {
                tracing::error!(error = %e, "could not release held rows; their leases will expire")
            }
        }
    }

    async fn claim_loop(
        &self,
        tracker: &TaskTracker,
        hard_stop: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        let most_held = self.settings.concurrency + self.settings.claim_ahead;
        let permits = Arc::new(Semaphore::new(most_held));
        // A task that ends frees its row's place; the loop waits for one when it holds enough.
        let row_done = Arc::new(Notify::new());
        let d = &self.dispatcher;
        let mut db_backoff = Duration::from_millis(100);
        // The watchdog is fed from this loop, so a wedged loop stops feeding it; no wait below
        // lasts longer than half its period.
        let beat = self
            .settings
            .watchdog
            .map_or(CLAIM_LOOP_MAX_WAIT, |w| (w / 2).min(CLAIM_LOOP_MAX_WAIT));
        let mut fed: Option<tokio::time::Instant> = None;
        loop {
            d.health.claim_loop_passed();
            // Fed at a quarter of the period, not on every pass of a busy loop.
            if self.settings.watchdog.is_some() && fed.is_none_or(|at| at.elapsed() >= beat / 2) {
                notify_systemd(sd_notify::NotifyState::Watchdog);
                fed = Some(tokio::time::Instant::now());
            }
            // Room for at least one message, then as many more as a batch allows.
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(beat) => continue,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            };
            // Rows claimed ahead wait for the send rate, and another daemon could send them
            // sooner: hold no more ahead than this daemon's share lets out in about a second.
            let limit =
                self.settings.concurrency + self.settings.claim_ahead.min(d.rate_allowance());
            let held_now = most_held - permits.available_permits();
            if held_now > limit {
                drop(first);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(beat) => {}
                    _ = row_done.notified() => {}
                }
                continue;
            }
            let room = limit - held_now + 1;
            let mut held = vec![first];
            while held.len() < self.settings.batch_size.min(room) {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            let wanted = held.len();
            let now = d.clock.now();
            let lease_until = now + chrono::Duration::from_std(d.lease).unwrap_or_default();
            let periods = periods(now, d.timezone);
            let request = ClaimRequest {
                owner: &d.owner,
                limit: wanted,
                lease_until,
                now,
                month: &periods.month,
                day: &periods.day,
                per_user_since: d.per_user_order.map(|hold| now - hold),
            };
            let countable = |raw: &RawMessage| d.countable(raw, now);
            let claim_began = std::time::Instant::now();
            let claimed = d.store.claim(&request, &countable);
            let rows = match claimed.await {
                Ok(rows) => {
                    tracing::debug!(
                        wanted,
                        rows = rows.len(),
                        held = held_now,
                        took_us = claim_began.elapsed().as_micros() as u64,
                        "claimed"
                    );
                    db_backoff = Duration::from_millis(100);
                    d.health.claim_result(Ok(()));
                    rows
                }
                Err(e) => {
                    d.health.claim_result(Err(&e));
                    tracing::error!(error = %e, retry_in = ?db_backoff, "cannot claim rows; the database is unavailable");
                    drop(held);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(db_backoff) => {}
                    }
                    db_backoff = (db_backoff * 2).min(MAX_DB_BACKOFF);
                    continue;
                }
            };
            let drained = rows.len() < wanted;
            for Claimed { raw, reserved } in rows {
                let permit = held.pop().expect("no more rows than permits");
                let dispatcher = d.clone();
                let hard_stop = hard_stop.clone();
                let row_done = row_done.clone();
                tracker.spawn(async move {
                    // Declared first, dropped last: the row's place is free when the loop looks.
                    let _done = NotifyOnDrop(row_done);
                    let _permit = permit;
                    let (id, account) = (raw.id, raw.account.clone());
                    let started = Arc::new(AtomicBool::new(false));
                    tokio::select! {
                        _ = dispatcher.handle(raw, reserved, now, started.clone()) => {}
                        _ = hard_stop.cancelled() => {
                            let in_doubt = started.load(std::sync::atomic::Ordering::SeqCst);
                            let reason = if in_doubt { crate::domain::lifecycle::reason::RELEASED_AT_SHUTDOWN } else { "released at shutdown before it was sent" };
                            dispatcher.record(id, &account, Outcome::Release { errcode: None, reason: reason.into(), in_doubt }, now).await;
                        }
                    }
                });
            }
            drop(held);
            if drained {
                // Nothing more is due: sleep until a wake-up hint or the poll interval.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval.min(beat)) => {}
                }
            }
        }
    }
}

/// Wakes the claim loop when a message task ends, however it ends.
struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}
