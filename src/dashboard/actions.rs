//! The actions (`[dashboard] actions = true`): each changes rows in one transaction with its
//! audit row, is logged with who did it, and answers with a redirect to what it changed.

use std::sync::Arc;

use askama::Template;
use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::Dashboard;
use super::access::Actor;
use super::pages::{FilterQuery, Frame, html};
use super::show::cell;
use crate::domain::text::loggable;
use crate::store::{AuditEntry, MessageFilter, Resend};

#[derive(Template)]
#[template(path = "confirm_cancel.html")]
pub struct ConfirmPage {
    pub frame: Frame,
    pub count: i64,
    pub up_to: i64,
    pub pairs: Vec<(&'static str, String)>,
    pub problems: Vec<String>,
    pub back: String,
}

#[derive(Template)]
#[template(path = "notice.html")]
pub struct NoticePage {
    pub frame: Frame,
    pub text: String,
    pub link: String,
}

fn notice(
    d: &Dashboard,
    actor: &Actor,
    status: StatusCode,
    text: String,
    link: String,
) -> Response {
    let page = NoticePage {
        frame: d.frame("Not done", "", actor),
        text,
        link,
    };
    (status, html(Ok(page))).into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    let reason = loggable(&e.to_string());
    tracing::warn!(error = %reason, "dashboard: action failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the action failed: {reason}\n"),
    )
        .into_response()
}

fn audit(actor: &Actor, action: &'static str) -> AuditEntry {
    AuditEntry {
        actor: actor.name.clone(),
        action,
        ..AuditEntry::default()
    }
}

/// GET `/cancel?filters`: how many waiting rows the filter matches now, and a form to cancel
/// exactly those (rows inserted later are not taken).
pub async fn confirm_cancel(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Query(query): Query<FilterQuery>,
) -> Response {
    let (filter, problems) = query.parse(d.timezone);
    let page = async {
        let up_to = d.store.newest_id().await?;
        let count = d.store.count_cancellable(&filter, up_to).await?;
        Ok(ConfirmPage {
            frame: d.frame("Cancel matching rows", "messages", &actor),
            count,
            up_to,
            pairs: query.pairs(),
            problems,
            back: query.link("/messages", None),
        })
    };
    html(page.await)
}

#[derive(Debug, Deserialize)]
pub struct MatchingForm {
    #[serde(flatten)]
    filter: FilterQuery,
    /// A string: serde's `flatten` hands every value on as text.
    up_to: String,
}

pub async fn cancel_matching(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<MatchingForm>,
) -> Response {
    let (filter, problems) = form.filter.parse(d.timezone);
    let Ok(up_to) = form.up_to.parse::<i64>() else {
        return notice(
            &d,
            &actor,
            StatusCode::BAD_REQUEST,
            "the form lacks its row bound".into(),
            "/messages".into(),
        );
    };
    if !problems.is_empty() {
        return notice(
            &d,
            &actor,
            StatusCode::BAD_REQUEST,
            problems.join("; "),
            form.filter.link("/messages", None),
        );
    }
    let described = describe(&filter);
    let reason = format!("cancelled from the dashboard by {}", actor.name);
    let mut entry = audit(&actor, "cancel_matching");
    entry.account = filter.account.clone();
    entry.template_id = filter.template_id.clone();
    entry.detail = format!("waiting rows up to #{up_to} where {described}");
    match d
        .store
        .cancel_rows(&filter, None, up_to, &reason, entry, chrono::Utc::now())
        .await
    {
        Ok(rows) => {
            tracing::info!(actor = %loggable(&actor.name), rows, filter = %loggable(&described), "dashboard: rows cancelled");
            Redirect::to("/audit").into_response()
        }
        Err(e) => failed(e),
    }
}

/// A filter in words, for the audit row.
fn describe(filter: &MessageFilter) -> String {
    let mut parts = Vec::new();
    for (name, value) in [
        ("status", &filter.status),
        ("account", &filter.account),
        ("template", &filter.template_id),
        ("openid", &filter.touser),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name} = {v}"));
        }
    }
    if let Some(code) = filter.errcode {
        parts.push(format!("errcode = {code}"));
    }
    if let Some(t) = filter.created_from {
        parts.push(format!("created from {}", t.to_rfc3339()));
    }
    if let Some(t) = filter.created_to {
        parts.push(format!("created before {}", t.to_rfc3339()));
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(", ")
    }
}

#[derive(Debug, Deserialize)]
pub struct RowForm {
    id: i64,
}

