//! What WeChat added after the 2014 interface page (docs/todays-wechat.md): users who refuse a
//! template (43101), too many sends to one user (43117), duplicates (40241), the `failed:freq
//! limit` delivery status, WeChat's own quota figures, and category templates added and
//! deleted from the command line. Each against the simulator, which plays those rules.

use std::time::Duration;

use wechat_outbox::simulator::SimSettings;

use crate::delivery::{daemon_with_callback, wait_joined};
use crate::helpers::{Backend, Daemon, Process, Row, Sim, TestDb};
use crate::limits::wait_for;
use crate::on_both_backends;

async fn insert(db: &TestDb, touser: &str, template: &str, value: &str) {
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data) \
             VALUES ('{touser}', '{template}', '{{\"keyword1\":\"{value}\"}}')"
        ))
        .await
        .unwrap();
}

async fn last_row(db: &TestDb) -> Row {
    db.app.rows().await.pop().expect("a row")
}

async fn settle(db: &TestDb) -> Row {
    db.app.wait_settled(Duration::from_secs(20)).await;
    last_row(db).await
}

/// A user who refused a template gets no more of it (no request, no quota) until the refusal
/// expires or is deleted with SQL; other templates still reach them.
async fn a_refused_template_is_not_sent_to_that_user_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        refusals: vec![("oRefuser0001".into(), "TREFUSED".into())],
        ..SimSettings::default()
    })
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;

    insert(&db, "oRefuser0001", "TREFUSED", "first").await;
    let refused = settle(&db).await;
    assert_eq!(
        (refused.status.as_str(), refused.last_errcode),
        ("failed", Some(43101))
    );
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap()
            .contains("user refused this template"),
        "{refused:?}"
    );
    assert_eq!(
        db.app
            .count_in(
                "report_refusals",
                "openid = 'oRefuser0001' AND in_force = 1"
            )
            .await,
        1
    );

    let requests = sim.sim.stats().send_requests;
    insert(&db, "oRefuser0001", "TREFUSED", "second").await;
    let skipped = settle(&db).await;
    assert_eq!(
        (
            skipped.status.as_str(),
            skipped.last_errcode,
            skipped.attempts
        ),
        ("failed", None, 1)
    );
    assert!(
        skipped.last_error.as_deref().unwrap().contains("43101"),
        "{skipped:?}"
    );
    assert_eq!(sim.sim.stats().send_requests, requests, "no request made");
    insert(&db, "oRefuser0001", "TOTHER", "another template").await;
    assert_eq!(settle(&db).await.status, "sent", "other templates go on");
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'account' AND used = 1")
            .await,
        1,
        "only the other template's send is counted"
    );

    // Expired: WeChat is asked again (and still refuses, renewing the refusal).
    db.app
        .exec(&format!(
            "UPDATE refusals SET expires_at = {}",
            db.app.now_plus(-1)
        ))
        .await
        .unwrap();
    insert(&db, "oRefuser0001", "TREFUSED", "after expiry").await;
    assert_eq!(settle(&db).await.last_errcode, Some(43101));
    assert_eq!(sim.sim.stats().send_requests, requests + 2);
    assert_eq!(db.app.count_in("report_refusals", "in_force = 1").await, 1);

    // Deleted with SQL after the user accepted again: sent.
    sim.sim.update(|s| s.refusals.clear());
    db.app.exec("DELETE FROM refusals").await.unwrap();
    insert(&db, "oRefuser0001", "TREFUSED", "accepted again").await;
    assert_eq!(settle(&db).await.status, "sent");
    daemon.stop().await;
}
on_both_backends!(a_refused_template_is_not_sent_to_that_user_again);

/// 43117 makes the row wait for that user, without using up an attempt; other users' rows
/// are sent meanwhile.
async fn too_frequent_sends_wait_for_that_user_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        per_user_interval: Duration::from_millis(1500),
        ..SimSettings::default()
    })
    .await;
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[errcodes]\ntoo_frequent_wait_secs = 1\n[retry]\nmax_attempts = 1",
    ))
    .await;
    insert(&db, "oBusyUser001", "TNOTICE", "one").await;
    insert(&db, "oBusyUser001", "TNOTICE", "two").await;
    insert(&db, "oCalmUser001", "TNOTICE", "three").await;
    let rows = db.app.wait_settled(Duration::from_secs(30)).await;
    for row in &rows {
        // With max_attempts = 1 a counted wait would have failed the row.
        assert_eq!((row.status.as_str(), row.attempts), ("sent", 1), "{row:?}");
    }
    let stats = sim.sim.stats();
    assert!(
        stats.errcodes.get("43117").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
    assert_eq!((stats.delivered, stats.duplicate_deliveries), (3, 0));
    daemon.stop().await;
}
on_both_backends!(too_frequent_sends_wait_for_that_user_only);

