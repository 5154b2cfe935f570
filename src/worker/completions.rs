//! Outcomes are written in groups: one task takes every outcome waiting and writes them in one
//! transaction, so that a busy pool pays one commit (one fsync) per group instead of one per
//! message. Nothing waits for a group to fill: while one transaction runs, the next group
//! gathers; an idle daemon writes each outcome at once. Each message still waits for its own
//! outcome to be durable, and learns whether its lease still held. docs/benchmarks.md.

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Finish, Outcome, Store, StoreResult};

/// The most outcomes written in one transaction.
const MAX_GROUP: usize = 256;

struct Job {
    finish: Finish,
    done: oneshot::Sender<StoreResult<bool>>,
}

/// A handle to the writing task; the task ends when the last handle is dropped.
pub struct Completions {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Completions {
    pub fn spawn(store: Store, owner: String) -> Completions {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(store, owner, queue));
        Completions { jobs }
    }

    /// Writes one outcome (with whatever else is waiting); true if the row was still ours.
    pub async fn finish(
        &self,
        id: i64,
        outcome: &Outcome,
        now: DateTime<Utc>,
        attempt_began: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let (done, result) = oneshot::channel();
        let job = Job {
            finish: Finish {
                id,
                outcome: outcome.clone(),
                now,
                attempt_began,
            },
            done,
        };
        if self.jobs.send(job).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        result.await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn write_groups(store: Store, owner: String, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let items: Vec<Finish> = group.iter().map(|j| j.finish.clone()).collect();
        match store.finish_many(&owner, &items).await {
            Ok(done) => {
                for (job, ours) in group.drain(..).zip(done) {
                    let _ = job.done.send(Ok(ours));
                }
            }
            Err(e) => {
                // Nothing of the group was written; each message retries on its own.
                let reason = e.to_string();
                for job in group.drain(..) {
                    let _ = job.done.send(Err(sqlx::Error::Protocol(reason.clone())));
                }
            }
        }
    }
}
