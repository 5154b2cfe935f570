//! The happy path and the scheduling columns: rows inserted by another connection while the
//! daemon runs are sent once, in priority order, not before `send_after`, never when cancelled
//! or expired.

use std::time::Duration;

use wechat_outbox::simulator::SimSettings;

use crate::helpers::{AppDb, Backend, Daemon, Sim, TestDb, assert_each_sent_once, slow_sim};
use crate::on_both_backends;

async fn rows_inserted_while_running_are_sent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    db.app.insert_good(25, "live").await;
    db.app.exec("INSERT INTO outbox (touser, template_id, data, client_msg_id) VALUES ('oOwnKey0001', 'TEMPLATE_ID', '{\"first\":\"x\"}', 'order-77')").await.unwrap();
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    assert_eq!(rows.len(), 26);
    assert!(
        rows.iter().all(|r| r.status == "sent" && r.attempts == 1),
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.msgid.is_some_and(|m| m > i64::from(u32::MAX) / 2)),
        "64-bit msgids"
    );
    assert_each_sent_once(&sim.sim, &rows);
    assert_eq!(
        sim.sim.stats().tokens_issued,
        1,
        "one token for the whole run"
    );
    let own = sim
        .sim
        .deliveries()
        .into_iter()
        .find(|d| d.touser == "oOwnKey0001")
        .unwrap();
    assert_eq!(
        own.client_msg_id.as_deref(),
        Some("order-77"),
        "an app's client_msg_id is sent as is"
    );
}
on_both_backends!(rows_inserted_while_running_are_sent);

async fn a_second_insert_with_the_same_client_msg_id_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let insert = "INSERT INTO outbox (touser, template_id, data, client_msg_id) VALUES ('oDup00001', 'T', '{}', 'k-1')";
    db.app.exec(insert).await.unwrap();
    let err = db
        .app
        .exec(insert)
        .await
        .expect_err("duplicate key refused");
    assert!(err.to_string().to_lowercase().contains("unique"), "{err}");
    // The same key on another account is a different message.
    db.app.exec("INSERT INTO outbox (account, touser, template_id, data, client_msg_id) VALUES ('other', 'oDup00001', 'T', '{}', 'k-1')").await.unwrap();
}
on_both_backends!(a_second_insert_with_the_same_client_msg_id_is_refused);

async fn priority_send_after_cancelled_and_expired_are_honoured(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let app = &db.app;
    // Inserted before the daemon starts, so the claim order is all that decides.
    for (user, priority) in [
        ("oPrioLow01", 0),
        ("oPrioHigh1", 10),
        ("oPrioMid01", 5),
        ("oPrioHigh2", 10),
    ] {
        app.exec(&format!("INSERT INTO outbox (touser, template_id, data, priority) VALUES ('{user}', 'T', '{{}}', {priority})")).await.unwrap();
    }
    app.exec(&format!("INSERT INTO outbox (touser, template_id, data, send_after) VALUES ('oLater0001', 'T', '{{}}', {})", app.now_plus(2))).await.unwrap();
    app.exec(&format!("INSERT INTO outbox (touser, template_id, data, send_after) VALUES ('oCancel001', 'T', '{{}}', {})", app.now_plus(1))).await.unwrap();
    app.exec(
        "UPDATE outbox SET status = 'cancelled' WHERE touser = 'oCancel001' AND status = 'pending'",
    )
    .await
    .unwrap();
    app.exec(&format!("INSERT INTO outbox (touser, template_id, data, expires_at) VALUES ('oExpired01', 'T', '{{}}', {})", app.now_plus(-60))).await.unwrap();
    app.exec(&format!("INSERT INTO outbox (touser, template_id, data, send_after, expires_at) VALUES ('oExpires02', 'T', '{{}}', {}, {})", app.now_plus(3), app.now_plus(1))).await.unwrap();

    // Strict order needs one message at a time, none claimed ahead.
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[workers]\nconcurrency = 1\nclaim_ahead = 0\nbatch_size = 1",
    ))
    .await;
    let rows = app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    let by_user = |u: &str| {
        rows.iter()
            .find(|r| r.touser.as_deref() == Some(u))
            .unwrap()
            .clone()
    };
    let order: Vec<String> = sim.sim.deliveries().into_iter().map(|d| d.touser).collect();
    assert_eq!(
        order,
        [
            "oPrioHigh1",
            "oPrioHigh2",
            "oPrioMid01",
            "oPrioLow01",
            "oLater0001"
        ],
        "priority first, then send_after"
    );
    let honoured = app
        .count("touser = 'oLater0001' AND sent_at >= send_after")
        .await;
    assert_eq!(honoured, 1, "sent before its send_after");
    assert_eq!(by_user("oCancel001").status, "cancelled");
    assert_eq!(by_user("oExpired01").status, "expired");
    assert_eq!(
        by_user("oExpires02").status,
        "expired",
        "expires before it may be sent"
    );
    assert!(
        by_user("oExpired01")
            .last_error
            .unwrap()
            .contains("expires_at passed")
    );
    assert_eq!(sim.sim.stats().delivered, 5);
}
on_both_backends!(priority_send_after_cancelled_and_expired_are_honoured);

