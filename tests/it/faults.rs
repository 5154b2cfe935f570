//! The fault suite: the real binary, a real database and the simulator, with things going
//! wrong; each scenario ends by checking the invariants (see `assert_invariants`).
//!
//! Short mode runs in `cargo test`. Long mode, for soak runs:
//! `FAULT_SUITE=long cargo test --release --test it faults:: -- --test-threads 1`.
//! Results are recorded in docs/reliability.md.

use std::time::Duration;

use sqlx::{Connection, SqliteConnection};
use wechat_outbox::simulator::{CallbackTarget, Faults, SimSettings};
use wechat_outbox::wechat::crypto::signature;

use crate::helpers::{AppDb, Backend, Process, Row, Sim, TestDb, assert_each_sent_once, slow_sim};
use crate::on_both_backends;

/// `short` in CI, `long` for soak runs.
fn scale(short: usize, long: usize) -> usize {
    if std::env::var("FAULT_SUITE").as_deref() == Ok("long") {
        long
    } else {
        short
    }
}

/// One line of figures per scenario, for docs/reliability.md (`-- --nocapture` shows them).
fn report(scenario: &str, backend: Backend, rows: &[Row], sim: &Sim, more: &str) {
    let stats = sim.sim.stats();
    let count = |s: &str| rows.iter().filter(|r| r.status == s).count();
    eprintln!(
        "fault-suite: {scenario} [{backend:?}] rows={} sent={} delivered={} failed={} unknown={} | requests={} reached_users={} twice={} deduplicated={} tokens={} faults={:?} {more}",
        rows.len(),
        count("sent"),
        count("delivered"),
        count("failed"),
        count("unknown"),
        stats.send_requests,
        stats.delivered,
        stats.duplicate_deliveries,
        stats.deduplicated,
        stats.tokens_issued,
        stats.faults,
    );
}

/// Every row ends in a terminal status with a reason; no user receives a message twice; quota
/// never exceeded; no row silently stuck.
async fn assert_invariants(db: &TestDb, sim: &Sim, settle: Duration) -> Vec<Row> {
    let rows = db.app.wait_settled(settle).await; // none pending or sending: nothing stuck
    for row in &rows {
        let terminal = [
            "sent",
            "failed",
            "expired",
            "cancelled",
            "unknown",
            "delivered",
            "blocked",
            "undelivered",
        ];
        assert!(
            terminal.contains(&row.status.as_str()),
            "row {} is {}",
            row.id,
            row.status
        );
        if !["sent", "delivered", "blocked", "undelivered"].contains(&row.status.as_str()) {
            assert!(
                row.last_error.as_deref().is_some_and(|e| !e.is_empty()),
                "row {} ended {} without a reason",
                row.id,
                row.status
            );
        }
    }
    assert_each_sent_once(&sim.sim, &rows);
    let over = db
        .app
        .count_in(
            "quota_usage",
            "(scope = 'account' AND used > 100000) OR (scope <> 'account' AND used > 10000)",
        )
        .await;
    assert_eq!(over, 0, "a quota was exceeded");
    rows
}

fn daemon_config(db: &TestDb, sim: &Sim, extra: &str) -> String {
    db.config_toml(
        &sim.url(),
        &format!("[workers]\nlease_secs = 2\nconcurrency = 16\n[api]\ntimeout_ms = 1000\n{extra}"),
    )
}

/// kill -9 at random moments under load, many times in a row, with restarts.
async fn kill_9_at_random_moments(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(5)).await;
    let config = daemon_config(&db, &sim, "");
    db.app.insert_good(scale(400, 5000), "kill").await;
    for _ in 0..scale(6, 60) {
        let mut daemon = Process::start(&config, &["run"]);
        daemon.wait_started().await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..700))).await;
        assert!(daemon.alive(), "{}", daemon.stderr());
        daemon.kill9();
    }
    let daemon = Process::start(&config, &["run"]);
    let rows = assert_invariants(&db, &sim, Duration::from_secs(90)).await;
    report(
        "kill -9 at random moments",
        backend,
        &rows,
        &sim,
        &format!("kills={}", scale(6, 60)),
    );
    drop(daemon);
    assert!(
        rows.iter().all(|r| r.status == "sent"),
        "every row is sent in the end"
    );
}
on_both_backends!(kill_9_at_random_moments);

