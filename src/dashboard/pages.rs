//! The pages: each reads what it shows, turns it into text (times in the timezone, app text
//! cut) and hands it to its template, which escapes every value.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;

use super::Dashboard;
use super::access::Actor;
use super::charts::Series;
use super::show::{cell, errcode_meaning, long};
use crate::domain::status::Status;
use crate::store::{DashboardTable, MessageFilter, MessageLine, Page, ViewRows};

/// What the layout around every page needs.
pub struct Frame {
    pub title: String,
    pub active: &'static str,
    pub zone: String,
    pub actions: bool,
    pub csrf: String,
    pub actor: String,
    /// Refresh the figures every few seconds.
    pub live: bool,
}

impl Dashboard {
    pub fn frame(&self, title: impl Into<String>, active: &'static str, actor: &Actor) -> Frame {
        Frame {
            title: title.into(),
            active,
            zone: self.zone_name.clone(),
            actions: self.actions,
            csrf: self.access.csrf_token().to_string(),
            actor: cell(&actor.name),
            live: false,
        }
    }
}

/// A cell of a table, with a link when it names something that has a page.
pub struct Cell {
    pub text: String,
    pub link: Option<String>,
}

pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Dashboard {
    /// A report's rows as a table; `link` gives a cell its link from its column and row.
    fn table(
        &self,
        rows: &ViewRows,
        link: impl Fn(&str, &[serde_json::Value], &serde_json::Value) -> Option<String>,
    ) -> Table {
        let cells = self.cells(rows);
        Table {
            columns: rows.columns.clone(),
            rows: rows
                .rows
                .iter()
                .zip(cells)
                .map(|(values, texts)| {
                    texts
                        .into_iter()
                        .zip(values.iter().zip(&rows.columns))
                        .map(|(text, (value, column))| Cell {
                            link: link(column, values, value),
                            text,
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// `/messages/{id}` for a column named `id`.
fn id_link(column: &str, _row: &[serde_json::Value], value: &serde_json::Value) -> Option<String> {
    (column == "id")
        .then(|| value.as_i64())
        .flatten()
        .map(|id| format!("/messages/{id}"))
}

/// An HTML page, or a plain 500 naming what failed.
pub fn html(page: Result<impl Template, anyhow::Error>) -> Response {
    let rendered = page.and_then(|p| p.render().map_err(anyhow::Error::from));
    match rendered {
        Ok(body) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            let reason = crate::domain::text::loggable_within(&format!("{e:#}"), 500);
            tracing::warn!(error = %reason, "dashboard: page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the page could not be made: {reason}\n"),
            )
                .into_response()
        }
    }
}

pub struct AccountCard {
    pub name: String,
    pub statuses: Vec<(String, i64, String)>,
    pub held: Vec<(String, i64)>,
    pub paused: Option<String>,
    pub can_resume: bool,
    pub templates_in_use: String,
    pub today: String,
    pub hour_chart: String,
    pub hour_totals: String,
    pub day_chart: String,
    pub day_totals: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub frame: Frame,
    pub as_of: String,
    /// Why the figures are older than they should be.
    pub stale: Option<String>,
    pub accounts: Vec<AccountCard>,
    pub quota: Table,
    pub stuck: Table,
    pub stuck_total: i64,
    pub events: Table,
}

pub async fn overview(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
) -> Response {
    html(overview_page(&d, &actor).await)
}

/// An account's value in a report's column, from the row whose `account` is `account`.
fn account_value<'r>(
    rows: &'r ViewRows,
    account: &str,
    column: &str,
) -> Option<&'r serde_json::Value> {
    let a = rows.columns.iter().position(|c| c == "account")?;
    let c = rows.columns.iter().position(|c| c == column)?;
    rows.rows
        .iter()
        .find(|r| r[a].as_str() == Some(account))
        .map(|r| &r[c])
}

async fn overview_page(d: &Dashboard, actor: &Actor) -> anyhow::Result<OverviewPage> {
    let figures = d.overview.figures(&d.store).await?;
    let mut names: Vec<String> = d.accounts.clone();
    for count in &figures.counts {
        if !names.contains(&count.account) && names.len() < 50 {
            names.push(count.account.clone());
        }
    }
    let time_of_day = |t: DateTime<Utc>| t.with_timezone(&d.timezone).format("%H:%M").to_string();
    let accounts = names
        .iter()
        .map(|name| {
            let mut statuses: Vec<(String, i64, String)> = Status::ALL
                .iter()
                .map(|s| {
                    let rows: i64 = figures
                        .counts
                        .iter()
                        .filter(|c| &c.account == name && c.status == s.as_str())
                        .map(|c| c.rows)
                        .sum();
                    let link = if linkable(name) {
                        messages_link(&[("status", s.as_str()), ("account", name)])
                    } else {
                        messages_link(&[("status", s.as_str())])
                    };
                    (s.as_str().to_string(), rows, link)
                })
                .collect();
            statuses.retain(|(status, rows, _)| {
                *rows > 0 || matches!(status.as_str(), "pending" | "sent" | "failed")
            });
            let held = figures
                .counts
                .iter()
                .filter(|c| &c.account == name && c.status == "held")
                .map(|c| (cell(c.held_for.as_deref().unwrap_or("?")), c.rows))
                .collect();
            let paused = account_value(&figures.pauses, name, "paused_until")
                .and_then(|until| until.as_str())
                .and_then(|until| DateTime::parse_from_rfc3339(until).ok())
                .filter(|until| *until > figures.at)
                .map(|until| {
                    let reason = account_value(&figures.pauses, name, "reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or_default();
                    format!(
                        "paused until {}: {}",
                        d.time(Some(until.with_timezone(&Utc))),
                        long(reason, 300)
                    )
                });
            let number = |rows: &ViewRows, column: &str| {
                account_value(rows, name, column).and_then(|v| v.as_i64())
            };
            let in_use = number(&figures.templates_in_use, "in_use").unwrap_or(0);
            let templates_in_use = match number(&figures.limits, "active_templates") {
                Some(limit) => format!("{in_use} of {limit}"),
                None => format!("{in_use}"),
            };
            let today = match (
                number(&figures.quota, "day_used"),
                number(&figures.quota, "day_limit"),
            ) {
                (Some(used), Some(limit)) => format!("{used} of {limit}"),
                _ => "no sends counted today".into(),
            };
            let hour = Series::of(
                "sends in the last hour, per minute",
                &figures.activity,
                name,
                figures.at,
                1,
                60,
            );
            let day = Series::of(
                "sends in the last day, per hour",
                &figures.activity,
                name,
                figures.at,
                60,
                24,
            );
            let totals = |s: &Series| {
                let (reached, unsent) = s.total();
                format!("{reached} sent, {unsent} ended unsent")
            };
            AccountCard {
                name: cell(name),
                statuses,
                held,
                can_resume: paused.is_some() && d.actions,
                paused,
                templates_in_use,
                today,
                hour_totals: totals(&hour),
                hour_chart: hour.svg(time_of_day),
                day_totals: totals(&day),
                day_chart: day.svg(time_of_day),
            }
        })
        .collect();
    let stuck_total = figures
        .stuck
        .rows
        .first()
        .and_then(|r| r.last())
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let mut stuck = figures.stuck.clone();
    stuck.columns.pop();
    for row in &mut stuck.rows {
        row.pop();
    }
    let mut frame = d.frame("Overview", "overview", actor);
    frame.live = true;
    let stale = d.overview.failing().map(|(since, error)| {
        format!(
            "The figures could not be read since {}: {error}. Shown: those of {}.",
            d.time(Some(since)),
            d.time(Some(figures.at))
        )
    });
    Ok(OverviewPage {
        frame,
        stale,
        as_of: d.time(Some(figures.at)),
        accounts,
        quota: d.table(&figures.quota, |column, row, _| {
            (column == "template_id")
                .then(|| row.get(1).and_then(|t| t.as_str()))
                .flatten()
                .filter(|t| linkable(t))
                .map(|t| messages_link(&[("template", t)]))
        }),
        stuck: d.table(&stuck, id_link),
        stuck_total,
        events: d.table(&figures.events, |_, _, _| None),
    })
}

/// Whether a value read cut to 200 characters (or longer) can be a filter's value in a link:
/// a value that long is never linked (a page of such links would be megabytes), nor one read
/// lossily.
fn linkable(value: &str) -> bool {
    // A replacement character: the value was not UTF-8 and was read lossily; the link (or an
    // action) would name another value.
    value.chars().count() < 200 && !value.contains('\u{fffd}')
}

/// `/messages?…` with these filters.
pub fn messages_link(filters: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in filters {
        if !value.is_empty() {
            query.append_pair(key, value);
        }
    }
    format!("/messages?{}", query.finish())
}

/// The messages list's query string, as typed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FilterQuery {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub openid: String,
    #[serde(default)]
    pub errcode: String,
    /// `YYYY-MM-DDTHH:MM` in the dashboard's timezone (what `datetime-local` sends).
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub before: String,
    #[serde(default)]
    pub after: String,
}

/// The longest value a filter field takes (a longer one cannot match an app's value anyway
/// within reason, and is refused rather than sent to the database).
const FILTER_CHARS: usize = 1_000;

impl FilterQuery {
    /// The store's filter and the problems with what was typed (each field ignored).
    pub fn parse(&self, timezone: chrono_tz::Tz) -> (MessageFilter, Vec<String>) {
        let mut problems = Vec::new();
        let mut text = |name: &str, value: &str| {
            let value = value.trim();
            if value.is_empty() {
                None
            } else if value.chars().count() > FILTER_CHARS {
                problems.push(format!(
                    "{name}: longer than {FILTER_CHARS} characters, ignored"
                ));
                None
            } else {
                Some(value.to_string())
            }
        };
        let mut filter = MessageFilter {
            status: text("status", &self.status),
            account: text("account", &self.account),
            template_id: text("template", &self.template),
            touser: text("openid", &self.openid),
            ..MessageFilter::default()
        };
        if let Some(status) = &filter.status
            && Status::parse(status).is_none()
        {
            problems.push(format!("status {}: not a status, ignored", cell(status)));
            filter.status = None;
        }
        if !self.errcode.trim().is_empty() {
            match self.errcode.trim().parse::<i64>() {
                Ok(code) => filter.errcode = Some(code),
                Err(_) => problems.push(format!(
                    "errcode {}: not a number, ignored",
                    cell(&self.errcode)
                )),
            }
        }
        for (name, value, into) in [
            ("from", &self.from, &mut filter.created_from),
            ("to", &self.to, &mut filter.created_to),
        ] {
            if value.trim().is_empty() {
                continue;
            }
            match local_time(value.trim(), timezone) {
                Some(t) => *into = Some(t),
                None => problems.push(format!(
                    "{name} {}: not a time like 2026-12-03T14:00, ignored",
                    cell(value)
                )),
            }
        }
        (filter, problems)
    }

    fn page(&self) -> Page {
        if let Ok(id) = self.before.parse() {
            Page::Before(id)
        } else if let Ok(id) = self.after.parse() {
            Page::After(id)
        } else {
            Page::Newest
        }
    }

    /// The filters as query pairs (no paging).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("status", &self.status),
            ("account", &self.account),
            ("template", &self.template),
            ("openid", &self.openid),
            ("errcode", &self.errcode),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.trim().to_string()))
        .collect()
    }

    /// This filter's list with one more pair (`before`/`after`), or the confirm page.
    pub fn link(&self, path: &str, extra: Option<(&str, String)>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs() {
            query.append_pair(k, &v);
        }
        if let Some((k, v)) = extra {
            query.append_pair(k, &v);
        }
        format!("{path}?{}", query.finish())
    }
}

