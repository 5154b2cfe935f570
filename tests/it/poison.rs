//! One bad input never stops the others (issue 14): values no program's clock holds, odd values
//! in the daemon's own columns, rows the daemon cannot read, events that cannot join, and quota
//! given back while rows wait. Each runs on both backends.

use std::time::Duration;

use wechat_outbox::simulator::SimSettings;

use crate::helpers::{Backend, Daemon, Process, Sim, TestDb};
use crate::limits::{insert_for_template, wait_for};
use crate::on_both_backends;

/// The error an app gets for `sql`, which must be refused.
async fn refused(db: &TestDb, sql: &str) -> String {
    match db.app.exec(sql).await {
        Ok(()) => panic!("accepted: {sql}"),
        Err(e) => e.to_string(),
    }
}

/// Times outside years 1-9999 (`infinity`, year 270000, an epoch number that far) are refused
/// at insert and update, with an error naming the column.
async fn times_out_of_range_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let insert = |column: &str, value: &str| {
        format!(
            "INSERT INTO outbox (touser, template_id, data, {column}) VALUES ('oT0000001', 'T', '{{}}', {value})"
        )
    };
    let values: &[&str] = match backend {
        Backend::Postgres => &["'infinity'", "'-infinity'", "'270000-01-01'"],
        Backend::Sqlite => &["'270000-01-01'", "1e15", "-1e15"],
    };
    for column in ["send_after", "expires_at"] {
        for value in values {
            let error = refused(&db, &insert(column, value)).await;
            assert!(error.contains(column), "{column} = {value}: {error}");
        }
    }
    db.app
        .exec(&insert("expires_at", "'2030-01-01'"))
        .await
        .unwrap();
    let error = refused(
        &db,
        &format!("UPDATE outbox SET send_after = {}", values[0]),
    )
    .await;
    assert!(error.contains("send_after"), "{error}");
    assert_eq!(db.app.count("1 = 1").await, 1);
}
on_both_backends!(times_out_of_range_are_refused);

/// The daemon's own columns hold only what the daemon writes: an app's `in_doubt = 'yes'` or
/// `attempts = 2^31` is refused, naming the column.
async fn odd_values_in_daemon_columns_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let insert = |column: &str, value: &str| {
        format!(
            "INSERT INTO outbox (touser, template_id, data, {column}) VALUES ('oT0000001', 'T', '{{}}', {value})"
        )
    };
    let mut cases = vec![
        ("attempts", "2147483647"),
        ("attempts", "-1"),
        ("next_attempt_at", "'infinity'"),
        ("in_doubt_since", "'infinity'"),
    ];
    if backend == Backend::Sqlite {
        cases.extend([
            ("attempts", "4294967296"),
            ("attempts", "'many'"),
            ("in_doubt", "'yes'"),
            ("in_doubt", "2"),
            ("in_doubt_since", "'yesterday'"),
            ("next_attempt_at", "'soon'"),
            ("quota_month", "x'00'"),
        ]);
    }
    for (column, value) in &cases {
        let error = refused(&db, &insert(column, value)).await;
        assert!(error.contains(column), "{column} = {value}: {error}");
    }
    db.app.exec(&insert("attempts", "0")).await.unwrap();
    let error = refused(&db, "UPDATE outbox SET attempts = 2147483647").await;
    assert!(error.contains("attempts"), "{error}");
    // SQLite checks a final row's values when it is put back in the queue; Postgres' CHECKs
    // hold for every row.
    let finish = "UPDATE outbox SET status = 'failed', attempts = 2000000";
    let error = match backend {
        Backend::Sqlite => {
            db.app.exec(finish).await.unwrap();
            refused(&db, "UPDATE outbox SET status = 'pending'").await
        }
        Backend::Postgres => refused(&db, finish).await,
    };
    assert!(error.contains("attempts"), "{error}");
    assert_eq!(db.app.count("1 = 1").await, 1);
}
on_both_backends!(odd_values_in_daemon_columns_are_refused);

