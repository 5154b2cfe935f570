//! WeChat misbehaving: busy answers, 5xx, hangs, paused accounts. Every row still ends in a
//! terminal status, and no user gets a message twice.

use std::time::Duration;

use wechat_outbox::simulator::{Faults, SimSettings};

use crate::helpers::{Backend, Daemon, Sim, TestDb, assert_each_sent_once};
use crate::on_both_backends;

fn sim_with(faults: Faults) -> SimSettings {
    SimSettings {
        faults,
        ..SimSettings::default()
    }
}

async fn busy_half_the_time_still_sends_everything_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(sim_with(Faults {
        busy_rate: 0.5,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    db.app.insert_good(60, "busy").await;
    let rows = db.app.wait_settled(Duration::from_secs(30)).await;
    daemon.stop().await;

    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
    assert!(
        rows.iter().any(|r| r.attempts > 1),
        "some rows needed retries"
    );
    let stats = sim.sim.stats();
    assert!(stats.errcodes["-1"] >= 10, "{stats:?}");
    assert_each_sent_once(&sim.sim, &rows);
}
on_both_backends!(busy_half_the_time_still_sends_everything_once);

async fn hangs_and_5xx_are_retried_with_the_same_client_msg_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    let faults = Faults {
        http_error_rate: 0.2,
        hang_rate: 0.2,
        garbage_rate: 0.1,
        ..Faults::default()
    };
    let sim = Sim::start(sim_with(faults)).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[api]\ntimeout_ms = 300")).await;
    db.app.insert_good(40, "flaky").await;
    let rows = db.app.wait_settled(Duration::from_secs(40)).await;
    daemon.stop().await;

    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:#?}");
    let stats = sim.sim.stats();
    assert!(
        stats.faults.get("hang").copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    // A hung or garbled answer had already delivered: its retry must be de-duplicated by
    // client_msg_id rather than delivered again.
    let reached_then_lost = stats.faults.get("hang").copied().unwrap_or(0)
        + stats.faults.get("garbage").copied().unwrap_or(0);
    assert!(
        stats.deduplicated >= 1 && stats.deduplicated <= reached_then_lost,
        "{stats:?}"
    );
    assert_each_sent_once(&sim.sim, &rows);
}
on_both_backends!(hangs_and_5xx_are_retried_with_the_same_client_msg_id);

async fn past_the_dedup_window_an_in_doubt_row_becomes_unknown(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(sim_with(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    }))
    .await;
    let config = db.config(&sim.url(), "[api]\ntimeout_ms = 200\n[workers]\nlease_secs = 1\n[retry]\ndedup_window_secs = 1\nbase_delay_ms = 150");
    let daemon = Daemon::start(config).await;
    db.app.insert_good(3, "doubt").await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;

    for row in &rows {
        assert_eq!(row.status, "unknown", "{row:#?}");
        assert!(row.attempts >= 2, "resent inside the window: {row:#?}");
        assert!(
            row.last_error
                .as_deref()
                .unwrap()
                .contains("de-duplication window has passed"),
            "{row:#?}"
        );
    }
    let stats = sim.sim.stats();
    assert_eq!(
        stats.delivered, 3,
        "each reached the user exactly once: {stats:?}"
    );
    assert_eq!(stats.duplicate_deliveries, 0);
    assert!(
        stats.deduplicated >= 3,
        "resends carried the same client_msg_id: {stats:?}"
    );
}
on_both_backends!(past_the_dedup_window_an_in_doubt_row_becomes_unknown);

async fn resend_policy_sends_in_doubt_rows_again_after_the_window(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        dedup_window: Duration::from_millis(500),
        ..sim_with(Faults {
            hang_rate: 1.0,
            ..Faults::default()
        })
    })
    .await;
    let config = db.config(&sim.url(), "[api]\ntimeout_ms = 200\n[workers]\nlease_secs = 1\n[retry]\ndedup_window_secs = 1\nin_doubt = \"resend\"\nmax_attempts = 6\nbase_delay_ms = 150");
    let daemon = Daemon::start(config).await;
    db.app.insert_good(1, "resend").await;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    // Every answer hung, so the row gives up as failed, but it kept resending past the window.
    assert_eq!(rows[0].status, "failed", "{rows:#?}");
    assert_eq!(rows[0].attempts, 6);
    assert!(
        sim.sim.stats().delivered >= 2,
        "resend chose possible duplicates over silence"
    );
}
on_both_backends!(resend_policy_sends_in_doubt_rows_again_after_the_window);