/// A wall-clock time typed in `timezone` (`2026-12-03T14:00`, seconds optional) in UTC.
fn local_time(text: &str, timezone: chrono_tz::Tz) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .ok()?;
    timezone
        .from_local_datetime(&naive)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

pub struct LineView {
    pub id: i64,
    pub created: String,
    pub account: String,
    pub touser: String,
    pub template_id: String,
    pub status: String,
    pub attempts: i64,
    pub errcode: String,
    pub error: String,
    pub sent: String,
}

impl Dashboard {
    fn line(&self, line: &MessageLine) -> LineView {
        LineView {
            id: line.id,
            created: self.time(line.created_at),
            account: cell(&line.account),
            touser: self.openid(&line.touser),
            template_id: cell(&line.template_id),
            status: match &line.held_for {
                Some(why) if line.status == "held" => format!("held ({})", cell(why)),
                _ => cell(&line.status),
            },
            attempts: line.attempts,
            errcode: line.last_errcode.map(|c| c.to_string()).unwrap_or_default(),
            error: line.last_error.as_deref().map(cell).unwrap_or_default(),
            sent: self.time(line.sent_at),
        }
    }
}

#[derive(Template)]
#[template(path = "messages.html")]
pub struct MessagesPage {
    pub frame: Frame,
    pub query: FilterQuery,
    /// Each option and whether it is the one chosen.
    pub statuses: Vec<(String, bool)>,
    pub accounts: Vec<(String, bool)>,
    pub problems: Vec<String>,
    pub lines: Vec<LineView>,
    pub newer: Option<String>,
    pub older: Option<String>,
    pub cancel_link: Option<String>,
}

