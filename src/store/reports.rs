//! What operators read: the report views, the counts behind `/metrics`, and the limits in
//! force (written for `report_quota`).

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, Time, on_backend};

/// A view's column names and rows, each value as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// An account's limits as the daemon runs them, for `report_quota`.
#[derive(Debug, Clone)]
pub struct AccountLimitsRow {
    pub account: String,
    pub active_templates: u32,
    pub monthly_per_template: u32,
    pub daily_per_account: u32,
    pub rate_per_second: u32,
    pub timezone: String,
    /// The timezone's offset from UTC at the time of writing.
    pub utc_offset_minutes: i32,
}

/// Rows counted by account, status and, for held rows, what they wait for.
#[derive(Debug, Clone)]
pub struct RowCount {
    pub account: String,
    pub status: String,
    pub held_for: Option<String>,
    pub rows: i64,
}

impl Store {
    /// Reads a view, each value as JSON. `view` and `order` are SQL: only constants (the
    /// report list) may be given.
    pub async fn read_view(
        &self,
        view: &'static str,
        order: &'static str,
    ) -> StoreResult<ViewRows> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM {view} ORDER BY {order}"));
        on_backend!(self, |pool, dialect| {
            let rows = sqlx::query(sql).fetch_all(pool).await?;
            Ok(view_rows::<_, dialect::ViewTime>(&rows))
        })
    }

    /// Writes the limits this daemon runs its accounts with, for `report_quota`.
    pub async fn record_limits(
        &self,
        rows: &[AccountLimitsRow],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            for row in rows {
                sqlx::query(
                    "INSERT INTO account_limits (account, active_templates, monthly_per_template,
                         daily_per_account, rate_per_second, timezone, utc_offset_minutes,
                         updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (account) DO UPDATE SET
                         active_templates = excluded.active_templates,
                         monthly_per_template = excluded.monthly_per_template,
                         daily_per_account = excluded.daily_per_account,
                         rate_per_second = excluded.rate_per_second,
                         timezone = excluded.timezone,
                         utc_offset_minutes = excluded.utc_offset_minutes,
                         updated_at = excluded.updated_at",
                )
                .bind(&row.account)
                .bind(i64::from(row.active_templates))
                .bind(i64::from(row.monthly_per_template))
                .bind(i64::from(row.daily_per_account))
                .bind(i64::from(row.rate_per_second))
                .bind(&row.timezone)
                .bind(row.utc_offset_minutes)
                .bind(Time(now))
                .execute(pool)
                .await?;
            }
            Ok(())
        })
    }

    /// Rows by account, status and held reason, for `/metrics` and the dashboard: text cut to
    /// 200 characters and read whatever an app wrote (text that is not UTF-8 included), so that
    /// no row can fail a scrape or keep the overview from being drawn. Callers add up groups
    /// (long or odd values may fall into one).
    pub async fn row_counts(&self) -> StoreResult<Vec<RowCount>> {
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT substr(account, 1, 200) AS account, substr(status, 1, 20) AS status,
                        substr(held_for, 1, 200) AS held_for, COUNT(*) AS rows
                 FROM outbox GROUP BY 1, 2, 3",
            )
            .fetch_all(pool)
            .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = super::RowReader::new(row);
                    RowCount {
                        account: r.shown_text("account").unwrap_or_default(),
                        status: r.shown_text("status").unwrap_or_default(),
                        held_for: r.shown_text("held_for"),
                        rows: r.get("rows"),
                    }
                })
                .collect())
        })
    }

    /// Rows per status, for the CLI and the demo.
    pub async fn status_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        on_backend!(self, |pool, _d| {
            sqlx::query_as("SELECT status, COUNT(*) FROM outbox GROUP BY status ORDER BY status")
                .fetch_all(pool)
                .await
        })
    }
}

/// Turns rows of any shape into JSON values, trying the types the report views produce. `T`
/// reads times (see each dialect's `ViewTime`).
pub(super) fn view_rows<R, T>(rows: &[R]) -> ViewRows
where
    R: sqlx::Row,
    T: Into<DateTime<Utc>>,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use serde_json::Value;
    use sqlx::Column;
    let columns = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let value = |row: &R, i: usize| -> Value {
        if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<i32>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
            return v.map_or(Value::Null, Value::from);
        }
        if let Ok(v) = row.try_get::<Option<T>, _>(i) {
            return v.map_or(Value::Null, |t| Value::from(t.into().to_rfc3339()));
        }
        row.try_get::<Option<String>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, Value::from)
    };
    let rows = rows
        .iter()
        .map(|row| (0..row.columns().len()).map(|i| value(row, i)).collect())
        .collect();
    ViewRows { columns, rows }
}
