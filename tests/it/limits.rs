//! The account's limits, exactly, on both backends: the monthly quota per template (also with
//! two daemons racing), templates in use, refused sends not counted, 45009 pausing one
//! account, data checked against the template, and the cluster-wide send rate.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use wechat_outbox::config::Config;
use wechat_outbox::simulator::{Faults, SimSettings};

use crate::helpers::{Backend, Daemon, Process, Sim, TestDb};
use crate::on_both_backends;

/// Waits until `condition` holds for `count` rows of `table`.
pub async fn wait_for(db: &TestDb, table: &str, condition: &str, count: i64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = db.app.count_in(table, condition).await;
        if now == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{table} where {condition}: {now}, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts `n` rows of one template for distinct users.
pub async fn insert_for_template(db: &TestDb, template: &str, n: usize, tag: &str) {
    let values: Vec<String> = (0..n)
        .map(|i| format!("('o{tag}{i:06}', '{template}', '{{\"k\":\"v\"}}')"))
        .collect();
    for chunk in values.chunks(1000) {
        db.app
            .exec(&format!(
                "INSERT INTO outbox (touser, template_id, data) VALUES {}",
                chunk.join(",")
            ))
            .await
            .unwrap();
    }
}

fn next_month(now: DateTime<Utc>) -> DateTime<Utc> {
    let tz: chrono_tz::Tz = "Asia/Shanghai".parse().unwrap();
    wechat_outbox::domain::quota::periods(now, tz).month_ends + chrono::Duration::seconds(1)
}

const FAST: &str = "[workers]\nconcurrency = 64\nbatch_size = 64";

/// 12,000 rows for one template, 10,000 a month: exactly 10,000 sent, 2,000 held, and the
/// 2,000 sent once the month turns.
async fn the_monthly_quota_is_exact_and_resumes_next_month(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), FAST)).await;
    insert_for_template(&db, "TQUOTA", 12_000, "q").await;
    wait_for(
        &db,
        "outbox",
        "status IN ('pending', 'sending')",
        0,
        Duration::from_secs(240),
    )
    .await;

    assert_eq!(db.app.count("status = 'sent'").await, 10_000);
    assert_eq!(db.app.count("status = 'held' AND held_for = 'monthly quota' AND last_error LIKE '%monthly quota of template TQUOTA (10000 in %is used up; held until %'").await, 2_000);
    assert_eq!(sim.sim.stats().delivered, 10_000, "never sent over quota");
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TQUOTA' AND used = 10000")
            .await,
        1
    );

    daemon.clock.set(next_month(Utc::now()));
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        12_000,
        Duration::from_secs(120),
    )
    .await;
    daemon.stop().await;
    assert_eq!(sim.sim.stats().delivered, 12_000);
    assert_eq!(sim.sim.stats().duplicate_deliveries, 0);
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TQUOTA' AND used = 2000")
            .await,
        1,
        "counted in the new month"
    );
}
on_both_backends!(the_monthly_quota_is_exact_and_resumes_next_month);

/// Two daemons (separate processes) race for the last of the quota: still exactly the limit.
async fn two_daemons_racing_stop_at_the_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config_toml(
        &sim.url(),
        &format!("{FAST}\n[limits]\nmonthly_per_template = 2000"),
    );
    let first = Process::start(&config, &["run"]);
    let second = Process::start(&config, &["run"]);
    // Two templates in each group of reservations: the daemons lock the same counters, and
    // must take them in the same order (a deadlock would abort groups and show in the log).
    insert_for_template(&db, "TRACE", 2_600, "r").await;
    insert_for_template(&db, "TRACF", 300, "s").await;
    wait_for(
        &db,
        "outbox",
        "status IN ('pending', 'sending')",
        0,
        Duration::from_secs(120),
    )
    .await;
    let logs = first.stderr() + &second.stderr();
    drop((first, second));
    assert_eq!(db.app.count("status = 'sent'").await, 2_300);
    assert_eq!(db.app.count("status = 'held'").await, 600);
    assert_eq!(sim.sim.stats().delivered, 2_300);
    assert!(!logs.contains("deadlock"), "{logs}");
}
on_both_backends!(two_daemons_racing_stop_at_the_limit);

