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

/// Rows no daemon can read (`infinity`, year 270000, `in_doubt = 'yes'`: values a database
/// written before the guards, or by hand, may hold), each in the middle of a claim's batch,
/// while three daemons drain the table: each such row fails alone naming its column, every
/// other row is sent, and no daemon exits.
async fn poison_rows_with_three_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    crate::poison::drop_guards(&db).await;
    let poison: &[(&str, &str)] = match backend {
        Backend::Postgres => &[
            ("expires_at", "'infinity'"),
            ("expires_at", "'270000-01-01'"),
            ("in_doubt_since", "'-infinity'"),
        ],
        Backend::Sqlite => &[
            ("in_doubt", "'yes'"),
            ("in_doubt_since", "'soon'"),
            ("expires_at", "'270000-01-01'"),
        ],
    };
    let good = scale(300, 3000);
    for (i, (column, value)) in poison.iter().enumerate() {
        db.app
            .insert_good(good / poison.len(), &format!("p{i}"))
            .await;
        db.app
            .exec(&format!(
                "INSERT INTO outbox (touser, template_id, data, {column}) VALUES ('oPoison{i}', 'T', '{{}}', {value})"
            ))
            .await
            .unwrap();
    }
    let config = daemon_config(&db, &sim, "");
    let mut daemons: Vec<Process> = (0..3).map(|_| Process::start(&config, &["run"])).collect();
    let rows = assert_invariants(&db, &sim, Duration::from_secs(60)).await;
    report("poison rows, three daemons", backend, &rows, &sim, "");
    for daemon in &mut daemons {
        assert!(daemon.alive(), "{}", daemon.stderr());
    }
    for (i, (column, _)) in poison.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r.touser.as_deref() == Some(&format!("oPoison{i}")))
            .unwrap();
        assert_eq!(row.status, "failed");
        assert!(
            row.last_error.as_deref().unwrap().contains(column),
            "{row:#?}"
        );
    }
    assert_eq!(
        rows.iter().filter(|r| r.status == "sent").count(),
        good / poison.len() * poison.len()
    );
}
on_both_backends!(poison_rows_with_three_daemons);

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

