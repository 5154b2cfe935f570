//! Recording what happens to a message: its quota reservation before the request leaves
//! (`Reservations`) and its outcome after (`Completions`).
//!
//! Writes that many message tasks make at once are done in groups: one task takes every
//! request waiting and runs them in one transaction, so a busy pool pays one commit (one
//! fsync) per group instead of one per message. While one transaction runs, the next group
//! gathers. Reservations never wait for a group to fill (an idle daemon writes each at once);
//! outcomes wait `OUTCOME_LINGER` for company, as their request has left already. Each task
//! still waits for its own result, durable, before it goes on. docs/benchmarks.md.

use std::future::Future;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::store::{AttemptLog, Finish, Outcome, QuotaReservation, Reserved, Store, StoreResult};

/// The most requests written in one transaction.
const MAX_GROUP: usize = 256;
/// How long a group of outcomes that is not full waits for more before it is written. The
/// request has left by then (its `sent_at` is taken, its slot free), so the wait costs no
/// latency, and at a few hundred messages a second it turns a commit per message or two into
/// one per 10 ms. On SQLite each commit is a turn of the one write lock that the apps'
/// inserts need too. Issue 16, alternated runs at 1,000 inserts/s on SQLite: with 2 ms the
/// app kept 866-1,000 inserts/s, with 10 ms 1,000/s in every run, p99 insert → sent 10-12 ms
/// either way; Postgres at 500/s: p99 7.5-7.7 ms against 9.6-10.1, host CPU per message
/// -5 to -11 %; drains unchanged. Reservations do not wait: they are on the way out.
const OUTCOME_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

type Job<T, R> = (T, oneshot::Sender<StoreResult<R>>);

/// A handle to a group-writing task; the task ends when the last handle is dropped.
pub struct Grouped<T, R> {
    jobs: mpsc::UnboundedSender<Job<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Grouped<T, R> {
    /// `write` runs one group in one transaction and answers each request in order; on an
    /// error nothing of the group was written and every request gets the error. A group that
    /// is not full first waits `linger` for more.
    fn spawn<F, Fut>(linger: std::time::Duration, write: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<Vec<R>>> + Send,
    {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job<T, R>>();
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(MAX_GROUP);
            while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
                if !linger.is_zero() && group.len() < MAX_GROUP {
                    tokio::time::sleep(linger).await;
                    while group.len() < MAX_GROUP {
                        match queue.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                }
                let (items, answers): (Vec<T>, Vec<_>) = group.drain(..).unzip();
                let began = std::time::Instant::now();
                let size = items.len();
                let written = write(items).await;
                tracing::debug!(
                    size,
                    took_us = began.elapsed().as_micros() as u64,
                    "group written"
                );
                match written {
                    Ok(results) => {
                        for (answer, result) in answers.into_iter().zip(results) {
                            let _ = answer.send(Ok(result));
                        }
                    }
                    Err(e) => {
                        // Each message retries or records the trouble on its own.
                        let reason = e.to_string();
                        for answer in answers {
                            let _ = answer.send(Err(sqlx::Error::Protocol(reason.clone())));
                        }
                    }
                }
            }
        });
        Grouped { jobs }
    }

    async fn submit(&self, item: T) -> StoreResult<R> {
        let (answer, result) = oneshot::channel();
        if self.jobs.send((item, answer)).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        result.await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// Outcomes, written with the same lease-checked UPDATE per row as alone.
pub struct Completions(Grouped<Finish, bool>);

impl Completions {
    pub fn spawn(store: Store, owner: String) -> Completions {
        Completions(Grouped::spawn(OUTCOME_LINGER, move |items: Vec<Finish>| {
            let (store, owner) = (store.clone(), owner.clone());
            async move {
                let written = store.finish_many(&owner, &items).await?;
                log_attempts(&store, &items, &written).await;
                Ok(written)
            }
        }))
    }

    /// Writes one outcome (with whatever else is waiting); true if the row was still ours.
    pub async fn finish(
        &self,
        id: i64,
        outcome: &Outcome,
        now: DateTime<Utc>,
        attempt_began: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.0
            .submit(Finish {
                id,
                outcome: outcome.clone(),
                now,
                attempt_began,
            })
            .await
    }
}

/// Logs the attempts of a written group that did not end in a send, for the dashboard's
/// timeline: after the outcomes (a group of sends writes nothing more), and best effort (the
/// row itself holds the last attempt's errcode and reason).
async fn log_attempts(store: &Store, items: &[Finish], written: &[bool]) {
    let columns: Vec<_> = items
        .iter()
        .zip(written)
        .filter(|(item, written)| **written && !matches!(item.outcome, Outcome::Sent { .. }))
        .map(|(item, _)| (item, item.outcome.columns(item.now)))
        .collect();
    if columns.is_empty() {
        return;
    }
    let attempts: Vec<_> = columns
        .iter()
        .map(|(item, c)| AttemptLog {
            outbox_id: item.id,
            at: item.now,
            status: c.status.as_str(),
            errcode: c.errcode.map(crate::store::errcode_column),
            error: c.error.as_deref(),
            in_doubt: c.in_doubt,
        })
        .collect();
    if let Err(e) = store.log_attempts(&attempts).await {
        tracing::warn!(error = %e, "attempts not logged for the dashboard's timeline");
    }
}

/// A quota reservation with its own strings, to travel to the writing task.
pub struct ReservationRequest {
    pub owner: String,
    pub id: i64,
    pub account: String,
    pub template_id: String,
    pub month: String,
    pub day: String,
    pub monthly_limit: u32,
    pub daily_limit: u32,
    pub now: DateTime<Utc>,
}

impl ReservationRequest {
    fn borrowed(&self) -> QuotaReservation<'_> {
        QuotaReservation {
            owner: &self.owner,
            id: self.id,
            account: &self.account,
            template_id: &self.template_id,
            month: &self.month,
            day: &self.day,
            monthly_limit: self.monthly_limit,
            daily_limit: self.daily_limit,
            now: self.now,
        }
    }
}

/// Quota reservations; each row's stays all or nothing (see `Store::reserve_quota_many`).
pub struct Reservations(Grouped<ReservationRequest, Reserved>);

impl Reservations {
    pub fn spawn(store: Store) -> Reservations {
        Reservations(Grouped::spawn(
            std::time::Duration::ZERO,
            move |items: Vec<ReservationRequest>| {
                let store = store.clone();
                async move {
                    let borrowed: Vec<QuotaReservation<'_>> =
                        items.iter().map(ReservationRequest::borrowed).collect();
                    store.reserve_quota_many(&borrowed).await
                }
            },
        ))
    }

    pub async fn reserve(&self, request: ReservationRequest) -> StoreResult<Reserved> {
        self.0.submit(request).await
    }
}