/// With room for 10 templates, the 11th waits as `held` with a reason, is never sent, and goes
/// out once an operator deactivates one.
async fn the_eleventh_template_waits_for_room(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config_toml(&sim.url(), "");
    let daemon = Daemon::start(Config::from_toml(&config).unwrap()).await;
    for t in 1..=10 {
        insert_for_template(&db, &format!("T{t:02}"), 2, &format!("t{t:02}")).await;
    }
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        20,
        Duration::from_secs(20),
    )
    .await;
    insert_for_template(&db, "T11", 3, "eleven").await;
    wait_for(&db, "outbox", "status = 'held' AND held_for = 'template' AND last_error LIKE 'template T11 is not in use and the account already uses 10 of its 10 templates%'", 3, Duration::from_secs(20)).await;
    assert_eq!(db.app.count_in("templates", "in_use").await, 10);
    assert!(
        sim.sim.deliveries().iter().all(|d| d.template_id != "T11"),
        "never sent while held"
    );

    let mut deactivate = Process::start(&config, &["templates", "deactivate", "T01"]);
    assert_eq!(
        deactivate.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        deactivate.stderr()
    );
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        23,
        Duration::from_secs(20),
    )
    .await;
    daemon.stop().await;
    assert_eq!(db.app.count_in("templates", "in_use").await, 10);
    assert_eq!(
        db.app
            .count_in(
                "templates",
                "template_id = 'T01' AND NOT in_use AND note = 'deactivated by an operator'"
            )
            .await,
        1
    );
}
on_both_backends!(the_eleventh_template_waits_for_room);

/// Rows for 11 templates at once, two daemons: exactly 10 templates get into use.
async fn racing_daemons_never_use_eleven_templates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config(&sim.url(), FAST);
    let (first, second) = (
        Daemon::start(config.clone()).await,
        Daemon::start(config).await,
    );
    for t in 1..=11 {
        insert_for_template(&db, &format!("R{t:02}"), 20, &format!("r{t:02}")).await;
    }
    wait_for(
        &db,
        "outbox",
        "status IN ('pending', 'sending')",
        0,
        Duration::from_secs(30),
    )
    .await;
    first.stop().await;
    second.stop().await;
    assert_eq!(db.app.count_in("templates", "in_use").await, 10);
    assert_eq!(db.app.count("status = 'sent'").await, 200);
    assert_eq!(
        db.app
            .count("status = 'held' AND held_for = 'template'")
            .await,
        20,
        "one template's rows wait"
    );
}
on_both_backends!(racing_daemons_never_use_eleven_templates);

/// Refused sends (43004, and -1 before it succeeds) give their count back.
async fn refused_sends_are_not_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            busy_rate: 0.4,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    insert_for_template(&db, "TCOUNT", 30, "c").await;
    db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('o_unfollowed_1', 'TCOUNT', '{\"k\":\"v\"}'), ('o_unfollowed_2', 'TCOUNT', '{\"k\":\"v\"}')").await.unwrap();
    db.app.wait_settled(Duration::from_secs(30)).await;
    daemon.stop().await;
    assert_eq!(db.app.count("status = 'sent'").await, 30);
    assert_eq!(db.app.count("last_errcode = 43004").await, 2);
    assert!(sim.sim.stats().errcodes["-1"] > 0);
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TCOUNT' AND used = 30")
            .await,
        1
    );
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'account' AND used = 30")
            .await,
        1
    );
}
on_both_backends!(refused_sends_are_not_counted);

