//! The simulator's delivery events: signed as WeChat signs them, sealed in safe mode, retried
//! when not acknowledged. The receiver here checks them with the project's crypto module.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use wechat_outbox::simulator::{CallbackTarget, SimSettings};
use wechat_outbox::wechat::crypto::{MessageCrypto, signature_matches};

use crate::helpers::Sim;

const TOKEN: &str = "push-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const APPID: &str = "wxpush000000001";

#[derive(Default)]
struct Received {
    /// msgid → Status, for pushes that verified.
    events: HashMap<i64, String>,
    /// Pushes seen per msgid, to prove retries happened.
    tries: HashMap<i64, u32>,
    refused: u32,
}

fn field(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    let value = &xml[start..end];
    Some(
        value
            .trim_start_matches("<![CDATA[")
            .trim_end_matches("]]>")
            .to_string(),
    )
}

async fn receive(
    State((received, safe)): State<(Arc<Mutex<Received>>, bool)>,
    Query(q): Query<HashMap<String, String>>,
    body: String,
) -> (StatusCode, &'static str) {
    let (ts, nonce) = (q["timestamp"].as_str(), q["nonce"].as_str());
    let mut log = received.lock().unwrap();
    if !signature_matches(&q["signature"], &[TOKEN, ts, nonce]) {
        log.refused += 1;
        return (StatusCode::FORBIDDEN, "bad signature");
    }
    let xml = if safe {
        let sealed = field(&body, "Encrypt").unwrap_or_default();
        let verified = q.get("encrypt_type").map(String::as_str) == Some("aes")
            && signature_matches(&q["msg_signature"], &[TOKEN, ts, nonce, &sealed]);
        match MessageCrypto::new(AES_KEY, APPID).unwrap().decrypt(&sealed) {
            Ok(xml) if verified => xml,
            _ => {
                log.refused += 1;
                return (StatusCode::FORBIDDEN, "bad envelope");
            }
        }
    } else {
        body
    };
    let msgid: i64 = field(&xml, "MsgID").unwrap().parse().unwrap();
    let tries = log.tries.entry(msgid).or_default();
    *tries += 1;
    if *tries == 1 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "not yet"); // make WeChat retry
    }
    assert_eq!(
        field(&xml, "Event").as_deref(),
        Some("TEMPLATESENDJOBFINISH")
    );
    log.events.insert(msgid, field(&xml, "Status").unwrap());
    (StatusCode::OK, "success")
}

async fn pushes_arrive(safe: bool) {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/wechat/default", post(receive))
        .with_state((received.clone(), safe));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback = format!("http://{}/wechat/default", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let target = CallbackTarget {
        url: callback,
        token: TOKEN.into(),
        encoding_aes_key: safe.then(|| AES_KEY.to_string()),
    };
    let sim = Sim::start(SimSettings {
        callback: Some(target),
        ..SimSettings::default()
    })
    .await;
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{}/cgi-bin/stable_token", sim.url()))
        .json(&json!({"grant_type": "client_credential", "appid": APPID, "secret": "s"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap();
    let mut expected = HashMap::new();
    for (openid, status) in [
        ("oPushOk001", "success"),
        ("o_block_002", "failed:user block"),
        ("o_sysfail_3", "failed: system failed"),
    ] {
        let reply: Value = http
            .post(format!("{}/cgi-bin/message/template/send?access_token={token}", sim.url()))
            .json(&json!({"touser": openid, "template_id": "TEMPLATE_ID", "data": {"first": {"value": "x"}}}))
            .send().await.unwrap().json().await.unwrap();
        assert_eq!(reply["errcode"], 0, "{reply}");
        expected.insert(reply["msgid"].as_i64().unwrap(), status.to_string());
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.sim.stats().events_acknowledged < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events not acknowledged: {:?}",
            sim.sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = received.lock().unwrap();
    assert_eq!(log.events, expected);
    assert_eq!(log.refused, 0);
    assert!(
        log.tries.values().all(|&n| n == 2),
        "each push retried once after a 500: {:?}",
        log.tries
    );
    let ids: HashSet<_> = log.events.keys().collect();
    assert_eq!(ids.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_pushes_are_signed_and_retried() {
    pushes_arrive(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_mode_pushes_are_encrypted_for_the_sending_appid() {
    pushes_arrive(true).await;
}