/// Three daemons on one database, one killed and restarted repeatedly: no double sends.
async fn three_daemons_one_killed_repeatedly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(3)).await;
    let config = daemon_config(&db, &sim, "");
    let steady = [
        Process::start(&config, &["run"]),
        Process::start(&config, &["run"]),
    ];
    db.app.insert_good(scale(600, 8000), "trio").await;
    for _ in 0..scale(5, 50) {
        let mut victim = Process::start(&config, &["run"]);
        victim.wait_started().await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        victim.kill9();
    }
    let rows = assert_invariants(&db, &sim, Duration::from_secs(90)).await;
    let rescued: usize = steady
        .iter()
        .flat_map(|d| {
            d.stderr()
                .lines()
                .filter(|l| l.contains("rescued rows whose lease expired"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            l.split("rows=")
                .nth(1)
                .and_then(|n| n.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
        })
        .sum();
    report(
        "three daemons, one killed repeatedly",
        backend,
        &rows,
        &sim,
        &format!("kills={} leases_rescued={rescued}", scale(5, 50)),
    );
    drop(steady);
    assert!(rows.iter().all(|r| r.status == "sent"));
}
on_both_backends!(three_daemons_one_killed_repeatedly);

/// WeChat misbehaving every way at once, and every token invalidated once mid-run.
async fn wechat_misbehaving(backend: Backend) {
    let db = TestDb::new(backend).await;
    let faults = Faults {
        busy_rate: 0.3,
        http_error_rate: 0.05,
        hang_rate: 0.01,
        garbage_rate: 0.02,
        ..Faults::default()
    };
    let sim = Sim::start(SimSettings {
        faults,
        ..SimSettings::default()
    })
    .await;
    let config = daemon_config(
        &db,
        &sim,
        "[retry]\nmax_attempts = 60\nbase_delay_ms = 20\nmax_delay_secs = 1",
    );
    let mut daemon = Process::start(&config, &["run"]);
    let rows = scale(300, 5000);
    db.app.insert_good(rows / 2, "mis").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sim.sim.invalidate_tokens();
    db.app.insert_good(rows - rows / 2, "behave").await;
    let settled = assert_invariants(&db, &sim, Duration::from_secs(120)).await;
    report(
        "WeChat misbehaving, tokens invalidated once",
        backend,
        &settled,
        &sim,
        "",
    );
    assert!(daemon.alive());
    assert!(
        settled.iter().all(|r| r.status == "sent"),
        "{:?}",
        settled.iter().find(|r| r.status != "sent")
    );
    let stats = sim.sim.stats();
    assert!(
        stats.tokens_issued <= 3,
        "token refreshes stay few: {stats:?}"
    );
}
on_both_backends!(wechat_misbehaving);

/// Bad rows of every shape among good ones, under busy answers: each fails with a reason.
async fn bad_rows_among_good_ones(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            busy_rate: 0.2,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let mut daemon = Process::start(&daemon_config(&db, &sim, ""), &["run"]);
    let huge = "长".repeat(30_000);
    let bad = [
        "('oB1xxxxx', 'T', '{')".to_string(),
        "('oB2xxxxx', 'T', 'null')".into(),
        "('oB3xxxxx', 'T', '\"just a string\"')".into(),
        "('oB4xxxxx', 'T', '{\"a\":[1,2]}')".into(),
        "('oB5xxxxx', 'T', '{\"a\":{\"value\":null}}')".into(),
        "('oB6xxxxx', 'T', '{\"\":\"empty key\"}')".into(),
        format!("('oB7xxxxx', 'T', '{{\"a\":\"{huge}\"}}')"),
        format!("('{}', 'T', '{{}}')", "o".repeat(10_000)),
        format!("('oB8xxxxx', '{}', '{{}}')", "T".repeat(5_000)),
        "('o B9 xx', 'T', '{}')".into(),
        "(NULL, NULL, NULL)".into(),
    ];
    for (i, row) in bad.iter().enumerate() {
        db.app.insert_good(3, &format!("g{i}")).await;
        db.app
            .exec(&format!(
                "INSERT INTO outbox (touser, template_id, data) VALUES {row}"
            ))
            .await
            .unwrap();
    }
    if backend == Backend::Sqlite {
        db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oUtf8Bad', 'T', CAST(x'7b22613a22c3287d' AS TEXT))").await.unwrap();
    }
    let rows = assert_invariants(&db, &sim, Duration::from_secs(60)).await;
    report("bad rows among good ones", backend, &rows, &sim, "");
    assert!(daemon.alive());
    let failed = rows
        .iter()
        .filter(|r| r.status == "failed" && r.last_errcode.is_none())
        .count();
    assert_eq!(
        failed,
        bad.len() + usize::from(backend == Backend::Sqlite),
        "each bad row failed locally"
    );
    assert_eq!(
        rows.iter().filter(|r| r.status == "sent").count(),
        3 * bad.len()
    );
}
on_both_backends!(bad_rows_among_good_ones);

/// Postgres kills the daemon's connections again and again mid-run: it reconnects by itself,
/// carries on, and does not exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_mid_run() {
    let db = TestDb::new(Backend::Postgres).await;
    let sim = Sim::start(slow_sim(5)).await;
    let mut daemon = Process::start(&daemon_config(&db, &sim, ""), &["run"]);
    db.app.insert_good(scale(500, 5000), "kill").await;
    let AppDb::Postgres(pool) = &db.app else {
        unreachable!()
    };
    let mut killed = 0i64;
    for _ in 0..scale(10, 100) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'wechat-outbox'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        killed += n;
    }
    assert!(killed > 0, "connections were killed");
    let rows = assert_invariants(&db, &sim, Duration::from_secs(90)).await;
    report(
        "Postgres connections killed",
        Backend::Postgres,
        &rows,
        &sim,
        &format!("connections_killed={killed}"),
    );
    assert!(
        daemon.alive(),
        "the daemon kept running: {}",
        daemon.stderr()
    );
    assert!(rows.iter().all(|r| r.status == "sent"));
}

