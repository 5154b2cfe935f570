//! The HTTP endpoint WeChat pushes to: `/wechat/{account}`.
//!
//! `GET` answers WeChat's server verification. `POST` checks the signature (in constant time)
//! and the timestamp window, opens the safe-mode envelope (current key, then the previous one
//! during a rotation), refuses DOCTYPEs and oversized bodies, and stores the push in
//! `inbound_events` **before** answering `success`. Anything refused gets a 4xx and is stored
//! nowhere; a database failure gets a 503 so that WeChat pushes again.

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
use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Account, MessageMode};
use crate::metrics::Metrics;
use crate::store::{InboundEvent, Store};
use crate::wechat::crypto::{MessageCrypto, signature_matches};
use crate::wechat::xml;

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
    window_secs: i64,
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
            window_secs: window_secs as i64,
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
    let response = next.run(request).await;
    if !response.status().is_success() {
        state
            .metrics
            .callback_refused(&account, response.status().as_u16());
    }
    response
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn spawn(
    listen: &str,
    state: Arc<CallbackState>,
    max_body_bytes: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    crate::http_server::spawn(
        "callback.listen",
        listen,
        router(state, max_body_bytes),
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
    tracing::info!(%account, status = status.as_u16(), reason, "callback refused");
    (status, reason)
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
        if (Utc::now().timestamp() - seconds).abs() > self.window_secs {
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
    let (timestamp, nonce) = state.fresh(&account, &p)?;
    let Some(echostr) = p.echostr.as_deref() else {
        return Err(refuse(&account, StatusCode::BAD_REQUEST, "echostr missing"));
    };
    let token = endpoint.token.expose_secret();
    // Safe-mode verification (as WeCom and wechatpy do it): echostr is sealed and signed.
    if let Some(msg_signature) = p.msg_signature.as_deref() {
        if !signature_matches(msg_signature, &[token, timestamp, nonce, echostr]) {
            return Err(refuse(
                &account,
                StatusCode::FORBIDDEN,
                "msg_signature does not match",
            ));
        }
        return endpoint
            .keys
            .iter()
            .find_map(|k| k.decrypt(echostr).ok())
            .ok_or_else(|| refuse(&account, StatusCode::FORBIDDEN, "echostr does not decrypt"));
    }
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
    let encrypted = p.encrypt_type.as_deref() == Some("aes");
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
    let event = inbound_event(&account, &fields, xml_text).ok_or_else(|| {
        refuse(
            &account,
            StatusCode::BAD_REQUEST,
            "push lacks FromUserName, CreateTime or MsgType",
        )
    })?;
    match state.store.record_inbound(&event, Utc::now()).await {
        Ok(new) => {
            if new {
                let kind = event.event.as_deref().or(event.msg_type.as_deref());
                state
                    .metrics
                    .event_received(&account, kind.unwrap_or("unknown"));
            }
            tracing::debug!(%account, new, event = ?event.event, msg_type = ?event.msg_type, "push stored");
            if event.event.as_deref() == Some("TEMPLATESENDJOBFINISH") {
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

/// The fields kept of a push, and the key that makes WeChat's retries of it one row:
/// MsgId for user messages; FromUserName + CreateTime (+ event and MsgID) for events, since
/// MsgId alone collides between events (WxJava #333).
pub fn inbound_event(account: &str, fields: &xml::Fields, raw_xml: String) -> Option<InboundEvent> {
    let from_user = fields.get("FromUserName")?.to_string();
    let create_time = fields.int("CreateTime")?;
    let msg_type = fields.get("MsgType")?.to_string();
    let event = fields.get("Event").map(str::to_string);
    let msgid = fields.int("MsgID").or_else(|| fields.int("MsgId"));
    let dedup_key = match (msg_type.as_str(), msgid) {
        ("event", _) => format!(
            "event:{from_user}:{create_time}:{}:{}",
            event.as_deref().unwrap_or(""),
            msgid.map(|m| m.to_string()).unwrap_or_default()
        ),
        (_, Some(msgid)) => format!("msg:{msgid}"),
        (_, None) => format!("msg:{from_user}:{create_time}"),
    };
    Some(InboundEvent {
        account: account.to_string(),
        dedup_key,
        msg_type: Some(msg_type),
        status: fields.get("Status").map(str::to_string),
        event,
        from_user: Some(from_user),
        to_user: fields.get("ToUserName").map(str::to_string),
        create_time: Some(create_time),
        msgid,
        raw_xml,
    })
}

/// Joins stored template events to their rows: at once when one arrives, and every second for
/// events that came before their send was recorded (the push can race the HTTP answer).
pub async fn join_loop(
    store: Store,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        match store.join_delivery_events(Utc::now()).await {
            Ok(0) => {}
            Ok(rows) => {
                metrics.events_joined(rows);
                tracing::debug!(rows, "delivery events joined");
            }
            Err(e) => tracing::warn!(error = %e, "cannot join delivery events yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
