//! The real binary: kill -9 and restart, several daemons on one database, SIGTERM, config
//! errors, and secrets kept out of the logs.

use std::time::Duration;

use wechat_outbox::simulator::{Faults, SimSettings};

use crate::helpers::{Backend, Process, Sim, TestDb, assert_each_sent_once, slow_sim};
use crate::on_both_backends;

async fn kill_9_mid_run_then_restart_sends_each_row_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(20)).await;
    // Short leases so that the restarted daemon rescues the dead one's rows quickly.
    let config = db.config_toml(
        &sim.url(),
        "[workers]\nlease_secs = 2\nconcurrency = 16\n[api]\ntimeout_ms = 1000",
    );
    db.app.insert_good(300, "crash").await;
    for round in 0..3 {
        let mut daemon = Process::start(&config, &["run"]);
        // Let it get some rows in flight, then kill it without warning.
        let target = 60 * (round + 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while db.app.count("status = 'sent'").await < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress in round {round}: {}",
                daemon.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon.kill9();
        assert!(db.app.count("status = 'sending'").await >= 0);
    }
    let daemon = Process::start(&config, &["run"]);
    let rows = db.app.wait_settled(Duration::from_secs(60)).await;
    drop(daemon);
    assert!(
        rows.iter().all(|r| r.status == "sent"),
        "{:#?}",
        rows.iter()
            .filter(|r| r.status != "sent")
            .collect::<Vec<_>>()
    );
    assert_each_sent_once(&sim.sim, &rows);
}
on_both_backends!(kill_9_mid_run_then_restart_sends_each_row_once);

async fn two_daemons_never_send_a_row_twice(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(2)).await;
    // Few rows claimed ahead, so that the two daemons' claims interleave many times.
    let config = db.config_toml(
        &sim.url(),
        "[workers]\nconcurrency = 16\nclaim_ahead = 8\nbatch_size = 8",
    );
    let first = Process::start(&config, &["run"]);
    let second = Process::start(&config, &["run"]);
    first.wait_started().await;
    second.wait_started().await;
    db.app.insert_good(400, "pair").await;
    let rows = db.app.wait_settled(Duration::from_secs(60)).await;
    let logs = format!("{}{}", first.stderr(), second.stderr());
    drop((first, second));

    assert!(
        rows.iter().all(|r| r.status == "sent" && r.attempts == 1),
        "{rows:#?}"
    );
    let stats = sim.sim.stats();
    assert_eq!(
        stats.send_requests, 400,
        "each row was requested exactly once: {stats:?}"
    );
    assert_each_sent_once(&sim.sim, &rows);
    // Both took part (not required for correctness, but a claim that locks out the other
    // daemon would hide contention this test exists to exercise).
    let owners = logs.matches("wechat-outbox started").count();
    assert_eq!(owners, 2);
}
on_both_backends!(two_daemons_never_send_a_row_twice);

async fn sigterm_drains_in_flight_messages_and_exits_0(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(400)).await;
    let config = db.config_toml(&sim.url(), "[workers]\nconcurrency = 8\nbatch_size = 8");
    let mut daemon = Process::start(&config, &["run"]);
    db.app.insert_good(8, "term").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.app.count("status = 'sending'").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing claimed: {}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    let rows = db.app.rows().await;
    assert!(
        rows.iter().all(|r| r.status == "sent"),
        "in-flight messages finished: {rows:#?}"
    );
}
on_both_backends!(sigterm_drains_in_flight_messages_and_exits_0);

