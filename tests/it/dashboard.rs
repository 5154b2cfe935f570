//! The dashboard (docs/dashboard.md) in a real headless Chromium on both backends: pages load
//! with real data, filters narrow the list, actions change rows and write the audit, a hostile
//! row's `<script>` does not run; and over plain HTTP: an action without its CSRF token, from
//! another site or without credentials is refused and changes nothing.

use std::time::Duration;

use crate::browser::{self, Browser};
use crate::helpers::{Backend, Daemon, Sim, TestDb};
use crate::on_both_backends;
use wechat_outbox::store::{AttemptLog, AuditEntry, MessageFilter, Resend, Store};

const PASSWORD: &str = "a dashboard password of some length";

/// A daemon with the dashboard's actions on, behind a password in a file.
async fn daemon_with_actions(db: &TestDb, sim: &Sim, dir: &tempfile::TempDir) -> (Daemon, String) {
    let file = dir.path().join("dashboard.password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let daemon = Daemon::start(db.config(
        &sim.url(),
        &format!(
            "[dashboard]\nactions = true\nuser = \"ops\"\npassword_file = \"{}\"",
            file.display()
        ),
    ))
    .await;
    let addr = daemon.dashboard.expect("dashboard enabled");
    (
        daemon,
        format!("http://ops:{}@{addr}", PASSWORD.replace(' ', "%20")),
    )
}

/// Rows of every kind the pages show: sent, failed by WeChat, failed for broken JSON, hostile,
/// and (inserted after the rest settled) rows waiting for later.
async fn insert_rows(db: &TestDb) {
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data) VALUES
             ('oDashUser0001', 'TNOTICE', '{\"first\":\"one\"}'),
             ('oDashUser0001', 'TNOTICE', '{\"first\":\"two\"}'),
             ('oDashUser0002', 'TNOTICE', '{\"first\":\"three\"}'),
             ('o_unfollowed_03', 'TNOTICE', '{\"first\":\"not a follower\"}'),
             ('oDashUser0004', 'TNOTICE', 'not json'),
             ('<img src=x onerror=\"window.pwned=2\">', 'THOSTILE',
              '{\"first\":\"<script>window.pwned=1</script>\"}')",
        )
        .await
        .unwrap();
    db.app.wait_settled(Duration::from_secs(30)).await;
    let later = db.app.now_plus(3600);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, send_after) VALUES
             ('oDashLater01', 'TBULK', '{{\"first\":\"a\"}}', {later}),
             ('oDashLater02', 'TBULK', '{{\"first\":\"b\"}}', {later}),
             ('oDashLater03', 'TBULK', '{{\"first\":\"c\"}}', {later}),
             ('oDashLater04', 'TONE', '{{\"first\":\"d\"}}', {later})"
        ))
        .await
        .unwrap();
}

/// The store of a migrated test database, with no daemon.
async fn migrated_store(db: &TestDb) -> Store {
    let config = db.config("http://127.0.0.1:9", "");
    wechat_outbox::app::migrate(&config).await.unwrap();
    Store::connect(&config.store_settings()).await.unwrap()
}

/// The id of the test's one row to `touser`.
async fn id_of(db: &TestDb, touser: &str) -> i64 {
    let ids: Vec<i64> = db
        .app
        .rows()
        .await
        .iter()
        .filter(|r| r.touser.as_deref() == Some(touser))
        .map(|r| r.id)
        .collect();
    assert_eq!(ids.len(), 1, "one row to {touser}");
    ids[0]
}

