//! One recipient at a time: per-user pacing (`[limits] per_user_interval_secs`) and per-user
//! order (`[workers] order = "per_user"`), across daemons, on both backends.

use std::time::Duration;

use wechat_outbox::simulator::{Faults, SimSettings};

use crate::helpers::{AppDb, Backend, Daemon, Sim, TestDb};
use crate::limits::wait_for;
use crate::on_both_backends;

async fn insert(db: &TestDb, touser: &str, template: &str, value: &str, priority: i64) {
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, priority) \
             VALUES ('{touser}', '{template}', '{{\"keyword1\":\"{value}\"}}', {priority})"
        ))
        .await
        .unwrap();
}

/// `sent_at` of each row to `touser` with `value`, in milliseconds since the epoch.
async fn sent_ms(app: &AppDb, touser: &str, value: &str) -> i64 {
    let sql = format!(
        "SELECT CAST(ROUND({}) AS BIGINT) FROM outbox WHERE touser = '{touser}' AND data LIKE '%\"{value}\"%'",
        match app {
            AppDb::Sqlite(_) => "(julianday(sent_at) - 2440587.5) * 86400000.0",
            AppDb::Postgres(_) => "EXTRACT(EPOCH FROM sent_at) * 1000",
        }
    );
    let sql = sqlx::AssertSqlSafe(sql);
    match app {
        AppDb::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        AppDb::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .expect("sent_at")
}

/// Two daemons keep one user's sends a second apart (the simulator would answer 43117 to any
/// closer than 0.9 s); attempts are not used up by the waits, and other users go at once.
async fn sends_to_one_user_are_paced_across_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        per_user_interval: Duration::from_millis(900),
        ..SimSettings::default()
    })
    .await;
    let extra = "[limits]\nper_user_interval_secs = 1\n[retry]\nmax_attempts = 1";
    let first = Daemon::start(db.config(&sim.url(), extra)).await;
    let second = Daemon::start(db.config(&sim.url(), extra)).await;
    for i in 0..3 {
        insert(&db, "oPacedUser01", "TNOTICE", &format!("p{i}"), 0).await;
        insert(&db, &format!("oOtherUser{i:02}"), "TNOTICE", "o", 0).await;
    }
    let rows = db.app.wait_settled(Duration::from_secs(30)).await;
    for row in &rows {
        assert_eq!((row.status.as_str(), row.attempts), ("sent", 1), "{row:?}");
    }
    let stats = sim.sim.stats();
    assert_eq!(stats.errcodes.get("43117"), None, "{stats:?}");
    let mut paced = Vec::new();
    for i in 0..3 {
        paced.push(sent_ms(&db.app, "oPacedUser01", &format!("p{i}")).await);
    }
    paced.sort();
    assert!(
        paced[2] - paced[0] >= 1900,
        "three sends a second apart: {paced:?}"
    );
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(sent_ms(&db.app, &format!("oOtherUser{i:02}"), "o").await);
    }
    assert!(
        others.iter().all(|&at| at < paced[2]),
        "other users wait for nobody"
    );
    first.stop().await;
    second.stop().await;
}
on_both_backends!(sends_to_one_user_are_paced_across_daemons);