async fn a_daily_limit_pauses_the_account_without_failing_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(sim_with(Faults {
        errcode_rate: 1.0,
        errcode: 45009,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    db.app.insert_good(5, "paused").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.app.count("last_errcode = 45009").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no 45009 recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;

    let rows = db.app.rows().await;
    assert!(
        rows.iter().all(|r| r.status == "pending"),
        "held, not failed: {rows:#?}"
    );
    assert!(
        rows.iter().all(|r| r.attempts == 0),
        "a pause does not use up attempts: {rows:#?}"
    );
    let requests = sim.sim.stats().send_requests;
    assert!(
        requests <= 5,
        "the paused account stopped sending: {requests} requests"
    );
    let paused = db
        .app
        .exec("DELETE FROM account_pauses WHERE account = 'default' AND reason LIKE '%45009%'")
        .await;
    assert!(paused.is_ok());
}
on_both_backends!(a_daily_limit_pauses_the_account_without_failing_rows);

async fn permanent_errcodes_fail_the_row_with_errcode_and_errmsg(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings {
        strict_templates: true,
        ..SimSettings::default()
    })
    .await;
    let daemon = Daemon::start(db.config(&sim.url(), "")).await;
    db.app.exec("INSERT INTO outbox (touser, template_id, data) VALUES ('o_unfollowed1', 'TEMPLATE_ID', '{\"first\":\"a\"}'), ('oFine000001', 'no-such-template', '{}'), ('oFine000002', 'TEMPLATE_ID', '{\"first\":\"b\"}')").await.unwrap();
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    let codes: Vec<(String, Option<i64>)> = rows
        .iter()
        .map(|r| (r.status.clone(), r.last_errcode))
        .collect();
    assert_eq!(
        codes,
        [
            ("failed".into(), Some(43004)),
            ("failed".into(), Some(40037)),
            ("sent".into(), Some(0))
        ]
    );
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("errcode 43004: require subscribe")
    );
    assert_eq!(rows[0].attempts, 1, "permanent errors are not retried");
    // 40037: WeChat does not know the template, so it goes out of use with a note.
    let retired = db
        .app
        .count_in(
            "templates",
            "template_id = 'no-such-template' AND NOT in_use AND note LIKE '%40037%'",
        )
        .await;
    assert_eq!(retired, 1);
}
on_both_backends!(permanent_errcodes_fail_the_row_with_errcode_and_errmsg);

/// The de-duplication window runs from the attempt that may have reached WeChat, not from the
/// row's first attempt: a row refused with -1 for longer than the window, whose next request
/// then times out, is still resent safely before it is given up as unknown.
async fn the_window_starts_at_the_doubtful_attempt(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(sim_with(Faults {
        busy_rate: 1.0,
        ..Faults::default()
    }))
    .await;
    let config = db.config(
        &sim.url(),
        "[api]\ntimeout_ms = 200\n[retry]\ndedup_window_secs = 2\nbase_delay_ms = 100\nmax_delay_secs = 1\nmax_attempts = 100",
    );
    let daemon = Daemon::start(config).await;
    db.app.insert_good(1, "late").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // busy for longer than the window
    sim.sim.set_faults(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    });
    let attempts_before = db.app.rows().await[0].attempts;
    let rows = db.app.wait_settled(Duration::from_secs(20)).await;
    daemon.stop().await;
    assert_eq!(rows[0].status, "unknown", "{rows:#?}");
    assert!(
        rows[0].attempts >= attempts_before + 2,
        "resent inside the window that began with the first doubtful request: {} then {}",
        attempts_before,
        rows[0].attempts
    );
    assert_eq!(sim.sim.stats().delivered, 1);
}
on_both_backends!(the_window_starts_at_the_doubtful_attempt);
