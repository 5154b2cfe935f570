//! The HTTP endpoint WeChat pushes to: `/wechat/{account}`.
//!
//! `GET` answers WeChat's server verification (the plain signature; nothing is decrypted on
//! GET). `POST` checks the signature (in constant time) and the timestamp window, opens the
//! safe-mode envelope (current key, then the previous one during a rotation), refuses DOCTYPEs
//! and oversized bodies, refuses a second body under a signed timestamp and nonce already
//! seen, and stores the push in `inbound_events` **before** answering `success`. Anything
//! refused gets a 4xx and is stored nowhere; a database failure gets a 503 so that WeChat
//! pushes again. Nothing from a request is logged raw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use chrono::{DateTime, TimeDelta, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha1::{Digest, Sha1};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Account, MessageMode};
use crate::domain::message::MAX_ID_CHARS;
#[cfg(test)]
use crate::domain::text::LOGGED_CHARS;
use crate::domain::text::echo;
use crate::domain::text::loggable;
use crate::http_server::{BodyDeadline, ConnectionLimits};
use crate::metrics::Metrics;
use crate::store::{ConsentChange, InboundEvent, Recorded, SignedPush, Store};
use crate::wechat::crypto::{MessageCrypto, signature_matches};
use crate::wechat::xml;

#[cfg(test)]
mod tests;

/// What one account needs to check its pushes.
struct Endpoint {
    token: SecretString,
    mode: MessageMode,
    /// The current key first, then the previous one during a rotation.
    keys: Vec<MessageCrypto>,
}

pub struct CallbackState {
    store: Store,
    endpoints: HashMap<String, Endpoint>,
    window_secs: u64,
    /// Woken after a template event is stored, so that it is joined at once.
    joined: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl CallbackState {
    pub fn new(
        store: Store,
        accounts: &[Account],
        window_secs: u64,
        joined: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> CallbackState {
        let endpoints = accounts
            .iter()
            .filter_map(|a| {
                let token = a.token.clone()?;
                let keys = [&a.encoding_aes_key, &a.previous_encoding_aes_key]
                    .into_iter()
                    .flatten()
                    .filter_map(|k| MessageCrypto::new(k.expose_secret(), &a.appid).ok())
                    .collect();
                Some((
                    a.name.clone(),
                    Endpoint {
                        token,
                        mode: a.message_mode,
                        keys,
                    },
                ))
            })
            .collect();
        CallbackState {
            store,
            endpoints,
            window_secs,
            joined,
            metrics,
        }
    }
}

pub fn router(state: Arc<CallbackState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/wechat/{account}", get(verify_server).post(receive))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_refusals,
        ))
        .with_state(state)
}