async fn in_a_browser(backend: Backend) {
    if !browser::available() {
        return;
    }
    let db = TestDb::new(backend).await;
    let sim = Sim::start(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, base) = daemon_with_actions(&db, &sim, &dir).await;
    insert_rows(&db).await;
    let b = Browser::start().await;
    let shots = backend == Backend::Sqlite;

    // Overview: the account's counts are the table's.
    b.goto(&format!("{base}/")).await;
    let sent = db.app.count("status IN ('sent', 'delivered')").await;
    let failed = db.app.count("status = 'failed'").await;
    let statuses: Vec<(Option<String>, String)> = db
        .app
        .rows()
        .await
        .into_iter()
        .map(|r| (r.touser, r.status))
        .collect();
    assert_eq!(failed, 3, "{statuses:?}");
    let shown = |status: &'static str| {
        let b = &b;
        async move {
            b.text(&format!(
                "section[data-account='default'] [data-status='{status}']"
            ))
            .await
        }
    };
    assert_eq!(shown("failed").await, failed.to_string());
    let shown_sent: i64 = shown("sent").await.parse::<i64>().unwrap()
        + b.eval("const n = document.querySelector(\"[data-status='delivered']\"); return n ? Number(n.textContent) : 0;")
            .await
            .as_i64()
            .unwrap();
    assert_eq!(shown_sent, sent);
    assert_eq!(b.count("svg.chart").await, 2, "two charts for the account");
    if shots {
        b.screenshot("overview").await;
    }

    // Messages: every row, then the filters narrow the list.
    b.goto(&format!("{base}/messages")).await;
    assert_eq!(b.count("#messages tbody tr").await, 10);
    b.fill("openid", "oDashUser0001").await;
    b.click_to_next_page("#apply").await;
    b.find("#messages").await;
    assert_eq!(b.count("#messages tbody tr").await, 2, "{}", b.path().await);
    assert!(b.path().await.contains("openid=oDashUser0001"));
    b.goto(&format!("{base}/messages")).await;
    b.choose("status", "failed").await;
    b.click_to_next_page("#apply").await;
    b.find("#messages").await;
    assert_eq!(b.count("#messages tbody tr").await, 3);
    b.goto(&format!("{base}/messages?errcode=43004")).await;
    assert_eq!(b.count("#messages tbody tr").await, 1);
    b.goto(&format!("{base}/messages?errcode=oops&template=TBULK"))
        .await;
    assert_eq!(
        b.count("#messages tbody tr").await,
        3,
        "a bad errcode is named and ignored"
    );
    assert!(b.text(".alert").await.contains("errcode oops"));
    if shots {
        b.screenshot("messages").await;
    }

    // A hostile row shows as text; its script does not run.
    let hostile = id_of(&db, "<img src=x onerror=\"window.pwned=2\">").await;
    b.goto(&format!("{base}/messages/{hostile}")).await;
    assert!(
        b.text("#data")
            .await
            .contains("<script>window.pwned=1</script>")
    );
    b.goto(&format!("{base}/messages?template=THOSTILE")).await;
    assert!(b.text("#messages").await.contains("<img src=x onerror="));
    assert_eq!(b.eval("return typeof window.pwned;").await, "undefined");
    let injected = b.count("main script, main img").await;
    assert_eq!(injected, 0, "no element came from the row");

    // One message's story, and an action: cancel it.
    let later = id_of(&db, "oDashLater04").await;
    b.goto(&format!("{base}/messages/{later}")).await;
    assert!(
        b.text("#timeline")
            .await
            .contains("inserted for oDashLater04")
    );
    if shots {
        b.screenshot("message").await;
    }
    b.click_to_next_page("#cancel").await;
    b.find("#status").await;
    assert_eq!(b.text("#status").await, "cancelled");
    assert_eq!(
        db.app
            .count(&format!("id = {later} AND status = 'cancelled'"))
            .await,
        1
    );
    assert!(b.text("#timeline").await.contains("cancel by ops"));

    // Cancel all that match a filter, with the count to confirm.
    b.goto(&format!("{base}/messages?template=TBULK")).await;
    b.click_to_next_page("#cancel-matching").await;
    assert_eq!(b.text("#count").await, "3");
    if shots {
        b.screenshot("confirm-cancel").await;
    }
    b.click_to_next_page("#confirm").await;
    b.find("#audit").await;
    assert_eq!(b.path().await, "/audit");
    assert_eq!(
        db.app
            .count("template_id = 'TBULK' AND status = 'cancelled'")
            .await,
        3
    );
    assert_eq!(
        db.app
            .count_in(
                "dashboard_audit",
                "action = 'cancel_matching' AND row_count = 3 AND actor = 'ops'"
            )
            .await,
        1
    );
    assert!(b.text("#audit").await.contains("cancel_matching"));
    if shots {
        b.screenshot("audit").await;
    }

    // Send again a row WeChat refused: a new row with a new client_msg_id, linked, once.
    let refused = id_of(&db, "o_unfollowed_03").await;
    b.goto(&format!("{base}/messages/{refused}")).await;
    assert!(
        b.text("#timeline")
            .await
            .contains("attempt ended failed: errcode 43004"),
        "each attempt that did not end in a send is on the timeline"
    );
    b.click_to_next_page("#resend").await;
    b.find("#timeline").await;
    let new_path = b.path().await;
    let new_id: i64 = new_path.trim_start_matches("/messages/").parse().unwrap();
    assert_ne!(new_id, refused);
    assert!(
        b.text("#timeline")
            .await
            .contains(&format!("sending #{refused} again"))
    );
    assert_eq!(db.app.count("touser = 'o_unfollowed_03'").await, 2);
    assert_eq!(
        db.app
            .count_in(
                "dashboard_audit",
                &format!(
                    "action = 'resend' AND outbox_id = {refused} AND new_outbox_id = {new_id}"
                )
            )
            .await,
        1
    );
    b.goto(&format!("{base}/messages/{refused}")).await;
    assert_eq!(b.count("#resend").await, 0, "sent again once only");

    // The other pages load with their data.
    b.goto(&format!("{base}/errors")).await;
    assert!(b.text("main").await.contains("43004"));
    if shots {
        b.screenshot("errors").await;
    }
    b.goto(&format!("{base}/templates")).await;
    b.find("main").await;
    if shots {
        b.screenshot("templates").await;
    }
    b.goto(&format!("{base}/held")).await;
    b.find("main").await;

    // The overview's numbers move without a reload (its figures may be a few seconds old when
    // the page loads: they follow).
    b.goto(&format!("{base}/")).await;
    let later = db.app.now_plus(3600);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, send_after)
             VALUES ('oDashLive01', 'TONE', '{{\"first\":\"e\"}}', {later})"
        ))
        .await
        .unwrap();
    let expected = db.app.count("status = 'pending'").await.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while shown("pending").await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview did not refresh"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(
        b.eval("return document.body.dataset.refreshed || null;")
            .await,
        serde_json::Value::Null
    );

    b.close().await;
    daemon.stop().await;
}
on_both_backends!(in_a_browser);