/// The address a line of the daemon's start-up log names after `addr=`.
async fn logged_addr(daemon: &Process, line: &str) -> std::net::SocketAddr {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = daemon.stderr();
        if let Some(addr) = log
            .lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
        {
            return addr.parse().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line:?} in: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain push signed with `token`, on a connection of its own; its status, or 0 when it got
/// no answer.
async fn signed_push(url: &str, token: &str, nonce: usize, xml: String) -> u16 {
    let now = chrono::Utc::now().timestamp().to_string();
    let nonce = nonce.to_string();
    let sig = signature(&[token, &now, &nonce]);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    match http
        .post(format!(
            "{url}?signature={sig}&timestamp={now}&nonce={nonce}"
        ))
        .body(xml)
        .send()
        .await
    {
        Ok(answer) => answer.status().as_u16(),
        Err(_) => 0,
    }
}

fn subscribe_xml(openid: &str) -> String {
    format!(
        "<xml><ToUserName>gh</ToUserName><FromUserName>{openid}</FromUserName><CreateTime>{}</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>",
        chrono::Utc::now().timestamp()
    )
}

/// What one slow client saw: how long each of its connections lived until the server closed
/// it, and how many it had to give up on because the server never did.
#[derive(Default)]
struct Trickled {
    closed_after: Vec<Duration>,
    never_closed: usize,
}

/// Opens connections to `addr` one after another until `stop_at`, each sending `request_line`
/// and then one header line every 300 ms, never finishing its head.
async fn trickle(
    addr: std::net::SocketAddr,
    request_line: &'static str,
    stop_at: tokio::time::Instant,
    give_up_after: Duration,
) -> Trickled {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Trickled::default();
    while tokio::time::Instant::now() < stop_at {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let opened = tokio::time::Instant::now();
        let head = format!("{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        let mut open = stream.write_all(head.as_bytes()).await.is_ok();
        let mut buf = [0u8; 256];
        while open {
            tokio::select! {
                // End of stream, a reset, or an answer: the server is done with it.
                _ = stream.read(&mut buf) => {
                    seen.closed_after.push(opened.elapsed());
                    open = false;
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if opened.elapsed() > give_up_after {
                        seen.never_closed += 1;
                        open = false;
                    } else if stream.write_all(b"X-Slow: a\r\n").await.is_err() {
                        seen.closed_after.push(opened.elapsed());
                        open = false;
                    }
                }
                // The test ends: it closes its connections itself.
                _ = tokio::time::sleep_until(stop_at) => open = false,
            }
        }
    }
    seen
}

/// A bounded slow-client flood (hundreds of connections trickling their request heads at the
/// callback and the monitor listeners, reconnecting when cut off) while WeChat's pushes, the
/// app's rows and `/healthz` go on: every push and `/healthz` answers within 2 s, and every slow
/// connection is cut at the header timeout.
async fn slow_client_flood(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let header_timeout = Duration::from_secs(2);
    let config = daemon_config(
        &db,
        &sim,
        &format!(
            "[callback]\nheader_timeout_secs = {}",
            header_timeout.as_secs()
        ),
    )
    .replace(
        "secret = \"test-app-secret-value\"",
        "secret = \"test-app-secret-value\"\ntoken = \"flood-token\"",
    );
    let mut daemon = Process::start(&config, &["run"]);
    let callback = logged_addr(&daemon, "callback endpoint listening").await;
    let monitor = logged_addr(&daemon, "monitor endpoint listening").await;
    let url = format!("http://{callback}/wechat/default");
    sim.sim.set_callback(Some(CallbackTarget {
        url: url.clone(),
        token: "flood-token".into(),
        encoding_aes_key: None,
    }));
    let started = tokio::time::Instant::now();
    let stop_at = started + Duration::from_secs(scale(6, 60) as u64);
    let give_up_after = header_timeout + Duration::from_millis(1500);
    let (to_callback, to_monitor) = (scale(300, 900), 60);
    let mut flood = Vec::new();
    for _ in 0..to_callback {
        flood.push(tokio::spawn(trickle(
            callback,
            "POST /wechat/default",
            stop_at,
            give_up_after,
        )));
    }
    for _ in 0..to_monitor {
        flood.push(tokio::spawn(trickle(
            monitor,
            "GET /healthz",
            stop_at,
            give_up_after,
        )));
    }
    let rows = scale(100, 1000);
    db.app.insert_good(rows, "slow").await;

    let (mut pushes, mut push_worst, mut health_worst) = (0, Duration::ZERO, Duration::ZERO);
    let health = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    while tokio::time::Instant::now() < stop_at {
        pushes += 1;
        let asked = tokio::time::Instant::now();
        let status = signed_push(
            &url,
            "flood-token",
            pushes,
            subscribe_xml(&format!("oLegit{pushes:05}")),
        )
        .await;
        push_worst = push_worst.max(asked.elapsed());
        assert_eq!(status, 200, "push {pushes} during the flood");
        let asked = tokio::time::Instant::now();
        let answer = health
            .get(format!("http://{monitor}/healthz"))
            .send()
            .await
            .map(|a| a.status().as_u16());
        health_worst = health_worst.max(asked.elapsed());
        assert_eq!(answer.ok(), Some(200), "/healthz during the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = Trickled::default();
    for task in flood {
        let one = task.await.unwrap();
        seen.closed_after.extend(one.closed_after);
        seen.never_closed += one.never_closed;
    }
    let cut_latest = seen.closed_after.iter().max().copied().unwrap_or_default();
    let flood_took = started.elapsed();
    let settled = assert_invariants(&db, &sim, Duration::from_secs(30)).await;
    report(
        "slow-client flood",
        backend,
        &settled,
        &sim,
        &format!(
            "slow_clients={} connections_cut={} never_cut={} cut_latest={cut_latest:?} pushes={pushes} push_worst={push_worst:?} healthz_worst={health_worst:?} flood={flood_took:?}",
            to_callback + to_monitor,
            seen.closed_after.len(),
            seen.never_closed
        ),
    );
    assert_eq!(
        seen.never_closed, 0,
        "a slow client outlived the header timeout"
    );
    assert!(
        seen.closed_after.len() >= to_callback + to_monitor,
        "every slow client was cut at least once: {}",
        seen.closed_after.len()
    );
    assert!(push_worst < Duration::from_secs(2), "{push_worst:?}");
    assert!(health_worst < Duration::from_secs(2), "{health_worst:?}");
    let delivered = settled.iter().filter(|r| r.status == "delivered").count();
    assert_eq!(delivered, rows, "every delivery event got through");
    assert_eq!(sim.sim.stats().events_failed, 0, "no push had to give up");
    assert_eq!(
        db.app
            .count_in("inbound_events", "event = 'subscribe'")
            .await,
        pushes as i64
    );
    assert!(daemon.alive(), "{}", daemon.stderr());
}
on_both_backends!(slow_client_flood);

/// Reads one HTTP/1.1 answer (head and a Content-Length body) within `limit`.
async fn read_answer(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|n| n.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no whole answer within {limit:?}: {other:?} after {text:?}"),
        }
    }
}

/// Whether the server closes `stream` within `limit` (end of stream or a reset).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // an answer before the close
        }
    }
}