/// Takes away the database's guards, as a database written before them (or by hand) may be.
pub async fn drop_guards(db: &TestDb) {
    let sql = match db.backend {
        Backend::Postgres => {
            "ALTER TABLE outbox DROP CONSTRAINT outbox_expires_at_in_range,
                 DROP CONSTRAINT outbox_in_doubt_since_in_range,
                 DROP CONSTRAINT outbox_attempts_in_range"
        }
        Backend::Sqlite => {
            "DROP TRIGGER outbox_daemon_columns_insert; DROP TRIGGER outbox_daemon_columns_update;
             DROP TRIGGER outbox_expires_at_valid_insert; DROP TRIGGER outbox_times_normalise_insert;"
        }
    };
    db.app.exec(sql).await.unwrap();
}

/// Rows the daemon cannot read, each among good rows of the same claim: each fails alone with
/// a reason naming its column, the good rows are sent, and the daemons keep running. Two
/// daemons share the table, as they would in production.
async fn an_unreadable_row_fails_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    drop_guards(&db).await;
    let poison: &[(&str, &str, &str)] = match backend {
        Backend::Postgres => &[
            ("expires_at", "'infinity'", "expires_at"),
            ("expires_at", "'270000-01-01'", "expires_at"),
            ("in_doubt_since", "'-infinity'", "in_doubt_since"),
            ("in_doubt_since", "'infinity'", "in_doubt_since"),
        ],
        Backend::Sqlite => &[
            ("in_doubt", "'yes'", "in_doubt"),
            ("in_doubt_since", "'garbage'", "in_doubt_since"),
            ("expires_at", "'not a time'", "expires_at"),
            ("quota_month", "x'00ff'", "quota_month"),
        ],
    };
    let mut values = Vec::new();
    for (i, (column, value, _)) in poison.iter().enumerate() {
        values.push(format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES ('oGoodA{i:04}', 'T', '{{}}');
             INSERT INTO outbox (touser, template_id, data, {column}) VALUES ('oPoison{i:04}', 'T', '{{}}', {value});
             INSERT INTO outbox (touser, template_id, data) VALUES ('oGoodB{i:04}', 'T', '{{}}');"
        ));
    }
    db.app.exec(&values.concat()).await.unwrap();
    let first = Daemon::start(db.config(&sim.url(), "")).await;
    let second = Daemon::start(db.config(&sim.url(), "")).await;
    let rows = db.app.wait_settled(Duration::from_secs(30)).await;
    for daemon in [&first, &second] {
        let health = reqwest::get(format!("http://{}/healthz", daemon.monitor))
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "the daemons keep running");
    }
    first.stop().await;
    second.stop().await;
    for row in &rows {
        let touser = row.touser.as_deref().unwrap_or_default();
        if let Some(i) = touser.strip_prefix("oPoison") {
            let (_, _, named) = poison[i.parse::<usize>().unwrap()];
            let error = row.last_error.as_deref().unwrap_or_default();
            assert_eq!(row.status, "failed", "{row:#?}");
            assert!(error.contains(named), "expected {named}: {error}");
            assert!(error.len() < 600, "bounded: {error}");
        } else {
            assert_eq!(row.status, "sent", "{row:#?}");
        }
    }
    assert_eq!(sim.sim.stats().send_requests as usize, poison.len() * 2);
}
on_both_backends!(an_unreadable_row_fails_alone);

/// A database that makes every claim fail (here a trigger standing for any such fault) turns
/// `/healthz` unhealthy with the reason, and healthy again once claims succeed.
async fn healthz_fails_while_claims_keep_failing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let (break_claims, mend) = match backend {
        Backend::Postgres => (
            "CREATE FUNCTION refuse_claims() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'claims refused by the test'; END $$;
             CREATE TRIGGER refuse_claims BEFORE UPDATE OF lease_owner ON outbox
                 FOR EACH ROW EXECUTE FUNCTION refuse_claims();",
            "DROP TRIGGER refuse_claims ON outbox",
        ),
        Backend::Sqlite => (
            "CREATE TRIGGER refuse_claims BEFORE UPDATE OF lease_owner ON outbox
             BEGIN SELECT RAISE(ABORT, 'claims refused by the test'); END;",
            "DROP TRIGGER refuse_claims",
        ),
    };
    db.app.exec(break_claims).await.unwrap();
    db.app.insert_good(3, "h").await;
    let daemon = Daemon::start(db.config(&sim.url(), "[monitor]\nfailing_after_secs = 1")).await;
    let healthz = format!("http://{}/healthz", daemon.monitor);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        let response = reqwest::get(&healthz).await.unwrap();
        if response.status() == 503 {
            break response.text().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("claims have failed"), "{body}");
    db.app.exec(mend).await.unwrap();
    db.app.wait_settled(Duration::from_secs(20)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while reqwest::get(&healthz).await.unwrap().status() != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz stayed 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    assert_eq!(db.app.count("status = 'sent'").await, 3);
}
on_both_backends!(healthz_fails_while_claims_keep_failing);

