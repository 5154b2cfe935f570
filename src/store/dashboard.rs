//! What the dashboard reads beyond the report views (messages by filter, one message's story,
//! the last day's activity) and what its actions change, each with its audit row in the same
//! transaction. docs/dashboard.md.

use chrono::{DateTime, Utc};

use super::{RowReader, Store, StoreResult, Time, on_backend};

/// Rows a list shows at once.
pub const PAGE_ROWS: i64 = 50;
/// Characters of `data` a message's page shows.
const DATA_CHARS: i64 = 65_536;

/// The messages list's filters; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageFilter {
    pub status: Option<String>,
    pub account: Option<String>,
    pub template_id: Option<String>,
    pub touser: Option<String>,
    pub errcode: Option<i64>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
}

/// Which page of a list, by the ids on its edges (keyset paging: no OFFSET to count past).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Newest,
    /// Rows with smaller ids than this.
    Before(i64),
    /// Rows with larger ids than this (the page before, going back).
    After(i64),
}

/// One row of the messages list.
#[derive(Debug, Clone, Default)]
pub struct MessageLine {
    pub id: i64,
    pub account: String,
    pub touser: String,
    pub template_id: String,
    pub status: String,
    pub attempts: i64,
    pub last_errcode: Option<i64>,
    pub last_error: Option<String>,
    pub held_for: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// One row as its page shows it. Text an app wrote is read as bytes (text that is not UTF-8
/// is shown with replacement characters) and cut; a time that cannot be read shows as none.
#[derive(Debug, Clone, Default)]
pub struct MessageDetail {
    pub line: MessageLine,
    pub data: Option<String>,
    pub url: Option<String>,
    pub miniprogram: Option<String>,
    pub client_msg_id: Option<String>,
    pub priority: i64,
    pub send_after: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub in_doubt_since: Option<DateTime<Utc>>,
    pub msgid: Option<i64>,
    pub updated_at: Option<DateTime<Utc>>,
    pub delivery_status: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub quota_month: Option<String>,
    pub quota_day: Option<String>,
    /// The first value that could not be read (and is shown as none or 0), and why.
    pub unreadable: Option<String>,
}

/// A delivery event joined to a row.
#[derive(Debug, Clone)]
pub struct JoinedEvent {
    pub received_at: Option<DateTime<Utc>>,
    pub status: Option<String>,
    pub joined_at: Option<DateTime<Utc>>,
}

/// Rows sent or ended in one minute, by account and status.
#[derive(Debug, Clone)]
pub struct ActivityCount {
    pub account: String,
    pub status: String,
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub rows: i64,
}

/// An attempt that did not end in a send, for the row's timeline.
#[derive(Debug, Clone)]
pub struct AttemptLine {
    pub at: Option<DateTime<Utc>>,
    pub status: String,
    pub errcode: Option<i64>,
    pub error: Option<String>,
}

/// An attempt to log (see `Store::log_attempts`).
#[derive(Debug, Clone)]
pub struct AttemptLog<'a> {
    pub outbox_id: i64,
    pub at: DateTime<Utc>,
    /// The status the attempt left the row in.
    pub status: &'a str,
    pub errcode: Option<i32>,
    pub error: Option<&'a str>,
    /// The attempt may have reached WeChat.
    pub in_doubt: bool,
}

/// Entries `outbox_attempts` keeps per row, at most: a row waiting out 43117 for days makes
/// one a minute.
pub const ATTEMPTS_KEPT: i64 = 50;

/// What an action did, as its audit row says.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub actor: String,
    pub action: &'static str,
    pub account: Option<String>,
    pub template_id: Option<String>,
    pub outbox_id: Option<i64>,
    pub new_outbox_id: Option<i64>,
    pub row_count: i64,
    pub detail: String,
}

/// An audit row as read back.
#[derive(Debug, Clone)]
pub struct AuditLine {
    pub id: i64,
    pub at: Option<DateTime<Utc>>,
    pub entry: AuditEntry,
    pub action: String,
}

/// Why a row could not be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resend {
    /// The new row's id.
    Created(i64),
    /// Sent again before, as this row.
    AlreadyResent(i64),
    /// Not a failed row that never reached WeChat (or no such row).
    NotEligible,
}

