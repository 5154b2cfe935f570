//! `/metrics`, `/healthz` and `/readyz`: the text parses as OpenMetrics (the format Prometheus
//! scrapes), its counters agree with the rows, and health follows the database.

use std::collections::BTreeMap;
use std::time::Duration;

use wechat_outbox::simulator::{CallbackTarget, Faults, SimSettings};

use crate::helpers::{Backend, Daemon, Sim, TestDb};
use crate::on_both_backends;

/// One sample: its name and labels.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the OpenMetrics text format strictly enough that a malformed exposition fails:
/// every sample belongs to a family declared by `# TYPE` with a suffix its type allows, label
/// values are quoted and escaped, values are numbers, histogram buckets only grow and end at
/// `+Inf` = `_count`, and the text ends with `# EOF`.
fn parse_openmetrics(text: &str) -> Vec<Sample> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "exposition must end with # EOF"
    );
    let mut family: Option<(String, String)> = None;
    let mut samples = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap(), parts.next().expect("metric name"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match keyword {
                "TYPE" => {
                    let kind = parts.next().expect("type");
                    assert!(
                        ["counter", "gauge", "histogram", "info", "unknown"].contains(&kind),
                        "unknown type in {line:?}"
                    );
                    family = Some((name.to_string(), kind.to_string()));
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (family_name, kind) = family
            .clone()
            .unwrap_or_else(|| panic!("{line:?} before # TYPE"));
        let sample = parse_sample(line);
        let suffix = sample
            .name
            .strip_prefix(&family_name)
            .unwrap_or_else(|| panic!("{line:?} outside its family {family_name}"));
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        assert!(
            allowed.contains(&suffix),
            "{line:?}: suffix not allowed for a {kind}"
        );
        samples.push(sample);
    }
    check_histograms(&samples);
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Sample {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => panic!("no value in {line:?}"),
    };
    assert!(valid_name(name), "bad sample name in {line:?}");
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            let key_start = chars.peek().expect("label").0;
            let mut key_end = key_start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = &inner[key_start..key_end];
            assert!(valid_name(key), "bad label name {key:?} in {line:?}");
            assert_eq!(
                chars.next().map(|c| c.1),
                Some('"'),
                "unquoted value in {line:?}"
            );
            let mut value = String::new();
            loop {
                match chars.next().expect("closing quote").1 {
                    '"' => break,
                    '\\' => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        c @ ('"' | '\\') => value.push(c),
                        c => panic!("bad escape \\{c} in {line:?}"),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key.to_string(), value);
            match chars.next().expect("',' or '}'") {
                (_, ',') => continue,
                (i, '}') => {
                    end = i;
                    break;
                }
                (_, c) => panic!("unexpected {c:?} in {line:?}"),
            }
        }
        rest = &inner[end + 1..];
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before the value in {line:?}"))
        .split(' ')
        .next()
        .unwrap();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

fn check_histograms(samples: &[Sample]) {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name.ends_with("_bucket")) {
        let mut series = s.labels.clone();
        let le = series.remove("le").expect("bucket without le");
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let key = format!("{}{:?}", s.name.trim_end_matches("_bucket"), series);
        buckets.entry(key).or_default().push((le, s.value));
    }
    for (series, bounds) in buckets {
        assert!(
            bounds
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "buckets of {series} must grow: {bounds:?}"
        );
        assert_eq!(
            bounds.last().unwrap().0,
            f64::INFINITY,
            "{series} lacks +Inf"
        );
        let count = samples
            .iter()
            .find(|s| {
                s.name.ends_with("_count")
                    && format!("{}{:?}", s.name.trim_end_matches("_count"), s.labels) == series
            })
            .unwrap_or_else(|| panic!("{series} lacks _count"));
        assert_eq!(bounds.last().unwrap().1, count.value, "+Inf bucket = count");
    }
}

/// The sum of the samples named `name` whose labels include `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn get(url: String) -> (u16, String) {
    let response = reqwest::get(url).await.expect("monitor answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn scrape(daemon: &Daemon) -> Vec<Sample> {
    let response = reqwest::get(format!("http://{}/metrics", daemon.monitor))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse_openmetrics(&response.text().await.unwrap())
}

const TOKEN: &str = "callback-token";

async fn metrics_match_the_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Half the sends answered "busy", at random: with 14 rows, no retry at all happens once in
    // 16,000 runs (at 0.3 it was once in 150, and CI met it).
    let sim = Sim::start(SimSettings {
        faults: Faults {
            busy_rate: 0.5,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let toml = db.config_toml(&sim.url(), "").replace(
        "secret = \"test-app-secret-value\"",
        &format!("secret = \"test-app-secret-value\"\ntoken = \"{TOKEN}\""),
    );
    let daemon = Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap()).await;
    sim.sim.set_callback(Some(CallbackTarget {
        url: daemon.callback_url("default"),
        token: TOKEN.into(),
        encoding_aes_key: None,
    }));
    assert_eq!(
        get(format!("http://{}/readyz", daemon.monitor)).await.0,
        200
    );

    db.app.insert_good(12, "m").await;
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data) VALUES
             ('o_block_0001', 'TEMPLATE_ID', '{\"first\":{\"value\":\"x\"}}'),
             ('oBroken', 'TEMPLATE_ID', '{not json')",
        )
        .await
        .unwrap();
    db.app.wait_settled(Duration::from_secs(30)).await;
    // 12 delivered and 1 blocked: every sent row gets its event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status IN ('delivered', 'blocked')").await < 13 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events not joined: {:#?} {:?}",
            db.app.rows().await,
            sim.sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two refused callback requests: one for a configured account, one for a made-up name.
    let post_xml = |url: String| async move {
        let response = reqwest::Client::new().post(url).body("<xml/>").send();
        response.await.unwrap().status().as_u16()
    };
    let refused_known = post_xml(daemon.callback_url("default")).await;
    let refused_unknown = post_xml(daemon.callback_url("nosuch")).await;

    let m = scrape(&daemon).await;
    let rows = db.app.rows().await;
    let named = |n: &str| format!("wechat_outbox_{n}");
    let count = |status: &str| rows.iter().filter(|r| r.status == status).count() as f64;

    // Counters: what this daemon did, against what the rows say.
    let sent_rows = rows.iter().filter(|r| r.has_sent_at == 1).count() as f64;
    assert_eq!(sent_rows, 13.0);
    assert_eq!(
        sum(&m, &named("outcomes_total"), &[("outcome", "sent")]),
        sent_rows
    );
    assert_eq!(
        sum(
            &m,
            &named("outcomes_total"),
            &[("outcome", "failed"), ("errcode", "none")]
        ),
        count("failed")
    );
    let claimed: i64 = rows
        .iter()
        .filter(|r| r.attempts > 0)
        .map(|r| r.attempts)
        .sum();
    let claimed_rows = rows.iter().filter(|r| r.attempts > 0).count() as i64;
    let retries = sum(&m, &named("retries_total"), &[("account", "default")]);
    assert!(retries > 0.0, "busy_rate 0.5 must cause retries");
    assert_eq!(
        retries,
        (claimed - claimed_rows) as f64,
        "one retry per extra attempt"
    );
    assert_eq!(
        sum(
            &m,
            &named("outcomes_total"),
            &[("outcome", "retry"), ("errcode", "-1")]
        ),
        retries
    );
    let stats = sim.sim.stats();
    assert_eq!(
        sum(&m, &named("send_request_seconds_count"), &[]),
        stats.send_requests as f64,
        "every send request got an answer and was timed"
    );
    assert_eq!(
        sum(&m, &named("token_refreshes_total"), &[("result", "ok")]),
        stats.tokens_issued as f64
    );
    let events = db
        .app
        .count_in("inbound_events", "event = 'TEMPLATESENDJOBFINISH'")
        .await;
    assert_eq!(events, 13);
    assert_eq!(
        sum(
            &m,
            &named("events_received_total"),
            &[("event", "TEMPLATESENDJOBFINISH")]
        ),
        events as f64
    );
    assert_eq!(sum(&m, &named("events_joined_total"), &[]), 13.0);
    let refused = |account: &str, status: u16| {
        sum(
            &m,
            &named("callback_refused_total"),
            &[("account", account), ("status", &status.to_string())],
        )
    };
    assert_eq!(refused("default", refused_known), 1.0);
    assert_eq!(refused("unconfigured", refused_unknown), 1.0);
    assert_eq!(sum(&m, &named("callback_refused_total"), &[]), 2.0);

    // Gauges read from the database at the scrape.
    for status in ["delivered", "blocked", "failed"] {
        assert_eq!(
            sum(&m, &named("rows"), &[("status", status)]),
            count(status),
            "{status}"
        );
    }
    assert_eq!(sum(&m, &named("rows"), &[]), rows.len() as f64);
    assert_eq!(sum(&m, &named("held_rows"), &[]), 0.0);
    assert_eq!(
        sum(&m, &named("quota_remaining"), &[("period", "day")]),
        100_000.0 - sent_rows
    );
    assert_eq!(
        sum(
            &m,
            &named("quota_remaining"),
            &[("period", "month"), ("template_id", "TEMPLATE_ID")]
        ),
        10_000.0 - sent_rows
    );
    assert_eq!(sum(&m, &named("database_up"), &[]), 1.0);

    assert_eq!(
        get(format!("http://{}/healthz", daemon.monitor)).await,
        (200, "ok\n".into())
    );
    daemon.stop().await;
}
on_both_backends!(metrics_match_the_rows);