/// Two sent rows, and delivery events stored for them as the callback would store them.
async fn sent_rows_with_events(db: &TestDb, events: &[(&str, i64, &str, i64)]) {
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data, status, msgid) VALUES
                 ('oUserA0001', 'T', '{}', 'sent', 1001), ('oUserB0001', 'T', '{}', 'sent', 1002),
                 ('oUserC0001', 'T', '{}', 'sent', 1003)",
        )
        .await
        .unwrap();
    for (i, (from_user, msgid, status, create_time)) in events.iter().enumerate() {
        db.app
            .exec(&format!(
                "INSERT INTO inbound_events (account, dedup_key, msg_type, event, from_user,
                     create_time, msgid, status, raw_xml)
                 VALUES ('default', 'k{i}', 'event', 'TEMPLATESENDJOBFINISH', '{from_user}',
                     {create_time}, {msgid}, '{status}', '<xml/>')"
            ))
            .await
            .unwrap();
    }
}

/// The join matches msgid **and** openid: an event whose FromUserName is not the row's touser
/// leaves the row as it was, is given up on with a reason, and is counted in `/metrics`. An
/// event time no clock holds (CreateTime 2^63-1) still joins, at the time of the join.
async fn events_join_their_own_row_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    sent_rows_with_events(
        &db,
        &[
            ("oUserA0001", 1001, "success", 1_764_000_000),
            ("oForger001", 1002, "failed:user block", 1_764_000_000),
            ("oUserC0001", 1003, "success", i64::MAX),
        ],
    )
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    wait_for(
        &db,
        "inbound_events",
        "given_up_at IS NOT NULL",
        1,
        Duration::from_secs(10),
    )
    .await;
    wait_for(
        &db,
        "outbox",
        "status = 'delivered'",
        2,
        Duration::from_secs(10),
    )
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", daemon.monitor))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    daemon.stop().await;
    assert_eq!(
        db.app
            .count("touser = 'oUserB0001' AND status = 'sent' AND delivery_status IS NULL")
            .await,
        1,
        "the forged event did not touch the row"
    );
    assert_eq!(
        db.app
            .count_in(
                "inbound_events",
                "from_user = 'oForger001' AND joined_at IS NULL AND join_problem LIKE 'FromUserName is not the touser%'"
            )
            .await,
        1
    );
    assert_eq!(
        db.app
            .count("touser = 'oUserC0001' AND delivered_at IS NOT NULL")
            .await,
        1
    );
    let mismatches = metrics
        .lines()
        .find(|l| l.starts_with("wechat_outbox_events_not_joined") && l.contains("openid_mismatch"))
        .unwrap_or_else(|| panic!("no mismatch counter in {metrics}"));
    assert!(mismatches.ends_with(" 1"), "{mismatches}");
}
on_both_backends!(events_join_their_own_row_only);

