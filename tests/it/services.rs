//! The background services (src/services/), one `run_once` at a time on a real store, and
//! `/healthz` naming a service that keeps failing.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use wechat_outbox::config::RetentionSettings;
use wechat_outbox::metrics::Metrics;
use wechat_outbox::services::release::Released;
use wechat_outbox::services::{
    ExpireOverdue, Heartbeat, JoinEvents, Prune, ReleaseHeld, RescueLeases, Service, SettleInDoubt,
};
use wechat_outbox::simulator::SimSettings;
use wechat_outbox::worker::AccountRuntime;

use crate::helpers::{Backend, Daemon, Sim, TestDb};
use crate::on_both_backends;

/// The status of the row whose touser is `touser`.
async fn status_of(db: &TestDb, touser: &str) -> String {
    let rows = db.app.rows().await;
    let row = rows.iter().find(|r| r.touser.as_deref() == Some(touser));
    row.unwrap_or_else(|| panic!("no row for {touser}: {rows:#?}"))
        .status
        .clone()
}

/// A row in `sending` whose lease expired goes back to `pending`, in doubt; one whose lease
/// still runs is left to its daemon.
async fn rescue_returns_rows_whose_lease_expired(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, attempts, lease_owner,
                 lease_expires_at)
             VALUES ('oLost', 'T', '{{}}', 'sending', 1, 'a-dead-daemon', {}),
                    ('oLive', 'T', '{{}}', 'sending', 1, 'a-live-daemon', {})",
            db.app.now_plus(-60),
            db.app.now_plus(600)
        ))
        .await
        .unwrap();
    let rescue = RescueLeases {
        store: db.store().await,
    };
    assert_eq!(rescue.run_once(Utc::now()).await.unwrap(), 1);
    assert_eq!(status_of(&db, "oLost").await, "pending");
    assert_eq!(status_of(&db, "oLive").await, "sending");
    assert_eq!(
        db.app
            .count("touser = 'oLost' AND in_doubt = TRUE AND lease_owner IS NULL")
            .await,
        1,
        "rescued in doubt, lease cleared"
    );
    assert_eq!(rescue.run_once(Utc::now()).await.unwrap(), 0, "only once");
}
on_both_backends!(rescue_returns_rows_whose_lease_expired);

/// A waiting row whose `expires_at` passed becomes `expired`; one that has time left waits.
async fn expire_ends_overdue_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, expires_at)
             VALUES ('oLate', 'T', '{{}}', {}), ('oInTime', 'T', '{{}}', {})",
            db.app.now_plus(-60),
            db.app.now_plus(3600)
        ))
        .await
        .unwrap();
    let expire = ExpireOverdue {
        store: db.store().await,
    };
    assert_eq!(expire.run_once(Utc::now()).await.unwrap(), 1);
    assert_eq!(status_of(&db, "oLate").await, "expired");
    assert_eq!(status_of(&db, "oInTime").await, "pending");
}
on_both_backends!(expire_ends_overdue_rows);

/// An in-doubt row whose first attempt is older than the de-duplication window is marked
/// `unknown`; one still inside the window waits to be resent.
async fn settle_gives_up_in_doubt_rows_past_the_window(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, attempts, in_doubt, in_doubt_since, kind)
             VALUES ('oOld', 'T', '{{}}', 1, TRUE, {old}, 'template'),
                    ('oOldSub', 'S', '{{}}', 1, TRUE, {old}, 'subscribe'),
                    ('oRecent', 'T', '{{}}', 1, TRUE, {recent}, 'template')",
            old = db.app.now_plus(-7200),
            recent = db.app.now_plus(-60)
        ))
        .await
        .unwrap();
    let settle = SettleInDoubt {
        store: db.store().await,
        window: chrono::Duration::hours(1),
    };
    assert_eq!(settle.run_once(Utc::now()).await.unwrap(), 2);
    assert_eq!(status_of(&db, "oOld").await, "unknown");
    assert_eq!(status_of(&db, "oOldSub").await, "unknown");
    assert_eq!(status_of(&db, "oRecent").await, "pending");
    // Each with its kind's reason: a subscription notification has no window at all.
    let reasons = db.app.rows().await;
    assert!(
        reasons[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("client_msg_id de-duplication window")
    );
    assert!(
        reasons[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains("bizsend de-duplicates nothing")
    );
}
on_both_backends!(settle_gives_up_in_doubt_rows_past_the_window);

/// A held row whose time has come is pending again; one held for later stays held.
async fn release_moves_held_rows_that_are_due(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, next_attempt_at)
             VALUES ('oDue', 'T', '{{}}', 'held', {}), ('oLater', 'T', '{{}}', 'held', {})",
            db.app.now_plus(-60),
            db.app.now_plus(3600)
        ))
        .await
        .unwrap();
    let config = db.config("http://127.0.0.1:9", "");
    let accounts = config.accounts().unwrap();
    let release = ReleaseHeld {
        store: db.store().await,
        accounts: Arc::new(
            accounts
                .into_iter()
                .map(|a| Arc::new(AccountRuntime::new(a)))
                .collect(),
        ),
        timezone: config.timezone().unwrap(),
    };
    let released = release.run_once(Utc::now()).await.unwrap();
    assert_eq!(released.due, 1, "{released:?}");
    assert_eq!(status_of(&db, "oDue").await, "pending");
    // Nothing is used up, so the row held for later has room: the claim checks it again.
    assert_eq!(
        released,
        Released {
            due: 1,
            with_room: u64::from(status_of(&db, "oLater").await == "pending"),
            consented: 0,
        }
    );
}
on_both_backends!(release_moves_held_rows_that_are_due);

