//! Delivery events end to end: the simulator pushes TEMPLATESENDJOBFINISH to the daemon's
//! callback endpoint, which stores each push once and joins it to the sent row by msgid.
//! Refused requests leave nothing behind.

use std::time::Duration;

use serde_json::Value;
use wechat_outbox::simulator::{CallbackTarget, SimSettings};
use wechat_outbox::wechat::crypto::{MessageCrypto, signature};

use crate::helpers::{Backend, Daemon, Sim, TestDb};
use crate::on_both_backends;

const TOKEN: &str = "callback-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const APPID: &str = "wxtest0000000001";

fn account_keys(safe: bool) -> String {
    let mut extra = format!("token = \"{TOKEN}\"\n");
    if safe {
        extra.push_str(&format!("encoding_aes_key = \"{AES_KEY}\"\n"));
    }
    extra
}

/// The test config with the callback token (and key) on the default account.
fn config_toml(db: &TestDb, sim: &Sim, safe: bool, extra: &str) -> String {
    let toml = db.config_toml(&sim.url(), extra);
    toml.replace(
        "secret = \"test-app-secret-value\"",
        &format!("secret = \"test-app-secret-value\"\n{}", account_keys(safe)),
    )
}

pub(crate) async fn daemon_with_callback(
    db: &TestDb,
    sim: &Sim,
    safe: bool,
    extra: &str,
) -> Daemon {
    let config =
        wechat_outbox::config::Config::from_toml(&config_toml(db, sim, safe, extra)).unwrap();
    let daemon = Daemon::start(config).await;
    sim.sim.set_callback(Some(CallbackTarget {
        url: daemon.callback_url("default"),
        token: TOKEN.into(),
        encoding_aes_key: safe.then(|| AES_KEY.to_string()),
    }));
    daemon
}