/// The most rows seen `sending` at once, looking every 20 ms until none is open or `limit`.
async fn most_rows_held(db: &TestDb, limit: Duration) -> i64 {
    let until = tokio::time::Instant::now() + limit;
    let mut most = 0;
    while db.app.count("status IN ('pending', 'sending')").await > 0
        && tokio::time::Instant::now() < until
    {
        most = most.max(db.app.count("status = 'sending'").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    most
}

/// `concurrency` caps the requests in flight; `claim_ahead` more rows are held meanwhile, so a
/// free request slot finds a row ready.
async fn requests_in_flight_stay_within_concurrency_while_rows_are_claimed_ahead(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(slow_sim(100)).await;
    db.app.insert_good(48, "ahead").await;
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[workers]\nconcurrency = 4\nclaim_ahead = 12\nbatch_size = 8",
    ))
    .await;
    let most_held = most_rows_held(&db, Duration::from_secs(20)).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    assert_each_sent_once(&sim.sim, &rows);
    let stats = sim.sim.stats();
    assert_eq!(stats.peak_sends_in_flight, 4, "{stats:?}");
    assert!(
        (5..=16).contains(&most_held),
        "held {most_held} rows at most; expected more than concurrency, at most concurrency + claim_ahead"
    );
}
on_both_backends!(requests_in_flight_stay_within_concurrency_while_rows_are_claimed_ahead);

/// Rows claimed ahead would only wait for a slow send rate: a daemon holds no more ahead than
/// its share sends in a second, leaving the rest to other daemons.
async fn a_slow_rate_limits_the_rows_claimed_ahead(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    db.app.insert_good(30, "rate").await;
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[workers]\nconcurrency = 2\nclaim_ahead = 100\n[limits]\nrate_per_second = 5",
    ))
    .await;
    let most_held = most_rows_held(&db, Duration::from_secs(3)).await;
    daemon.stop().await;
    assert!(
        (3..=7).contains(&most_held),
        "held {most_held} rows at most; expected concurrency 2 + a rate of 5 per second"
    );
}
on_both_backends!(a_slow_rate_limits_the_rows_claimed_ahead);

async fn an_invalidated_token_is_refreshed_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\nconcurrency = 32")).await;
    db.app.insert_good(20, "before").await;
    db.app.wait_settled(Duration::from_secs(20)).await;
    assert_eq!(sim.sim.stats().tokens_issued, 1);

    sim.sim.invalidate_tokens();
    db.app.insert_good(60, "after").await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
    let stats = sim.sim.stats();
    assert_eq!(
        stats.tokens_issued, 2,
        "one refresh for a burst of 40001s: {stats:?}"
    );
    assert!(
        stats.errcodes.get("40001").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
    assert_each_sent_once(&sim.sim, &rows);
}
on_both_backends!(an_invalidated_token_is_refreshed_once);

async fn the_classic_token_endpoint_works_too(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[api]\ntoken_endpoint = \"classic\"")).await;
    db.app.insert_good(5, "classic").await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
    assert_eq!(sim.sim.stats().tokens_issued, 1);
}
on_both_backends!(the_classic_token_endpoint_works_too);

/// SQLite stores app times as text: every common way of writing one must compare correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_accepts_the_times_apps_naturally_write() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings::default()).await;
    let due = [
        ("oTimeDue01", "datetime('now')"),
        ("oTimeDue02", "'2001-02-03T04:05:06+08:00'"),
        ("oTimeDue03", "'2001-02-03T04:05:06Z'"),
        ("oTimeDue04", "'2001-02-03 04:05:06.789'"),
        ("oTimeDue05", "1000000000"),
    ];
    let later = [
        ("oTimeLate1", "datetime('now', '+1 day')"),
        ("oTimeLate2", "'2999-01-01T00:00:00+08:00'"),
        ("oTimeLate3", "strftime('%s', 'now') + 86400"),
    ];
    for (user, time) in due.iter().chain(later.iter()) {
        db.app.exec(&format!("INSERT INTO outbox (touser, template_id, data, send_after) VALUES ('{user}', 'T', '{{}}', {time})")).await.unwrap();
    }
    // An offset is honoured: 08:00+08:00 is midnight UTC.
    let AppDb::Sqlite(pool) = &db.app else {
        unreachable!()
    };
    let stored: String =
        sqlx::query_scalar("SELECT send_after FROM outbox WHERE touser = 'oTimeDue02'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(stored, "2001-02-02 20:05:06.000");
    let refused = db.app.exec("INSERT INTO outbox (touser, template_id, data, send_after) VALUES ('oBadTime01', 'T', '{}', 'next tuesday')").await;
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("send_after must be a time")
    );

    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status = 'sent'").await < due.len() as i64 {
        assert!(tokio::time::Instant::now() < deadline, "due rows not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;
    assert_eq!(
        db.app.count("status = 'pending'").await,
        later.len() as i64,
        "future rows wait"
    );
}