/// A subscribe row held for consent just after its user's accept landed, or just after another
/// row gave a one-time consent back (their own wake-ups found no held row yet), is released by
/// the next pass; one whose user has nothing that allows a send stays held until its deadline.
async fn release_wakes_rows_held_after_their_consent_arrived(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(&format!(
            "INSERT INTO outbox (kind, touser, template_id, data, status, held_for, next_attempt_at)
             VALUES ('subscribe', 'oRaced', 'S', '{{}}', 'held', 'consent', {later}),
                    ('subscribe', 'oGivenBack', 'S', '{{}}', 'held', 'consent', {later}),
                    ('subscribe', 'oUsedUp', 'S', '{{}}', 'held', 'consent', {later}),
                    ('subscribe', 'oNobody', 'S', '{{}}', 'held', 'consent', {later});
             INSERT INTO consents (account, openid, template_id, status, granted, used, source,
                                   updated_at, answered_at)
             VALUES ('default', 'oRaced', 'S', 'accept', 1, 0, 'popup', {now}, {now}),
                    ('default', 'oGivenBack', 'S', 'accept', 1, 0, 'popup', {now}, {old}),
                    ('default', 'oUsedUp', 'S', 'accept', 0, 1, 'popup', {now}, {now})",
            later = db.app.now_plus(7 * 86_400),
            now = db.app.now_plus(0),
            old = db.app.now_plus(-86_400),
        ))
        .await
        .unwrap();
    let config = db.config("http://127.0.0.1:9", "");
    let release = ReleaseHeld {
        store: db.store().await,
        accounts: Arc::new(
            config
                .accounts()
                .unwrap()
                .into_iter()
                .map(|a| Arc::new(AccountRuntime::new(a)))
                .collect(),
        ),
        timezone: config.timezone().unwrap(),
    };
    let released = release.run_once(Utc::now()).await.unwrap();
    assert_eq!((released.consented, released.due), (2, 2), "{released:?}");
    assert_eq!(status_of(&db, "oRaced").await, "pending");
    assert_eq!(status_of(&db, "oGivenBack").await, "pending");
    assert_eq!(status_of(&db, "oUsedUp").await, "held");
    assert_eq!(status_of(&db, "oNobody").await, "held");
}
on_both_backends!(release_wakes_rows_held_after_their_consent_arrived);

/// A terminal row older than `keep_days` is deleted; a waiting row as old is kept, and so is
/// a recent terminal row.
async fn prune_deletes_old_terminal_rows_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let long_ago = db.app.now_plus(-100 * 86_400);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (touser, template_id, data, status, updated_at)
             VALUES ('oOldFailed', 'T', '{{}}', 'failed', {long_ago}),
                    ('oOldWaiting', 'T', '{{}}', 'pending', {long_ago}),
                    ('oNewFailed', 'T', '{{}}', 'failed', {})",
            db.app.now_plus(-86_400)
        ))
        .await
        .unwrap();
    let prune = Prune {
        store: db.store().await,
        settings: RetentionSettings {
            keep_days: 90,
            batch_size: 1000,
            interval_secs: 3600,
        },
    };
    assert_eq!(prune.run_once(Utc::now()).await.unwrap(), (1, 0));
    let left: Vec<_> = db
        .app
        .rows()
        .await
        .into_iter()
        .filter_map(|r| r.touser)
        .collect();
    assert_eq!(left, ["oOldWaiting", "oNewFailed"]);
}
on_both_backends!(prune_deletes_old_terminal_rows_only);