/// The tables the dashboard shows as they come (report views and small tables), each one
/// constant statement with its row limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardTable {
    /// Quota per template this month and the account's day (`report_quota`).
    QuotaThisMonth,
    /// Paused accounts, with until when and why.
    Pauses,
    /// The limits each account runs with (written by the daemons).
    AccountLimits,
    /// Templates in use per account.
    TemplatesInUse,
    /// Overdue rows (`report_stuck`), the first few, each with the total.
    Stuck,
    /// Delivery events not joined (`report_events`).
    UnjoinedEvents,
    /// Held rows by account, reason and template, with the oldest and the next look.
    HeldGroups,
    /// The last 7 days' errors by errcode (`report_errors`).
    ErrorsByCode,
    /// The last 7 days' most frequent reasons (`report_errors`).
    ErrorReasons,
    /// This month's sends and limit per template (`report_quota`).
    TemplateMonths,
}

/// Overdue rows the overview lists (their count is exact).
pub const STUCK_SHOWN: i64 = 20;

impl DashboardTable {
    fn statement(self) -> (&'static str, i64) {
        match self {
            DashboardTable::QuotaThisMonth => (
                "SELECT substr(account, 1, 200) AS account, substr(template_id, 1, 200) AS template_id, month_used, month_limit, month_remaining,
                month_exhausted_on, day_used, day_limit, wechat_day_used,
                wechat_day_limit
                FROM report_quota ORDER BY account, template_id",
                1_000,
            ),
            DashboardTable::Pauses => (
                "SELECT substr(account, 1, 200) AS account, paused_until, errcode,
                substr(reason, 1, 600) AS reason FROM account_pauses
                ORDER BY account",
                1_000,
            ),
            DashboardTable::AccountLimits => (
                "SELECT substr(account, 1, 200) AS account, active_templates, daily_per_account,
                rate_per_second
                FROM account_limits ORDER BY account",
                1_000,
            ),
            DashboardTable::TemplatesInUse => (
                "SELECT substr(account, 1, 200) AS account, COUNT(*) AS in_use FROM templates
                WHERE in_use
                GROUP BY 1 ORDER BY 1",
                1_000,
            ),
            DashboardTable::Stuck => (
                "SELECT id, substr(account, 1, 200) AS account, substr(template_id, 1, 200) AS template_id,
                status, why, since,
                COUNT(*) OVER () AS total
                FROM report_stuck ORDER BY since, id",
                STUCK_SHOWN,
            ),
            DashboardTable::UnjoinedEvents => (
                "SELECT substr(account, 1, 200) AS account, state, substr(problem, 1, 300) AS problem,
                event_count, last_received
                FROM report_events WHERE state <> 'joined' ORDER BY account, state",
                100,
            ),
            DashboardTable::HeldGroups => (
                "SELECT substr(account, 1, 200) AS account, substr(held_for, 1, 200) AS held_for,
                substr(template_id, 1, 200) AS template_id, COUNT(*) AS row_count,
                MIN(created_at) AS oldest, MIN(next_attempt_at) AS next_look
                FROM outbox WHERE status = 'held'
                GROUP BY 1, 2, 3 ORDER BY row_count DESC, account",
                500,
            ),
            DashboardTable::ErrorsByCode => (
                "SELECT errcode, CAST(SUM(row_count) AS BIGINT) AS row_count,
                COUNT(*) AS reasons, MAX(last_seen) AS last_seen
                FROM report_errors GROUP BY errcode ORDER BY row_count DESC",
                200,
            ),
            DashboardTable::ErrorReasons => (
                "SELECT errcode, substr(error, 1, 600) AS error, row_count, last_seen FROM report_errors
                ORDER BY row_count DESC, errcode",
                100,
            ),
            DashboardTable::TemplateMonths => (
                "SELECT substr(account, 1, 200) AS account, substr(template_id, 1, 200) AS template_id, month_used, month_limit, month_exhausted_on
                FROM report_quota",
                5_000,
            ),
        }
    }
}

/// A value bound to a statement built from a filter.
enum Arg {
    Text(String),
    Int(i64),
    Time(Time),
}

