//! Hostile requests at the callback endpoint (issue 14): one observed signature replayed with
//! other bodies, compatible mode's plain fields forged beside the sealed part, GET used to
//! decrypt, NUL bytes, event times out of range, forged log lines. Slow clients and the
//! connection cap are in faults.rs.

use std::time::Duration;

use wechat_outbox::config::Config;
use wechat_outbox::simulator::{CallbackTarget, SimSettings};
use wechat_outbox::wechat::crypto::{MessageCrypto, signature};

use crate::helpers::{Backend, Daemon, Process, Sim, TestDb};
use crate::on_both_backends;

const TOKEN: &str = "hostile-callback-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const APPID: &str = "wxtest0000000001";

/// The test config with a callback token on the default account, in `mode` (with a key unless
/// plain).
fn config_toml(db: &TestDb, sim: &Sim, mode: &str) -> String {
    let mut account = format!(
        "secret = \"test-app-secret-value\"\ntoken = \"{TOKEN}\"\nmessage_mode = \"{mode}\"\n"
    );
    if mode != "plain" {
        account.push_str(&format!("encoding_aes_key = \"{AES_KEY}\"\n"));
    }
    db.config_toml(&sim.url(), "")
        .replace("secret = \"test-app-secret-value\"", &account)
}

async fn start(db: &TestDb, sim: &Sim, mode: &str) -> Daemon {
    let daemon = Daemon::start(Config::from_toml(&config_toml(db, sim, mode)).unwrap()).await;
    sim.sim.set_callback(Some(CallbackTarget {
        url: daemon.callback_url("default"),
        token: TOKEN.into(),
        encoding_aes_key: (mode == "safe").then(|| AES_KEY.to_string()),
    }));
    daemon
}

fn now() -> String {
    chrono::Utc::now().timestamp().to_string()
}

/// The query WeChat signs a push with: `signature` over token, timestamp and nonce, and for a
/// sealed body `encrypt_type=aes` with `msg_signature` over the ciphertext as well.
fn signed_query(timestamp: &str, nonce: &str, sealed: Option<&str>) -> String {
    let mut query = format!(
        "signature={}&timestamp={timestamp}&nonce={nonce}",
        signature(&[TOKEN, timestamp, nonce])
    );
    if let Some(sealed) = sealed {
        query.push_str(&format!(
            "&encrypt_type=aes&msg_signature={}",
            signature(&[TOKEN, timestamp, nonce, sealed])
        ));
    }
    query
}

fn seal(xml: &str) -> String {
    MessageCrypto::new(AES_KEY, APPID).unwrap().encrypt(xml)
}

/// A sealed push's body; compatible mode puts plain fields beside `<Encrypt>`.
fn envelope(plain_fields: &str, sealed: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_x]]></ToUserName>{plain_fields}<Encrypt><![CDATA[{sealed}]]></Encrypt></xml>"
    )
}

fn event_fields(openid: &str, create_time: &str, event: &str, msgid: i64) -> String {
    format!(
        "<FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event><MsgID>{msgid}</MsgID><Status><![CDATA[success]]></Status>"
    )
}

fn event_xml(openid: &str, create_time: &str, event: &str, msgid: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_x]]></ToUserName>{}</xml>",
        event_fields(openid, create_time, event, msgid)
    )
}

/// Posts `body` under `query`; returns the status and the answer.
async fn post(url: &str, query: &str, body: String) -> (u16, String) {
    let answer = reqwest::Client::new()
        .post(format!("{url}?{query}"))
        .body(body)
        .send()
        .await
        .expect("the endpoint answered");
    (answer.status().as_u16(), answer.text().await.unwrap())
}

async fn events(db: &TestDb, condition: &str) -> i64 {
    db.app.count_in("inbound_events", condition).await
}

