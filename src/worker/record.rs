//! Recording what happens to a message: its quota reservation before the request leaves
//! (`Reservations`) and its outcome after (`Completions`).
//!
//! Writes that many message tasks make at once are done in groups: one task takes every
//! request waiting and runs them in one transaction, so a busy pool pays one commit (one
//! fsync) per group instead of one per message. Nothing waits for a group to fill: while one
//! transaction runs, the next group gathers; an idle daemon writes each request at once. Each
//! task still waits for its own result, durable, before it goes on. docs/benchmarks.md.

use std::future::Future;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Finish, Outcome, QuotaReservation, Reserved, Store, StoreResult};

/// The most requests written in one transaction.
const MAX_GROUP: usize = 256;

type Job<T, R> = (T, oneshot::Sender<StoreResult<R>>);

/// A handle to a group-writing task; the task ends when the last handle is dropped.
pub struct Grouped<T, R> {
    jobs: mpsc::UnboundedSender<Job<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Grouped<T, R> {
    /// `write` runs one group in one transaction and answers each request in order; on an
    /// error nothing of the group was written and every request gets the error.
    fn spawn<F, Fut>(write: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<Vec<R>>> + Send,
    {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job<T, R>>();
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(MAX_GROUP);
            while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
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
        Completions(Grouped::spawn(move |items: Vec<Finish>| {
            let (store, owner) = (store.clone(), owner.clone());
            async move { store.finish_many(&owner, &items).await }
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
        Reservations(Grouped::spawn(move |items: Vec<ReservationRequest>| {
            let store = store.clone();
            async move {
                let borrowed: Vec<QuotaReservation<'_>> =
                    items.iter().map(ReservationRequest::borrowed).collect();
                store.reserve_quota_many(&borrowed).await
            }
        }))
    }

    pub async fn reserve(&self, request: ReservationRequest) -> StoreResult<Reserved> {
        self.0.submit(request).await
    }
}