/// 45009 on one account pauses it until the next day; the other keeps sending.
async fn a_daily_limit_pauses_only_its_account(backend: Backend) {
    let db = TestDb::new(backend).await;
    let faults = Faults {
        errcode_rate: 1.0,
        errcode: 45009,
        errcode_appid: Some("wxshop000000002".into()),
        ..Faults::default()
    };
    let sim = Sim::start(SimSettings {
        faults,
        ..SimSettings::default()
    })
    .await;
    let mut toml = db.config_toml(&sim.url(), "");
    toml.push_str(
        "[[accounts]]\nname = \"shop\"\nappid = \"wxshop000000002\"\nsecret = \"shop-secret\"\n",
    );
    let daemon = Daemon::start(Config::from_toml(&toml).unwrap()).await;
    db.app.exec("INSERT INTO outbox (account, touser, template_id, data) VALUES ('shop', 'oShopUser1', 'T', '{}'), ('shop', 'oShopUser2', 'T', '{}')").await.unwrap();
    wait_for(
        &db,
        "account_pauses",
        "account = 'shop' AND errcode = 45009",
        1,
        Duration::from_secs(10),
    )
    .await;
    db.app.insert_good(10, "other").await;
    wait_for(
        &db,
        "outbox",
        "status = 'sent'",
        10,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;
    assert_eq!(
        db.app
            .count("account = 'shop' AND status = 'pending' AND attempts = 0")
            .await,
        2,
        "held back, not failed"
    );
    assert_eq!(
        db.app
            .count("account = 'default' AND status = 'sent'")
            .await,
        10
    );
    assert!(
        sim.sim.stats().send_requests <= 12,
        "the paused account stopped calling"
    );
}
on_both_backends!(a_daily_limit_pauses_only_its_account);

/// Data that does not fit a known template fails before any quota or request is spent.
async fn bad_data_for_a_known_template_fails_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    // TEMPLATE_ID is listed by the simulator with the single parameter `first`.
    db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oData00001', 'TEMPLATE_ID', '{\"frist\":\"typo\"}'), ('oData00002', 'TEMPLATE_ID', '{\"first\":\"ok\",\"extra\":\"x\"}')").await.unwrap();
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(
        rows[0].last_error.as_deref(),
        Some("data lacks parameter \"first\" of template TEMPLATE_ID")
    );
    assert!(
        rows[1]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("data.extra is not a parameter of template TEMPLATE_ID")
    );
    assert_eq!(sim.sim.stats().send_requests, 0);
    assert_eq!(db.app.count_in("quota_usage", "used > 0").await, 0);
}
on_both_backends!(bad_data_for_a_known_template_fails_first);

/// The configured rate is for the whole cluster: one daemon, or three sharing it, never send
/// faster than the rate (a lower bound on the time taken, so a slow machine cannot fail it) and
/// do use it (a generous upper bound).
async fn the_rate_holds_for_the_cluster(backend: Backend) {
    const RATE: f64 = 50.0;
    const ROWS: usize = 150;
    for daemons in [1usize, 3] {
        let db = TestDb::new(backend).await;
        let sim = Sim::start(SimSettings::default()).await;
        let config = db.config(&sim.url(), "[limits]\nrate_per_second = 50");
        let mut running = Vec::new();
        for _ in 0..daemons {
            running.push(Daemon::start(config.clone()).await);
        }
        // Let the heartbeats see every daemon before the burst arrives.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = Instant::now();
        insert_for_template(&db, "TRATE", ROWS, "rate").await;
        wait_for(
            &db,
            "outbox",
            "status = 'sent'",
            ROWS as i64,
            Duration::from_secs(60),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        for daemon in running {
            daemon.stop().await;
        }
        // Each daemon may start with a full burst of its share: RATE in all.
        let fastest = (ROWS as f64 - RATE) / RATE;
        assert!(
            elapsed >= fastest / 1.1,
            "{daemons} daemon(s): {ROWS} sends in {elapsed:.2} s beat the rate (≥ {fastest:.2} s)"
        );
        assert!(
            elapsed <= fastest * 2.5 + 2.0,
            "{daemons} daemon(s): {elapsed:.2} s is far below the rate"
        );
    }
}
on_both_backends!(the_rate_holds_for_the_cluster);

/// The operator's view: `quota` shows used, limit and remaining; `templates list` shows what is
/// in use; `templates activate` refuses without room.
async fn the_cli_shows_quota_and_templates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let config = db.config_toml(
        &sim.url(),
        "[limits]\nactive_templates = 1\nmonthly_per_template = 100",
    );
    let daemon = Daemon::start(Config::from_toml(&config).unwrap()).await;
    insert_for_template(&db, "TCLI", 7, "cli").await;
    wait_for(&db, "outbox", "status = 'sent'", 7, Duration::from_secs(20)).await;
    daemon.stop().await;

    let run = |args: &[&str]| Process::start(&config, args);
    let mut quota = run(&["quota"]);
    assert_eq!(
        quota.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        quota.stderr()
    );
    let out = quota.stdout();
    assert!(
        out.lines().any(|l| l.contains("template:TCLI")
            && l.split_whitespace().rev().take(3).collect::<Vec<_>>() == ["93", "100", "7"]),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("account (today)")
            && l.split_whitespace().rev().take(3).collect::<Vec<_>>() == ["99993", "100000", "7"]),
        "{out}"
    );

    let mut list = run(&["templates", "list"]);
    assert_eq!(
        list.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
    assert!(
        list.stdout()
            .lines()
            .any(|l| l.contains("TCLI") && l.contains(" yes ")),
        "{}",
        list.stdout()
    );
    // A template from WeChat's list shows its parameters, and which WeChat no longer shows.
    assert!(
        list.stdout().lines().any(
            |l| l.contains("ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY")
                && l.contains(
                    "first (not shown), keynote1, keynote2, keynote3, remark (not shown)"
                )
        ),
        "{}",
        list.stdout()
    );

    let mut activate = run(&["templates", "activate", "TOTHER"]);
    assert_eq!(
        activate.wait_exit(Duration::from_secs(20)).await.code(),
        Some(1)
    );
    assert!(
        activate
            .stderr()
            .contains("already uses 1 of its 1 templates"),
        "{}",
        activate.stderr()
    );
}
on_both_backends!(the_cli_shows_quota_and_templates);