/// Plain mode's signature covers no body: 200 forged `unsubscribe` pushes under one observed
/// signature store one event at most, and the users they name still get their messages. An
/// identical retry is answered `success` without a second copy.
async fn one_observed_signature_carries_one_body(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = start(&db, &sim, "plain").await;
    let url = daemon.callback_url("default");
    let timestamp = now();
    let query = signed_query(&timestamp, "808", None);
    let forged = |i: usize| event_xml(&format!("oForged{i:05}"), &timestamp, "unsubscribe", 0);

    let mut accepted = 0;
    for i in 0..200 {
        let (status, _) = post(&url, &query, forged(i)).await;
        match status {
            200 => accepted += 1,
            403 => {}
            other => panic!("forged push {i} answered {other}"),
        }
    }
    assert_eq!(accepted, 1, "one body per observed signature");
    assert_eq!(events(&db, "1 = 1").await, 1);
    assert_eq!(db.app.count_in("suppressed_openids", "1 = 1").await, 1);

    // WeChat retrying the push it signed: success, stored once.
    assert_eq!(
        post(&url, &query, forged(0)).await,
        (200, "success".to_string())
    );
    assert_eq!(events(&db, "1 = 1").await, 1);

    // A user named by a refused forgery is not suppressed.
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oForged00001', 'T', '{}')")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status = 'delivered'").await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            db.app.rows().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A timestamp near i64::MIN is outside the window, not an overflow.
    let ancient = i64::MIN.to_string();
    let (status, _) = post(&url, &signed_query(&ancient, "9", None), forged(7)).await;
    assert_eq!(status, 403);

    // Entries older than twice the window are deleted, a bounded batch with each push.
    let old: Vec<String> = (0..150)
        .map(|i| format!("('default', '1000000000', 'n{i}', 'x', '2001-01-01 00:00:00')"))
        .collect();
    db.app
        .exec(&format!(
            "INSERT INTO callback_replays (account, timestamp_param, nonce, body_sha1, received_at) VALUES {}",
            old.join(",")
        ))
        .await
        .unwrap();
    let fresh = event_xml("oFresh00001", &timestamp, "subscribe", 0);
    let (status, _) = post(&url, &signed_query(&timestamp, "809", None), fresh).await;
    assert_eq!(status, 200);
    let left = db
        .app
        .count_in("callback_replays", "timestamp_param = '1000000000'")
        .await;
    assert_eq!(left, 50, "100 old entries deleted with the push");
    // The forged push, the delivery event of the row, the fresh push.
    assert_eq!(events(&db, "1 = 1").await, 3, "nothing refused was stored");
    daemon.stop().await;
}
on_both_backends!(one_observed_signature_carries_one_body);