/// Actions are refused without the CSRF token, from another site, or without credentials; the
/// row stays as it was. Read-only by default: no action routes at all.
async fn actions_are_guarded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = daemon_with_actions(&db, &sim, &dir).await;
    let addr = daemon.dashboard.unwrap();
    let later = db.app.now_plus(3600);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, send_after)
             VALUES ('oGuarded0001', 'TNOTICE', '{{\"first\":\"x\"}}', {later})"
        ))
        .await
        .unwrap();
    let id = db.app.rows().await[0].id;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http
        .get(format!("http://{addr}/messages/{id}"))
        .basic_auth("ops", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let body = page.text().await.unwrap();
    let token = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the page carries a CSRF token: {body}"))
        .to_string();
    let post = |form: Vec<(&'static str, String)>,
                auth: Option<&'static str>,
                origin: Option<&'static str>| {
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (key, value) in &form {
            body.append_pair(key, value);
        }
        let mut request = http
            .post(format!("http://{addr}/actions/cancel"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.finish());
        if let Some(password) = auth {
            request = request.basic_auth("ops", Some(password));
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let id_field = ("id", id.to_string());
    for (what, form, auth, origin, expected) in [
        (
            "no token",
            vec![id_field.clone()],
            Some(PASSWORD),
            None,
            403,
        ),
        (
            "a wrong token",
            vec![id_field.clone(), ("csrf", "0".repeat(64))],
            Some(PASSWORD),
            None,
            403,
        ),
        (
            "another site",
            vec![id_field.clone(), ("csrf", token.clone())],
            Some(PASSWORD),
            Some("http://evil.example"),
            403,
        ),
        (
            "no credentials",
            vec![id_field.clone(), ("csrf", token.clone())],
            None,
            None,
            401,
        ),
        (
            "a wrong password",
            vec![id_field.clone(), ("csrf", token.clone())],
            Some("not the password at all"),
            None,
            401,
        ),
    ] {
        let answer = post(form, auth, origin).await.unwrap();
        assert_eq!(answer.status().as_u16(), expected, "{what}");
        assert_eq!(
            db.app
                .count(&format!("id = {id} AND status = 'pending'"))
                .await,
            1,
            "{what}"
        );
    }
    assert_eq!(db.app.count_in("dashboard_audit", "1 = 1").await, 0);
    // With everything right, the same request cancels.
    let answer = post(vec![id_field, ("csrf", token)], Some(PASSWORD), None)
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 303);
    assert_eq!(
        db.app
            .count(&format!("id = {id} AND status = 'cancelled'"))
            .await,
        1
    );
    assert_eq!(
        db.app
            .count_in("dashboard_audit", "action = 'cancel' AND actor = 'ops'")
            .await,
        1
    );
    daemon.stop().await;

    // The default: read-only on loopback, no login, no action routes, no buttons.
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let addr = daemon.dashboard.unwrap();
    let page = http
        .get(format!("http://{addr}/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(!page.text().await.unwrap().contains("name=\"csrf\""));
    let answer = http
        .post(format!("http://{addr}/actions/cancel"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("id={id}"))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(answer.status().as_u16(), 403..=405),
        "{}",
        answer.status()
    );
    assert_eq!(
        db.app
            .count(&format!("id = {id} AND status = 'cancelled'"))
            .await,
        1
    );
    daemon.stop().await;
}
on_both_backends!(actions_are_guarded);

/// Eight operators send the same failed row again at once: one new row, the others told so.
async fn a_row_is_sent_again_once_however_many_click(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(Default::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data)
             VALUES ('o_unfollowed_05', 'TNOTICE', '{\"first\":\"x\"}')",
        )
        .await
        .unwrap();
    db.app.wait_settled(Duration::from_secs(30)).await;
    let id = id_of(&db, "o_unfollowed_05").await;
    let store = migrated_store(&db).await;
    let clicks = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let audit = AuditEntry {
                actor: format!("operator {i}"),
                action: "resend",
                ..AuditEntry::default()
            };
            store
                .resend_row(id, audit, chrono::Utc::now())
                .await
                .unwrap()
        })
    });
    let mut created = Vec::new();
    let mut told = Vec::new();
    for click in clicks.collect::<Vec<_>>() {
        match click.await.unwrap() {
            Resend::Created(new) => created.push(new),
            Resend::AlreadyResent(new) => told.push(new),
            Resend::NotEligible => panic!("a failed row is eligible"),
        }
    }
    assert_eq!(created.len(), 1, "{created:?} {told:?}");
    assert!(told.iter().all(|new| *new == created[0]), "{told:?}");
    assert_eq!(db.app.count("touser = 'o_unfollowed_05'").await, 2);
    assert_eq!(
        db.app
            .count_in("dashboard_audit", "action = 'resend'")
            .await,
        1
    );
    // A row WeChat accepted is never sent again.
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data)
             VALUES ('oSentRow0001', 'TNOTICE', '{\"first\":\"x\"}')",
        )
        .await
        .unwrap();
    db.app.wait_settled(Duration::from_secs(30)).await;
    let sent = id_of(&db, "oSentRow0001").await;
    let audit = AuditEntry {
        actor: "ops".into(),
        action: "resend",
        ..AuditEntry::default()
    };
    let again = store.resend_row(sent, audit, chrono::Utc::now()).await;
    assert_eq!(again.unwrap(), Resend::NotEligible);
    assert_eq!(db.app.count("touser = 'oSentRow0001'").await, 1);
    store.close().await;
    daemon.stop().await;
}
on_both_backends!(a_row_is_sent_again_once_however_many_click);

