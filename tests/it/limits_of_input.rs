//! Bad input from apps: each malformed row fails with a reason that names the problem, without
//! a call to WeChat, and the good rows around it are sent.

use std::time::Duration;

use wechat_outbox::simulator::SimSettings;

use crate::helpers::{AppDb, Backend, Daemon, Sim, TestDb};
use crate::on_both_backends;

async fn each_malformed_row_fails_with_a_reason(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let huge = "x".repeat(70_000);
    let cases: Vec<(String, &str)> = vec![
        (
            "('default', 'oBad000001', 'T', '{\"a\": broken')".into(),
            "data is not valid JSON",
        ),
        (
            "('default', 'oBad000002', 'T', '[\"not\",\"an\",\"object\"]')".into(),
            "data must be a JSON object",
        ),
        (
            "('default', 'oBad000003', 'T', NULL)".into(),
            "data is missing",
        ),
        ("('default', NULL, 'T', '{}')".into(), "touser is missing"),
        ("('default', '', 'T', '{}')".into(), "touser is empty"),
        (
            "('default', 'oBad000004', NULL, '{}')".into(),
            "template_id is missing",
        ),
        (
            "('nobody', 'oBad000005', 'T', '{}')".into(),
            "account \"nobody\" is not configured",
        ),
        (
            format!("('default', 'oBad000006', 'T', '{{\"a\":\"{huge}\"}}')"),
            "data is larger than",
        ),
        (
            format!("('default', '{}', 'T', '{{}}')", "o".repeat(300)),
            "touser is longer than",
        ),
        (
            "('default', 'oBad000007', 'T', '{\"a\":{\"colour\":\"red\",\"value\":\"v\"}}')".into(),
            "unknown field \"colour\"",
        ),
    ];
    let mut values = Vec::new();
    for (i, (row, _)) in cases.iter().enumerate() {
        values.push(format!("('default', 'oGood{i:05}', 'T', '{{}}')"));
        values.push(row.clone());
    }
    db.app
        .exec(&format!(
            "INSERT INTO outbox (account, touser, template_id, data) VALUES {}",
            values.join(",")
        ))
        .await
        .unwrap();
    db.app.exec("INSERT INTO outbox (touser, template_id, data, url) VALUES ('oBad000008', 'T', '{}', 'javascript:alert(1)')").await.unwrap();
    db.app.exec("INSERT INTO outbox (touser, template_id, data, miniprogram) VALUES ('oBad000009', 'T', '{}', '{\"pagepath\":\"p\"}')").await.unwrap();

    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    let good: Vec<_> = rows
        .iter()
        .filter(|r| r.touser.as_deref().is_some_and(|t| t.starts_with("oGood")))
        .collect();
    assert_eq!(good.len(), cases.len());
    assert!(
        good.iter().all(|r| r.status == "sent"),
        "good rows flow: {good:#?}"
    );
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| !r.touser.as_deref().is_some_and(|t| t.starts_with("oGood")))
        .collect();
    let mut expected: Vec<&str> = cases.iter().map(|(_, reason)| *reason).collect();
    expected.extend(["url must start with http", "miniprogram.appid is missing"]);
    assert_eq!(bad.len(), expected.len());
    for (row, reason) in bad.iter().zip(expected) {
        assert_eq!(row.status, "failed", "{row:#?}");
        let error = row.last_error.as_deref().unwrap_or_default();
        assert!(error.contains(reason), "expected {reason:?}, got {error:?}");
        assert_eq!(row.last_errcode, None, "refused locally, not by WeChat");
    }
    assert_eq!(
        sim.sim.stats().send_requests as usize,
        cases.len(),
        "no call for a malformed row"
    );
}
on_both_backends!(each_malformed_row_fails_with_a_reason);

/// What the database itself refuses at insert, so the app sees the error at once.
async fn wrong_types_are_refused_at_insert(backend: Backend) {
    let db = TestDb::new(backend).await;
    for sql in [
        "INSERT INTO outbox (touser, template_id, data, priority) VALUES ('oX00000001', 'T', '{}', 'high')",
        "INSERT INTO outbox (touser, template_id, data, send_after) VALUES ('oX00000002', 'T', '{}', 'soon')",
        "INSERT INTO outbox (touser, template_id, data, status) VALUES ('oX00000003', 'T', '{}', 'shipped')",
        "INSERT INTO outbox (account, touser, template_id, data) VALUES (NULL, 'oX00000004', 'T', '{}')",
    ] {
        assert!(db.app.exec(sql).await.is_err(), "accepted: {sql}");
    }
    if backend == Backend::Sqlite {
        // A number in a TEXT column becomes text by affinity; a blob stays a blob.
        let blob = "INSERT INTO outbox (touser, template_id, data) VALUES (x'6f6b', 'T', '{}')";
        assert!(db.app.exec(blob).await.is_err());
    }
    assert_eq!(db.app.count("1 = 1").await, 0);
}
on_both_backends!(wrong_types_are_refused_at_insert);