/// With a small cap: a connection over it is closed at once (on both listeners), slow clients
/// are cut at the header timeout and the endpoint recovers, a body that stops coming gets 408,
/// and a kept-alive connection lives for the idle timeout, not the header timeout.
async fn the_cap_fails_fast_and_timeouts_cut_slow_clients(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let toml = db
        .config_toml(
            &sim.url(),
            "[callback]\nmax_connections = 4\nheader_timeout_secs = 1\nbody_timeout_secs = 1\nidle_timeout_secs = 3\n[monitor]\nmax_connections = 2",
        )
        .replace(
            "secret = \"test-app-secret-value\"",
            "secret = \"test-app-secret-value\"\ntoken = \"cap-token\"",
        );
    let daemon =
        crate::helpers::Daemon::start(wechat_outbox::config::Config::from_toml(&toml).unwrap())
            .await;
    let url = daemon.callback_url("default");
    let connect = |addr| async move { tokio::net::TcpStream::connect(addr).await.unwrap() };

    // Four silent clients fill the callback's cap, two the monitor's.
    let opened = tokio::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect(daemon.callback).await);
    }
    let mut monitor_silent = [connect(daemon.monitor).await, connect(daemon.monitor).await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    for addr in [daemon.callback, daemon.monitor] {
        let mut over = connect(addr).await;
        let asked = tokio::time::Instant::now();
        assert!(
            closed_within(&mut over, Duration::from_millis(500)).await,
            "a connection over the cap of {addr} was not closed at once"
        );
        assert!(asked.elapsed() < Duration::from_millis(500));
    }
    // The header timeout (1 s) cuts them all, not sooner.
    for stream in silent.iter_mut().chain(monitor_silent.iter_mut()) {
        assert!(closed_within(stream, Duration::from_millis(2500)).await);
    }
    let cut_after = opened.elapsed();
    assert!(
        cut_after >= Duration::from_millis(950) && cut_after < Duration::from_millis(3000),
        "{cut_after:?}"
    );
    // Recovered: room again.
    assert_eq!(
        signed_push(&url, "cap-token", 1, subscribe_xml("oAfterCut01")).await,
        200
    );
    let healthz = reqwest::get(format!("http://{}/healthz", daemon.monitor))
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200);

    // A body that stops half-way: 408 at the body timeout, then the connection is closed.
    use tokio::io::AsyncWriteExt;
    let mut stalled = connect(daemon.callback).await;
    stalled
        .write_all(b"POST /wechat/default?timestamp=1&nonce=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n<xml>")
        .await
        .unwrap();
    let asked = tokio::time::Instant::now();
    let answer = read_answer(&mut stalled, Duration::from_millis(2500)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        asked.elapsed() >= Duration::from_millis(950),
        "{:?}",
        asked.elapsed()
    );
    assert!(closed_within(&mut stalled, Duration::from_millis(500)).await);

    // Kept alive after an answer: still open past the header timeout, closed at the idle one.
    let mut kept = connect(daemon.callback).await;
    kept.write_all(b"GET /wechat/default HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut kept, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let answered = tokio::time::Instant::now();
    assert!(
        !closed_within(&mut kept, Duration::from_millis(1800)).await,
        "closed at the header timeout while idle"
    );
    assert!(closed_within(&mut kept, Duration::from_millis(2700)).await);
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(2950) && idle_for < Duration::from_millis(4500),
        "{idle_for:?}"
    );
    assert_eq!(
        signed_push(&url, "cap-token", 2, subscribe_xml("oAfterCut02")).await,
        200
    );
    assert_eq!(db.app.count_in("inbound_events", "1 = 1").await, 2);
    daemon.stop().await;
}
on_both_backends!(the_cap_fails_fast_and_timeouts_cut_slow_clients);