/// An event whose join fails (a trigger standing for any value a statement cannot handle; on
/// Postgres with a check violation's SQLSTATE, 23514) is given up on alone with the error; the
/// other events still join.
async fn an_event_that_cannot_join_fails_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let refuse_one = match backend {
        Backend::Postgres => {
            "CREATE FUNCTION refuse_b() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN IF NEW.touser = 'oUserB0001' THEN
                        RAISE EXCEPTION 'cannot update B' USING ERRCODE = '23514'; END IF;
                    RETURN NEW; END $$;
             CREATE TRIGGER refuse_b BEFORE UPDATE OF delivery_status ON outbox
                 FOR EACH ROW EXECUTE FUNCTION refuse_b();"
        }
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_b BEFORE UPDATE OF delivery_status ON outbox
             WHEN NEW.touser = 'oUserB0001' BEGIN SELECT RAISE(ABORT, 'cannot update B'); END;"
        }
    };
    db.app.exec(refuse_one).await.unwrap();
    sent_rows_with_events(
        &db,
        &[
            ("oUserA0001", 1001, "success", 1_764_000_000),
            ("oUserB0001", 1002, "success", 1_764_000_000),
            ("oUserC0001", 1003, "failed: system failed", 1_764_000_000),
        ],
    )
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    wait_for(
        &db,
        "inbound_events",
        "joined_at IS NOT NULL",
        2,
        Duration::from_secs(10),
    )
    .await;
    wait_for(
        &db,
        "inbound_events",
        "given_up_at IS NOT NULL",
        1,
        Duration::from_secs(10),
    )
    .await;
    daemon.stop().await;
    assert_eq!(
        db.app.count("status IN ('delivered', 'undelivered')").await,
        2
    );
    assert_eq!(
        db.app
            .count_in(
                "inbound_events",
                "from_user = 'oUserB0001' AND join_problem LIKE 'the join failed for this event%'"
            )
            .await,
        1
    );
}
on_both_backends!(an_event_that_cannot_join_fails_alone);

/// Events for messages another system sent never join: after the join window they are given up
/// on, no longer probed, and counted by `report events`.
async fn events_that_never_join_are_given_up(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    sent_rows_with_events(&db, &[("oElsewhere1", 9_999, "success", 1_764_000_000)]).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[callback]\njoin_window_secs = 1")).await;
    wait_for(
        &db,
        "inbound_events",
        "given_up_at IS NOT NULL AND join_problem LIKE 'no sent row with this MsgID within 1s%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let store = db.store().await;
    let report = wechat_outbox::report::read(&store, "events").await.unwrap();
    daemon.stop().await;
    let state = report.columns.iter().position(|c| c == "state").unwrap();
    let count = report
        .columns
        .iter()
        .position(|c| c == "event_count")
        .unwrap();
    let given_up: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r[state] == "given up")
        .collect();
    assert_eq!(given_up.len(), 1, "{:?}", report.rows);
    assert_eq!(given_up[0][count], 1);
}
on_both_backends!(events_that_never_join_are_given_up);

/// 60 rows against a month of 50, 5 of them refused by WeChat (43004, which gives its count
/// back), two daemons: every send given back reaches a held row within seconds, so exactly 50
/// are sent and the other 10 are refused or held for next month (before the fix: 46-47 sent).
/// Then a limit raised (a daemon restarted with 55) lets the held ones go, without waiting for
/// the month to end. The quota is never exceeded.
async fn quota_given_back_reaches_held_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let limits = |monthly: u32| format!("[limits]\nmonthly_per_template = {monthly}");
    let first = Daemon::start(db.config(&sim.url(), &limits(50))).await;
    let second = Daemon::start(db.config(&sim.url(), &limits(50))).await;
    let mut values: Vec<String> = (0..5)
        .map(|i| format!("('ounfollowed{i:03}', 'TQ', '{{\"k\":\"v\"}}')"))
        .collect();
    values.extend((0..55).map(|i| format!("('oQuota{i:05}', 'TQ', '{{\"k\":\"v\"}}')")));
    fastrand::shuffle(&mut values);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES {}",
            values.join(",")
        ))
        .await
        .unwrap();
    // Refused rows held before their turn stay held with the good ones: the month is full.
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        50,
        Duration::from_secs(20),
    )
    .await;
    wait_for(
        &db,
        "outbox",
        "status = 'held' OR (status = 'failed' AND last_errcode = 43004)",
        10,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        db.app.count("status = 'sent'").await,
        50,
        "never over the month"
    );
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TQ' AND used = 50")
            .await,
        1
    );
    first.stop().await;
    second.stop().await;

    let raised = Daemon::start(db.config(&sim.url(), &limits(55))).await;
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        55,
        Duration::from_secs(10),
    )
    .await;
    raised.stop().await;
    // Refused rows still held wait for next month: the month is full again.
    assert_eq!(
        db.app
            .count("status = 'held' OR (status = 'failed' AND last_errcode = 43004)")
            .await,
        5
    );
    assert_eq!(sim.sim.stats().delivered, 55);
}
on_both_backends!(quota_given_back_reaches_held_rows);