/// A cancel by filter takes the rows counted on the confirm page and none inserted since, and
/// only waiting rows.
async fn a_cancel_by_filter_takes_only_what_was_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = migrated_store(&db).await;
    let later = db.app.now_plus(3600);
    let insert = |touser: &'static str, template: &'static str| {
        let later = later.clone();
        let db = &db;
        async move {
            db.app
                .exec(&format!(
                    "INSERT INTO outbox (touser, template_id, data, send_after)
                     VALUES ('{touser}', '{template}', '{{\"first\":\"x\"}}', {later})"
                ))
                .await
                .unwrap()
        }
    };
    for touser in ["oBulk00001", "oBulk00002", "oBulk00003"] {
        insert(touser, "TBULK").await;
    }
    insert("oOther0001", "TOTHER").await;
    db.app
        .exec("UPDATE outbox SET status = 'failed' WHERE touser = 'oBulk00003'")
        .await
        .unwrap();
    let filter = MessageFilter {
        template_id: Some("TBULK".into()),
        ..MessageFilter::default()
    };
    let up_to = store.newest_id().await.unwrap();
    assert_eq!(store.count_cancellable(&filter, up_to).await.unwrap(), 2);
    insert("oBulk00004", "TBULK").await;
    let audit = AuditEntry {
        actor: "ops".into(),
        action: "cancel_matching",
        ..AuditEntry::default()
    };
    let cancelled = store
        .cancel_rows(
            &filter,
            None,
            up_to,
            "cancelled by a test",
            audit,
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(cancelled, 2);
    assert_eq!(db.app.count("status = 'cancelled'").await, 2);
    assert_eq!(
        db.app
            .count("status = 'pending' AND touser IN ('oBulk00004', 'oOther0001')")
            .await,
        2,
        "a later row and another template's row wait on"
    );
    assert_eq!(
        db.app
            .count("touser = 'oBulk00003' AND status = 'failed'")
            .await,
        1
    );
    assert_eq!(
        db.app
            .count("status = 'cancelled' AND last_error = 'cancelled by a test'")
            .await,
        2
    );
    assert_eq!(
        db.app
            .count_in(
                "dashboard_audit",
                "action = 'cancel_matching' AND row_count = 2"
            )
            .await,
        1
    );
    store.close().await;
}
on_both_backends!(a_cancel_by_filter_takes_only_what_was_counted);