async fn past_the_grace_period_in_flight_rows_are_released(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            hang_rate: 1.0,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let config = db.config_toml(
        &sim.url(),
        "[workers]\nshutdown_grace_secs = 1\n[api]\ntimeout_ms = 4000",
    );
    let mut daemon = Process::start(&config, &["run"]);
    db.app.insert_good(4, "grace").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.sim.stats().send_requests < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in flight: {}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.signal("INT");
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    let rows = db.app.rows().await;
    for row in &rows {
        assert_eq!(row.status, "pending", "released for another run: {row:#?}");
        assert_eq!(row.attempts, 0);
        assert!(
            row.last_error
                .as_deref()
                .unwrap()
                .contains("may have reached WeChat"),
            "{row:#?}"
        );
    }
    assert_eq!(
        db.app.count("in_doubt = (1 = 1)").await,
        4,
        "marked in doubt: the request had left"
    );
}
on_both_backends!(past_the_grace_period_in_flight_rows_are_released);

#[tokio::test]
async fn a_bad_config_fails_at_start_naming_the_setting() {
    let cases = [
        (
            "database_url = 'sqlite:///tmp/x.db'\n[workers]\nconcurrency = 0\n[[accounts]]\nname='a'\nappid='wx'\nsecret='s'",
            "workers.concurrency",
        ),
        (
            "database_url = 'sqlite:///tmp/x.db'\n[[accounts]]\nname='a'\nappid='wx'",
            "accounts[0] (a).secret is missing",
        ),
        (
            "[[accounts]]\nname='a'\nappid='wx'\nsecret='s'",
            "database_url",
        ),
    ];
    for (config, named) in cases {
        for command in ["check-config", "run"] {
            let mut process = Process::start(config, &[command]);
            let status = process.wait_exit(Duration::from_secs(10)).await;
            assert_eq!(status.code(), Some(1));
            assert!(
                process.stderr().contains(named),
                "{command}: {named:?} not in {}",
                process.stderr()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_reach_the_logs() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            busy_rate: 0.3,
            http_error_rate: 0.2,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let mut daemon = Process::start(&db.config_toml(&sim.url(), ""), &["run"]);
    db.app.insert_good(20, "secret").await;
    sim.sim.invalidate_tokens();
    db.app.wait_settled(Duration::from_secs(30)).await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    let logs = daemon.stderr();
    assert!(
        logs.contains("access token refreshed"),
        "debug logs were captured"
    );
    assert!(
        !logs.contains("test-app-secret-value"),
        "the app secret leaked"
    );
    assert!(!logs.contains("access_token="), "a URL with a token leaked");
    assert!(!logs.contains("SIM"), "a token leaked");
}

#[tokio::test]
async fn the_environment_overrides_the_file() {
    let config = "database_url = 'sqlite:///tmp/never-opened.db'\n[[accounts]]\nname='a'\nappid='wx'\nsecret='s'";
    let mut bad = Process::start_with_env(
        config,
        &["check-config"],
        &[("WECHAT_OUTBOX_WORKERS__CONCURRENCY", "0")],
    );
    assert_eq!(bad.wait_exit(Duration::from_secs(10)).await.code(), Some(1));
    assert!(
        bad.stderr()
            .contains("workers.concurrency must be at least 1"),
        "{}",
        bad.stderr()
    );
    let mut typo = Process::start_with_env(
        config,
        &["check-config"],
        &[("WECHAT_OUTBOX_WORKERS__CONCURENCY", "3")],
    );
    assert_eq!(
        typo.wait_exit(Duration::from_secs(10)).await.code(),
        Some(1)
    );
    assert!(
        typo.stderr().contains("concurency"),
        "an unknown key is named: {}",
        typo.stderr()
    );
    let mut good = Process::start_with_env(
        config,
        &["check-config"],
        &[("WECHAT_OUTBOX_API__BASE_URL", "http://127.0.0.1:1")],
    );
    assert_eq!(
        good.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0),
        "{}",
        good.stderr()
    );
}

async fn migrate_applies_the_schema_once(backend: Backend) {
    let db = TestDb::new(backend).await; // already migrated by the library; the binary agrees
    for _ in 0..2 {
        let mut migrate = Process::start(&db.config_toml("http://127.0.0.1:9", ""), &["migrate"]);
        assert_eq!(
            migrate.wait_exit(Duration::from_secs(20)).await.code(),
            Some(0),
            "{}",
            migrate.stderr()
        );
    }
    db.app.insert_good(1, "migrated").await;
    assert_eq!(db.app.count("status = 'pending'").await, 1);
}
on_both_backends!(migrate_applies_the_schema_once);

/// The README's first command: the demo runs the whole path and every row ends as shown.
#[test]
fn the_demo_runs_end_to_end() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wechat-outbox"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "delivered",
        "blocked",
        "data is not valid JSON",
        "errcode 40003",
        "cancelled",
        "expired",
        "0 delivered twice",
        "errcode 43101",
        "the user refused this template (WeChat answered 43101 to an earlier row",
        "went out as WeChat shows it since 2023 (20 characters): 比利时手工黑巧克力礼盒（72%可可，十…",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from the demo:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("delivery event: success").count(),
        5,
        "{stdout}"
    );
    // The subscription notification, sent once its user accepted the popup.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("oDemoUser0010") && l.contains("delivered")),
        "{stdout}"
    );
}