pub async fn messages(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Query(query): Query<FilterQuery>,
) -> Response {
    html(messages_page(&d, &actor, query).await)
}

async fn messages_page(
    d: &Dashboard,
    actor: &Actor,
    query: FilterQuery,
) -> anyhow::Result<MessagesPage> {
    let (filter, problems) = query.parse(d.timezone);
    let page = query.page();
    let lines = d.store.list_messages(&filter, page).await?;
    let full = lines.len() as i64 == crate::store::PAGE_ROWS;
    let edge = |key: &str, id: i64| Some(query.link("/messages", Some((key, id.to_string()))));
    // Going back (`after`) a short page is the newest; going on (`before`) a short page is the
    // oldest. An empty page links back to the newest.
    let newer = match (page, lines.first()) {
        (Page::Newest, _) => None,
        (Page::After(_), Some(first)) if full => edge("after", first.id),
        (Page::After(_), _) => None,
        (Page::Before(_), Some(first)) => edge("after", first.id),
        (Page::Before(_), None) => Some(query.link("/messages", None)),
    };
    let older = match (page, lines.last()) {
        (Page::After(_), Some(last)) => edge("before", last.id),
        (Page::After(_), None) => Some(query.link("/messages", None)),
        (_, Some(last)) if full => edge("before", last.id),
        _ => None,
    };
    let cancellable = matches!(filter.status.as_deref(), None | Some("pending" | "held"));
    Ok(MessagesPage {
        frame: d.frame("Messages", "messages", actor),
        cancel_link: (d.actions && cancellable).then(|| query.link("/cancel", None)),
        statuses: Status::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), query.status.trim() == s.as_str()))
            .collect(),
        accounts: d
            .accounts
            .iter()
            .map(|a| (cell(a), query.account.trim() == a))
            .collect(),
        problems,
        lines: lines.iter().map(|l| d.line(l)).collect(),
        newer,
        older,
        query,
    })
}

