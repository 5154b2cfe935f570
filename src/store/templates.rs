//! The account's templates: which are in use (at most the limit, however many daemons race),
//! and what WeChat lists.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};
use crate::domain::lifecycle::reason;

/// Whether a template could be taken into use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateUse {
    InUse,
    /// `in_use` templates are in use already: the limit.
    NoRoom {
        in_use: i64,
    },
}

/// A template as listed by `wechat-outbox templates list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TemplateRow {
    pub account: String,
    pub template_id: String,
    pub title: Option<String>,
    pub in_use: bool,
    pub note: Option<String>,
    /// Its text with `{{name.DATA}}` parameters, when WeChat's list gave it.
    pub content: Option<String>,
    /// `template`, or `subscribe (one-time)` / `subscribe (long-term)` for the account's
    /// subscription templates (`subscribe_templates`, never "in use": no slots apply to them).
    pub kind: String,
}

/// A template as WeChat lists it.
#[derive(Debug, Clone)]
pub struct SyncedTemplate {
    pub template_id: String,
    pub title: String,
    pub content: String,
}

impl Store {
    /// Takes a template into use if it is not and the account has room, atomically (two
    /// daemons racing cannot exceed `limit`: see each dialect's `lock_account_templates`).
    pub async fn take_template_into_use(
        &self,
        account: &str,
        template_id: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<TemplateUse> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            dialect::lock_account_templates(&mut tx, account).await?;
            let in_use: Option<bool> = sqlx::query_scalar(
                "SELECT in_use FROM templates WHERE account = $1 AND template_id = $2",
            )
            .bind(account)
            .bind(template_id)
            .fetch_optional(&mut *tx)
            .await?;
            if in_use == Some(true) {
                return Ok(TemplateUse::InUse);
            }
            let count: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE account = $1 AND in_use")
                    .bind(account)
                    .fetch_one(&mut *tx)
                    .await?;
            if count >= i64::from(limit) {
                return Ok(TemplateUse::NoRoom { in_use: count });
            }
            sqlx::query(
                "INSERT INTO templates (account, template_id, in_use, in_use_since)
                 VALUES ($1, $2, true, $3)
                 ON CONFLICT (account, template_id) DO UPDATE SET in_use = true,
                    in_use_since = excluded.in_use_since, note = NULL",
            )
            .bind(account)
            .bind(template_id)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(TemplateUse::InUse)
        })
    }

    /// Takes a template out of use with a note saying why, and wakes the account's rows held
    /// for room; false if it was not in use.
    pub async fn retire_template(
        &self,
        account: &str,
        template_id: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            dialect::lock_account_templates(&mut tx, account).await?;
            let was_in_use: Option<bool> = sqlx::query_scalar(
                "SELECT in_use FROM templates WHERE account = $1 AND template_id = $2",
            )
            .bind(account)
            .bind(template_id)
            .fetch_optional(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO templates (account, template_id, in_use, note) VALUES ($1, $2, false, $3)
                 ON CONFLICT (account, template_id) DO UPDATE SET in_use = false,
                    note = excluded.note",
            )
            .bind(account)
            .bind(template_id)
            .bind(note)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE outbox SET next_attempt_at = $2
                 WHERE status = 'held' AND held_for = 'template' AND account = $1",
            )
            .bind(account)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(was_in_use == Some(true))
        })
    }

    /// Records WeChat's template list for an account; templates missing from it get a note.
    pub async fn sync_templates(
        &self,
        account: &str,
        listed: &[SyncedTemplate],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            for t in listed {
                sqlx::query(
                    "INSERT INTO templates (account, template_id, title, content, last_seen_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (account, template_id) DO UPDATE SET title = excluded.title,
                        content = excluded.content, last_seen_at = excluded.last_seen_at,
                        note = NULL",
                )
                .bind(account)
                .bind(&t.template_id)
                .bind(&t.title)
                .bind(&t.content)
                .bind(Time(now))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE templates SET note = $3
                 WHERE account = $1 AND (last_seen_at IS NULL OR last_seen_at < $2)
                   AND note IS NULL",
            )
            .bind(account)
            .bind(Time(now))
            .bind(reason::MISSING_FROM_LIST)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn list_templates(&self) -> StoreResult<Vec<TemplateRow>> {
        on_backend!(self, |pool, _d| {
            sqlx::query_as(
                "SELECT account, template_id, title, in_use, note, content, kind FROM (
                    SELECT account, template_id, title, in_use, note, content,
                           'template' AS kind FROM templates
                    UNION ALL
                    SELECT account, template_id, title, (1 = 0) AS in_use, note, content,
                           CASE WHEN long_term THEN 'subscribe (long-term)'
                                ELSE 'subscribe (one-time)' END AS kind
                    FROM subscribe_templates) listed
                 ORDER BY account, kind DESC, in_use DESC, template_id",
            )
            .fetch_all(pool)
            .await
        })
    }

    /// Fails the rows still waiting (pending, not in doubt, or held) for a template deleted at
    /// WeChat; returns how many. A row in doubt is left to its resend: its earlier attempt may
    /// have reached the user.
    pub async fn fail_waiting_rows_of_template(
        &self,
        account: &str,
        template_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        on_backend!(self, |pool, _d| {
            Ok(sqlx::query(
                "UPDATE outbox SET status = 'failed', held_for = NULL, last_error = $3,
                    last_errcode = NULL, updated_at = $4
                 WHERE account = $1 AND template_id = $2
                   AND (status = 'held' OR (status = 'pending' AND in_doubt = false))",
            )
            .bind(account)
            .bind(template_id)
            .bind(reason::TEMPLATE_DELETED)
            .bind(Time(now))
            .execute(pool)
            .await?
            .rows_affected())
        })
    }
}