/// The outbox in its own schema of the app's database, written in the app's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_rows_follow_the_apps_transaction() {
    let db = TestDb::new(Backend::Postgres).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let AppDb::Postgres(pool) = &db.app else {
        unreachable!()
    };
    sqlx::raw_sql("CREATE TABLE public.orders (id int PRIMARY KEY, paid bool)")
        .execute(pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql("INSERT INTO public.orders VALUES (1, true); INSERT INTO wechat.outbox (touser, template_id, data) VALUES ('oRolledBack', 'T', '{}')").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql("INSERT INTO public.orders VALUES (2, true); INSERT INTO wechat.outbox (touser, template_id, data) VALUES ('oCommitted1', 'T', '{}')").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();

    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].touser.as_deref(), Some("oCommitted1"));
    assert_eq!(rows[0].status, "sent");
    let in_public: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'outbox'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        in_public, 0,
        "the tables live only in the configured schema"
    );
}

/// With polling all but off, a row from another connection is still picked up at once: the
/// wake-up hint (LISTEN/NOTIFY on Postgres, `PRAGMA data_version` on SQLite) works.
async fn new_rows_wake_an_idle_daemon_without_polling(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\npoll_interval_ms = 600000")).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // idle: the first look found nothing
    for round in 1..=3 {
        db.app.insert_good(1, &format!("wake{round}")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while db.app.count("status = 'sent'").await < round {
            assert!(
                tokio::time::Instant::now() < deadline,
                "row {round} waited for a poll"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    daemon.stop().await;
}
on_both_backends!(new_rows_wake_an_idle_daemon_without_polling);

async fn several_accounts_share_one_daemon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let extra =
        "[[accounts]]\nname = \"shop\"\nappid = \"wxshop000000002\"\nsecret = \"shop-secret\"\n";
    let mut toml = db.config_toml(&sim.url(), "");
    toml.push_str(extra);
    let config = wechat_outbox::config::Config::from_toml(&toml).unwrap();
    let daemon = Daemon::start(config).await;
    db.app.insert_good(5, "deflt").await;
    db.app.exec("INSERT INTO outbox (account, touser, template_id, data) VALUES ('shop', 'oShop00001', 'T', '{}'), ('shop', 'oShop00002', 'T', '{}')").await.unwrap();
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
    let by_appid = |appid: &str| {
        sim.sim
            .deliveries()
            .into_iter()
            .filter(|d| d.appid == appid)
            .count()
    };
    assert_eq!(by_appid("wxtest0000000001"), 5);
    assert_eq!(
        by_appid("wxshop000000002"),
        2,
        "each account sends with its own token"
    );
    assert_eq!(sim.sim.stats().tokens_issued, 2);
}
on_both_backends!(several_accounts_share_one_daemon);

/// The per-account rate: 10 sends a second (a burst of 10, then one every 100 ms), so 30
/// rows cannot all be sent in under about 2 seconds however fast the machine is.
async fn the_send_rate_is_limited_per_account(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    db.app.insert_good(30, "rate").await;
    let started = std::time::Instant::now();
    let daemon = Daemon::start(db.config(&sim.url(), "[limits]\nrate_per_second = 10")).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    daemon.stop().await;
    assert!(rows.iter().all(|r| r.status == "sent"));
    assert!(
        elapsed >= Duration::from_millis(1900),
        "30 sends at 10/s took only {elapsed:?}"
    );
}
on_both_backends!(the_send_rate_is_limited_per_account);

/// However many rows wait, a claim reads the claim index in order, never the whole table
/// (issue #6: a 1M-row backlog must drain about as fast as a small one).
async fn the_claim_reads_its_index_not_the_table(backend: Backend) {
    let db = TestDb::new(backend).await;
    // A backlog: at 5,000 rows Postgres rightly joins the claimed ids to the whole (small)
    // table, which this test then reports.
    db.app.insert_good(50_000, "plan").await;
    db.app.analyze_outbox().await;
    let plan = db
        .store()
        .await
        .claim_plan(chrono::Utc::now(), None)
        .await
        .unwrap();
    assert!(plan.contains("outbox_claim"), "{plan}");
    let scans_the_table = plan
        .lines()
        .any(|step| step.trim() == "SCAN outbox" || step.contains("Seq Scan on outbox"));
    assert!(!scans_the_table, "{plan}");
}
on_both_backends!(the_claim_reads_its_index_not_the_table);

/// A Postgres server without autovacuum is named at start: the claim index's head fills with
/// dead entries that every claim walks. SQLite has nothing to warn about.
async fn a_server_without_autovacuum_is_warned_about(backend: Backend) {
    let db = TestDb::new(backend).await;
    let warnings = db.store().await.setting_warnings().await.unwrap();
    let expected = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => {
            db.app
                .count_in("pg_settings", "name = 'autovacuum' AND setting = 'off'")
                .await
        }
    };
    assert_eq!(warnings.len() as i64, expected, "{warnings:?}");
    assert!(warnings.iter().all(|w| w.contains("autovacuum is off")));
}
on_both_backends!(a_server_without_autovacuum_is_warned_about);