/// The database turns read-only for a while: the daemon says so clearly, loses nothing, resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_for_a_moment() {
    let db = TestDb::new(Backend::Postgres).await;
    let sim = Sim::start(slow_sim(5)).await;
    let mut daemon = Process::start(&daemon_config(&db, &sim, ""), &["run"]);
    db.app.insert_good(200, "before").await;
    // Mid-run: the daemon is up and sending.
    wait_or_show_log(&db, &daemon, "status = 'sent'", 1, Duration::from_secs(20)).await;
    let AppDb::Postgres(pool) = &db.app else {
        unreachable!()
    };
    let database = db.url.rsplit('/').next().unwrap().to_string();
    let set_read_only = |on: bool| {
        let sql = format!("ALTER DATABASE {database} SET default_transaction_read_only = {on}");
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .unwrap();
            // Sessions keep their setting: make the daemon reconnect under the new one.
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'wechat-outbox'",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    };
    // Apps' existing sessions keep writing, so rows still arrive meanwhile: this one is opened
    // before the switch (a pooled connection opened after it would be read-only).
    let mut session = pool.acquire().await.unwrap();
    set_read_only(true).await;
    let during: Vec<String> = (0..100)
        .map(|i| {
            format!(
                "('oduring{i:05}', 'TEMPLATE_ID', '{{\"first\":{{\"value\":\"during {i}\"}}}}')"
            )
        })
        .collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO outbox (touser, template_id, data) VALUES {}",
        during.join(",")
    )))
    .execute(&mut *session)
    .await
    .expect("an existing session still writes");
    drop(session);
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_read_only(false).await;
    let settled = "status NOT IN ('pending', 'sending')";
    wait_or_show_log(&db, &daemon, settled, 300, Duration::from_secs(60)).await;
    let rows = assert_invariants(&db, &sim, Duration::from_secs(5)).await;
    let read_only = daemon.stderr().matches("read-only transaction").count();
    report(
        "Postgres read-only for 3 s",
        Backend::Postgres,
        &rows,
        &sim,
        &format!("read_only_errors_logged={read_only}"),
    );
    assert!(daemon.alive());
    assert!(rows.iter().all(|r| r.status == "sent"));
    let log = daemon.stderr();
    assert!(
        log.contains("read-only transaction"),
        "the cause is reported: {log}"
    );
}