pub(crate) async fn wait_joined(db: &TestDb, rows: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db
        .app
        .count("status IN ('delivered', 'blocked', 'undelivered')")
        .await
        < rows
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows not joined: {:#?}",
            db.app.rows().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn events_count(db: &TestDb, condition: &str) -> i64 {
    db.app.count_in("inbound_events", condition).await
}

async fn insert_mixed(db: &TestDb) {
    db.app.insert_good(6, "ok").await;
    db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('o_block_0001', 'T', '{}'), ('o_block_0002', 'T', '{}'), ('o_sysfail_01', 'T', '{}')").await.unwrap();
}

async fn assert_joined_as_the_simulator_decided(db: &TestDb) {
    wait_joined(db, 9).await;
    let statuses = |status: &str| format!("status = '{status}' AND delivered_at IS NOT NULL");
    assert_eq!(db.app.count(&statuses("delivered")).await, 6);
    assert_eq!(
        db.app
            .count(&(statuses("blocked") + " AND delivery_status = 'failed:user block'"))
            .await,
        2
    );
    assert_eq!(
        db.app
            .count(&(statuses("undelivered") + " AND delivery_status = 'failed: system failed'"))
            .await,
        1
    );
    assert_eq!(
        events_count(
            db,
            "event = 'TEMPLATESENDJOBFINISH' AND joined_at IS NOT NULL AND outbox_id IS NOT NULL"
        )
        .await,
        9
    );
    assert_eq!(events_count(db, "1 = 1").await, 9, "each push stored once");
}

/// Sends the mixed rows with the simulator pushing events back; returns its counters.
async fn joined_end_to_end(
    backend: Backend,
    safe: bool,
    settings: SimSettings,
) -> wechat_outbox::simulator::Stats {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(settings).await;
    let daemon = daemon_with_callback(&db, &sim, safe, "").await;
    insert_mixed(&db).await;
    assert_joined_as_the_simulator_decided(&db).await;
    daemon.stop().await;
    sim.sim.stats()
}

async fn plain_events_are_joined(backend: Backend) {
    joined_end_to_end(backend, false, SimSettings::default()).await;
}
on_both_backends!(plain_events_are_joined);

async fn safe_mode_events_are_joined(backend: Backend) {
    joined_end_to_end(backend, true, SimSettings::default()).await;
}
on_both_backends!(safe_mode_events_are_joined);

/// The push arrives before the daemon has recorded the send (it races the HTTP answer), and
/// WeChat pushes every event twice: all rows still join, each push is stored once.
async fn early_and_repeated_events_are_joined_once(backend: Backend) {
    let settings = SimSettings {
        events_before_answer: true,
        event_copies: 2,
        ..SimSettings::default()
    };
    let stats = joined_end_to_end(backend, true, settings).await;
    assert_eq!(
        stats.events_acknowledged, 18,
        "every copy was answered success: {stats:?}"
    );
}
on_both_backends!(early_and_repeated_events_are_joined_once);

/// A push signed and sealed the way WeChat does, for pushes the simulator does not make.
struct Pusher {
    url: String,
    safe: bool,
}

impl Pusher {
    fn query(&self, body_encrypt: Option<&str>, timestamp: i64) -> String {
        // A fresh nonce per push, as WeChat's: a (timestamp, nonce) pair carries one body.
        let (ts, nonce) = (timestamp.to_string(), fastrand::u64(..).to_string());
        let mut q = format!(
            "signature={}&timestamp={ts}&nonce={nonce}",
            signature(&[TOKEN, &ts, &nonce])
        );
        if let Some(sealed) = body_encrypt {
            q.push_str(&format!(
                "&encrypt_type=aes&msg_signature={}",
                signature(&[TOKEN, &ts, &nonce, sealed])
            ));
        }
        q
    }

    /// Posts `xml` properly signed (and sealed in safe mode); returns the status.
    async fn post(&self, xml: &str) -> u16 {
        let now = chrono::Utc::now().timestamp();
        if self.safe {
            let sealed = MessageCrypto::new(AES_KEY, APPID).unwrap().encrypt(xml);
            let body = format!(
                "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[{sealed}]]></Encrypt></xml>"
            );
            self.raw(&self.query(Some(&sealed), now), body).await
        } else {
            self.raw(&self.query(None, now), xml.to_string()).await
        }
    }

    async fn raw(&self, query: &str, body: String) -> u16 {
        self.try_raw(query, body)
            .await
            .expect("the endpoint answered")
    }

    /// `None` when the server closed the connection before taking the whole body, as it does
    /// with a body over the limit (it answers 413 without reading the rest).
    async fn try_raw(&self, query: &str, body: String) -> Option<u16> {
        let sent = reqwest::Client::new()
            .post(format!("{}?{query}", self.url))
            .body(body)
            .send()
            .await;
        match sent {
            Ok(answer) => Some(answer.status().as_u16()),
            Err(e) if e.is_request() => None,
            Err(e) => panic!("{e}"),
        }
    }
}

fn event_xml(openid: &str, create_time: i64, event: &str, msgid: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event><MsgID>{msgid}</MsgID><Status><![CDATA[success]]></Status></xml>"
    )
}

async fn unsubscribed_users_are_suppressed_and_unknown_msgids_kept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = daemon_with_callback(&db, &sim, false, "").await;
    let pusher = Pusher {
        url: daemon.callback_url("default"),
        safe: false,
    };

    assert_eq!(
        pusher
            .post(&event_xml("oLeaving001", 1_700_000_000, "unsubscribe", 0))
            .await,
        200
    );
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oLeaving001', 'T', '{}')")
        .await
        .unwrap();
    let rows = db.app.wait_settled(Duration::from_secs(10)).await;
    assert_eq!(rows[0].status, "failed");
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("unsubscribed"),
        "{rows:#?}"
    );
    assert_eq!(
        sim.sim.stats().send_requests,
        0,
        "no API call for a suppressed user"
    );

    assert_eq!(
        pusher
            .post(&event_xml("oLeaving001", 1_700_000_100, "subscribe", 0))
            .await,
        200
    );
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oLeaving001', 'T', '{}')")
        .await
        .unwrap();
    db.app.wait_settled(Duration::from_secs(10)).await;
    assert_eq!(sim.sim.stats().delivered, 1, "sent again after subscribe");

    // An event for a msgid this daemon never sent is kept, unjoined; the same push twice once.
    let stray = event_xml(
        "oStranger01",
        1_700_000_200,
        "TEMPLATESENDJOBFINISH",
        123_456_789,
    );
    assert_eq!(pusher.post(&stray).await, 200);
    assert_eq!(pusher.post(&stray).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await; // a join pass or more
    assert_eq!(
        events_count(&db, "msgid = 123456789 AND joined_at IS NULL").await,
        1
    );
    daemon.stop().await;
}
on_both_backends!(unsubscribed_users_are_suppressed_and_unknown_msgids_kept);