/// The claim counts the rows it is given terms for in its own transaction, in order, until a
/// counter is full; the rest wait with no mark, and rows without terms are not counted.
async fn the_claim_counts_ready_rows_in_its_transaction(backend: Backend) {
    use wechat_outbox::store::{ClaimRequest, CountTerms, Reserved};
    let db = TestDb::new(backend).await;
    insert_for_template(&db, "TPL_CLAIM", 7, "claim").await;
    let store = db.store().await;
    // Even users are counted by the claim (two fit the month; the third waits), odd ones are
    // left to their task.
    let countable = |raw: &wechat_outbox::domain::message::RawMessage| {
        let user: u32 = raw
            .touser
            .as_deref()?
            .trim_start_matches("oclaim")
            .parse()
            .ok()?;
        let template_id = raw.template_id.clone()?;
        let ready = user.is_multiple_of(2) && raw.quota_month.is_none();
        ready.then_some(CountTerms {
            template_id,
            monthly_limit: 2,
            daily_limit: 100,
        })
    };
    // One row was counted by an earlier attempt: it keeps its periods and is not counted again.
    db.app
        .exec(
            "UPDATE outbox SET quota_month = '2026-10', quota_day = '2026-10-31'
             WHERE touser = 'oclaim000004'",
        )
        .await
        .unwrap();
    let now = Utc::now();
    let request = ClaimRequest {
        owner: "me",
        limit: 10,
        lease_until: now + chrono::Duration::seconds(60),
        now,
        month: "2026-11",
        day: "2026-11-28",
        per_user_since: None,
    };
    let claimed = store.claim(&request, &countable).await.unwrap();
    let mut by_user: Vec<(String, Option<Reserved>, Option<String>)> = claimed
        .into_iter()
        .map(|c| (c.raw.touser.unwrap(), c.reserved, c.raw.quota_month))
        .collect();
    by_user.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        Some(Reserved::Granted),
        None,
        Some(Reserved::Granted),
        None,
        None,
        None,
        Some(Reserved::MonthFull),
    ];
    assert_eq!(
        by_user.iter().map(|(_, r, _)| *r).collect::<Vec<_>>(),
        expected,
        "{by_user:?}"
    );
    // Rows come back with the periods they had before this claim.
    let before: Vec<Option<&str>> = by_user.iter().map(|(_, _, m)| m.as_deref()).collect();
    assert_eq!(
        before,
        [None, None, None, None, Some("2026-10"), None, None]
    );
    assert_eq!(db.app.count("quota_month = '2026-10'").await, 1);
    assert_eq!(db.app.count("status = 'sending'").await, 7);
    assert_eq!(
        db.app
            .count("quota_month = '2026-11' AND quota_day = '2026-11-28'")
            .await,
        2
    );
    assert_eq!(db.app.count("quota_month IS NULL").await, 4);
    assert_eq!(
        db.app
            .count_in(
                "quota_usage",
                "scope = 'template:TPL_CLAIM' AND period = '2026-10'"
            )
            .await,
        0
    );
    for (scope, period) in [("template:TPL_CLAIM", "2026-11"), ("account", "2026-11-28")] {
        let used = db
            .app
            .count_in(
                "quota_usage",
                &format!("scope = '{scope}' AND period = '{period}' AND used = 2"),
            )
            .await;
        assert_eq!(used, 1, "{scope} {period}");
    }
}
on_both_backends!(the_claim_counts_ready_rows_in_its_transaction);