/// Waits until `condition` holds for at least `count` outbox rows, or fails showing the
/// daemon's log.
async fn wait_or_show_log(
    db: &TestDb,
    daemon: &Process,
    condition: &str,
    count: i64,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while db.app.count(condition).await < count {
        if tokio::time::Instant::now() > deadline {
            let log = daemon.stderr();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{condition}: not {count} rows; daemon log, last lines first:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Another process holds SQLite's write lock for seconds, longer than busy_timeout: the daemon
/// waits, reports, continues, and the other writer's rows are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_writer() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(slow_sim(5)).await;
    let mut daemon = Process::start(
        &daemon_config(&db, &sim, "[database]\nbusy_timeout_ms = 1000"),
        &["run"],
    );
    db.app.insert_good(300, "flow").await;
    let path = db.url.trim_start_matches("sqlite://").to_string();
    for round in 0..scale(2, 10) {
        let mut writer = SqliteConnection::connect(&format!("sqlite://{path}"))
            .await
            .unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut writer)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES ('oLocker{round:04}', 'T', '{{}}')"
        )))
        .execute(&mut writer)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        sqlx::raw_sql("COMMIT").execute(&mut writer).await.unwrap();
    }
    let rows = assert_invariants(&db, &sim, Duration::from_secs(60)).await;
    let busy = daemon.stderr().matches("database is locked").count();
    report(
        "SQLite locked 3 s by another writer",
        Backend::Sqlite,
        &rows,
        &sim,
        &format!("locks={} busy_errors_logged={busy}", scale(2, 10)),
    );
    assert!(daemon.alive());
    assert!(rows.iter().all(|r| r.status == "sent"));
    assert_eq!(
        rows.iter()
            .filter(|r| r
                .touser
                .as_deref()
                .is_some_and(|t| t.starts_with("oLocker")))
            .count(),
        scale(2, 10)
    );
}

/// A flood of invalid requests at the callback endpoint: the valid pushes still get through.
async fn callback_flood(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = daemon_config(&db, &sim, "").replace(
        "secret = \"test-app-secret-value\"",
        "secret = \"test-app-secret-value\"\ntoken = \"flood-token\"",
    );
    let mut daemon = Process::start(&config, &["run"]);
    let url = format!("http://{}/wechat/default", daemon.callback_addr().await);
    sim.sim.set_callback(Some(CallbackTarget {
        url: url.clone(),
        token: "flood-token".into(),
        encoding_aes_key: None,
    }));
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut refused = 0;
                for i in 0..scale(150, 3000) {
                    let now = chrono::Utc::now().timestamp().to_string();
                    let bogus = signature(&["wrong-token", &now, "1"]);
                    let answer = http
                        .post(format!("{url}?signature={bogus}&timestamp={now}&nonce=1"))
                        .body(format!("<xml><A>{i}</A></xml>"))
                        .send()
                        .await;
                    if answer.is_ok_and(|a| a.status().is_client_error()) {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let rows = scale(100, 2000);
    db.app.insert_good(rows, "flood").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while db.app.count("status = 'delivered'").await < rows as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery events did not get through the flood"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refused = 0;
    for task in flood {
        refused += task.await.unwrap();
    }
    assert_eq!(
        refused,
        8 * scale(150, 3000),
        "every invalid request was refused"
    );
    assert_eq!(
        sim.sim.stats().events_failed,
        0,
        "no valid push had to give up"
    );
    assert_eq!(
        db.app.count_in("inbound_events", "1 = 1").await,
        rows as i64,
        "nothing invalid stored"
    );
    let settled = assert_invariants(&db, &sim, Duration::from_secs(10)).await;
    report(
        "callback flood",
        backend,
        &settled,
        &sim,
        &format!("invalid_requests_refused={refused}"),
    );
    assert!(daemon.alive());
}
on_both_backends!(callback_flood);