/// 40241 to a resend in doubt means the first attempt got through: sent without a msgid, and
/// counted. To a row not in doubt it is a duplicate: failed, and not counted.
async fn a_duplicate_answer_ends_a_row_by_its_doubt(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        duplicate_window: Duration::from_secs(60),
        ..SimSettings::default()
    })
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    insert(&db, "oDupUser0001", "TNOTICE", "same").await;
    assert_eq!(settle(&db).await.status, "sent");

    let (yes, now) = match backend {
        Backend::Sqlite => ("1", "strftime('%Y-%m-%d %H:%M:%f', 'now')"),
        Backend::Postgres => ("true", "now()"),
    };
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, in_doubt, in_doubt_since, attempts) \
             VALUES ('oDupUser0001', 'TNOTICE', '{{\"keyword1\":\"same\"}}', {yes}, {now}, 1)"
        ))
        .await
        .unwrap();
    let resent = settle(&db).await;
    assert_eq!(
        (
            resent.status.as_str(),
            resent.msgid,
            resent.last_errcode,
            resent.has_sent_at
        ),
        ("sent", None, Some(40241), 1),
        "{resent:?}"
    );
    insert(&db, "oDupUser0001", "TNOTICE", "same").await;
    let duplicate = settle(&db).await;
    assert_eq!(
        (duplicate.status.as_str(), duplicate.last_errcode),
        ("failed", Some(40241))
    );
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'account' AND used = 2")
            .await,
        1,
        "the first send and the resend that got through"
    );
    assert_eq!(sim.sim.stats().delivered, 1);
    daemon.stop().await;
}
on_both_backends!(a_duplicate_answer_ends_a_row_by_its_doubt);

/// `failed:freq limit` lands in `delivery_status` and report_daily counts it on its own; the
/// simulator shows users values as WeChat does since 2023.
async fn freq_limit_events_are_counted_on_their_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    // Under the 2014 rules the daemon sends a long value whole; WeChat shows 20 characters.
    let daemon =
        daemon_with_callback(&db, &sim, false, "[templates]\ncontent_rules = \"2014\"").await;
    insert(&db, "o_freqlimit_01", "TNOTICE", "a").await;
    let long = "twenty-six characters long";
    insert(&db, "oHappyUser01", "TNOTICE", long).await;
    wait_joined(&db, 2).await;
    let happy = sim.sim.deliveries();
    let happy = happy.iter().find(|d| d.touser == "oHappyUser01").unwrap();
    assert_eq!(happy.data["keyword1"]["value"], long);
    assert_eq!(happy.shown["keyword1"], "twenty-six characte…");
    assert_eq!(
        db.app
            .count("status = 'undelivered' AND delivery_status = 'failed:freq limit'")
            .await,
        1
    );
    assert_eq!(
        db.app
            .count_in(
                "report_daily",
                "freq_limited = 1 AND undelivered = 1 AND delivered = 1"
            )
            .await,
        1
    );
    daemon.stop().await;
}
on_both_backends!(freq_limit_events_are_counted_on_their_own);

/// `daily_per_account = "wechat"`: WeChat's figure is the cap, read before the first send,
/// and report_quota shows WeChat's count beside the daemon's.
async fn the_daily_cap_follows_wechats_own_figure(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        daily_limit: 3,
        ..SimSettings::default()
    })
    .await;
    let daemon =
        Daemon::start(db.config(&sim.url(), "[limits]\ndaily_per_account = \"wechat\"")).await;
    db.app.insert_good(5, "capped").await;
    wait_for(
        &db,
        "outbox",
        "status IN ('sent', 'held')",
        5,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(db.app.count("status = 'sent'").await, 3);
    assert_eq!(
        db.app
            .count("status = 'held' AND held_for = 'daily quota'")
            .await,
        2
    );
    assert_eq!(
        sim.sim.stats().errcodes.get("45009"),
        None,
        "never asked beyond the cap"
    );
    assert_eq!(
        db.app
            .count_in(
                "wechat_quota",
                "daily_limit = 3 AND used = 0 AND own_used = 0"
            )
            .await,
        1,
        "read at start, before any send"
    );
    assert_eq!(
        db.app
            .count_in(
                "report_quota",
                "day_limit = 3 AND day_used = 3 AND wechat_day_limit = 3"
            )
            .await,
        1
    );
    daemon.stop().await;
}
on_both_backends!(the_daily_cap_follows_wechats_own_figure);

