//! The report views return the right figures for a fixture with known counts, on both
//! backends, through `wechat-outbox report NAME --format json`.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{AppDb, Backend, Process, TestDb};
use crate::on_both_backends;

/// Ten rows of TA in every state, inserted three hours ago with known seconds from insert to
/// sent and from sent to delivered, and two TB rows inserted and sent just now.
async fn insert_fixture(app: &AppDb) {
    let at = |seconds_from_insert: i64| app.now_plus(-3 * 3600 + seconds_from_insert);
    let created = at(0);
    // template, touser, status, sent_at, delivered_at, last_errcode, last_error, next_attempt_at, lease_expires_at
    let row = |t: &str,
               user: String,
               status: &str,
               sent: String,
               delivered: String,
               errcode: &str,
               error: &str,
               next: String,
               lease: String| {
        format!(
            "('{t}', '{user}', '{status}', {created}, {sent}, {delivered}, {errcode}, {error}, {next}, {lease})"
        )
    };
    let null = || "NULL".to_string();
    let mut rows = Vec::new();
    for (i, (status, to_sent, to_delivered)) in [
        ("delivered", 1, 10),
        ("delivered", 2, 20),
        ("delivered", 3, 30),
        ("blocked", 4, 40),
        ("undelivered", 5, 50),
    ]
    .into_iter()
    .enumerate()
    {
        rows.push(row(
            "TA",
            format!("oR{i}"),
            status,
            at(to_sent),
            at(to_sent + to_delivered),
            "NULL",
            "NULL",
            created.clone(),
            null(),
        ));
    }
    rows.push(row(
        "TA",
        "oR5".into(),
        "sent",
        at(3600),
        null(),
        "NULL",
        "NULL",
        created.clone(),
        null(),
    ));
    for i in 6..8 {
        rows.push(row(
            "TA",
            format!("oR{i}"),
            "failed",
            null(),
            null(),
            "40003",
            "'errcode 40003: invalid openid'",
            created.clone(),
            null(),
        ));
    }
    rows.push(row(
        "TA",
        "oR8".into(),
        "pending",
        null(),
        null(),
        "NULL",
        "NULL",
        at(60),
        null(),
    ));
    rows.push(row(
        "TA",
        "oR9".into(),
        "sending",
        null(),
        null(),
        "NULL",
        "NULL",
        created.clone(),
        at(120),
    ));
    app.exec(&format!(
        "INSERT INTO outbox (template_id, touser, status, created_at, sent_at, delivered_at, last_errcode, last_error, next_attempt_at, lease_expires_at) VALUES {}",
        rows.join(",")
    ))
    .await
    .unwrap();
    // Sent rows have WeChat's msgid (report_stuck passes over those without one: no event can
    // join them).
    app.exec("UPDATE outbox SET msgid = 5000000000 + id WHERE sent_at IS NOT NULL")
        .await
        .unwrap();
    let (just_now, a_second_later) = (app.now_plus(-2), app.now_plus(-1));
    app.exec(&format!(
        "INSERT INTO outbox (template_id, touser, status, created_at, sent_at) VALUES ('TB', 'oS0', 'sent', {just_now}, {a_second_later}), ('TB', 'oS1', 'sent', {just_now}, {a_second_later})"
    ))
    .await
    .unwrap();
}

async fn report(db: &TestDb, name: &str) -> Vec<Value> {
    let mut process = Process::start(
        &db.config_toml("http://127.0.0.1:9", ""),
        &["report", name, "--format", "json"],
    );
    assert_eq!(
        process.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        process.stderr()
    );
    serde_json::from_str::<Value>(&process.stdout())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn pick<'a>(rows: &'a [Value], key: &str, value: &str) -> &'a Value {
    rows.iter()
        .find(|r| r[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value} in {rows:#?}"))
}

fn close(value: &Value, expected: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - expected).abs() < 0.01)
}

