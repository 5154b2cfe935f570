//! The access token each account shares among daemons, and the lease that lets one daemon at a
//! time refresh it (a refresh knocks out the token before it).

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// The shared access token of one account, as stored.
#[derive(Clone)]
pub struct StoredToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// The token is a secret: never printed.
impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Asks for a token refresh lease: granted when no other daemon holds one and the stored token
/// is missing, expires before `refresh_before`, or is the `failing` one.
pub struct TokenLease<'a> {
    pub account: &'a str,
    pub owner: &'a str,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    pub refresh_before: DateTime<Utc>,
    pub failing: Option<&'a str>,
}

impl Store {
    pub async fn load_token(&self, account: &str) -> StoreResult<Option<StoredToken>> {
        on_backend!(self, |pool, _d| {
            let row: Option<(String, Time)> = sqlx::query_as(
                "SELECT access_token, expires_at FROM access_tokens
                 WHERE account = $1 AND access_token IS NOT NULL AND expires_at IS NOT NULL",
            )
            .bind(account)
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|(token, expires_at)| StoredToken {
                token,
                expires_at: expires_at.0,
            }))
        })
    }

    /// Takes the account's refresh lease if `lease` may have it; whether it was granted. One
    /// transaction: the account's row is created if missing, then taken only if free.
    pub async fn lease_token_refresh(&self, lease: &TokenLease<'_>) -> StoreResult<bool> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            sqlx::query("INSERT INTO access_tokens (account) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(lease.account)
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query(
                "UPDATE access_tokens SET refresh_owner = $2, refresh_lease_until = $3
                 WHERE account = $1
                   AND (refresh_lease_until IS NULL OR refresh_lease_until < $4)
                   AND (access_token IS NULL OR expires_at <= $5 OR access_token = $6)",
            )
            .bind(lease.account)
            .bind(lease.owner)
            .bind(Time(lease.lease_until))
            .bind(Time(lease.now))
            .bind(Time(lease.refresh_before))
            .bind(lease.failing)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Stores a fresh token, if `owner` still holds the refresh lease, and frees the lease.
    pub async fn save_token(
        &self,
        account: &str,
        owner: &str,
        token: &StoredToken,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "UPDATE access_tokens SET access_token = $3, expires_at = $4, refreshed_at = $5,
                        refresh_owner = NULL, refresh_lease_until = NULL
                 WHERE account = $1 AND refresh_owner = $2",
            )
            .bind(account)
            .bind(owner)
            .bind(&token.token)
            .bind(Time(token.expires_at))
            .bind(Time(now))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    pub async fn release_token_lease(&self, account: &str, owner: &str) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "UPDATE access_tokens SET refresh_owner = NULL, refresh_lease_until = NULL
                 WHERE account = $1 AND refresh_owner = $2",
            )
            .bind(account)
            .bind(owner)
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}