/// The account's daily quota, set per account: the rest wait for the next day in the
/// configured timezone, then go.
async fn the_daily_quota_holds_rows_until_the_next_day(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let toml = db
        .config_toml(&sim.url(), "[limits]\ntimezone = \"UTC\"")
        .replace(
            "secret = \"test-app-secret-value\"",
            "secret = \"test-app-secret-value\"\ndaily_per_account = 5",
        );
    let daemon = Daemon::start(Config::from_toml(&toml).unwrap()).await;
    insert_for_template(&db, "TDAY", 8, "day").await;
    wait_for(
        &db,
        "outbox",
        "status IN ('pending', 'sending')",
        0,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(db.app.count("status = 'sent'").await, 5);
    assert_eq!(db.app.count("status = 'held' AND held_for = 'daily quota' AND last_error LIKE '%daily quota (5 on %) is used up; held until % UTC'").await, 3);
    // A reservation refused by the day gives back the month it had counted, and leaves its row
    // uncounted (reservations share a transaction; each one stays all or nothing).
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TDAY' AND used = 5")
            .await,
        1
    );
    assert_eq!(
        db.app
            .count("status = 'held' AND quota_month IS NULL")
            .await,
        3
    );

    let tomorrow = Utc::now()
        .date_naive()
        .succ_opt()
        .unwrap()
        .and_hms_opt(0, 0, 1)
        .unwrap()
        .and_utc();
    daemon.clock.set(tomorrow);
    wait_for(&db, "outbox", "status = 'sent'", 8, Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(sim.sim.stats().delivered, 8);
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'template:TDAY' AND used = 8")
            .await,
        1
    );
}
on_both_backends!(the_daily_quota_holds_rows_until_the_next_day);

/// A row whose request may have reached WeChat is never held on a limit at its retry (which
/// would erase its doubt and let a later resend outside the window reach the user twice): it
/// was counted and checked before that request left, so the retry goes out with the same
/// client_msg_id even though its template was deactivated meanwhile.
async fn an_in_doubt_retry_is_not_held_when_its_template_goes_out_of_use(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        faults: Faults {
            hang_rate: 1.0,
            ..Faults::default()
        },
        ..SimSettings::default()
    })
    .await;
    let config = db.config_toml(
        &sim.url(),
        "[limits]\nauto_activate_templates = false\n[api]\ntimeout_ms = 200\n[retry]\nbase_delay_ms = 1500\nmax_delay_secs = 2",
    );
    let mut activate = Process::start(&config, &["templates", "activate", "TDOUBT"]);
    assert_eq!(
        activate.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        activate.stderr()
    );
    let daemon = Daemon::start(Config::from_toml(&config).unwrap()).await;
    insert_for_template(&db, "TDOUBT", 1, "doubt").await;
    wait_for(
        &db,
        "outbox",
        "status = 'pending' AND in_doubt = (1 = 1)",
        1,
        Duration::from_secs(10),
    )
    .await;

    let mut deactivate = Process::start(&config, &["templates", "deactivate", "TDOUBT"]);
    assert_eq!(
        deactivate.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        deactivate.stderr()
    );
    sim.sim.set_faults(Faults::default());
    wait_for(&db, "outbox", "status = 'sent'", 1, Duration::from_secs(20)).await;
    daemon.stop().await;
    let stats = sim.sim.stats();
    assert_eq!(
        (stats.delivered, stats.duplicate_deliveries),
        (1, 0),
        "{stats:?}"
    );
    assert!(
        stats.deduplicated >= 1,
        "the retry reused the client_msg_id: {stats:?}"
    );
}
on_both_backends!(an_in_doubt_retry_is_not_held_when_its_template_goes_out_of_use);

/// An attempt whose request never reached WeChat (here its access token could not be had)
/// gives its count back: while the account's token fails, the day's count stays 0, and the
/// row is counted once when it is finally sent.
async fn an_attempt_that_never_reached_wechat_is_not_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        credentials: [("wxtest0000000001".to_string(), "another-secret".to_string())].into(),
        ..SimSettings::default()
    })
    .await;
    let _daemon = Daemon::start(db.config(&sim.url(), "[retry]\nbase_delay_ms = 4000")).await;
    db.app.insert_good(1, "token").await;
    wait_for(
        &db,
        "outbox",
        "status = 'pending' AND attempts = 1",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(db.app.count_in("outbox", "quota_month IS NULL").await, 1);
    assert_eq!(db.app.count_in("quota_usage", "used > 0").await, 0);

    sim.sim.update(|s| s.credentials.clear());
    wait_for(&db, "outbox", "status = 'sent'", 1, Duration::from_secs(20)).await;
    assert_eq!(
        db.app
            .count_in("quota_usage", "scope = 'account' AND used = 1")
            .await,
        1
    );
}
on_both_backends!(an_attempt_that_never_reached_wechat_is_not_counted);