/// A delivery event joins its sent row; an event with no row waits out the join window and is
/// then given up on.
async fn join_joins_events_and_gives_up_after_the_window(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.app
        .exec(
            "INSERT INTO outbox (touser, template_id, data, status, msgid)
             VALUES ('oUserA0001', 'T', '{}', 'sent', 1001)",
        )
        .await
        .unwrap();
    for (key, from_user, msgid) in [("k1", "oUserA0001", 1001), ("k2", "oNobody01", 4242)] {
        db.app
            .exec(&format!(
                "INSERT INTO inbound_events (account, dedup_key, msg_type, event, from_user,
                     create_time, msgid, status, raw_xml)
                 VALUES ('default', '{key}', 'event', 'TEMPLATESENDJOBFINISH', '{from_user}',
                     1764000000, {msgid}, 'success', '<xml/>')"
            ))
            .await
            .unwrap();
    }
    let join = JoinEvents::new(
        db.store().await,
        Arc::new(Notify::new()),
        Arc::new(Metrics::new(["default"])),
        Duration::from_secs(900),
    );
    let counts = join.run_once(Utc::now()).await.unwrap();
    assert_eq!((counts.joined, counts.given_up), (1, 0), "{counts:?}");
    assert_eq!(status_of(&db, "oUserA0001").await, "delivered");
    let later = join
        .run_once(Utc::now() + chrono::Duration::seconds(901))
        .await
        .unwrap();
    assert_eq!((later.joined, later.given_up), (0, 1), "{later:?}");
    assert_eq!(
        db.app
            .count_in("inbound_events", "msgid = 4242 AND given_up_at IS NOT NULL")
            .await,
        1
    );
}
on_both_backends!(join_joins_events_and_gives_up_after_the_window);

/// Each daemon's beat counts the live daemons and re-divides the rate; a daemon that stops
/// removes its row.
async fn heartbeat_shares_the_rate_among_live_daemons(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = db.config("http://127.0.0.1:9", "[limits]\nrate_per_second = 10");
    let runtime = |a| Arc::new(vec![Arc::new(AccountRuntime::new(a))]);
    let (a, b) = (
        runtime(config.accounts().unwrap().remove(0)),
        runtime(config.accounts().unwrap().remove(0)),
    );
    let first = Heartbeat::new(db.store().await, "daemon-a".into(), a.clone());
    let second = Heartbeat::new(db.store().await, "daemon-b".into(), b.clone());
    assert_eq!(first.run_once(Utc::now()).await.unwrap(), 1);
    assert_eq!(a[0].share_per_second(), 10);
    assert_eq!(second.run_once(Utc::now()).await.unwrap(), 2);
    assert_eq!(b[0].share_per_second(), 5, "half the rate each");
    second.stop().await;
    assert_eq!(db.app.count_in("daemons", "owner = 'daemon-b'").await, 0);
    assert_eq!(first.run_once(Utc::now()).await.unwrap(), 1);
    assert_eq!(a[0].share_per_second(), 10, "the whole rate again");
}
on_both_backends!(heartbeat_shares_the_rate_among_live_daemons);

/// A service that keeps failing turns `/healthz` to 503 with its name, how long and its error,
/// though the claim loop is well; it turns 200 again once the service succeeds. The join fails
/// while its table is away.
async fn healthz_names_a_service_that_keeps_failing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = Daemon::start(db.config(&sim.url(), "[monitor]\nfailing_after_secs = 1")).await;
    let healthz = format!("http://{}/healthz", daemon.monitor);
    let get = |url: String| async move {
        let response = reqwest::get(url).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(get(healthz.clone()).await, (200, "ok\n".into()));
    db.app
        .exec("ALTER TABLE inbound_events RENAME TO inbound_events_away")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = get(healthz.clone()).await;
        if status == 503 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.starts_with("join: no successful pass for "), "{body}");
    assert!(
        body.contains("inbound_events"),
        "the error is named: {body}"
    );
    db.app.insert_good(2, "s").await;
    db.app.wait_settled(Duration::from_secs(20)).await;
    db.app
        .exec("ALTER TABLE inbound_events_away RENAME TO inbound_events")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get(healthz.clone()).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz stayed 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    assert_eq!(db.app.count("status = 'sent'").await, 2, "sends went on");
}
on_both_backends!(healthz_names_a_service_that_keeps_failing);
