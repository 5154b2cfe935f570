//! Joins stored template events to their rows: at once when one arrives (the callback's wake),
//! and every second for events that came before their send was recorded (the push can race
//! the HTTP answer). Events that cannot join are given up on with a reason; if the pass as a
//! whole fails (a value no statement can handle), the events are tried one at a time so that
//! one event fails alone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::{Service, Time};
use crate::metrics::{Metrics, NotJoined};
use crate::store::{JoinCounts, JoinPass, Store, is_data_error};

/// How often a pass runs when no event wakes it.
const JOIN_INTERVAL: Duration = Duration::from_secs(1);
/// Most events a pass tries one at a time; the rest wait for the next pass.
const ONE_AT_A_TIME: i64 = 1000;

pub struct JoinEvents {
    store: Store,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    window: chrono::Duration,
    window_text: String,
}

impl JoinEvents {
    /// `wake` is notified by the callback endpoint when it stores a push; events that have not
    /// joined `window` after they arrived are given up on.
    pub fn new(store: Store, wake: Arc<Notify>, metrics: Arc<Metrics>, window: Duration) -> Self {
        JoinEvents {
            store,
            wake,
            metrics,
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            window_text: format!("{}s", window.as_secs()),
        }
    }
}

impl Service for JoinEvents {
    /// What the pass joined, mismatched and gave up on (summed over events one at a time).
    type Report = JoinCounts;

    fn name(&self) -> &'static str {
        "join"
    }

    fn interval(&self) -> Duration {
        JOIN_INTERVAL
    }

    fn failure_message(&self) -> &'static str {
        "cannot join delivery events now; trying again"
    }

    /// Events carry the time they were received, in real time.
    fn time(&self) -> Time {
        Time::Wall
    }

    fn wake(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    async fn run_once(&self, now: DateTime<Utc>) -> anyhow::Result<JoinCounts> {
        let pass = JoinPass {
            now,
            received_before: now.checked_sub_signed(self.window).unwrap_or(now),
            window: &self.window_text,
            only: None,
        };
        match self.store.join_delivery_events(&pass).await {
            Ok(counts) => {
                count_join(&self.metrics, counts);
                Ok(counts)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the join pass failed; joining events one at a time");
                self.join_one_at_a_time(&pass).await
            }
        }
    }
}

impl JoinEvents {
    /// Each waiting event in its own transaction; one whose join the database refuses (a value
    /// it cannot handle) is given up on with the error, so that the others still join. Any
    /// other failure (a lock, a timeout, a lost connection) stops the pass without giving
    /// anything up.
    async fn join_one_at_a_time(&self, pass: &JoinPass<'_>) -> anyhow::Result<JoinCounts> {
        let ids = self
            .store
            .unjoined_events(ONE_AT_A_TIME)
            .await
            .context("cannot list the events waiting to join")?;
        let mut total = JoinCounts::default();
        for id in ids {
            let one = JoinPass {
                only: Some(id),
                ..*pass
            };
            match self.store.join_delivery_events(&one).await {
                Ok(counts) => {
                    count_join(&self.metrics, counts);
                    total.joined += counts.joined;
                    total.mismatched += counts.mismatched;
                    total.given_up += counts.given_up;
                }
                // A lock, a timeout, a lost connection: the event is fine; the next pass tries
                // again.
                Err(e) if !is_data_error(&e) => {
                    return Err(e).context("cannot join an event");
                }
                Err(e) => {
                    let problem = format!("the join failed for this event: {e}");
                    self.store
                        .give_up_event(id, &problem, pass.now)
                        .await
                        .context("cannot give up on an unjoinable event")?;
                    tracing::warn!(
                        event = id,
                        "a delivery event could not be joined; given up on"
                    );
                    self.metrics.events_not_joined(NotJoined::Unjoinable, 1);
                }
            }
        }
        Ok(total)
    }
}

fn count_join(metrics: &Metrics, counts: JoinCounts) {
    if counts.joined > 0 {
        metrics.events_joined(counts.joined);
        tracing::debug!(rows = counts.joined, "delivery events joined");
    }
    if counts.mismatched > 0 {
        metrics.events_not_joined(NotJoined::OpenidMismatch, counts.mismatched);
        tracing::warn!(
            events = counts.mismatched,
            "delivery events whose FromUserName is not the row's touser; rows left as they were"
        );
    }
    if counts.given_up > 0 {
        metrics.events_not_joined(NotJoined::NoSentRow, counts.given_up);
        tracing::info!(
            events = counts.given_up,
            "delivery events with no sent row within the join window; given up on"
        );
    }
}