async fn held_rows_show_their_reason(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[limits]\ndaily_per_account = 2")).await;
    db.app.insert_good(5, "h").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status = 'held'").await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "rows not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = scrape(&daemon).await;
    let held = [("account", "default"), ("reason", "daily quota")];
    assert_eq!(sum(&m, "wechat_outbox_held_rows", &held), 3.0);
    assert_eq!(sum(&m, "wechat_outbox_rows", &[("status", "held")]), 3.0);
    assert_eq!(
        sum(&m, "wechat_outbox_quota_remaining", &[("period", "day")]),
        0.0
    );
    daemon.stop().await;
}
on_both_backends!(held_rows_show_their_reason);

/// `/healthz` turns 503 with the reason when the database goes away, and `/readyz` stays
/// ready (the daemon keeps retrying; restarting it would not help). Postgres only: a SQLite
/// file cannot be taken away from an open connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_the_database() {
    let db = TestDb::new(Backend::Postgres).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let healthz = format!("http://{}/healthz", daemon.monitor);
    assert_eq!(get(healthz.clone()).await.0, 200);
    db.terminate_connections_and_refuse().await;
    let (status, body) = get(healthz.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database"), "{body}");
    db.allow_connections().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get(healthz.clone()).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthz did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(format!("http://{}/readyz", daemon.monitor)).await.0,
        200
    );
    daemon.stop().await;
}