/// Compatible mode: plain fields beside `<Encrypt>` are never trusted; the sealed part is used
/// whenever it is there, and its `msg_signature` checked even when `encrypt_type` is dropped.
async fn compatible_mode_uses_the_sealed_part(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = start(&db, &sim, "compatible").await;
    let url = daemon.callback_url("default");
    let timestamp = now();
    let sealed = seal(&event_xml(
        "oSealed0001",
        &timestamp,
        "TEMPLATESENDJOBFINISH",
        5,
    ));
    let body = envelope(
        &event_fields("oVictim0001", &timestamp, "unsubscribe", 0),
        &sealed,
    );

    // A genuine push's URL with the sealed part's parameters dropped, forged plain fields.
    let (status, _) = post(&url, &signed_query(&timestamp, "1", None), body.clone()).await;
    assert_eq!(status, 403, "no msg_signature over the sealed part");
    assert_eq!(events(&db, "1 = 1").await, 0);

    let (status, _) = post(
        &url,
        &signed_query(&timestamp, "2", Some(&sealed)),
        body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    // encrypt_type dropped but msg_signature kept: <Encrypt> alone selects the sealed part.
    let query = signed_query(&timestamp, "3", Some(&sealed)).replace("&encrypt_type=aes", "");
    assert_eq!(post(&url, &query, body).await.0, 200);
    assert_eq!(events(&db, "from_user = 'oSealed0001'").await, 1);
    assert_eq!(events(&db, "from_user = 'oVictim0001'").await, 0);
    assert_eq!(db.app.count_in("suppressed_openids", "1 = 1").await, 0);
    daemon.stop().await;
}
on_both_backends!(compatible_mode_uses_the_sealed_part);

/// Safe mode: replaying a push's msg_signature, timestamp and nonce on GET with its
/// `<Encrypt>` as echostr gets a 4xx, never the plaintext; plain verification still works.
async fn get_never_decrypts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = start(&db, &sim, "safe").await;
    let url = daemon.callback_url("default");
    let timestamp = now();
    let sealed = seal(&event_xml("oSecret0001", &timestamp, "subscribe", 0));
    let query = signed_query(&timestamp, "55", Some(&sealed));
    assert_eq!(post(&url, &query, envelope("", &sealed)).await.0, 200);

    let echostr: String = url_encode(&sealed);
    let http = reqwest::Client::new();
    let replay = http
        .get(format!("{url}?{query}&echostr={echostr}"))
        .send()
        .await
        .unwrap();
    let status = replay.status().as_u16();
    let text = replay.text().await.unwrap();
    assert!((400..500).contains(&status), "answered {status}: {text}");
    assert!(
        !text.contains("oSecret0001") && !text.contains("<xml>"),
        "{text}"
    );

    // Without msg_signature the plain check echoes echostr as is: still no plaintext.
    let plain_only = signed_query(&timestamp, "55", None);
    let echoed = http
        .get(format!("{url}?{plain_only}&echostr={echostr}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!echoed.contains("oSecret0001"), "{echoed}");

    let verify = signed_query(&now(), "56", None);
    let answer = http
        .get(format!("{url}?{verify}&echostr=5927782489442352469"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.text().await.unwrap(), "5927782489442352469");
    daemon.stop().await;
}
on_both_backends!(get_never_decrypts);

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A signed push with NUL in its fields (PostgreSQL's text cannot hold NUL) is stored with
/// U+FFFD in their place and answered `success`, plain and sealed.
async fn a_nul_byte_is_stored_as_the_replacement_character(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = start(&db, &sim, "compatible").await;
    let url = daemon.callback_url("default");
    let timestamp = now();
    let xml = |openid: &str| {
        event_xml(openid, &timestamp, "TEMPLATESENDJOBFINISH", 77)
            .replace("success", "failed:\0user block")
    };

    let plain = xml("oNul\0Plain");
    assert_eq!(
        post(&url, &signed_query(&timestamp, "1", None), plain).await,
        (200, "success".to_string())
    );
    let sealed = seal(&xml("oNul\0Sealed"));
    assert_eq!(
        post(
            &url,
            &signed_query(&timestamp, "2", Some(&sealed)),
            envelope("", &sealed)
        )
        .await,
        (200, "success".to_string())
    );
    for who in ["Plain", "Sealed"] {
        let stored = format!(
            "from_user = 'oNul\u{FFFD}{who}' AND status = 'failed:\u{FFFD}user block'
             AND raw_xml LIKE '%oNul\u{FFFD}{who}%'"
        );
        assert_eq!(events(&db, &stored).await, 1, "{who}");
    }
    assert_eq!(events(&db, "1 = 1").await, 2);
    daemon.stop().await;
}
on_both_backends!(a_nul_byte_is_stored_as_the_replacement_character);

/// A validly signed event with `CreateTime` 9223372036854775807 is stored with the time it was
/// received (raw_xml keeps the original), once however often it comes, and joining goes on.
async fn an_event_time_out_of_range_is_stored_as_received(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = start(&db, &sim, "plain").await;
    let url = daemon.callback_url("default");
    let before = chrono::Utc::now().timestamp();
    let odd = event_xml(
        "oOddTime001",
        "9223372036854775807",
        "TEMPLATESENDJOBFINISH",
        31_337,
    );
    for nonce in ["1", "2"] {
        assert_eq!(
            post(&url, &signed_query(&now(), nonce, None), odd.clone()).await,
            (200, "success".to_string())
        );
    }
    let after = chrono::Utc::now().timestamp();
    let stored = format!(
        "create_time BETWEEN {before} AND {after} AND raw_xml LIKE '%<CreateTime>9223372036854775807</CreateTime>%'"
    );
    assert_eq!(events(&db, &stored).await, 1);
    assert_eq!(events(&db, "1 = 1").await, 1, "WeChat's retry stored once");

    db.app.insert_good(3, "after").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status = 'delivered'").await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows not joined: {:#?}",
            db.app.rows().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
}
on_both_backends!(an_event_time_out_of_range_is_stored_as_received);

/// `/wechat/x%0A…%1B[31m` must not write a forged line or raw ANSI codes into the text log, and
/// a long name is cut.
async fn request_text_never_reaches_the_log_raw(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Process::start(&config_toml(&db, &sim, "plain"), &["run"]);
    let base = format!("http://{}/wechat/", daemon.callback_addr().await);
    let forged =
        "x%0A2026-01-01T00:00:00.000000Z%20ERROR%20wechat_outbox:%20forged%20line%1B%5B31m";
    let long = "y".repeat(5000);
    let http = reqwest::Client::new();
    for name in [forged, &long] {
        let answer = http.get(format!("{base}{name}")).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let answer = http.post(format!("{base}{name}")).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 404);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while daemon.stderr().matches("callback refused").count() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = daemon.stderr();
    assert!(!log.contains('\u{1b}'), "raw ESC in the log:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00")),
        "a forged line:\n{log}"
    );
    assert!(log.contains("x\\n2026-01-01T00:00:00"), "{log}");
    assert!(!log.contains(&"y".repeat(65)), "the long name is cut");
}
on_both_backends!(request_text_never_reaches_the_log_raw);