/// Counts every refused request, whichever layer refused it (a body too large never reaches
/// the handler).
async fn count_refusals(
    State(state): State<Arc<CallbackState>>,
    request: Request,
    next: Next,
) -> Response {
    let account = request
        .uri()
        .path()
        .strip_prefix("/wechat/")
        .filter(|name| state.endpoints.contains_key(*name))
        .unwrap_or("unknown")
        .to_string();
    let deadline = request.extensions().get::<BodyDeadline>().cloned();
    let response = next.run(request).await;
    if !response.status().is_success() {
        // A body cut off by the deadline reads as malformed here; the server answers 408.
        let status = if deadline.is_some_and(|d| d.hit()) {
            StatusCode::REQUEST_TIMEOUT
        } else {
            response.status()
        };
        state.metrics.callback_refused(&account, status.as_u16());
    }
    response
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn spawn(
    listen: &str,
    state: Arc<CallbackState>,
    max_body_bytes: usize,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    crate::http_server::spawn(
        "callback.listen",
        listen,
        router(state, max_body_bytes),
        limits,
        shutdown,
    )
    .await
}

#[derive(Deserialize)]
struct Params {
    signature: Option<String>,
    timestamp: Option<String>,
    nonce: Option<String>,
    echostr: Option<String>,
    encrypt_type: Option<String>,
    msg_signature: Option<String>,
}

/// A refusal: its status, and a reason for the log (never a secret; the body says less).
type Refusal = (StatusCode, &'static str);

fn refuse(account: &str, status: StatusCode, reason: &'static str) -> Refusal {
    let account = loggable(account);
    tracing::info!(%account, status = status.as_u16(), reason, "callback refused");
    (status, reason)
}

/// Whether a request's `timestamp` is within `window_secs` of `now`, for any two numbers:
/// `now - timestamp` would overflow for a timestamp near `i64::MIN`.
fn within_window(now: i64, timestamp: i64, window_secs: u64) -> bool {
    now.abs_diff(timestamp) <= window_secs
}

impl CallbackState {
    fn endpoint(&self, account: &str) -> Result<&Endpoint, Refusal> {
        self.endpoints.get(account).ok_or_else(|| {
            refuse(
                account,
                StatusCode::NOT_FOUND,
                "no callback for this account (unknown account or no token)",
            )
        })
    }

    /// The timestamp must parse and be within the window of our clock.
    fn fresh<'a>(&self, account: &str, p: &'a Params) -> Result<(&'a str, &'a str), Refusal> {
        let (Some(timestamp), Some(nonce)) = (p.timestamp.as_deref(), p.nonce.as_deref()) else {
            return Err(refuse(
                account,
                StatusCode::BAD_REQUEST,
                "timestamp or nonce missing",
            ));
        };
        let Ok(seconds) = timestamp.parse::<i64>() else {
            return Err(refuse(
                account,
                StatusCode::BAD_REQUEST,
                "timestamp is not a number",
            ));
        };
        if !within_window(Utc::now().timestamp(), seconds, self.window_secs) {
            return Err(refuse(
                account,
                StatusCode::FORBIDDEN,
                "timestamp outside the allowed window",
            ));
        }
        Ok((timestamp, nonce))
    }
}

async fn verify_server(
    State(state): State<Arc<CallbackState>>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
) -> Result<String, Refusal> {
    let endpoint = state.endpoint(&account)?;
    // An Official Account verifies its server with the plain signature in every message mode.
    // Opening a sealed echostr (WeCom's way) would decrypt any <Encrypt> seen in a push for
    // whoever replays that push's msg_signature, timestamp and nonce: nothing opens on GET.
    if p.msg_signature.is_some() || p.encrypt_type.is_some() {
        return Err(refuse(
            &account,
            StatusCode::BAD_REQUEST,
            "GET with msg_signature or encrypt_type: verification uses the plain signature",
        ));
    }
    let (timestamp, nonce) = state.fresh(&account, &p)?;
    let Some(echostr) = p.echostr.as_deref() else {
        return Err(refuse(&account, StatusCode::BAD_REQUEST, "echostr missing"));
    };
    let token = endpoint.token.expose_secret();
    match p.signature.as_deref() {
        Some(signature) if signature_matches(signature, &[token, timestamp, nonce]) => {
            Ok(echostr.to_string())
        }
        _ => Err(refuse(
            &account,
            StatusCode::FORBIDDEN,
            "signature does not match",
        )),
    }
}

async fn receive(
    State(state): State<Arc<CallbackState>>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
    body: Bytes,
) -> Result<&'static str, Refusal> {
    let endpoint = state.endpoint(&account)?;
    let (timestamp, nonce) = state.fresh(&account, &p)?;
    let token = endpoint.token.expose_secret();
    let Ok(body) = std::str::from_utf8(&body) else {
        return Err(refuse(
            &account,
            StatusCode::BAD_REQUEST,
            "body is not UTF-8",
        ));
    };
    let outer =
        xml::parse(body).map_err(|e| refuse(&account, StatusCode::BAD_REQUEST, xml_reason(&e)))?;
    // Compatible mode puts the plain fields beside <Encrypt>: whenever the sealed part is there
    // it is the one used and its msg_signature checked, else the plain signature (which covers
    // no body) would vouch for plain fields anyone could have changed.
    let encrypted = p.encrypt_type.as_deref() == Some("aes") || outer.get("Encrypt").is_some();
    let xml_text = if encrypted {
        if endpoint.keys.is_empty() {
            return Err(refuse(
                &account,
                StatusCode::BAD_REQUEST,
                "encrypted push but no encoding_aes_key",
            ));
        }
        let Some(sealed) = outer.get("Encrypt") else {
            return Err(refuse(
                &account,
                StatusCode::BAD_REQUEST,
                "encrypted push without <Encrypt>",
            ));
        };
        let signed = p
            .msg_signature
            .as_deref()
            .is_some_and(|s| signature_matches(s, &[token, timestamp, nonce, sealed]));
        if !signed {
            return Err(refuse(
                &account,
                StatusCode::FORBIDDEN,
                "msg_signature does not match",
            ));
        }
        endpoint
            .keys
            .iter()
            .find_map(|k| k.decrypt(sealed).ok())
            .ok_or_else(|| {
                refuse(
                    &account,
                    StatusCode::FORBIDDEN,
                    "ciphertext does not decrypt for this appid",
                )
            })?
    } else {
        if endpoint.mode == MessageMode::Safe {
            return Err(refuse(
                &account,
                StatusCode::FORBIDDEN,
                "plain push to a safe-mode account",
            ));
        }
        let signed = p
            .signature
            .as_deref()
            .is_some_and(|s| signature_matches(s, &[token, timestamp, nonce]));
        if !signed {
            return Err(refuse(
                &account,
                StatusCode::FORBIDDEN,
                "signature does not match",
            ));
        }
        body.to_string()
    };
    let fields = if encrypted {
        xml::parse(&xml_text)
            .map_err(|e| refuse(&account, StatusCode::BAD_REQUEST, xml_reason(&e)))?
    } else {
        outer
    };
    let now = Utc::now();
    let event = inbound_event(&account, &fields, xml_text, now.timestamp()).ok_or_else(|| {
        refuse(
            &account,
            StatusCode::BAD_REQUEST,
            "push lacks FromUserName, CreateTime or MsgType",
        )
    })?;
    let signed = SignedPush {
        timestamp: timestamp.to_string(),
        nonce: without_nul(nonce),
        body_sha1: Sha1::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        forget_before: forget_before(now, state.window_secs),
    };
    let items = subscription_items(event, &fields);
    let event = &items[0];
    match state.store.record_push_items(&items, &signed, now).await {
        Ok(Recorded::Replayed) => Err(refuse(
            &account,
            StatusCode::FORBIDDEN,
            "timestamp and nonce already used with another body (a replay)",
        )),
        Ok(recorded) => {
            let new = recorded == Recorded::New;
            if new {
                let kind = event.event.as_deref().or(event.msg_type.as_deref());
                state
                    .metrics
                    .event_received(&account, kind.unwrap_or("unknown"));
            }
            tracing::debug!(%account, new, event = ?event.event, msg_type = ?event.msg_type, "push stored");
            if matches!(
                event.event.as_deref(),
                Some("TEMPLATESENDJOBFINISH" | "subscribe_msg_sent_event")
            ) {
                state.joined.notify_one();
            }
            Ok("success")
        }
        Err(e) => {
            tracing::error!(%account, error = %e, "cannot store a push; WeChat will retry");
            Err((StatusCode::SERVICE_UNAVAILABLE, "storage unavailable"))
        }
    }
}