/// One moment in a row's story.
pub struct Moment {
    pub at: String,
    pub what: String,
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub frame: Frame,
    pub line: LineView,
    pub fields: Vec<(&'static str, String)>,
    pub data: String,
    pub timeline: Vec<Moment>,
    pub can_cancel: bool,
    pub can_resend: bool,
    /// A value of the row that could not be read (shown as none or 0).
    pub unreadable: Option<String>,
}

pub async fn message(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return (StatusCode::NOT_FOUND, "no such message\n").into_response();
    };
    match message_page(&d, &actor, id).await {
        Ok(Some(page)) => html(Ok(page)),
        Ok(None) => (StatusCode::NOT_FOUND, "no such message\n").into_response(),
        Err(e) => html(Err::<MessagePage, _>(e)),
    }
}

async fn message_page(
    d: &Dashboard,
    actor: &Actor,
    id: i64,
) -> anyhow::Result<Option<MessagePage>> {
    let Some(m) = d.store.message(id).await? else {
        return Ok(None);
    };
    let events = d.store.joined_events(id).await?;
    let audit = d.store.audit_of_row(id).await?;
    let l = &m.line;
    let mut timeline: Vec<(Option<DateTime<Utc>>, String)> = vec![(
        l.created_at,
        format!(
            "inserted for {} with template {}",
            d.openid(&l.touser),
            cell(&l.template_id)
        ),
    )];
    if let Some(t) = m.in_doubt_since {
        timeline.push((
            Some(t),
            "an attempt began that may have reached WeChat: later attempts reuse its client_msg_id"
                .into(),
        ));
    }
    let attempts = d.store.attempts_of_row(id).await?;
    for a in &attempts {
        let mut what = format!("attempt ended {}", cell(&a.status));
        if let Some(code) = a.errcode {
            what.push_str(&format!(
                ": errcode {code} ({})",
                errcode_meaning(Some(code))
            ));
        }
        if let Some(e) = &a.error {
            what.push_str(&format!(": {}", long(e, 500)));
        }
        timeline.push((a.at, what));
    }
    if attempts.is_empty() && (l.attempts > 0 || l.last_error.is_some()) {
        // Nothing logged (an attempt that ended in a send, or a reason from maintenance or an
        // app): what the row holds.
        let mut what = format!("{} request(s) made", l.attempts);
        if let Some(code) = l.last_errcode.filter(|c| *c != 0) {
            what.push_str(&format!(
                "; last errcode {code} ({})",
                errcode_meaning(Some(code))
            ));
        }
        if let Some(e) = &l.last_error {
            what.push_str(&format!(": {}", long(e, 500)));
        }
        timeline.push((m.updated_at, what));
    }
    if l.status == "held" {
        timeline.push((
            m.updated_at,
            format!(
                "held: waits for {}; looked at again at {}",
                cell(l.held_for.as_deref().unwrap_or("room")),
                d.time(m.next_attempt_at)
            ),
        ));
    } else if l.status == "pending" {
        // The claim takes a row once both its retry time and its send_after have come.
        let due = m.next_attempt_at.max(m.send_after);
        timeline.push((due, "due: sent from then on".into()));
    }
    if let Some(t) = l.sent_at {
        let msgid = m
            .msgid
            .map(|id| format!(", msgid {id}"))
            .unwrap_or_default();
        timeline.push((Some(t), format!("accepted by WeChat{msgid}")));
    }
    for e in &events {
        timeline.push((
            e.received_at,
            format!(
                "delivery event: {}",
                cell(e.status.as_deref().unwrap_or("?"))
            ),
        ));
    }
    for a in &audit {
        let what = match (a.action.as_str(), a.entry.outbox_id, a.entry.new_outbox_id) {
            ("resend", Some(old), Some(new)) if new == id => {
                format!("created by {} sending #{old} again", cell(&a.entry.actor))
            }
            ("resend", _, Some(new)) => format!("sent again by {} as #{new}", cell(&a.entry.actor)),
            (action, _, _) => format!(
                "{} by {}: {}",
                cell(action),
                cell(&a.entry.actor),
                long(&a.entry.detail, 300)
            ),
        };
        timeline.push((a.at, what));
    }
    timeline.sort_by_key(|(at, _)| *at);
    let final_status = Status::parse(&l.status).is_some_and(|s| s.is_terminal());
    let data = match m
        .data
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        Some(Ok(json)) => serde_json::to_string_pretty(&json)
            .unwrap_or_default()
            .lines()
            .map(|line| long(line, 2_000))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(Err(_)) => long(m.data.as_deref().unwrap_or_default(), 20_000),
        None => String::new(),
    };
    let fields = vec![
        ("account", cell(&l.account)),
        ("touser", d.openid(&l.touser)),
        ("template_id", cell(&l.template_id)),
        ("status", cell(&l.status)),
        ("priority", m.priority.to_string()),
        (
            "client_msg_id",
            m.client_msg_id.as_deref().map(cell).unwrap_or_default(),
        ),
        ("url", m.url.as_deref().map(cell).unwrap_or_default()),
        (
            "miniprogram",
            m.miniprogram.as_deref().map(cell).unwrap_or_default(),
        ),
        ("expires_at", d.time(m.expires_at)),
        ("msgid", m.msgid.map(|i| i.to_string()).unwrap_or_default()),
        (
            "delivery_status",
            m.delivery_status.as_deref().map(cell).unwrap_or_default(),
        ),
        ("delivered_at", d.time(m.delivered_at)),
        (
            "quota",
            format!(
                "{} {}",
                m.quota_month.as_deref().map(cell).unwrap_or_default(),
                m.quota_day.as_deref().map(cell).unwrap_or_default()
            ),
        ),
        ("updated_at", d.time(m.updated_at)),
    ];
    let can_resend = d.actions
        && l.status == "failed"
        && l.sent_at.is_none()
        && m.msgid.is_none()
        && m.in_doubt_since.is_none()
        && !audit
            .iter()
            .any(|a| a.action == "resend" && a.entry.outbox_id == Some(id));
    let mut frame = d.frame(format!("Message #{id}"), "messages", actor);
    frame.live = !final_status;
    Ok(Some(MessagePage {
        frame,
        line: d.line(l),
        fields,
        data,
        timeline: timeline
            .into_iter()
            .map(|(at, what)| Moment {
                at: d.time(at),
                what,
            })
            .collect(),
        can_cancel: d.actions && matches!(l.status.as_str(), "pending" | "held"),
        can_resend,
        unreadable: m.unreadable.as_deref().map(|p| long(p, 300)),
    }))
}