/// Rows held for room among templates in use go out within seconds of a template being taken
/// out of use by SQL (no command that wakes them).
async fn room_among_templates_reaches_held_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[limits]\nactive_templates = 1")).await;
    insert_for_template(&db, "TA", 2, "a").await;
    wait_for(&db, "outbox", "status = 'sent'", 2, Duration::from_secs(10)).await;
    insert_for_template(&db, "TB", 3, "b").await;
    wait_for(
        &db,
        "outbox",
        "status = 'held' AND held_for = 'template'",
        3,
        Duration::from_secs(10),
    )
    .await;
    db.app
        .exec("UPDATE templates SET in_use = false WHERE template_id = 'TA'")
        .await
        .unwrap();
    wait_for(&db, "outbox", "status = 'sent'", 5, Duration::from_secs(5)).await;
    daemon.stop().await;
}
on_both_backends!(room_among_templates_reaches_held_rows);

/// A row may hold a time no clock type holds (in a column without a guard, or with the guards
/// dropped): every report still prints, instead of panicking on it.
async fn reports_print_times_no_clock_holds(backend: Backend) {
    let db = TestDb::new(backend).await;
    drop_guards(&db).await;
    let (odd, expires) = match backend {
        Backend::Postgres => ("'infinity'", "'infinity'"),
        Backend::Sqlite => ("'the end of time'", "NULL"),
    };
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, last_error, expires_at,
                 updated_at, created_at, sent_at)
             VALUES ('oOdd000001', 'T', '{{}}', 'failed', 'odd', {expires}, {odd}, {odd}, {odd})"
        ))
        .await
        .unwrap();
    let store = db.store().await;
    let report = wechat_outbox::report::read(&store, "errors").await.unwrap();
    let text = wechat_outbox::report::render(&report, wechat_outbox::report::Format::Table);
    assert!(text.contains("odd"), "{text}");
    for name in ["status", "stuck", "daily", "latency", "events", "quota"] {
        let report = wechat_outbox::report::read(&store, name).await;
        let report = report.unwrap_or_else(|e| panic!("report {name}: {e:#}"));
        wechat_outbox::report::render(&report, wechat_outbox::report::Format::Table);
    }
}
on_both_backends!(reports_print_times_no_clock_holds);

/// A row in flight whose `updated_at` an app set to something no clock holds is still rescued
/// when its daemon's lease runs out (the rescue takes the start of its doubt from there), and
/// the rest of the maintenance pass runs.
async fn a_row_in_flight_with_an_odd_updated_at_is_rescued(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let odd = match backend {
        Backend::Postgres => "'infinity'",
        Backend::Sqlite => "'whenever'",
    };
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, attempts, lease_owner,
                 lease_expires_at, updated_at)
             VALUES ('oLost00001', 'T', '{{}}', 'sending', 1, 'a-dead-daemon', {}, {odd})",
            db.app.now_plus(-60)
        ))
        .await
        .unwrap();
    db.app.insert_good(2, "r").await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
}
on_both_backends!(a_row_in_flight_with_an_odd_updated_at_is_rescued);