fn xml_reason(error: &xml::XmlError) -> &'static str {
    match error {
        xml::XmlError::Doctype | xml::XmlError::UnknownEntity(_) => {
            "XML with DOCTYPE or entities refused"
        }
        xml::XmlError::TooLarge => "XML too large or too deep",
        xml::XmlError::NotWeChatXml | xml::XmlError::Malformed(_) => "malformed XML",
    }
}

/// Signed pushes received before this are forgotten: a timestamp may be up to the window
/// ahead of our clock when it arrives, and is accepted until the window after it.
fn forget_before(now: DateTime<Utc>, window_secs: u64) -> DateTime<Utc> {
    let keep = i64::try_from(window_secs.saturating_mul(2)).unwrap_or(i64::MAX);
    TimeDelta::try_seconds(keep)
        .and_then(|keep| now.checked_sub_signed(keep))
        .map_or(DateTime::UNIX_EPOCH, |at| at.max(DateTime::UNIX_EPOCH))
}

/// `text` with each NUL replaced by U+FFFD: PostgreSQL's text cannot hold NUL, and a push
/// refused for it would be lost (WeChat gives up after three tries). Both backends store the
/// same.
fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Event times accepted as they are: from 2000-01-01 to a day past our clock. Anything else
/// (PostgreSQL's `to_timestamp` fails on 9223372036854775807) is stored as the time received;
/// `raw_xml` keeps what WeChat wrote.
const EARLIEST_CREATE_TIME: i64 = 946_684_800;
const LATEST_CREATE_TIME_AHEAD: i64 = 86_400;

/// The fields kept of a push, and the key that makes WeChat's retries of it one row:
/// MsgId for user messages; FromUserName + CreateTime (+ event and MsgID) for events, since
/// MsgId alone collides between events (WxJava #333). `received` is our clock (Unix seconds).
pub fn inbound_event(
    account: &str,
    fields: &xml::Fields,
    raw_xml: String,
    received: i64,
) -> Option<InboundEvent> {
    let text = |name: &str| fields.get(name).map(without_nul);
    let from_user = text("FromUserName")?;
    let create_time_text = fields.get("CreateTime")?.trim();
    let msg_type = text("MsgType")?;
    let event = text("Event");
    let msgid = fields.int("MsgID").or_else(|| fields.int("MsgId"));
    let sent_at = create_time_text.parse::<i64>().ok();
    // The key keeps the time WeChat wrote, so that its retries of an odd one still match.
    let create_key = match sent_at {
        Some(seconds) => seconds.to_string(),
        None => without_nul(create_time_text),
    };
    let latest = received.saturating_add(LATEST_CREATE_TIME_AHEAD);
    let create_time = sent_at
        .filter(|t| (EARLIEST_CREATE_TIME..=latest).contains(t))
        .unwrap_or(received);
    let dedup_key = match (msg_type.as_str(), msgid) {
        ("event", _) => format!(
            "event:{from_user}:{create_key}:{}:{}",
            event.as_deref().unwrap_or(""),
            msgid.map(|m| m.to_string()).unwrap_or_default()
        ),
        (_, Some(msgid)) => format!("msg:{msgid}"),
        (_, None) => format!("msg:{from_user}:{create_key}"),
    };
    Some(InboundEvent {
        account: without_nul(account),
        dedup_key,
        msg_type: Some(msg_type),
        status: text("Status"),
        event,
        from_user: Some(from_user),
        to_user: text("ToUserName"),
        create_time: Some(create_time),
        msgid,
        raw_xml: without_nul(&raw_xml),
        template_id: None,
        consent: None,
    })
}