#[derive(Template)]
#[template(path = "table_page.html")]
pub struct TablePage {
    pub frame: Frame,
    pub intro: String,
    pub sections: Vec<(String, Table)>,
}

pub async fn held(State(d): State<Arc<Dashboard>>, Extension(actor): Extension<Actor>) -> Response {
    let page = async {
        let rows = d.store.dashboard_table(DashboardTable::HeldGroups).await?;
        let table = d.table(&rows, |column, row, _| {
            (column == "row_count").then(|| {
                let text = |i: usize| row.get(i).and_then(|v| v.as_str()).unwrap_or_default();
                messages_link(&[
                    ("status", "held"),
                    ("account", text(0)),
                    ("template", text(2)),
                ])
            })
        });
        let mut frame = d.frame("Held rows", "held", &actor);
        frame.live = true;
        Ok(TablePage {
            frame,
            intro: "Held rows wait for room and move on by themselves when it appears: \
                    'template' for a place among the account's templates in use, 'monthly quota' \
                    for the template's next month (or a raised limit), 'daily quota' for the \
                    account's next day, 'consent' for the user to accept a subscription \
                    notification (failed after subscribe.consent_wait_secs)."
                .into(),
            sections: vec![("By reason, account and template".into(), table)],
        })
    };
    html(page.await)
}