/// `order = "per_user"`: a user's row waiting for its retry holds back that user's later row,
/// not other users'.
async fn a_users_rows_go_out_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            busy_rate: 1.0,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let extra = "[workers]\norder = \"per_user\"\n[retry]\nbase_delay_ms = 1500";
    let first = Daemon::start(db.config(&sim.url(), extra)).await;
    let second = Daemon::start(db.config(&sim.url(), extra)).await;
    insert(&db, "oOrderUser01", "TNOTICE", "paid", 0).await;
    let retrying = "status = 'pending' AND attempts = 1";
    wait_for(&db, "outbox", retrying, 1, Duration::from_secs(10)).await;
    // "paid" waits for its retry; "shipped" comes later.
    sim.sim.set_faults(Faults::default());
    insert(&db, "oOrderUser01", "TNOTICE", "shipped", 0).await;
    insert(&db, "oSomeoneElse", "TNOTICE", "other", 0).await;
    db.app.wait_settled(Duration::from_secs(20)).await;
    let paid = sent_ms(&db.app, "oOrderUser01", "paid").await;
    let shipped = sent_ms(&db.app, "oOrderUser01", "shipped").await;
    let other = sent_ms(&db.app, "oSomeoneElse", "other").await;
    assert!(shipped > paid, "shipped {shipped} before paid {paid}");
    assert!(other < paid, "another user is not held back");
    let order: Vec<String> = sim
        .sim
        .deliveries()
        .iter()
        .filter(|d| d.touser == "oOrderUser01")
        .map(|d| d.data["keyword1"]["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["paid", "shipped"]);
    first.stop().await;
    second.stop().await;
}
on_both_backends!(a_users_rows_go_out_in_order);

/// A row that stays open (held for room) holds its user's later rows back for
/// `order_hold_max_secs` at most.
async fn an_open_row_holds_later_ones_back_for_a_while_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[workers]\norder = \"per_user\"\norder_hold_max_secs = 2\n[limits]\nactive_templates = 1",
    ))
    .await;
    insert(&db, "oFirstUser01", "TINUSE", "takes the one place", 0).await;
    db.app.wait_settled(Duration::from_secs(10)).await;
    insert(&db, "oHeldUser001", "TNOROOM", "held for room", 0).await;
    insert(&db, "oHeldUser001", "TINUSE", "later", 0).await;
    let inserted = tokio::time::Instant::now();
    let later_sent = "touser = 'oHeldUser001' AND status = 'sent'";
    wait_for(&db, "outbox", later_sent, 1, Duration::from_secs(15)).await;
    assert!(
        inserted.elapsed() >= Duration::from_millis(1500),
        "held back until the first row's hold ended: {:?}",
        inserted.elapsed()
    );
    assert_eq!(
        db.app
            .count("touser = 'oHeldUser001' AND status = 'held' AND template_id = 'TNOROOM'")
            .await,
        1
    );
    daemon.stop().await;
}
on_both_backends!(an_open_row_holds_later_ones_back_for_a_while_only);

/// A row scheduled for later never holds back one due now, whatever its priority.
async fn a_row_for_later_holds_nothing_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\norder = \"per_user\"")).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, priority, send_after) \
             VALUES ('oLaterUser01', 'TNOTICE', '{{\"keyword1\":\"next year\"}}', 9, {})",
            db.app.now_plus(3600)
        ))
        .await
        .unwrap();
    insert(&db, "oLaterUser01", "TNOTICE", "now", 0).await;
    let sent_now = "touser = 'oLaterUser01' AND status = 'sent'";
    wait_for(&db, "outbox", sent_now, 1, Duration::from_secs(10)).await;
    assert_eq!(db.app.count("status = 'pending' AND priority = 9").await, 1);
    daemon.stop().await;
}
on_both_backends!(a_row_for_later_holds_nothing_back);

/// Under `order = "per_user"` a recipient of any length is a row like another: the index keyed
/// by it must not fail the app's INSERT or the claim (a btree entry on Postgres holds about
/// 2.7 kB); the row fails alone, on the daemon's own check of `touser`.
async fn a_huge_touser_fails_its_own_row_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[workers]\norder = \"per_user\"")).await;
    // Letters that do not compress: Postgres compresses an index entry before it measures it.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let huge: String = std::iter::once('o')
        .chain((0..20_000).map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            char::from(b'a' + ((seed >> 33) % 26) as u8)
        }))
        .collect();
    insert(&db, &huge, "TNOTICE", "huge", 0).await;
    insert(&db, "oNormalUser1", "TNOTICE", "normal", 0).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    let statuses: Vec<(&str, Option<i64>)> = rows
        .iter()
        .map(|r| (r.status.as_str(), r.last_errcode))
        .collect();
    assert_eq!(statuses, [("failed", None), ("sent", Some(0))]);
    assert!(
        rows[0].last_error.as_deref().unwrap().contains("touser"),
        "{:?}",
        rows[0].last_error
    );
    daemon.stop().await;
}
on_both_backends!(a_huge_touser_fails_its_own_row_only);