/// Everything that must be refused is refused with a 4xx and stores nothing, and the endpoint
/// keeps accepting valid pushes afterwards.
async fn bad_requests_are_refused_without_side_effects(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = daemon_with_callback(&db, &sim, true, "").await;
    let safe = Pusher {
        url: daemon.callback_url("default"),
        safe: true,
    };
    let now = chrono::Utc::now().timestamp();
    let xml = event_xml("oAttacker01", now, "TEMPLATESENDJOBFINISH", 1);
    let sealed = MessageCrypto::new(AES_KEY, APPID).unwrap().encrypt(&xml);
    let envelope = |sealed: &str| {
        format!(
            "<xml><ToUserName><![CDATA[gh]]></ToUserName><Encrypt><![CDATA[{sealed}]]></Encrypt></xml>"
        )
    };
    let other_appid = MessageCrypto::new(AES_KEY, "wxsomeoneelse0001")
        .unwrap()
        .encrypt(&xml);
    let truncated = &sealed[..sealed.len() - 24];
    let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">]><xml><Encrypt>&lol1;</Encrypt></xml>";

    let cases: Vec<(&str, String, String)> = vec![
        (
            "wrong msg_signature",
            safe.query(Some(&sealed), now)
                .replace("msg_signature=", "msg_signature=0"),
            envelope(&sealed),
        ),
        (
            "stale timestamp",
            safe.query(Some(&sealed), now - 3600),
            envelope(&sealed),
        ),
        (
            "another appid",
            safe.query(Some(&other_appid), now),
            envelope(&other_appid),
        ),
        (
            "truncated ciphertext",
            safe.query(Some(truncated), now),
            envelope(truncated),
        ),
        ("entity bomb", safe.query(Some("x"), now), bomb.to_string()),
        (
            "plain push to a safe account",
            safe.query(None, now),
            xml.clone(),
        ),
        (
            "not XML",
            safe.query(Some(&sealed), now),
            "{\"json\": true}".into(),
        ),
        (
            "10 MB body",
            safe.query(Some(&sealed), now),
            format!(
                "<xml><Encrypt>{}</Encrypt></xml>",
                "A".repeat(10 * 1024 * 1024)
            ),
        ),
    ];
    for (name, query, body) in cases {
        match safe.try_raw(&query, body).await {
            Some(status) => assert!((400..500).contains(&status), "{name}: answered {status}"),
            None => assert_eq!(name, "10 MB body", "{name}: connection dropped"),
        }
    }
    let unknown = Pusher {
        url: daemon.callback_url("nobody"),
        safe: true,
    };
    assert_eq!(unknown.post(&xml).await, 404);
    assert_eq!(
        events_count(&db, "1 = 1").await,
        0,
        "nothing refused was stored"
    );

    assert_eq!(safe.post(&xml).await, 200, "the endpoint is unharmed");
    assert_eq!(events_count(&db, "1 = 1").await, 1);
    daemon.stop().await;
}
on_both_backends!(bad_requests_are_refused_without_side_effects);