pub async fn errors(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let page = async {
        let mut by_code = d
            .store
            .dashboard_table(DashboardTable::ErrorsByCode)
            .await?;
        // No rows, no columns: nothing to add to.
        if !by_code.columns.is_empty() {
            by_code.columns.insert(1, "meaning".into());
            for row in &mut by_code.rows {
                let meaning = errcode_meaning(row.first().and_then(|v| v.as_i64()));
                row.insert(1.min(row.len()), serde_json::Value::from(meaning));
            }
        }
        let codes = d.table(&by_code, |column, row, _| {
            (column == "row_count")
                .then(|| row.first().and_then(|v| v.as_i64()))
                .flatten()
                .map(|code| messages_link(&[("errcode", &code.to_string())]))
        });
        let reasons = d
            .store
            .dashboard_table(DashboardTable::ErrorReasons)
            .await?;
        // Not live: the last 7 days' errors are a whole-table read (0.3 s at 1M rows on SQLite,
        // docs/dashboard.md), and they change slowly.
        Ok(TablePage {
            frame: d.frame("Errors", "errors", &actor),
            intro: "Rows of the last 7 days that ended or wait with an error, by WeChat's errcode \
                    (none: the daemon's own reason)."
                .into(),
            sections: vec![
                ("By errcode".into(), codes),
                (
                    "Most frequent reasons".into(),
                    d.table(&reasons, |_, _, _| None),
                ),
            ],
        })
    };
    html(page.await)
}

