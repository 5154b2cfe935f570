//! Daemons sharing the database say they are alive, so that each can take its share of an
//! account's send rate.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

impl Store {
    /// Records this daemon as alive; returns how many daemons beat since `alive_since`. Rows of
    /// daemons silent for an hour longer are deleted. One transaction.
    pub async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> StoreResult<i64> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            sqlx::query(
                "INSERT INTO daemons (owner, started_at, heartbeat_at) VALUES ($1, $2, $2)
                 ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )
            .bind(owner)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM daemons WHERE heartbeat_at < $1")
                .bind(Time(alive_since - chrono::Duration::hours(1)))
                .execute(&mut *tx)
                .await?;
            let alive: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM daemons WHERE heartbeat_at >= $1")
                    .bind(Time(alive_since))
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok(alive)
        })
    }

    pub async fn remove_daemon(&self, owner: &str) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query("DELETE FROM daemons WHERE owner = $1")
                .bind(owner)
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}