/// Under systemd (`Type=notify`): READY=1 once started, WATCHDOG=1 while running, STOPPING=1
/// on SIGTERM, then a clean exit with the in-flight rows finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_alive_and_stopping() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(slow_sim(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket_env = socket_path.to_str().unwrap().to_string();
    let mut daemon = Process::start_with_env(
        &db.config_toml(&sim.url(), ""),
        &["run"],
        &[
            ("NOTIFY_SOCKET", socket_env.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let next = move |socket: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let messages = tokio::task::spawn_blocking(move || {
        let first = next(&socket);
        // The watchdog (1 s) is fed at least every half period.
        let beats: Vec<String> = (0..3).map(|_| next(&socket)).collect();
        (first, beats, socket)
    })
    .await
    .unwrap();
    assert_eq!(messages.0.trim(), "READY=1");
    assert!(
        messages.1.iter().all(|m| m.trim() == "WATCHDOG=1"),
        "{:?}",
        messages.1
    );

    db.app.insert_good(4, "notify").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.app.count("status = 'sending'").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.signal("TERM");
    let socket = messages.2;
    let stopping = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|_| next(&socket))
            .find(|m| m.trim() == "STOPPING=1")
    })
    .await
    .unwrap();
    assert!(stopping.is_some(), "STOPPING=1 was sent");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    assert_eq!(
        db.app.count("status = 'sent'").await,
        4,
        "in-flight rows finished"
    );
}

/// `--log-format json` writes one JSON object per line, each message's lines carrying its id;
/// under systemd's journal (`JOURNAL_STREAM`) text lines leave the timestamp to journald.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_with_a_flag_and_journald_friendly() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config_toml(&sim.url(), "");
    let mut json = Process::start(&config, &["--log-format", "json", "run"]);
    json.wait_started().await;
    db.app.insert_good(1, "json").await;
    db.app.wait_settled(Duration::from_secs(20)).await;
    json.signal("TERM");
    assert_eq!(
        json.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    let lines: Vec<serde_json::Value> = json
        .stderr()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "wechat-outbox started")
    );
    let sent = lines
        .iter()
        .find(|l| l["message"] == "sent")
        .expect("a 'sent' line");
    assert_eq!(
        sent["span"]["id"], 1,
        "the message's id rides on its lines: {sent}"
    );

    let mut journal = Process::start_with_env(
        &config,
        &["run"],
        &[("JOURNAL_STREAM", "8:12345"), ("RUST_LOG", "info")],
    );
    journal.wait_started().await;
    journal.signal("TERM");
    journal.wait_exit(Duration::from_secs(10)).await;
    let first = journal
        .stderr()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        first.starts_with(" INFO") || first.starts_with("INFO"),
        "no timestamp of our own under journald: {first:?}"
    );
}
