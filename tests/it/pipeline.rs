//! The happy path and the scheduling columns: rows inserted by another connection while the
//! daemon runs are sent once, in priority order, not before `send_after`, never when cancelled
//! or expired.

use std::time::Duration;

use wechat_outbox::simulator::SimSettings;

use crate::helpers::{AppDb, Backend, Daemon, Sim, TestDb, assert_each_sent_once};
use crate::on_both_backends;

async fn rows_inserted_while_running_are_sent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), ""));
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

    let started = std::time::Instant::now();
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\nconcurrency = 1\nbatch_size = 1"));
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
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "send_after was not honoured"
    );
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

async fn an_invalidated_token_is_refreshed_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\nconcurrency = 32"));
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
    let daemon = Daemon::start(db.config(&sim.url(), "[api]\ntoken_endpoint = \"classic\""));
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
            .contains("send_after and expires_at must be times")
    );

    let daemon = Daemon::start(db.config(&sim.url(), ""));
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
    let daemon = Daemon::start(db.config(&sim.url(), ""));
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