async fn the_reports_count_a_known_fixture(backend: Backend) {
    let db = TestDb::new(backend).await;
    insert_fixture(&db.app).await;

    let status = report(&db, "status").await;
    let count = |template: &str, status_name: &str| {
        status
            .iter()
            .find(|r| r["template_id"] == template && r["status"] == status_name)
            .map(|r| r["row_count"].as_i64().unwrap())
    };
    assert_eq!(
        [
            count("TA", "delivered"),
            count("TA", "blocked"),
            count("TA", "undelivered"),
            count("TA", "failed"),
            count("TA", "pending"),
            count("TA", "sending"),
            count("TA", "sent"),
            count("TB", "sent")
        ],
        [
            Some(3),
            Some(1),
            Some(1),
            Some(2),
            Some(1),
            Some(1),
            Some(1),
            Some(2)
        ]
    );

    let daily = report(&db, "daily").await;
    let ta = pick(&daily, "template_id", "TA");
    let beijing_day = (chrono::Utc::now() - chrono::Duration::hours(3)
        + chrono::Duration::hours(8))
    .format("%Y-%m-%d")
    .to_string();
    assert_eq!(ta["day"], beijing_day.as_str());
    assert_eq!(
        [
            &ta["queued"],
            &ta["sent"],
            &ta["delivered"],
            &ta["blocked"],
            &ta["undelivered"],
            &ta["failed"]
        ],
        [10, 6, 3, 1, 1, 2]
    );
    assert!(close(&ta["delivery_rate"], 0.6), "{ta}");
    assert_eq!(
        pick(&daily, "template_id", "TB")["delivery_rate"],
        Value::Null
    );

    let errors = report(&db, "errors").await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!([&errors[0]["errcode"], &errors[0]["row_count"]], [40003, 2]);
    assert_eq!(errors[0]["error"], "errcode 40003: invalid openid");

    let stuck = report(&db, "stuck").await;
    let mut why: Vec<&str> = stuck.iter().map(|r| r["why"].as_str().unwrap()).collect();
    why.sort();
    assert_eq!(
        why,
        [
            "pending 5 minutes past next_attempt_at",
            "sending past its lease",
            "sent over an hour ago without a delivery event"
        ]
    );

    let latency = report(&db, "latency").await;
    let ta = pick(&latency, "template_id", "TA");
    assert_eq!([&ta["sent_rows"], &ta["delivered_rows"]], [6, 5]);
    for (key, expected) in [
        ("mean_to_sent_secs", 602.5),
        ("p50_to_sent_secs", 3.0),
        ("p95_to_sent_secs", 3600.0),
        ("mean_to_delivered_secs", 30.0),
        ("p50_to_delivered_secs", 30.0),
        ("p95_to_delivered_secs", 50.0),
    ] {
        assert!(
            close(&ta[key], expected),
            "{key}: {} expected {expected}",
            ta[key]
        );
    }
    let tb = pick(&latency, "template_id", "TB");
    assert!(
        close(&tb["p50_to_sent_secs"], 1.0) && tb["p50_to_delivered_secs"].is_null(),
        "{tb}"
    );

    let mut unknown = Process::start(
        &db.config_toml("http://127.0.0.1:9", ""),
        &["report", "nonsense"],
    );
    assert_eq!(
        unknown.wait_exit(Duration::from_secs(20)).await.code(),
        Some(1)
    );
    assert!(
        unknown
            .stderr()
            .contains("the reports are: status, quota, daily, errors, latency, stuck")
    );
}
on_both_backends!(the_reports_count_a_known_fixture);