/// SQLite lets text that is not UTF-8 in; the row fails, its neighbours are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_text_that_is_not_utf8_fails_only_its_row() {
    let db = TestDb::new(Backend::Sqlite).await;
    let sim = Sim::start(SimSettings::default()).await;
    db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oFine000001', 'T', '{}'), (CAST(x'6fff00fe' AS TEXT), 'T', '{}'), ('oFine000002', 'T', CAST(x'7b22613a22ff7d' AS TEXT))").await.unwrap();
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while db.app.count("status IN ('pending', 'sending')").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "rows still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    // Read back only the daemon's columns: the app's text here cannot be decoded as UTF-8.
    let AppDb::Sqlite(pool) = &db.app else {
        unreachable!()
    };
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, last_error FROM outbox ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows[0], ("sent".into(), None));
    assert_eq!(
        rows[1],
        ("failed".into(), Some("touser is not valid UTF-8".into()))
    );
    assert_eq!(
        rows[2],
        ("failed".into(), Some("data is not valid UTF-8".into()))
    );
}

/// WeChat's 2023 rules (`[templates] content_rules = "2023"`, the default): a keyword value of
/// more than 20 characters, or of more than one line, is sent as WeChat would show it (cut,
/// ending in `…`); `first` and `remark`, which WeChat no longer shows, go as they came.
async fn long_values_are_cut_to_what_wechat_shows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let long = "字".repeat(30);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES
             ('oCut000001', 'ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY',
              '{{\"first\":\"{long}\",\"keynote1\":\"{long}\",\"keynote2\":\"已发货\\n单号 123\",
                \"keynote3\":\"2026-12-03 09:00\",\"remark\":\"a\\nb\"}}')"
        ))
        .await
        .unwrap();
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    assert_eq!(rows[0].status, "sent", "{rows:#?}");
    let data = &sim.sim.deliveries()[0].data;
    assert_eq!(data["keynote1"]["value"], format!("{}…", "字".repeat(19)));
    assert_eq!(data["keynote2"]["value"], "已发货…");
    assert_eq!(data["keynote3"]["value"], "2026-12-03 09:00");
    assert_eq!(
        data["first"]["value"], long,
        "not shown by WeChat: sent as it came"
    );
    assert_eq!(data["remark"]["value"], "a\nb");
}
on_both_backends!(long_values_are_cut_to_what_wechat_shows);

/// With `overlong = "fail"` such a row fails before any quota or request is spent on it,
/// naming the parameter and the limit; the rows around it are sent. With `content_rules =
/// "2014"` nothing is checked.
async fn long_values_fail_their_row_when_asked_to(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES
             ('oLong00001', 'TLONG', '{{\"amount\":\"{}\"}}'),
             ('oLong00002', 'TLONG', '{{\"amount\":\"one\\ntwo\"}}'),
             ('oFine00001', 'TLONG', '{{\"amount\":\"39.8元\"}}')",
            "9".repeat(21)
        ))
        .await
        .unwrap();
    let daemon = Daemon::start(db.config(&sim.url(), "[templates]\noverlong = \"fail\"")).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    let by_user = |user: &str| {
        rows.iter()
            .find(|r| r.touser.as_deref() == Some(user))
            .unwrap()
    };
    let reason = |user: &str| by_user(user).last_error.clone().unwrap_or_default();
    assert_eq!(by_user("oLong00001").status, "failed");
    assert!(
        reason("oLong00001").contains("data.amount is 21 characters long"),
        "{rows:#?}"
    );
    assert!(reason("oLong00001").contains("at most 20"));
    assert_eq!(by_user("oLong00002").status, "failed");
    assert!(
        reason("oLong00002").contains("data.amount has a line break"),
        "{rows:#?}"
    );
    assert_eq!(by_user("oFine00001").status, "sent");
    assert_eq!(
        sim.sim.stats().send_requests,
        1,
        "no request for a failed row"
    );
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TLONG' AND used = 1")
            .await,
        1,
        "quota counted for the sent row only"
    );

    // The 2014 rules: the same values go out as they are.
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oLong00003', 'TLONG', '{\"amount\":\"one\\ntwo\"}')")
        .await
        .unwrap();
    let daemon = Daemon::start(db.config(
        &sim.url(),
        "[templates]\noverlong = \"fail\"\ncontent_rules = \"2014\"",
    ))
    .await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    let last = rows
        .iter()
        .find(|r| r.touser.as_deref() == Some("oLong00003"))
        .unwrap();
    assert_eq!(last.status, "sent", "{last:#?}");
    let sent = sim
        .sim
        .deliveries()
        .into_iter()
        .find(|d| d.touser == "oLong00003")
        .unwrap();
    assert_eq!(sent.data["amount"]["value"], "one\ntwo");
}
on_both_backends!(long_values_fail_their_row_when_asked_to);