/// The filter's conditions as SQL, with their values bound from `$first`.
fn conditions(filter: &MessageFilter, first: usize) -> (Vec<String>, Vec<Arg>) {
    let mut sql = Vec::new();
    let mut args = Vec::new();
    let mut add = |column: &str, op: &str, arg: Arg| {
        sql.push(format!("{column} {op} ${}", first + args.len()));
        args.push(arg);
    };
    let text = |s: &Option<String>| s.clone().map(Arg::Text);
    for (column, value) in [
        ("status", text(&filter.status)),
        ("account", text(&filter.account)),
        ("template_id", text(&filter.template_id)),
        ("touser", text(&filter.touser)),
    ] {
        if let Some(value) = value {
            add(column, "=", value);
        }
    }
    if let Some(errcode) = filter.errcode {
        add("last_errcode", "=", Arg::Int(errcode));
    }
    if let Some(from) = filter.created_from {
        add("created_at", ">=", Arg::Time(Time(from)));
    }
    if let Some(to) = filter.created_to {
        add("created_at", "<", Arg::Time(Time(to)));
    }
    (sql, args)
}

/// Binds `args` in order (a macro: the query's type differs per backend).
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::Text(s) => query.bind(s),
                Arg::Int(i) => query.bind(i),
                Arg::Time(t) => query.bind(t),
            };
        }
        query
    }};
}

/// Inserts an audit row on `$executor` (a macro: the executor's type differs per backend).
macro_rules! insert_audit {
    ($executor:expr, $audit:expr, $now:expr) => {{
        let audit = $audit;
        sqlx::query(
            "INSERT INTO dashboard_audit (at, actor, action, account, template_id, outbox_id,
                 new_outbox_id, row_count, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(Time($now))
        .bind(super::bounded(&audit.actor))
        .bind(audit.action)
        .bind(audit.account.as_deref().map(super::bounded))
        .bind(audit.template_id.as_deref().map(super::bounded))
        .bind(audit.outbox_id)
        .bind(audit.new_outbox_id)
        .bind(audit.row_count)
        .bind(super::bounded(&audit.detail))
        .execute($executor)
        .await?;
    }};
}

const LINE_COLUMNS: &str =
    "id, substr(account, 1, 200) AS account, substr(touser, 1, 200) AS touser,
    substr(template_id, 1, 200) AS template_id, status, attempts, last_errcode,
    substr(last_error, 1, 600) AS last_error, substr(held_for, 1, 200) AS held_for, created_at,
    sent_at";

fn read_line<'r, R: sqlx::Row>(reader: &mut RowReader<'r, R>) -> MessageLine
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i32>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Time>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    MessageLine {
        id: reader.get("id"),
        account: reader.shown_text("account").unwrap_or_default(),
        touser: reader.shown_text("touser").unwrap_or_default(),
        template_id: reader.shown_text("template_id").unwrap_or_default(),
        status: reader.shown_text("status").unwrap_or_default(),
        attempts: i64::from(reader.get::<i32>("attempts")),
        last_errcode: reader.get::<Option<i32>>("last_errcode").map(i64::from),
        last_error: reader.shown_text("last_error"),
        held_for: reader.shown_text("held_for"),
        created_at: reader.time("created_at"),
        sent_at: reader.time("sent_at"),
    }
}