/// A subscription event stored as one event per `<List>` item (a popup answers several
/// templates at once; a sent event may report several sends), each with its template, its
/// consent change or its delivery; any other push (or one without items) as it came.
pub fn subscription_items(event: InboundEvent, fields: &xml::Fields) -> Vec<InboundEvent> {
    let kind = event.event.clone().unwrap_or_default();
    let subscription = matches!(
        kind.as_str(),
        "subscribe_msg_popup_event" | "subscribe_msg_change_event" | "subscribe_msg_sent_event"
    );
    if !subscription || fields.list_items().is_empty() {
        return vec![event];
    }
    // Consent is written for an openid no longer than any WeChat issues.
    let openid_fits = event
        .from_user
        .as_deref()
        .is_some_and(|openid| openid.chars().count() <= MAX_ID_CHARS);
    let mut items: Vec<InboundEvent> = fields
        .list_items()
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let text = |name: &str| item.get(name).map(|v| without_nul(v.trim()));
            // A template id longer than any WeChat issues is kept in raw_xml only.
            let template_id =
                text("TemplateId").filter(|t| !t.is_empty() && t.chars().count() <= MAX_ID_CHARS);
            let said = text("SubscribeStatusString").unwrap_or_default();
            let consent = match (kind.as_str(), said.as_str()) {
                ("subscribe_msg_sent_event", _) => None,
                (_, "reject") => Some(ConsentChange::Withdrawn),
                ("subscribe_msg_popup_event", "accept") => Some(ConsentChange::Granted),
                ("subscribe_msg_change_event", "accept") => Some(ConsentChange::Resumed),
                _ => None,
            }
            .filter(|_| openid_fits);
            let (msgid, status) = if kind == "subscribe_msg_sent_event" {
                let msgid = text("MsgID").and_then(|m| m.parse::<i64>().ok());
                (msgid, Some(sent_status(&text)))
            } else {
                (None, (!said.is_empty()).then_some(said))
            };
            // The item's own MsgID and template in the key: several sends to one user within
            // a second are several events, while WeChat's retry of one push repeats them all.
            InboundEvent {
                dedup_key: format!(
                    "{}:{index}:{}:{}:{:?}",
                    event.dedup_key,
                    msgid.map(|m| m.to_string()).unwrap_or_default(),
                    template_id.as_deref().unwrap_or_default(),
                    consent
                ),
                msgid,
                status: status.map(|s| echo(&s).into_owned()),
                template_id,
                consent,
                // The push is kept once, on its first item: 256 items of a 64 KB body would
                // otherwise store 16 MB.
                raw_xml: if index == 0 {
                    event.raw_xml.clone()
                } else {
                    String::new()
                },
                ..event.clone()
            }
        })
        .collect();
    // Applied in one order (by template) whoever pushes: two pushes for one user then lock
    // the user's ledger entries in the same order (no deadlock on Postgres).
    items.sort_by(|a, b| a.template_id.cmp(&b.template_id));
    items
}

/// The delivery status of one `subscribe_msg_sent_event` item, in the words of the template
/// event that the join understands: `success` when ErrorCode is 0; else `failed:user block`
/// when the user refused (43101, or a status naming a block), or `failed:` with WeChat's
/// ErrorStatus and ErrorCode. The push itself stays in `raw_xml`.
fn sent_status(text: &dyn Fn(&str) -> Option<String>) -> String {
    let code = text("ErrorCode").and_then(|c| c.parse::<i64>().ok());
    let said = text("ErrorStatus").unwrap_or_default();
    match code {
        Some(0) => "success".into(),
        Some(43101) => format!("failed:user block ({said}, ErrorCode 43101)"),
        _ if said.to_lowercase().contains("block") => {
            format!("failed:user block ({said})")
        }
        Some(code) => format!("failed:{said} (ErrorCode {code})"),
        None => format!("failed:{said} (no ErrorCode)"),
    }
}