pub async fn cancel(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<RowForm>,
) -> Response {
    let reason = format!("cancelled from the dashboard by {}", actor.name);
    let mut entry = audit(&actor, "cancel");
    entry.outbox_id = Some(form.id);
    entry.detail = "one row".into();
    let link = format!("/messages/{}", form.id);
    match d
        .store
        .cancel_rows(
            &MessageFilter::default(),
            Some(form.id),
            i64::MAX,
            &reason,
            entry,
            chrono::Utc::now(),
        )
        .await
    {
        Ok(1) => {
            tracing::info!(actor = %loggable(&actor.name), id = form.id, "dashboard: row cancelled");
            Redirect::to(&link).into_response()
        }
        Ok(_) => notice(
            &d,
            &actor,
            StatusCode::CONFLICT,
            format!(
                "#{} is no longer waiting: it was claimed or finished first",
                form.id
            ),
            link,
        ),
        Err(e) => failed(e),
    }
}

pub async fn resend(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<RowForm>,
) -> Response {
    let mut entry = audit(&actor, "resend");
    entry.detail = "a failed row sent again as a new row with a new client_msg_id".into();
    let link = format!("/messages/{}", form.id);
    match d.store.resend_row(form.id, entry, chrono::Utc::now()).await {
        Ok(Resend::Created(new)) => {
            tracing::info!(actor = %loggable(&actor.name), id = form.id, new, "dashboard: row sent again");
            Redirect::to(&format!("/messages/{new}")).into_response()
        }
        Ok(Resend::AlreadyResent(new)) => notice(
            &d,
            &actor,
            StatusCode::CONFLICT,
            format!("#{} was sent again already, as #{new}", form.id),
            format!("/messages/{new}"),
        ),
        Ok(Resend::NotEligible) => notice(
            &d,
            &actor,
            StatusCode::CONFLICT,
            format!(
                "#{} cannot be sent again: only a failed row that WeChat never accepted, with no attempt in doubt, can",
                form.id
            ),
            link,
        ),
        Err(e) => failed(e),
    }
}

#[derive(Debug, Deserialize)]
pub struct AccountForm {
    account: String,
}

pub async fn resume(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<AccountForm>,
) -> Response {
    if !d.accounts.contains(&form.account) {
        return notice(
            &d,
            &actor,
            StatusCode::BAD_REQUEST,
            format!("no account {}", cell(&form.account)),
            "/".into(),
        );
    }
    let mut entry = audit(&actor, "resume_account");
    entry.account = Some(form.account.clone());
    entry.detail = "pause ended".into();
    match d
        .store
        .resume_account(&form.account, entry, chrono::Utc::now())
        .await
    {
        Ok(_) => {
            tracing::info!(actor = %loggable(&actor.name), account = %loggable(&form.account), "dashboard: account resumed");
            Redirect::to("/").into_response()
        }
        Err(e) => failed(e),
    }
}

#[derive(Debug, Deserialize)]
pub struct TemplateForm {
    account: String,
    template_id: String,
}

pub async fn template_out_of_use(
    State(d): State<Arc<Dashboard>>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<TemplateForm>,
) -> Response {
    if !d.accounts.contains(&form.account) || form.template_id.chars().count() > 200 {
        let what = format!(
            "no template {} of account {}",
            cell(&form.template_id),
            cell(&form.account)
        );
        return notice(
            &d,
            &actor,
            StatusCode::BAD_REQUEST,
            what,
            "/templates".into(),
        );
    }
    let now = chrono::Utc::now();
    let note = format!("taken out of use from the dashboard by {}", actor.name);
    let was = match d
        .store
        .retire_template(&form.account, &form.template_id, &note, now)
        .await
    {
        Ok(was) => was,
        Err(e) => return failed(e),
    };
    if !was {
        let what = format!("{} was not in use", cell(&form.template_id));
        return notice(&d, &actor, StatusCode::CONFLICT, what, "/templates".into());
    }
    let mut entry = audit(&actor, "template_out_of_use");
    entry.account = Some(form.account.clone());
    entry.template_id = Some(form.template_id.clone());
    entry.row_count = i64::from(was);
    entry.detail = if was {
        "taken out of use"
    } else {
        "was not in use"
    }
    .into();
    if let Err(e) = d.store.record_audit(entry, now).await {
        return failed(e);
    }
    tracing::info!(actor = %loggable(&actor.name), account = %loggable(&form.account), template = %loggable(&form.template_id), "dashboard: template taken out of use");
    Redirect::to("/templates").into_response()
}