impl Store {
    /// A page of rows matching `filter`, newest first.
    pub async fn list_messages(
        &self,
        filter: &MessageFilter,
        page: Page,
    ) -> StoreResult<Vec<MessageLine>> {
        let (mut conds, mut args) = conditions(filter, 1);
        let order = match page {
            Page::Newest => "DESC",
            Page::Before(id) => {
                conds.push(format!("id < ${}", args.len() + 1));
                args.push(Arg::Int(id));
                "DESC"
            }
            Page::After(id) => {
                conds.push(format!("id > ${}", args.len() + 1));
                args.push(Arg::Int(id));
                "ASC"
            }
        };
        let filter_sql = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {LINE_COLUMNS} FROM outbox {filter_sql} ORDER BY id {order} LIMIT {PAGE_ROWS}"
        );
        let mut lines = on_backend!(self, |pool, _d| {
            let query = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), args);
            let rows = query.fetch_all(pool).await?;
            rows.iter()
                .map(|row| read_line(&mut RowReader::new(row)))
                .collect::<Vec<_>>()
        });
        if order == "ASC" {
            lines.reverse();
        }
        Ok(lines)
    }

    /// How many rows `filter` matches that a cancel would take: waiting, and no newer than
    /// `up_to_id`.
    pub async fn count_cancellable(
        &self,
        filter: &MessageFilter,
        up_to_id: i64,
    ) -> StoreResult<i64> {
        let (conds, args) = conditions(filter, 2);
        let sql = cancellable_sql("SELECT COUNT(*) FROM outbox", &conds);
        on_backend!(self, |pool, _d| {
            let query = bind_all!(
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(up_to_id),
                args
            );
            query.fetch_one(pool).await
        })
    }

    /// The largest id in the table (0 when empty): a cancel by filter takes no row inserted
    /// after its count was shown.
    pub async fn newest_id(&self) -> StoreResult<i64> {
        on_backend!(self, |pool, _d| {
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM outbox")
                .fetch_one(pool)
                .await
        })
    }

    /// One row, whole but for its cut `data`.
    pub async fn message(&self, id: i64) -> StoreResult<Option<MessageDetail>> {
        let sql = format!(
            "SELECT {LINE_COLUMNS}, substr(data, 1, {DATA_CHARS}) AS data,
                substr(url, 1, 2000) AS url, substr(miniprogram, 1, 2000) AS miniprogram,
                substr(client_msg_id, 1, 200) AS client_msg_id, priority, send_after,
                expires_at, next_attempt_at, in_doubt_since, msgid, updated_at,
                substr(delivery_status, 1, 200) AS delivery_status, delivered_at,
                substr(quota_month, 1, 40) AS quota_month, substr(quota_day, 1, 40) AS quota_day
             FROM outbox WHERE id = $1"
        );
        on_backend!(self, |pool, _d| {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|row| {
                let mut r = RowReader::new(&row);
                MessageDetail {
                    line: read_line(&mut r),
                    data: r.shown_text("data"),
                    url: r.shown_text("url"),
                    miniprogram: r.shown_text("miniprogram"),
                    client_msg_id: r.shown_text("client_msg_id"),
                    priority: i64::from(r.get::<i32>("priority")),
                    send_after: r.time("send_after"),
                    expires_at: r.time("expires_at"),
                    next_attempt_at: r.time("next_attempt_at"),
                    in_doubt_since: r.time("in_doubt_since"),
                    msgid: r.get("msgid"),
                    updated_at: r.time("updated_at"),
                    delivery_status: r.shown_text("delivery_status"),
                    delivered_at: r.time("delivered_at"),
                    quota_month: r.shown_text("quota_month"),
                    quota_day: r.shown_text("quota_day"),
                    unreadable: r.problem.take(),
                }
            }))
        })
    }

    /// The delivery events joined to a row (WeChat may push one twice).
    pub async fn joined_events(&self, outbox_id: i64) -> StoreResult<Vec<JoinedEvent>> {
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT received_at, substr(status, 1, 200) AS status, joined_at
                 FROM inbound_events WHERE outbox_id = $1 ORDER BY id LIMIT 10",
            )
            .bind(outbox_id)
            .fetch_all(pool)
            .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = RowReader::new(row);
                    JoinedEvent {
                        received_at: r.time("received_at"),
                        status: r.shown_text("status"),
                        joined_at: r.time("joined_at"),
                    }
                })
                .collect())
        })
    }

    /// Rows sent (by `sent_at`) or ended unsent (by `updated_at`) since `since`, per minute.
    pub async fn activity_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<ActivityCount>> {
        // Minutes since the epoch of a stored time: the one expression that differs.
        let minute = |column: &str| match self {
            Store::Sqlite(_) => format!("CAST(strftime('%s', {column}) AS INTEGER) / 60"),
            Store::Postgres(_) => {
                format!("CAST(floor(EXTRACT(EPOCH FROM {column}) / 60) AS BIGINT)")
            }
        };
        let sql = format!(
            "SELECT substr(account, 1, 200) AS account, status, {sent} AS minute, COUNT(*) AS rows
             FROM outbox WHERE sent_at >= $1 AND sent_at <= $2
             GROUP BY 1, status, minute
             UNION ALL
             SELECT substr(account, 1, 200) AS account, status, {ended} AS minute,
                    COUNT(*) AS rows
             FROM outbox
             WHERE sent_at IS NULL AND status IN ('failed', 'expired', 'cancelled', 'unknown')
               AND updated_at >= $1 AND updated_at <= $2
             GROUP BY 1, status, minute",
            sent = minute("sent_at"),
            ended = minute("updated_at"),
        );
        let now = Utc::now() + chrono::Duration::minutes(1);
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(Time(since))
                .bind(Time(now))
                .fetch_all(pool)
                .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = RowReader::new(row);
                    ActivityCount {
                        account: r.shown_text("account").unwrap_or_default(),
                        status: r.shown_text("status").unwrap_or_default(),
                        minute: r.get("minute"),
                        rows: r.get("rows"),
                    }
                })
                .collect())
        })
    }

    /// Logs attempts that did not end in a send. Up to [`ATTEMPTS_KEPT`] per row; beyond,
    /// only a row's first attempt in doubt, which keeps it from being sent again.
    pub async fn log_attempts(&self, attempts: &[AttemptLog<'_>]) -> StoreResult<()> {
        // One statement per hundred attempts: this runs on the task that writes the outcomes
        // of every message, and a WeChat outage makes whole groups of retries.
        for chunk in attempts.chunks(100) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let n = 2 + i * 6;
                    format!(
                        "SELECT ${n} AS outbox_id, ${} AS at, ${} AS status, ${} AS errcode, \
                         ${} AS error, ${} AS in_doubt",
                        n + 1,
                        n + 2,
                        n + 3,
                        n + 4,
                        n + 5
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO outbox_attempts (outbox_id, at, status, errcode, error, in_doubt)
                 SELECT v.outbox_id, v.at, v.status, v.errcode, v.error, v.in_doubt
                 FROM ({}) AS v
                 WHERE (SELECT COUNT(*) FROM outbox_attempts a WHERE a.outbox_id = v.outbox_id) < $1
                    OR (v.in_doubt AND NOT EXISTS (SELECT 1 FROM outbox_attempts a
                                                   WHERE a.outbox_id = v.outbox_id AND a.in_doubt))",
                rows.join(" UNION ALL ")
            );
            on_backend!(self, |pool, _d| {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ATTEMPTS_KEPT);
                for a in chunk {
                    query = query
                        .bind(a.outbox_id)
                        .bind(Time(a.at))
                        .bind(a.status)
                        .bind(a.errcode)
                        .bind(a.error)
                        .bind(a.in_doubt);
                }
                query.execute(pool).await?;
            });
        }
        Ok(())
    }

    /// A row's logged attempts, oldest first.
    pub async fn attempts_of_row(&self, outbox_id: i64) -> StoreResult<Vec<AttemptLine>> {
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT at, status, CAST(errcode AS BIGINT) AS errcode, error FROM outbox_attempts
                 WHERE outbox_id = $1 ORDER BY id LIMIT $2",
            )
            .bind(outbox_id)
            .bind(ATTEMPTS_KEPT)
            .fetch_all(pool)
            .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = RowReader::new(row);
                    AttemptLine {
                        at: r.time("at"),
                        status: r.shown_text("status").unwrap_or_default(),
                        errcode: r.get("errcode"),
                        error: r.shown_text("error"),
                    }
                })
                .collect())
        })
    }

    /// Templates in use first, then the others, at most `limit`, text cut and read whatever
    /// it holds.
    pub async fn shown_templates(&self, limit: i64) -> StoreResult<Vec<super::TemplateRow>> {
        on_backend!(self, |pool, _d| {
            let rows = sqlx::query(
                "SELECT substr(account, 1, 200) AS account,
                        substr(template_id, 1, 200) AS template_id,
                        substr(title, 1, 200) AS title, in_use, substr(note, 1, 300) AS note,
                        substr(content, 1, 2000) AS content
                 FROM templates ORDER BY in_use DESC, account, template_id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = RowReader::new(row);
                    super::TemplateRow {
                        account: r.shown_text("account").unwrap_or_default(),
                        template_id: r.shown_text("template_id").unwrap_or_default(),
                        title: r.shown_text("title"),
                        in_use: r.get("in_use"),
                        note: r.shown_text("note"),
                        content: r.shown_text("content"),
                        kind: "template".into(),
                    }
                })
                .collect())
        })
    }

    /// One of the dashboard's tables, each value as JSON.
    pub async fn dashboard_table(&self, table: DashboardTable) -> StoreResult<super::ViewRows> {
        let (sql, limit) = table.statement();
        let sql = sqlx::AssertSqlSafe(format!("{sql} LIMIT {limit}"));
        on_backend!(self, |pool, dialect| {
            let rows = sqlx::query(sql).fetch_all(pool).await?;
            Ok(super::reports::view_rows::<_, dialect::ViewTime>(&rows))
        })
    }

    /// The audit rows about one outbox row (acted on, or created by a resend).
    pub async fn audit_of_row(&self, outbox_id: i64) -> StoreResult<Vec<AuditLine>> {
        self.audit_lines(
            "SELECT * FROM dashboard_audit WHERE outbox_id = $1 OR new_outbox_id = $1
             ORDER BY id LIMIT 50",
            Some(outbox_id),
        )
        .await
    }

    /// The newest audit rows.
    pub async fn recent_audit(&self) -> StoreResult<Vec<AuditLine>> {
        self.audit_lines(
            "SELECT * FROM dashboard_audit ORDER BY id DESC LIMIT 200",
            None,
        )
        .await
    }

    async fn audit_lines(&self, sql: &'static str, id: Option<i64>) -> StoreResult<Vec<AuditLine>> {
        on_backend!(self, |pool, _d| {
            let mut query = sqlx::query(sql);
            if let Some(id) = id {
                query = query.bind(id);
            }
            let rows = query.fetch_all(pool).await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let mut r = RowReader::new(row);
                    AuditLine {
                        id: r.get("id"),
                        at: r.time("at"),
                        action: r.shown_text("action").unwrap_or_default(),
                        entry: AuditEntry {
                            actor: r.shown_text("actor").unwrap_or_default(),
                            action: "",
                            account: r.shown_text("account"),
                            template_id: r.shown_text("template_id"),
                            outbox_id: r.get("outbox_id"),
                            new_outbox_id: r.get("new_outbox_id"),
                            row_count: r.get("row_count"),
                            detail: r.shown_text("detail").unwrap_or_default(),
                        },
                    }
                })
                .collect())
        })
    }

    /// Cancels the waiting rows `filter` matches with ids up to `up_to_id` (one row: a filter
    /// on nothing but `only_id`), writing `reason` on them and `audit` (with the count) in the
    /// same transaction. Rows already claimed are left alone, as an app's cancel leaves them.
    pub async fn cancel_rows(
        &self,
        filter: &MessageFilter,
        only_id: Option<i64>,
        up_to_id: i64,
        reason: &str,
        mut audit: AuditEntry,
        now: DateTime<Utc>,
    ) -> StoreResult<i64> {
        let (mut conds, mut args) = conditions(filter, 4);
        if let Some(id) = only_id {
            conds.push(format!("id = ${}", 4 + args.len()));
            args.push(Arg::Int(id));
        }
        let sql = cancellable_sql(
            "UPDATE outbox SET status = 'cancelled', last_error = $2, updated_at = $3",
            &conds,
        );
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let query = bind_all!(
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(up_to_id)
                    .bind(super::bounded(reason))
                    .bind(Time(now)),
                args
            );
            let done = query.execute(&mut *tx).await?.rows_affected() as i64;
            // A row that was no longer waiting: nothing happened, nothing to audit. A filter
            // that matched nothing is audited (someone asked for it).
            if done == 0 && only_id.is_some() {
                return Ok(0);
            }
            audit.row_count = done;
            insert_audit!(&mut *tx, audit, now);
            tx.commit().await?;
            Ok(done)
        })
    }

    /// Sends a failed row again as a new row (a new `client_msg_id`, so WeChat does not take it
    /// for the old one), once: only a row that failed without WeChat accepting it and with no
    /// attempt in doubt, so that nobody gets the message twice.
    pub async fn resend_row(
        &self,
        id: i64,
        audit: AuditEntry,
        now: DateTime<Utc>,
    ) -> StoreResult<Resend> {
        match self.try_resend_row(id, audit, now).await {
            // Another operator's resend of the same row committed first (the unique index on
            // the audit): theirs stands.
            Err(e) if super::is_data_error(&e) => match self.resent_as(id).await? {
                Some(new) => Ok(Resend::AlreadyResent(new)),
                None => Err(e),
            },
            done => done,
        }
    }

    /// The row a resend of `id` created, if one did.
    async fn resent_as(&self, id: i64) -> StoreResult<Option<i64>> {
        on_backend!(self, |pool, _d| {
            let new: Option<Option<i64>> = sqlx::query_scalar(
                "SELECT new_outbox_id FROM dashboard_audit WHERE outbox_id = $1 AND action = 'resend'",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            Ok(new.map(Option::unwrap_or_default))
        })
    }

    async fn try_resend_row(
        &self,
        id: i64,
        mut audit: AuditEntry,
        now: DateTime<Utc>,
    ) -> StoreResult<Resend> {
        if let Some(new) = self.resent_as(id).await? {
            return Ok(Resend::AlreadyResent(new));
        }
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let created: Option<i64> = sqlx::query_scalar(
                "INSERT INTO outbox (account, touser, template_id, data, url, miniprogram,
                     priority, send_after, expires_at, created_at, updated_at, next_attempt_at,
                     kind, page)
                 SELECT account, touser, template_id, data, url, miniprogram, priority,
                        CASE WHEN kind = 'subscribe' THEN NULL ELSE send_after END,
                        expires_at, $2, $2, $2, kind, page
                 FROM outbox o
                 WHERE id = $1 AND status = 'failed' AND sent_at IS NULL AND msgid IS NULL
                   AND in_doubt = $3 AND in_doubt_since IS NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox_attempts a
                                   WHERE a.outbox_id = o.id AND a.in_doubt)
                 RETURNING id",
            )
            .bind(id)
            .bind(Time(now))
            .bind(false)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(created) = created else {
                return Ok(Resend::NotEligible);
            };
            audit.outbox_id = Some(id);
            audit.new_outbox_id = Some(created);
            audit.row_count = 1;
            insert_audit!(&mut *tx, audit, now);
            tx.commit().await?;
            Ok(Resend::Created(created))
        })
    }

    /// Ends an account's pause now (the row `account_pauses` holds); false if it was not paused.
    pub async fn resume_account(
        &self,
        account: &str,
        mut audit: AuditEntry,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let done = sqlx::query("DELETE FROM account_pauses WHERE account = $1")
                .bind(account)
                .execute(&mut *tx)
                .await?
                .rows_affected() as i64;
            if done == 0 {
                return Ok(false);
            }
            audit.row_count = done;
            insert_audit!(&mut *tx, audit, now);
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Writes an audit row on its own (for an action whose change committed already).
    pub async fn record_audit(&self, audit: AuditEntry, now: DateTime<Utc>) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            insert_audit!(pool, audit, now);
            Ok(())
        })
    }
}

/// `statement` limited to waiting rows with ids up to `$1`, and `conds`.
fn cancellable_sql(statement: &str, conds: &[String]) -> String {
    let mut sql = format!("{statement} WHERE status IN ('pending', 'held') AND id <= $1");
    for cond in conds {
        sql.push_str(" AND ");
        sql.push_str(cond);
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_binds_its_values_in_order_and_never_splices_them() {
        let filter = MessageFilter {
            status: Some("failed'; DROP TABLE outbox; --".into()),
            touser: Some("o1".into()),
            errcode: Some(40003),
            ..MessageFilter::default()
        };
        let (sql, args) = conditions(&filter, 3);
        assert_eq!(sql, ["status = $3", "touser = $4", "last_errcode = $5"]);
        assert_eq!(args.len(), 3);
        assert!(conditions(&MessageFilter::default(), 1).0.is_empty());
    }
}
