//! Per-user pacing: each recipient's next allowed send, taken atomically by whichever daemon
//! sends to them, so that the minimum interval holds across daemons.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// How long a recipient's turn is kept after it passed, before the prune deletes it.
pub const TURN_KEPT: chrono::Duration = chrono::Duration::days(1);

impl Store {
    /// Takes `openid`'s turn at `now` if its previous send was at least `interval` ago, setting
    /// the next turn to `now + interval`. `None` when taken; otherwise the time the turn comes.
    pub async fn take_recipient_turn(
        &self,
        account: &str,
        openid: &str,
        now: DateTime<Utc>,
        interval: chrono::Duration,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        on_backend!(self, |pool, _d| {
            // One statement: of two daemons racing for the same turn, the upsert's row lock (or
            // SQLite's one writer) lets only one find the old turn passed.
            let taken = sqlx::query(
                "INSERT INTO recipient_turns (account, openid, next_send_at) VALUES ($1, $2, $4)
                 ON CONFLICT (account, openid) DO UPDATE SET next_send_at = excluded.next_send_at
                 WHERE recipient_turns.next_send_at <= $3",
            )
            .bind(account)
            .bind(openid)
            .bind(Time(now))
            .bind(Time(now + interval))
            .execute(pool)
            .await?
            .rows_affected()
                == 1;
            if taken {
                return Ok(None);
            }
            let next: Option<Time> = sqlx::query_scalar(
                "SELECT next_send_at FROM recipient_turns WHERE account = $1 AND openid = $2",
            )
            .bind(account)
            .bind(openid)
            .fetch_optional(pool)
            .await?;
            // Gone meanwhile (pruned): the turn is free again, a moment later.
            Ok(Some(next.map_or(now, |t| t.0)))
        })
    }

    /// Deletes turns that passed more than `TURN_KEPT` before `now`; returns how many.
    pub async fn forget_past_turns(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            Ok(
                sqlx::query("DELETE FROM recipient_turns WHERE next_send_at < $1")
                    .bind(Time(now - TURN_KEPT))
                    .execute(pool)
                    .await?
                    .rows_affected(),
            )
        })
    }
}