pub struct TemplateView {
    pub account: String,
    pub template_id: String,
    pub title: String,
    pub parameters: String,
    pub in_use: bool,
    pub note: String,
    pub month: String,
    pub exhausted_on: String,
    pub link: String,
    pub actionable: bool,
    pub account_raw: String,
    pub template_raw: String,
}

#[derive(Template)]
#[template(path = "templates.html")]
pub struct TemplatesPage {
    pub frame: Frame,
    pub templates: Vec<TemplateView>,
    /// More templates are known than shown.
    pub cut: bool,
}

/// Templates the page lists at most (those in use first).
const TEMPLATES_SHOWN: usize = 1_000;

pub async fn templates(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let page = async {
        let quota = d
            .store
            .dashboard_table(DashboardTable::TemplateMonths)
            .await?;
        let mut month: HashMap<(String, String), (String, String)> = HashMap::new();
        for row in &quota.rows {
            let text = |i: usize| {
                row.get(i)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let number = |i: usize| row.get(i).and_then(|v| v.as_i64()).unwrap_or_default();
            month.insert(
                (text(0), text(1)),
                (format!("{} of {}", number(2), number(3)), text(4)),
            );
        }
        let mut known = d.store.shown_templates(TEMPLATES_SHOWN as i64 + 1).await?;
        let cut = known.len() > TEMPLATES_SHOWN;
        known.truncate(TEMPLATES_SHOWN);
        let templates = known
            .into_iter()
            .map(|t| {
                let (used, exhausted_on) = month
                    .get(&(t.account.clone(), t.template_id.clone()))
                    .cloned()
                    .unwrap_or_default();
                TemplateView {
                    link: messages_link(&[("account", &t.account), ("template", &t.template_id)]),
                    account: cell(&t.account),
                    template_id: cell(&t.template_id),
                    title: cell(t.title.as_deref().unwrap_or_default()),
                    parameters: t
                        .content
                        .as_deref()
                        .map(|c| cell(&crate::domain::template::parameters(c).join(", ")))
                        .unwrap_or_default(),
                    // A name read cut cannot be acted on.
                    in_use: t.in_use,
                    actionable: linkable(&t.account) && linkable(&t.template_id),
                    note: cell(t.note.as_deref().unwrap_or_default()),
                    month: used,
                    exhausted_on: cell(&exhausted_on),
                    account_raw: t.account,
                    template_raw: t.template_id,
                }
            })
            .collect();
        Ok(TemplatesPage {
            frame: d.frame("Templates", "templates", &actor),
            templates,
            cut,
        })
    };
    html(page.await)
}

pub struct AuditView {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub link: Option<String>,
    pub rows: i64,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
pub struct AuditPage {
    pub frame: Frame,
    pub entries: Vec<AuditView>,
}

pub async fn audit(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let page = async {
        let entries = d
            .store
            .recent_audit()
            .await?
            .into_iter()
            .map(|a| {
                let e = &a.entry;
                let target = [
                    e.account.as_deref().map(cell),
                    e.template_id.as_deref().map(cell),
                    e.outbox_id.map(|id| format!("#{id}")),
                    e.new_outbox_id.map(|id| format!("→ #{id}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
                AuditView {
                    at: d.time(a.at),
                    actor: cell(&e.actor),
                    action: cell(&a.action),
                    link: e
                        .new_outbox_id
                        .or(e.outbox_id)
                        .map(|id| format!("/messages/{id}")),
                    target,
                    rows: e.row_count,
                    detail: long(&e.detail, 300),
                }
            })
            .collect();
        Ok(AuditPage {
            frame: d.frame("Audit", "audit", &actor),
            entries,
        })
    };
    html(page.await)
}