/// `templates add` copies a category template into the account and takes it into use;
/// `templates delete` removes it; WeChat's refusals are explained; the templates-in-use limit
/// is kept before WeChat is asked.
async fn templates_are_added_and_deleted_at_wechat(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config_toml(&sim.url(), "[limits]\nactive_templates = 1");
    let run = async |args: &[&str]| {
        let mut process = Process::start(&config, args);
        let status = process.wait_exit(Duration::from_secs(30)).await;
        (status.code(), process.stdout(), process.stderr())
    };

    let (code, out, err) = run(&[
        "templates",
        "add",
        "--short-id",
        "43216",
        "--keywords",
        "名称, 金额，时间",
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let template_id = out.trim().to_string();
    assert!(template_id.starts_with("SIM"), "{out}");
    assert_eq!(
        db.app
            .count_in(
                "templates",
                &format!("template_id = '{template_id}' AND content LIKE '%amount2.DATA%'")
            )
            .await,
        1,
        "synced with its content"
    );
    assert_eq!(db.app.count_in("templates", "in_use = true").await, 1);

    let (code, _, err) = run(&[
        "templates",
        "add",
        "--short-id",
        "47118",
        "--keywords",
        "商品名称",
    ])
    .await;
    assert_ne!(code, Some(0));
    assert!(err.contains("already uses 1 of its 1 templates"), "{err}");

    for (short_id, keywords, errcode, words) in [
        ("TM00001", "名称", "40247", "category templates"),
        ("43216", "名称,不存在", "40246", "keyword names"),
        ("99999", "名称", "40037", "no such template"),
    ] {
        let (code, _, err) = run(&[
            "templates",
            "add",
            "--out-of-use",
            "--short-id",
            short_id,
            "--keywords",
            keywords,
        ])
        .await;
        assert_ne!(code, Some(0));
        assert!(err.contains(errcode) && err.contains(words), "{err}");
    }

    insert(&db, "oWaiting0001", &template_id, "waits").await;
    let (code, out, err) = run(&["templates", "delete", &template_id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted at WeChat"), "{out}");
    assert_eq!(
        db.app
            .count("status = 'failed' AND last_error LIKE '%deleted at WeChat%'")
            .await,
        1,
        "a waiting row would take the template into use again"
    );
    assert_eq!(db.app.count_in("templates", "in_use = true").await, 0);
    let (code, _, err) = run(&["templates", "delete", &template_id]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("40037"), "{err}");
}
on_both_backends!(templates_are_added_and_deleted_at_wechat);

/// Another system sending on the same account shows in WeChat's count, not in the daemon's:
/// the daemon logs the difference, and `wechat-outbox quota` shows both.
async fn another_system_on_the_account_is_noticed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let http = wechat_outbox::wechat::api::http_client(reqwest::Client::builder()).unwrap();
    let token: serde_json::Value = http
        .post(format!("{}/cgi-bin/stable_token", sim.url()))
        .json(&serde_json::json!({"grant_type": "client_credential",
            "appid": "wxtest0000000001", "secret": "another-system"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    for i in 0..12 {
        let answer: serde_json::Value = http
            .post(format!(
                "{}/cgi-bin/message/template/send?access_token={token}",
                sim.url()
            ))
            .json(&serde_json::json!({"touser": format!("oElsewhere{i:04}"),
                "template_id": "TX", "data": {"k": {"value": "v"}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["errcode"], 0, "{answer}");
    }

    let config = db.config_toml(&sim.url(), "");
    let mut daemon = Process::start(&config, &["run"]);
    daemon.wait_started().await;
    let read = "used = 12 AND own_used = 0";
    wait_for(&db, "wechat_quota", read, 1, Duration::from_secs(20)).await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(
        daemon
            .stderr()
            .contains("another system may send on this account"),
        "{}",
        daemon.stderr()
    );

    let mut quota = Process::start(&config, &["quota"]);
    assert_eq!(
        quota.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
    let out = quota.stdout();
    assert!(
        out.lines().any(|l| l.contains("WeChat's own count")
            && l.split_whitespace().rev().take(3).collect::<Vec<_>>() == ["99988", "100000", "12"]),
        "{out}"
    );
}
on_both_backends!(another_system_on_the_account_is_noticed);