/// The store releases no more held rows than there is room for, highest priority first: one
/// send given back in a full month sends one held row round the claim, not all of them.
async fn holds_are_released_up_to_the_room(backend: Backend) {
    use wechat_outbox::store::HoldLimits;
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let now = chrono::Utc::now();
    let p = wechat_outbox::domain::quota::periods(now, chrono_tz::Asia::Shanghai);
    db.app
        .exec(&format!(
            "INSERT INTO quota_usage (account, scope, period, used) VALUES
                 ('default', 'template:TM', '{month}', 48), ('default', 'account', '{day}', 99);
             INSERT INTO templates (account, template_id, in_use) VALUES
                 ('default', 'TM', true), ('default', 'TUSED', true);
             INSERT INTO outbox (touser, template_id, data, status, held_for, priority,
                 next_attempt_at) VALUES
                 ('oM1', 'TM', '{{}}', 'held', 'monthly quota', 0, {later}),
                 ('oM2', 'TM', '{{}}', 'held', 'monthly quota', 5, {later}),
                 ('oM3', 'TM', '{{}}', 'held', 'monthly quota', 1, {later}),
                 ('oM4', 'TM', '{{}}', 'held', 'monthly quota', 0, {later}),
                 ('oD1', 'TD', '{{}}', 'held', 'daily quota', 0, {later}),
                 ('oD2', 'TD', '{{}}', 'held', 'daily quota', 0, {later}),
                 ('oT1', 'TNEW', '{{}}', 'held', 'template', 0, {later}),
                 ('oT2', 'TNEW2', '{{}}', 'held', 'template', 0, {later}),
                 ('oU1', 'TUSED', '{{}}', 'held', 'template', 0, {later}),
                 ('oU2', 'TUSED', '{{}}', 'held', 'template', 0, {later});",
            month = p.month,
            day = p.day,
            later = db.app.now_plus(86_400),
        ))
        .await
        .unwrap();
    let limits = [HoldLimits {
        account: "default",
        active_templates: Some(3),
        monthly_per_template: 50,
        daily_per_account: 100,
    }];
    let released = store
        .release_holds_with_room(&limits, &p.month, &p.day, now)
        .await
        .unwrap();
    let pending = |users: &str| format!("status = 'pending' AND touser IN ({users})");
    assert_eq!(
        released, 6,
        "2 of the month, 1 of the day, 1 for the free slot, 2 in use"
    );
    assert_eq!(
        db.app.count(&pending("'oM2', 'oM3'")).await,
        2,
        "by priority"
    );
    assert_eq!(db.app.count(&pending("'oD1'")).await, 1, "by id");
    assert_eq!(db.app.count(&pending("'oT1'")).await, 1);
    assert_eq!(
        db.app.count(&pending("'oU1', 'oU2'")).await,
        2,
        "template in use"
    );
    let again = store
        .release_holds_with_room(&limits, &p.month, &p.day, now)
        .await
        .unwrap();
    assert_eq!(
        again, 4,
        "the room is counted again each time; the claim decides"
    );
    store.close().await;
}
on_both_backends!(holds_are_released_up_to_the_room);

/// A limit raised in the configuration file takes effect on SIGHUP (`systemctl reload`), without
/// a restart: the rows held for the month go within seconds. A file that does not load changes
/// nothing and the daemon keeps running.
async fn a_limit_raised_by_reload_lets_held_rows_go(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = |monthly: u32| {
        db.config_toml(
            &sim.url(),
            &format!("[limits]\nmonthly_per_template = {monthly}"),
        )
    };
    let mut daemon = Process::start(&config(5), &["run"]);
    daemon.wait_started().await;
    insert_for_template(&db, "TQ", 8, "q").await;
    wait_for(&db, "outbox", "status = 'sent'", 5, Duration::from_secs(20)).await;
    wait_for(&db, "outbox", "status = 'held'", 3, Duration::from_secs(10)).await;

    std::fs::write(&daemon.config_path, "this is not TOML").unwrap();
    daemon.signal("HUP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(daemon.alive(), "{}", daemon.stderr());
    assert!(daemon.stderr().contains("configuration not reloaded"));
    assert_eq!(db.app.count("status = 'held'").await, 3);

    std::fs::write(&daemon.config_path, config(8)).unwrap();
    daemon.signal("HUP");
    wait_for(&db, "outbox", "status = 'sent'", 8, Duration::from_secs(10)).await;
    assert!(daemon.alive());
    assert_eq!(
        db.app
            .count_in("account_limits", "monthly_per_template = 8")
            .await,
        1,
        "report_quota reads the new limit"
    );
    drop(daemon);
}
on_both_backends!(a_limit_raised_by_reload_lets_held_rows_go);