/// Server verification, and pushes sealed by wechatpy (an independent implementation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechatpy_pushes_and_server_verification_are_accepted() {
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/wechatpy_pushes.json")).unwrap();
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings::default()).await;
    // The fixture's timestamps are fixed, so this test widens the window.
    let toml = db
        .config_toml(&sim.url(), "[callback]\ntimestamp_window_secs = 4000000000")
        .replace("name = \"default\"", "name = \"wechatpy\"")
        .replace(
            "appid = \"wxtest0000000001\"",
            &format!("appid = \"{}\"", fixture["appid"].as_str().unwrap()),
        )
        .replace(
            "secret = \"test-app-secret-value\"",
            &format!(
                "secret = \"s\"\ntoken = \"{}\"\nencoding_aes_key = \"{}\"",
                fixture["token"].as_str().unwrap(),
                fixture["encoding_aes_key"].as_str().unwrap()
            ),
        );
    let daemon = Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap()).await;
    let url = daemon.callback_url("wechatpy");
    let http = reqwest::Client::new();

    for push in fixture["pushes"].as_array().unwrap() {
        let s = |k: &str| push[k].as_str().unwrap().to_string();
        let query = format!(
            "signature={}&timestamp={}&nonce={}&encrypt_type=aes&msg_signature={}",
            s("signature"),
            s("timestamp"),
            s("nonce"),
            s("msg_signature")
        );
        let body = format!(
            "<xml><ToUserName><![CDATA[gh_wechatpy]]></ToUserName><Encrypt><![CDATA[{}]]></Encrypt></xml>",
            s("encrypt")
        );
        let answer = http
            .post(format!("{url}?{query}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200);
        assert_eq!(answer.text().await.unwrap(), "success");
    }
    assert_eq!(events_count(&db, "account = 'wechatpy'").await, 3);
    assert_eq!(
        events_count(&db, "msgid = 3147483649 AND status = 'failed:user block'").await,
        1
    );
    assert_eq!(
        events_count(&db, "msg_type = 'text' AND raw_xml LIKE '%模板消息收到了%'").await,
        1
    );

    // GET verification, plain: echostr comes back when the signature matches.
    let (ts, nonce) = ("1700000000", "7");
    let sig = signature(&[fixture["token"].as_str().unwrap(), ts, nonce]);
    let answer = http
        .get(format!(
            "{url}?signature={sig}&timestamp={ts}&nonce={nonce}&echostr=hello123"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.text().await.unwrap(), "hello123");
    let refused = http
        .get(format!(
            "{url}?signature=0{sig}&timestamp={ts}&nonce={nonce}&echostr=hello123"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    daemon.stop().await;
}

/// The wechatpy vector of NOTES.md: a sealed echostr with msg_signature (WeCom's verification)
/// is refused, not opened: an Official Account verifies with the plain signature, and opening
/// on GET would decrypt any `<Encrypt>` for whoever replays a push's parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_echostr_is_not_opened() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings::default()).await;
    let toml = db
        .config_toml(&sim.url(), "[callback]\ntimestamp_window_secs = 4000000000")
        .replace("appid = \"wxtest0000000001\"", "appid = \"wx49f0ab532d5d035a\"")
        .replace("secret = \"test-app-secret-value\"", "secret = \"s\"\ntoken = \"123456\"\nencoding_aes_key = \"kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR\"");
    let daemon = Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap()).await;
    let echostr = "4ByGGj%2BsVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1%2BbXFXDQQb1o6co6Yh9Bv41n7hOchLF6p%2BQ%3D%3D";
    let url = format!(
        "{}?msg_signature=dd6b9c95b495b3f7e2901bfbc76c664930ffdb96&timestamp=1411443780&nonce=437374425&echostr={echostr}",
        daemon.callback_url("default")
    );
    let answer = reqwest::get(url).await.unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    assert!(!answer.text().await.unwrap().contains("5927782489442352469"));
    daemon.stop().await;
}

/// During a key rotation both keys open pushes; compatible mode takes plain and sealed pushes;
/// a third key, or a plain push with a wrong signature, is refused.
async fn rotated_keys_and_compatible_mode(backend: Backend) {
    const NEW_KEY: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123456";
    const THIRD_KEY: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let toml = db.config_toml(&sim.url(), "").replace(
        "secret = \"test-app-secret-value\"",
        &format!("secret = \"s\"\ntoken = \"{TOKEN}\"\nencoding_aes_key = \"{NEW_KEY}\"\nprevious_encoding_aes_key = \"{AES_KEY}\"\nmessage_mode = \"compatible\""),
    );
    let daemon = Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap()).await;
    let pusher = Pusher {
        url: daemon.callback_url("default"),
        safe: false,
    };
    let now = chrono::Utc::now().timestamp();
    let sealed_with = |key: &str, n: i64| {
        let sealed = MessageCrypto::new(key, APPID).unwrap().encrypt(&event_xml(
            "oRotate0001",
            now + n,
            "TEMPLATESENDJOBFINISH",
            n,
        ));
        (
            pusher.query(Some(&sealed), now),
            format!(
                "<xml><ToUserName><![CDATA[gh]]></ToUserName><Encrypt><![CDATA[{sealed}]]></Encrypt></xml>"
            ),
        )
    };
    let (q, body) = sealed_with(AES_KEY, 1);
    assert_eq!(
        pusher.raw(&q, body).await,
        200,
        "the previous key still opens"
    );
    let (q, body) = sealed_with(NEW_KEY, 2);
    assert_eq!(pusher.raw(&q, body).await, 200, "the new key opens");
    let (q, body) = sealed_with(THIRD_KEY, 3);
    assert_eq!(pusher.raw(&q, body).await, 403, "an unknown key does not");
    assert_eq!(
        pusher
            .post(&event_xml(
                "oRotate0001",
                now + 4,
                "TEMPLATESENDJOBFINISH",
                4
            ))
            .await,
        200,
        "compatible mode takes plain pushes"
    );
    let wrong = pusher.query(None, now).replace("signature=", "signature=f");
    assert_eq!(
        pusher
            .raw(
                &wrong,
                event_xml("oRotate0001", now + 5, "TEMPLATESENDJOBFINISH", 5)
            )
            .await,
        403
    );
    assert_eq!(events_count(&db, "1 = 1").await, 3);
    daemon.stop().await;
}
on_both_backends!(rotated_keys_and_compatible_mode);

/// The join pass runs every second: it must go from the unjoined events to their rows, not walk
/// the sent rows, even with statistics gathered before any row had a msgid (as after a backlog
/// was inserted and analysed).
async fn the_join_pass_starts_from_the_events(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app.insert_good(20_000, "join").await;
    db.app.analyze_outbox().await;
    db.app
        .exec("UPDATE outbox SET status = 'sent', msgid = id")
        .await
        .unwrap();
    let plan = db
        .store()
        .await
        .join_plan(chrono::Utc::now())
        .await
        .unwrap();
    let walks_outbox = plan.lines().any(|step| {
        let step = step.trim();
        step.starts_with("SCAN outbox")
            || step.contains("AUTOMATIC")
            || step.contains("Seq Scan on outbox")
    });
    assert!(!walks_outbox, "{plan}");
    // Each event looks its row up by (account, msgid).
    let probes = match backend {
        Backend::Sqlite => {
            plan.contains("SEARCH o USING INDEX outbox_msgid (account=? AND msgid=?)")
        }
        Backend::Postgres => {
            plan.contains("Index Cond: ((account = e.account) AND (msgid = e.msgid))")
        }
    };
    assert!(probes, "{plan}");
}
on_both_backends!(the_join_pass_starts_from_the_events);