/// `wechat-outbox dashboard` serves the pages alone, sending nothing, and refuses to start
/// with actions on and no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_command_serves_without_sending() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(Default::default()).await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let toml = db.config_toml(
        &sim.url(),
        &format!("[dashboard]\nlisten = \"127.0.0.1:{port}\""),
    );
    let mut refused = crate::helpers::Process::start(
        &db.config_toml(&sim.url(), "[dashboard]\nactions = true"),
        &["dashboard"],
    );
    assert!(!refused.wait_exit(Duration::from_secs(30)).await.success());
    assert!(
        refused.stderr().contains("dashboard.password_file"),
        "{}",
        refused.stderr()
    );
    let mut process = crate::helpers::Process::start(&toml, &["dashboard"]);
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oAlone00001', 'TNOTICE', '{\"first\":\"x\"}')")
        .await
        .ok();
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        match http
            .get(format!("http://127.0.0.1:{port}/messages"))
            .send()
            .await
        {
            Ok(page) => break page.text().await.unwrap(),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no dashboard: {e}; {}", process.stderr()),
        }
    };
    assert!(page.contains("oAlone00001"), "{page}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.app.count("status = 'pending'").await,
        1,
        "nothing is sent"
    );
    assert_eq!(sim.sim.stats().send_requests, 0);
    process.signal("TERM");
    assert!(process.wait_exit(Duration::from_secs(30)).await.success());
}