/// The date on which a month's pace exhausts `limit`, as report_quota computes it: the month's
/// start plus the elapsed part of the month times limit / used; None if after the month.
fn exhausted_on(now: chrono::DateTime<chrono::Utc>, used: i64, limit: i64) -> Option<String> {
    use chrono::{Datelike, NaiveDate};
    let local = now.with_timezone(&chrono_tz::Asia::Shanghai).naive_local();
    let start = NaiveDate::from_ymd_opt(local.year(), local.month(), 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap();
    let end = start.checked_add_months(chrono::Months::new(1)).unwrap();
    let elapsed = (local - start).num_milliseconds() as f64;
    let at = start + chrono::Duration::milliseconds((elapsed * limit as f64 / used as f64) as i64);
    (at < end).then(|| at.format("%Y-%m-%d").to_string())
}

/// report_quota: this month per template and today per account against the limits the daemon
/// recorded, with the day the month's pace runs out.
async fn report_quota_shows_use_limit_and_pace(backend: Backend) {
    let db = TestDb::new(backend).await;
    let now = chrono::Utc::now();
    let p = wechat_outbox::domain::quota::periods(now, chrono_tz::Asia::Shanghai);
    let earlier = wechat_outbox::domain::quota::periods(
        now - chrono::Duration::days(40),
        chrono_tz::Asia::Shanghai,
    );
    let yes = if backend == Backend::Sqlite {
        "1"
    } else {
        "true"
    };
    let no = if backend == Backend::Sqlite {
        "0"
    } else {
        "false"
    };
    let at = db.app.now_plus(0);
    db.app
        .exec(&format!(
            "INSERT INTO account_limits (account, active_templates, monthly_per_template,
                 daily_per_account, rate_per_second, timezone, utc_offset_minutes, updated_at)
             VALUES ('shop', 10, 1000, 500, 20, 'Asia/Shanghai', 480, {at}),
                    ('idle', 10, 10, 5, 20, 'Asia/Shanghai', 480, {at});
             INSERT INTO templates (account, template_id, in_use) VALUES
                 ('shop', 'TA', {yes}), ('shop', 'TB', {yes}), ('shop', 'TC', {no}),
                 ('shop', 'TD', {no}), ('other', 'TX', {yes});
             INSERT INTO quota_usage (account, scope, period, used) VALUES
                 ('shop', 'template:TA', '{month}', 1000),
                 ('shop', 'template:TB', '{month}', 950),
                 ('shop', 'template:TC', '{month}', 3),
                 ('shop', 'template:TC', '{old_month}', 7),
                 ('shop', 'template:TD', '{old_month}', 9),
                 ('shop', 'account', '{day}', 120),
                 ('shop', 'account', '{old_day}', 999);",
            month = p.month,
            day = p.day,
            old_month = earlier.month,
            old_day = earlier.day,
        ))
        .await
        .unwrap();

    let rows = report(&db, "quota").await;
    let row = |account: &str, template: Option<&str>| {
        rows.iter()
            .find(|r| r["account"] == account && r["template_id"].as_str() == template)
            .unwrap_or_else(|| panic!("no row for {account} {template:?} in {rows:#?}"))
    };
    assert_eq!(
        rows.len(),
        4,
        "TA, TB, TC of shop and one row for idle: {rows:#?}"
    );
    for (template, used, remaining) in [("TA", 1000, 0), ("TB", 950, 50), ("TC", 3, 997)] {
        let r = row("shop", Some(template));
        assert_eq!(r["month"], p.month.as_str());
        assert_eq!(r["month_used"], used, "{template}");
        assert_eq!(r["month_limit"], 1000);
        assert_eq!(r["month_remaining"], remaining, "{template}");
        assert_eq!(
            r["month_exhausted_on"].as_str().map(str::to_string),
            exhausted_on(now, used, 1000),
            "{template}"
        );
        assert_eq!(r["day"], p.day.as_str());
        assert_eq!(
            (&r["day_used"], &r["day_limit"], &r["day_remaining"]),
            (&120.into(), &500.into(), &380.into())
        );
    }
    // At the limit, the month ran out today.
    assert_eq!(
        row("shop", Some("TA"))["month_exhausted_on"],
        p.day.as_str()
    );
    let idle = row("idle", None);
    assert_eq!(
        (
            &idle["month_used"],
            &idle["month_exhausted_on"],
            &idle["day_remaining"]
        ),
        (&0.into(), &Value::Null, &5.into())
    );
}
on_both_backends!(report_quota_shows_use_limit_and_pace);