/// Labels come from fixed sets: 300 signed pushes of made-up event types and rows of 200
/// unknown accounts (one of them named by 1 MB) leave `/metrics` small, with event labels from
/// the known types or `other`, and account labels `default` or `unconfigured`.
async fn metrics_labels_stay_in_fixed_sets(backend: Backend) {
    use wechat_outbox::wechat::crypto::signature;

    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let toml = db.config_toml(&sim.url(), "").replace(
        "secret = \"test-app-secret-value\"",
        &format!("secret = \"test-app-secret-value\"\ntoken = \"{TOKEN}\""),
    );
    let daemon = Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap()).await;

    let client = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp().to_string();
    for i in 0..300 {
        // A nonce and a sender of its own per push: each is a new push, not a replay or a retry.
        let nonce = format!("n{i}");
        let query = format!(
            "signature={}&timestamp={now}&nonce={nonce}",
            signature(&[TOKEN, &now, &nonce])
        );
        let xml = format!(
            "<xml><ToUserName>gh_x</ToUserName><FromUserName>oMade{i}</FromUserName><CreateTime>{now}</CreateTime><MsgType>event</MsgType><Event>MadeUp{i}</Event></xml>"
        );
        let status = client
            .post(format!("{}?{query}", daemon.callback_url("default")))
            .body(xml)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "push {i}");
    }
    let huge = "h".repeat(1 << 20);
    let mut values = vec![format!("('{huge}', 'oHuge', 'TEMPLATE_ID', '{{}}')")];
    values.extend((0..199).map(|i| format!("('nobody{i}', 'oNobody', 'TEMPLATE_ID', '{{}}')")));
    db.app
        .exec(&format!(
            "INSERT INTO outbox (account, touser, template_id, data) VALUES {}",
            values.join(",")
        ))
        .await
        .unwrap();
    db.app.insert_good(3, "ok").await;
    db.app.wait_settled(Duration::from_secs(30)).await;

    let response = reqwest::get(format!("http://{}/metrics", daemon.monitor))
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(text.len() < 32 * 1024, "/metrics is {} bytes", text.len());
    let m = parse_openmetrics(&text);
    let known_events = [
        "TEMPLATESENDJOBFINISH",
        "subscribe",
        "unsubscribe",
        "SCAN",
        "LOCATION",
        "CLICK",
        "VIEW",
        "text",
        "image",
        "voice",
        "video",
        "shortvideo",
        "location",
        "link",
        "other",
    ];
    for sample in &m {
        if let Some(account) = sample.labels.get("account") {
            assert!(
                account == "default" || account == "unconfigured",
                "{}: account label {:?}",
                sample.name,
                wechat_outbox::domain::text::echo(account)
            );
        }
        if let Some(event) = sample.labels.get("event") {
            assert!(
                known_events.contains(&event.as_str()),
                "event label {event:?}"
            );
        }
    }
    let named = |n: &str| format!("wechat_outbox_{n}");
    assert_eq!(
        sum(&m, &named("events_received_total"), &[("event", "other")]),
        300.0
    );
    assert_eq!(
        sum(
            &m,
            &named("outcomes_total"),
            &[("account", "unconfigured"), ("outcome", "failed")]
        ),
        200.0
    );
    assert_eq!(
        sum(
            &m,
            &named("rows"),
            &[("account", "unconfigured"), ("status", "failed")]
        ),
        200.0
    );
    assert_eq!(
        sum(
            &m,
            &named("outcomes_total"),
            &[("account", "default"), ("outcome", "sent")]
        ),
        3.0
    );
    daemon.stop().await;
}
on_both_backends!(metrics_labels_stay_in_fixed_sets);