/// Rows built to hurt the pages (values of 1 MB, held rows with such template ids, on SQLite
/// text that is not UTF-8) leave every page whole and small; a login attempt storm does not lock
/// the operator out; a no-op cancel writes no audit.
async fn hostile_rows_and_clients_fail_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = daemon_with_actions(&db, &sim, &dir).await;
    let addr = daemon.dashboard.unwrap();
    // Postgres refuses an index entry over 8 KB (outbox_held_for indexes held rows' template
    // ids): its rows get what it admits.
    let huge = "<".repeat(if backend == Backend::Sqlite {
        1_000_000
    } else {
        6_000
    });
    let later = db.app.now_plus(3600);
    for i in 0..5 {
        db.app
            .exec(&format!(
                "INSERT INTO outbox (account, touser, template_id, data, status, held_for, send_after)
                 VALUES ('{huge}{i}', 'oHuge{i:05}', '{huge}{i}', '{{}}', 'held', 'template', {later})"
            ))
            .await
            .unwrap();
    }
    if backend == Backend::Sqlite {
        db.app
            .exec(&format!(
                "INSERT INTO outbox (account, touser, template_id, data, send_after)
                 VALUES (CAST(x'ff6163c3' AS TEXT), 'oBadUtf8001', CAST(x'c328' AS TEXT), '{{}}', {later});
                 INSERT INTO outbox (account, touser, template_id, data, status, updated_at)
                 VALUES (CAST(x'ff41' AS TEXT), 'oBadUtf8002', 'T', '{{}}', 'cancelled',
                         strftime('%Y-%m-%d %H:%M:%f', 'now'));
                 INSERT INTO templates (account, template_id, in_use)
                 VALUES ('default', CAST(x'ff3c62' AS TEXT), 1)"
            ))
            .await
            .unwrap();
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/", "/held", "/messages", "/errors", "/templates", "/audit"] {
        let page = http
            .get(format!("http://{addr}{path}"))
            .basic_auth("ops", Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "{path}");
        let body = page.text().await.unwrap();
        assert!(body.len() < 300_000, "{path}: {} bytes", body.len());
        assert!(!body.contains("could not be read"), "{path}: figures read");
        assert!(
            !body.contains("name=\"template_id\" value=\"\u{fffd}"),
            "{path}: a template id read lossily is not acted on"
        );
    }
    // The same rows leave /metrics whole (it reads the same counts).
    let metrics = http
        .get(format!("http://{}/metrics", daemon.monitor))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("held"));
    // Twenty-five wrong logins from one client: it is refused for a while, even with the right
    // password (not compared); the operator on another address logs in.
    for _ in 0..25 {
        http.get(format!("http://{addr}/"))
            .basic_auth("ops", Some("guess"))
            .send()
            .await
            .unwrap();
    }
    let status = |client: reqwest::Client, password: &'static str| {
        let url = format!("http://{addr}/");
        async move {
            let answer = client
                .get(url)
                .basic_auth("ops", Some(password))
                .send()
                .await;
            answer.unwrap().status().as_u16()
        }
    };
    assert_eq!(status(http.clone(), "guess").await, 429);
    assert_eq!(status(http.clone(), PASSWORD).await, 429);
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    assert_eq!(
        status(elsewhere.clone(), PASSWORD).await,
        200,
        "not locked out"
    );
    // Cancelling a row that is not waiting changes nothing and audits nothing.
    let page = elsewhere
        .get(format!("http://{addr}/messages"))
        .basic_auth("ops", Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("name=\"csrf\""), "the list has no forms");
    let one = elsewhere
        .get(format!("http://{addr}/cancel"))
        .basic_auth("ops", Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = one
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let answer = elsewhere
        .post(format!("http://{addr}/actions/cancel"))
        .basic_auth("ops", Some(PASSWORD))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("id=999999&csrf={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 409);
    assert_eq!(db.app.count_in("dashboard_audit", "1 = 1").await, 0);
    daemon.stop().await;

    // Read-only and open: only requests naming the machine by address or as localhost.
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let addr = daemon.dashboard.unwrap();
    let rebound = http
        .get(format!("http://{addr}/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 421);
    let local = http
        .get(format!("http://{addr}/"))
        .header("host", format!("localhost:{}", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), 200);
    daemon.stop().await;
}
on_both_backends!(hostile_rows_and_clients_fail_alone);

/// An attempt that may have reached WeChat is logged in doubt, and a row with one is never
/// sent again from the dashboard, even if a later outcome cleared the row's own doubt.
async fn a_row_once_in_doubt_is_never_sent_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(wechat_outbox::simulator::SimSettings {
        faults: wechat_outbox::simulator::Faults {
            hang_rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[api]\ntimeout_ms = 300\n[workers]\nlease_secs = 2",
    ))
    .await;
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oDoubt00001', 'TNOTICE', '{\"first\":\"x\"}')")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while db.app.count_in("outbox_attempts", "in_doubt").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt logged in doubt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    let id = id_of(&db, "oDoubt00001").await;
    // As a later permanent failure leaves it: failed, its own doubt cleared.
    db.app
        .exec(&format!(
            "UPDATE outbox SET status = 'failed', in_doubt = false, in_doubt_since = NULL,
                    sent_at = NULL, msgid = NULL WHERE id = {id}"
        ))
        .await
        .unwrap();
    let store = migrated_store(&db).await;
    let audit = AuditEntry {
        actor: "ops".into(),
        action: "resend",
        ..AuditEntry::default()
    };
    let again = store
        .resend_row(id, audit, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(again, Resend::NotEligible);
    assert_eq!(db.app.count("touser = 'oDoubt00001'").await, 1);
    store.close().await;
}
on_both_backends!(a_row_once_in_doubt_is_never_sent_again);

/// Retention prunes the attempts log whole, however many batches it takes.
async fn old_attempts_are_pruned_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = migrated_store(&db).await;
    let old = chrono::Utc::now() - chrono::Duration::days(400);
    let attempts: Vec<AttemptLog> = (0..2_500)
        .map(|i| AttemptLog {
            outbox_id: i,
            at: old,
            status: "pending",
            errcode: Some(-1),
            error: Some("system busy"),
            in_doubt: false,
        })
        .collect();
    store.log_attempts(&attempts).await.unwrap();
    let recent = AttemptLog {
        at: chrono::Utc::now(),
        outbox_id: 9_999,
        ..attempts[0].clone()
    };
    store.log_attempts(&[recent]).await.unwrap();
    assert_eq!(db.app.count_in("outbox_attempts", "1 = 1").await, 2_501);
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    store.prune(cutoff, 1_000).await.unwrap();
    assert_eq!(
        db.app.count_in("outbox_attempts", "1 = 1").await,
        1,
        "the recent one stays"
    );
    store.close().await;
}
on_both_backends!(old_attempts_are_pruned_whole);