/// Pruning removes exactly what is old and terminal, and nothing else, in batches.
async fn pruning_removes_exactly_the_old_terminal_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (old, recent) = (db.app.now_plus(-100 * 86400), db.app.now_plus(-86400));
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
    let waiting = ["pending", "sending", "held"];
    let mut rows = Vec::new();
    for (i, status) in terminal.iter().chain(waiting.iter()).enumerate() {
        rows.push(format!("('oOld{i:04}', 'T', '{{}}', '{status}', {old})"));
        rows.push(format!("('oNew{i:04}', 'T', '{{}}', '{status}', {recent})"));
    }
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, updated_at) VALUES {}",
            rows.join(",")
        ))
        .await
        .unwrap();
    let event = |i: usize, when: &str| format!("('default', 'k{i}', 'event', '<xml/>', {when})");
    let events: Vec<String> = (0..5)
        .map(|i| event(i, &old))
        .chain((5..8).map(|i| event(i, &recent)))
        .collect();
    db.app.exec(&format!("INSERT INTO inbound_events (account, dedup_key, msg_type, raw_xml, received_at) VALUES {}", events.join(","))).await.unwrap();

    let config = db.config_toml(
        "http://127.0.0.1:9",
        "[retention]\nkeep_days = 90\nbatch_size = 2",
    );
    let mut prune = Process::start(&config, &["prune"]);
    assert_eq!(
        prune.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        prune.stderr()
    );
    assert!(
        prune
            .stdout()
            .contains("deleted 8 rows and 5 pushes older than 90 days"),
        "{}",
        prune.stdout()
    );

    assert_eq!(
        db.app.count("touser LIKE 'oOld%'").await,
        waiting.len() as i64,
        "old waiting rows stay"
    );
    assert_eq!(
        db.app
            .count("touser LIKE 'oOld%' AND status IN ('pending', 'sending', 'held')")
            .await,
        3
    );
    assert_eq!(
        db.app.count("touser LIKE 'oNew%'").await,
        (terminal.len() + waiting.len()) as i64,
        "recent rows stay"
    );
    assert_eq!(db.app.count_in("inbound_events", "1 = 1").await, 3);
}
on_both_backends!(pruning_removes_exactly_the_old_terminal_rows);

/// `report status` and `report errors` used to panic on any cell over 65,535 characters (fmt
/// width). A row whose account and last_error are 100,000 characters, the error holding a
/// newline and an ESC: the table prints each cut and on one line, json prints it whole.
async fn reports_print_cells_of_100_000_characters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let account = "a".repeat(100_000);
    let error = format!("line1\nforged{}[31m{}", '\u{1b}', "e".repeat(100_000));
    let chr = if backend == Backend::Sqlite {
        "char"
    } else {
        "chr"
    };
    let sql_error = error
        .replace('\n', &format!("' || {chr}(10) || '"))
        .replace('\u{1b}', &format!("' || {chr}(27) || '"));
    db.app
        .exec(&format!(
            "INSERT INTO outbox (account, touser, template_id, data, status, last_errcode, last_error)
             VALUES ('{account}', 'oLong', 'T', '{{}}', 'failed', 40003, '{sql_error}')"
        ))
        .await
        .unwrap();
    for name in ["status", "errors", "daily"] {
        let mut process = Process::start(
            &db.config_toml("http://127.0.0.1:9", ""),
            &["report", name, "--format", "table"],
        );
        let exit = process.wait_exit(Duration::from_secs(20)).await.code();
        assert_eq!(exit, Some(0), "report {name}: {}", process.stderr());
        let table = process.stdout();
        assert_eq!(
            table.lines().count(),
            2,
            "report {name}: header and one row"
        );
        assert!(table.contains('…'), "report {name} cut nothing");
        assert!(!table.contains('\u{1b}'), "report {name} printed a raw ESC");
        assert!(
            table.lines().all(|l| l.chars().count() < 1_000),
            "report {name}: a line of {} chars",
            table.lines().map(|l| l.chars().count()).max().unwrap_or(0)
        );
    }
    assert!(
        report(&db, "status").await[0]["account"] == Value::String(account),
        "json keeps the account whole"
    );
    let errors = report(&db, "errors").await;
    assert_eq!(
        errors[0]["error"],
        Value::String(error),
        "json keeps the error whole"
    );
}
on_both_backends!(reports_print_cells_of_100_000_characters);
