//! Subscription notifications (订阅通知) from the same outbox, against the simulator: rows wait
//! for the user's consent (pushed by WeChat's popup event, in plain and encrypted mode), a
//! one-time consent sends one row, a long-term one serves until withdrawn, `consent = "trust"`
//! lets WeChat decide and the ledger learns, a held row fails after its wait, typed values are
//! checked before any request, and an ambiguous bizsend is never resent.

use std::time::Duration;

use wechat_outbox::config::Config;
use wechat_outbox::simulator::subscribe::ConsentAnswer;
use wechat_outbox::simulator::{CallbackTarget, SimSettings};

use crate::delivery::daemon_with_callback;
use crate::helpers::{Backend, Daemon, Sim, TestDb};
use crate::limits::wait_for;
use crate::on_both_backends;

const APPID: &str = "wxtest0000000001";
const ONE_TIME: &str = "SUB_ORDER_SHIPPED";
const LONG_TERM: &str = "SUB_APPOINTMENT";
const SHIPPED: &str =
    r#"{"character_string1":"SO-2026-0001","phrase2":"已发货","time3":"2026年12月3日 15:01"}"#;
const APPOINTMENT: &str = r#"{"thing1":"门诊复查","date2":"2026年12月9日"}"#;

async fn insert(db: &TestDb, touser: &str, template: &str, data: &str) {
    db.app
        .exec(&format!(
            "INSERT INTO outbox (kind, touser, template_id, data, page) \
             VALUES ('subscribe', '{touser}', '{template}', '{data}', 'https://example.com/o/1')"
        ))
        .await
        .unwrap();
}

fn answer(openid: &str, template: &str, accept: bool) -> ConsentAnswer {
    ConsentAnswer {
        appid: APPID.into(),
        openid: openid.into(),
        template_ids: vec![template.into()],
        accept,
    }
}

const WAIT: Duration = Duration::from_secs(20);
const HELD_FOR_CONSENT: &str = "status = 'held' AND held_for = 'consent'";

/// A daemon (plain pushes, `extra` settings) on a new database, after `openid` accepted
/// `template`'s popup once.
async fn with_consent(
    backend: Backend,
    extra: &str,
    openid: &str,
    template: &str,
) -> (TestDb, Sim, Daemon) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let daemon = daemon_with_callback(&db, &sim, false, extra).await;
    sim.sim
        .subscribe_popup(&answer(openid, template, true))
        .await;
    let accepted = format!("openid = '{openid}' AND status = 'accept'");
    wait_for(&db, "consents", &accepted, 1, WAIT).await;
    (db, sim, daemon)
}

const TOKEN: &str = "subscribe-callback-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

/// A daemon whose account takes pushes in `mode` (plain, compatible or safe), and the
/// simulator pushing to it (sealed unless plain).
async fn daemon_in_mode(db: &TestDb, sim: &Sim, mode: &str) -> Daemon {
    let mut keys = format!("token = \"{TOKEN}\"\nmessage_mode = \"{mode}\"\n");
    if mode != "plain" {
        keys.push_str(&format!("encoding_aes_key = \"{AES_KEY}\"\n"));
    }
    let toml = db.config_toml(&sim.url(), "").replace(
        "secret = \"test-app-secret-value\"",
        &format!("secret = \"test-app-secret-value\"\n{keys}"),
    );
    let daemon = Daemon::start(Config::from_toml(&toml).unwrap()).await;
    sim.sim.set_callback(Some(CallbackTarget {
        url: daemon.callback_url("default"),
        token: TOKEN.into(),
        encoding_aes_key: (mode != "plain").then(|| AES_KEY.to_string()),
    }));
    daemon
}

/// A row waits held for consent; the popup's accept (pushed in the account's message mode)
/// sends it, its sent event delivers it; the one-time consent is used, so the next row waits
/// again.
async fn consent_sends_one_row_per_accept(backend: Backend, mode: &str) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon = daemon_in_mode(&db, &sim, mode).await;

    insert(&db, "oSubUser0001", ONE_TIME, SHIPPED).await;
    wait_for(&db, "outbox", HELD_FOR_CONSENT, 1, WAIT).await;
    let reason = db.app.rows().await[0].last_error.clone().unwrap();
    assert!(reason.contains("waits for the user's consent"), "{reason}");
    assert_eq!(
        sim.sim.stats().send_requests,
        0,
        "no request without consent"
    );

    sim.sim
        .subscribe_popup(&answer("oSubUser0001", ONE_TIME, true))
        .await;
    wait_for(&db, "outbox", "status = 'delivered'", 1, WAIT).await;
    assert_eq!(sim.sim.stats().subscribe_sends, 1);
    assert_eq!(
        db.app
            .count_in(
                "report_consents",
                "openid = 'oSubUser0001' AND granted = 0 AND used = 1 AND status = 'accept'"
            )
            .await,
        1
    );
    assert_eq!(
        db.app
            .count_in(
                "outbox",
                "status = 'delivered' AND delivery_status = 'success' AND msgid IS NOT NULL"
            )
            .await,
        1
    );

    insert(&db, "oSubUser0001", ONE_TIME, SHIPPED).await;
    wait_for(&db, "outbox", HELD_FOR_CONSENT, 1, WAIT).await;
    assert_eq!(
        sim.sim.stats().subscribe_sends,
        1,
        "a used consent is not used again"
    );
}

async fn consent_in_plain_mode(backend: Backend) {
    consent_sends_one_row_per_accept(backend, "plain").await;
}
on_both_backends!(consent_in_plain_mode);

async fn consent_in_compatible_mode(backend: Backend) {
    consent_sends_one_row_per_accept(backend, "compatible").await;
}
on_both_backends!(consent_in_compatible_mode);

async fn consent_in_safe_mode(backend: Backend) {
    consent_sends_one_row_per_accept(backend, "safe").await;
}
on_both_backends!(consent_in_safe_mode);

/// Eight rows race for two one-time consents among four workers: exactly two are sent.
async fn one_time_consents_are_used_exactly_once_under_concurrency(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon = daemon_with_callback(&db, &sim, false, "[workers]\nconcurrency = 8").await;
    for _ in 0..2 {
        sim.sim
            .subscribe_popup(&answer("oSubRacer001", ONE_TIME, true))
            .await;
        // Two popups of one user in one second are one push to the dedup key (see the docs).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    wait_for(&db, "consents", "granted = 2", 1, WAIT).await;
    let values: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "('subscribe', 'oSubRacer001', '{ONE_TIME}', \
                 '{{\"character_string1\":\"SO-{i}\",\"phrase2\":\"已发货\",\"time3\":\"15:01\"}}')"
            )
        })
        .collect();
    db.app
        .exec(&format!(
            "INSERT INTO outbox (kind, touser, template_id, data) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    wait_for(&db, "outbox", "status = 'delivered'", 2, WAIT).await;
    wait_for(&db, "outbox", "status = 'held'", 6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.sim.stats().subscribe_sends, 2);
    assert_eq!(
        sim.sim.stats().errcodes.get("43101"),
        None,
        "{:?}",
        sim.sim.stats()
    );
    assert_eq!(
        db.app
            .count_in("consents", "granted = 0 AND used = 2")
            .await,
        1
    );
}
on_both_backends!(one_time_consents_are_used_exactly_once_under_concurrency);

/// A long-term template's consent sends every row until the user rejects it in the settings;
/// then rows wait again.
async fn long_term_consent_serves_until_withdrawn(backend: Backend) {
    let (db, sim, _daemon) = with_consent(backend, "", "oSubPatient1", LONG_TERM).await;
    for _ in 0..3 {
        insert(&db, "oSubPatient1", LONG_TERM, APPOINTMENT).await;
    }
    wait_for(&db, "outbox", "status = 'delivered'", 3, WAIT).await;

    sim.sim
        .subscribe_change(&answer("oSubPatient1", LONG_TERM, false))
        .await;
    wait_for(
        &db,
        "report_consents",
        "status = 'reject' AND source = 'change'",
        1,
        WAIT,
    )
    .await;
    insert(&db, "oSubPatient1", LONG_TERM, APPOINTMENT).await;
    wait_for(&db, "outbox", HELD_FOR_CONSENT, 1, WAIT).await;
    let reason = db.app.rows().await[3].last_error.clone().unwrap();
    assert!(reason.contains("the user rejected it"), "{reason}");
    assert_eq!(sim.sim.stats().subscribe_sends, 3);
}
on_both_backends!(long_term_consent_serves_until_withdrawn);

/// `consent = "trust"`: sent without a consent in the ledger; WeChat's 43101 fails the row and
/// the ledger learns the refusal.
async fn trust_lets_wechat_decide_and_the_ledger_learns(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon = daemon_with_callback(&db, &sim, false, "[subscribe]\nconsent = \"trust\"").await;
    insert(&db, "oSubTrusted1", ONE_TIME, SHIPPED).await;
    db.app.wait_settled(WAIT).await;
    let row = db.app.rows().await.pop().unwrap();
    assert_eq!(
        (row.status.as_str(), row.last_errcode),
        ("failed", Some(43101))
    );
    assert!(row.last_error.unwrap().contains("report_consents"));
    assert_eq!(
        db.app
            .count_in(
                "consents",
                "openid = 'oSubTrusted1' AND status = 'reject' AND source = 'wechat'"
            )
            .await,
        1
    );
}
on_both_backends!(trust_lets_wechat_decide_and_the_ledger_learns);

/// Without a consent, a row waits `consent_wait_secs` from when it was due, then fails.
async fn a_row_without_consent_fails_after_its_wait(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon =
        daemon_with_callback(&db, &sim, false, "[subscribe]\nconsent_wait_secs = 1").await;
    insert(&db, "oSubNobody01", ONE_TIME, SHIPPED).await;
    wait_for(&db, "outbox", "status = 'failed'", 1, WAIT).await;
    let row = db.app.rows().await.pop().unwrap();
    assert_eq!(row.status, "failed");
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("no consent from the user"),
        "{row:?}"
    );
    assert_eq!(sim.sim.stats().send_requests, 0);
}
on_both_backends!(a_row_without_consent_fails_after_its_wait);

/// Typed values, an unknown kind and the other kind's link column fail their own row before
/// any request, naming the key and the rule; the good row beside them is sent.
async fn bad_subscribe_rows_fail_alone_with_the_rule_named(backend: Backend) {
    let (db, sim, _daemon) = with_consent(backend, "", "oSubGood0001", LONG_TERM).await;
    let long = "长".repeat(21);
    db.app
        .exec(&format!(
            "INSERT INTO outbox (kind, touser, template_id, data, url) VALUES \
             ('subscribe', 'oSubBad00001', '{LONG_TERM}', '{{\"thing1\":\"{long}\",\"date2\":\"2026-12-09\"}}', NULL),
             ('subscribe', 'oSubBad00002', '{LONG_TERM}', '{{\"thing1\":\"x\",\"date2\":\"someday\"}}', NULL),
             ('subscribe', 'oSubBad00003', '{LONG_TERM}', '{{\"first\":\"x\"}}', NULL),
             ('subscribe', 'oSubBad00004', '{LONG_TERM}', '{{\"thing1\":\"x\",\"date2\":\"2026-12-09\"}}', 'https://x'),
             ('postcard', 'oSubBad00005', '{LONG_TERM}', '{{}}', NULL),
             ('subscribe', 'oSubBad00006', '{ONE_TIME}', '{{\"character_string1\":\"A1\",\"phrase2\":\"已发货\"}}', NULL),
             ('subscribe', 'oSubGood0001', '{LONG_TERM}', '{{\"thing1\":\"x\",\"date2\":\"2026-12-09\"}}', NULL)"
        ))
        .await
        .unwrap();
    db.app.wait_settled(WAIT).await;
    let rows = db.app.rows().await;
    let reasons: Vec<String> = rows
        .iter()
        .map(|r| r.last_error.clone().unwrap_or_default())
        .collect();
    assert!(
        reasons[0].contains("data.thing1") && reasons[0].contains("at most 20 characters"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("data.date2") && reasons[1].contains("date:"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("data.first has no type"), "{reasons:?}");
    assert!(
        reasons[3].contains("url is not used by a subscribe row"),
        "{reasons:?}"
    );
    assert!(reasons[4].contains("kind is \"postcard\""), "{reasons:?}");
    assert!(
        reasons[5].contains("data lacks parameter \"time3\""),
        "{reasons:?}"
    );
    for row in &rows[..6] {
        assert_eq!(
            (row.status.as_str(), row.last_errcode),
            ("failed", None),
            "{row:?}"
        );
    }
    wait_for(&db, "outbox", "status = 'delivered'", 1, WAIT).await;
    assert_eq!(
        sim.sim.stats().send_requests,
        1,
        "only the good row was requested"
    );
}
on_both_backends!(bad_subscribe_rows_fail_alone_with_the_rule_named);

/// bizsend de-duplicates nothing: a request whose answer is lost ends `unknown` at once,
/// reaching the user once, never twice.
async fn an_ambiguous_bizsend_is_never_resent(backend: Backend) {
    let (db, sim, _daemon) = with_consent(
        backend,
        "[api]\ntimeout_ms = 300",
        "oSubHang0001",
        LONG_TERM,
    )
    .await;
    sim.sim.set_faults(wechat_outbox::simulator::Faults {
        hang_rate: 1.0,
        ..Default::default()
    });
    insert(&db, "oSubHang0001", LONG_TERM, APPOINTMENT).await;
    wait_for(&db, "outbox", "status = 'unknown'", 1, WAIT).await;
    let row = db.app.rows().await.pop().unwrap();
    assert!(
        row.last_error
            .unwrap()
            .contains("bizsend de-duplicates nothing")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = sim.sim.stats();
    assert_eq!(
        (
            stats.send_requests,
            stats.delivered,
            stats.duplicate_deliveries
        ),
        (1, 1, 0)
    );
}
on_both_backends!(an_ambiguous_bizsend_is_never_resent);

/// The account's subscription templates are synced from gettemplate at start (one-time and
/// long-term told apart) and listed beside the template messages' templates.
async fn subscription_templates_are_synced_and_listed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon = daemon_with_callback(&db, &sim, false, "").await;
    wait_for(&db, "subscribe_templates", "note IS NULL", 2, WAIT).await;
    let listed = db.store().await.list_templates().await.unwrap();
    let kinds: Vec<(&str, &str)> = listed
        .iter()
        .filter(|t| t.kind.starts_with("subscribe"))
        .map(|t| (t.template_id.as_str(), t.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (ONE_TIME, "subscribe (one-time)"),
            (LONG_TERM, "subscribe (long-term)")
        ]
    );
    assert!(listed.iter().any(|t| t.kind == "template"));
}
on_both_backends!(subscription_templates_are_synced_and_listed);

/// The ledger's own contract, straight on the store: ten takes race for two one-time consents
/// and two win; a give-back returns one; a refusal WeChat answered empties it; a long-term
/// consent is taken without using a one-time one.
async fn the_ledger_hands_out_each_consent_once(backend: Backend) {
    use wechat_outbox::store::{ConsentKey, ConsentTaken};
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let now = chrono::Utc::now();
    let key = ConsentKey {
        account: "default",
        openid: "oLedger00001",
        template_id: ONE_TIME,
    };
    db.app
        .exec(&format!(
            "INSERT INTO consents (account, openid, template_id, status, granted, used, source, \
             updated_at) VALUES ('default', 'oLedger00001', '{ONE_TIME}', 'accept', 2, 0, \
             'popup', CURRENT_TIMESTAMP)"
        ))
        .await
        .unwrap();
    let takes = (0..10).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let key = ConsentKey {
                account: "default",
                openid: "oLedger00001",
                template_id: ONE_TIME,
            };
            store.take_consent(key, false, now).await.unwrap()
        })
    });
    let results: Vec<ConsentTaken> = futures_results(takes).await;
    let won = results
        .iter()
        .filter(|t| **t == ConsentTaken::OneTime)
        .count();
    assert_eq!(won, 2, "{results:?}");
    assert_eq!(
        store.take_consent(key, false, now).await.unwrap(),
        ConsentTaken::Missing { rejected: false }
    );
    store
        .give_back_consent(key, ConsentTaken::OneTime, now)
        .await
        .unwrap();
    assert_eq!(
        db.app
            .count_in("consents", "granted = 1 AND used = 1")
            .await,
        1
    );
    assert_eq!(
        store.take_consent(key, true, now).await.unwrap(),
        ConsentTaken::LongTerm,
        "an accepted long-term template needs no one-time consent"
    );
    assert_eq!(
        db.app
            .count_in("consents", "granted = 1 AND used = 2")
            .await,
        1
    );
    store.learn_refusal(key, now, now).await.unwrap();
    assert_eq!(
        store.take_consent(key, false, now).await.unwrap(),
        ConsentTaken::Missing { rejected: true }
    );
    assert_eq!(
        db.app
            .count_in(
                "report_consents",
                "status = 'reject' AND granted = 0 AND source = 'wechat'"
            )
            .await,
        1
    );

    // The user accepts again while a request is in flight; its late 43101 leaves that be.
    db.app
        .exec(
            "UPDATE consents SET status = 'accept', granted = 1, source = 'popup', \
             answered_at = CURRENT_TIMESTAMP",
        )
        .await
        .unwrap();
    let request_began = now - chrono::Duration::hours(1);
    store.learn_refusal(key, now, request_began).await.unwrap();
    assert_eq!(
        db.app
            .count_in("consents", "status = 'accept' AND granted = 1")
            .await,
        1,
        "a 43101 to an older request does not overwrite the user's newer accept"
    );
}
on_both_backends!(the_ledger_hands_out_each_consent_once);

async fn futures_results<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

/// A subscription notification reaches a user who unfollowed the account (in 服务通知), and an
/// account WeChat does not let send them (48001) fails those rows alone: its template messages
/// go on, and the account is not paused.
async fn subscribe_rows_go_where_template_messages_do_not(backend: Backend) {
    let (db, sim, _daemon) = with_consent(backend, "", "oSubGone0001", LONG_TERM).await;
    db.app
        .exec(
            "INSERT INTO suppressed_openids (account, openid, since) \
             VALUES ('default', 'oSubGone0001', CURRENT_TIMESTAMP)",
        )
        .await
        .unwrap();
    insert(&db, "oSubGone0001", LONG_TERM, APPOINTMENT).await;
    wait_for(&db, "outbox", "status = 'delivered'", 1, WAIT).await;

    sim.sim.update(|s| s.subscribe_errcode = Some(48001));
    insert(&db, "oSubGone0001", LONG_TERM, APPOINTMENT).await;
    wait_for(
        &db,
        "outbox",
        "status = 'failed' AND last_errcode = 48001",
        1,
        WAIT,
    )
    .await;
    db.app
        .exec("INSERT INTO outbox (touser, template_id, data) VALUES ('oTemplate001', 'TEMPLATE_ID', '{\"first\":\"x\"}')")
        .await
        .unwrap();
    wait_for(&db, "outbox", "status = 'delivered'", 2, WAIT).await;

    // WeChat's daily limit of bizsend: that row waits for the next day, nothing else does.
    sim.sim.update(|s| s.subscribe_errcode = Some(45009));
    insert(&db, "oSubGone0001", LONG_TERM, APPOINTMENT).await;
    let waits = "status = 'pending' AND last_errcode = 45009 AND attempts = 0";
    wait_for(&db, "outbox", waits, 1, WAIT).await;
    let reason = db.app.rows().await.pop().unwrap().last_error.unwrap();
    assert!(reason.contains("template messages go on"), "{reason}");
    assert_eq!(db.app.count_in("account_pauses", "1 = 1").await, 0);
}
on_both_backends!(subscribe_rows_go_where_template_messages_do_not);

/// A one-time consent taken for a request WeChat refused (-1 busy) is given back, so the retry
/// sends the row; and a failed subscribe row resent from the dashboard stays a subscription
/// notification with its link (not a template message).
async fn a_refused_attempt_gives_its_consent_back_and_a_resend_keeps_the_kind(backend: Backend) {
    use wechat_outbox::store::{AuditEntry, Resend};
    let (db, sim, _daemon) = with_consent(backend, "", "oSubBusy0001", ONE_TIME).await;
    sim.sim.set_faults(wechat_outbox::simulator::Faults {
        busy_rate: 1.0,
        ..Default::default()
    });
    insert(&db, "oSubBusy0001", ONE_TIME, SHIPPED).await;
    wait_for(&db, "outbox", "attempts >= 3", 1, WAIT).await;
    assert_eq!(
        db.app.count_in("consents", "granted = 1").await,
        1,
        "given back each time"
    );
    sim.sim.set_faults(Default::default());
    wait_for(&db, "outbox", "status = 'delivered'", 1, WAIT).await;
    assert_eq!(
        db.app
            .count_in("consents", "granted = 0 AND used = 1")
            .await,
        1
    );

    // A row that failed for want of consent, resent once the user consents.
    db.app
        .exec(&format!(
            "INSERT INTO outbox (kind, touser, template_id, data, page, status, last_error) \
             VALUES ('subscribe', 'oSubLate0001', '{ONE_TIME}', '{SHIPPED}', \
             'https://example.com/late', 'failed', 'no consent')"
        ))
        .await
        .unwrap();
    let failed = db.app.rows().await.pop().unwrap().id;
    sim.sim
        .subscribe_popup(&answer("oSubLate0001", ONE_TIME, true))
        .await;
    let store = db.store().await;
    let audit = AuditEntry {
        actor: "test".into(),
        action: "resend",
        ..AuditEntry::default()
    };
    let Resend::Created(new) = store
        .resend_row(failed, audit, chrono::Utc::now())
        .await
        .unwrap()
    else {
        panic!("a failed row is resent");
    };
    wait_for(
        &db,
        "outbox",
        &format!(
            "id = {new} AND kind = 'subscribe' AND page = 'https://example.com/late' \
             AND status = 'delivered'"
        ),
        1,
        WAIT,
    )
    .await;
    assert_eq!(
        db.app
            .count_in("templates", "template_id = 'SUB_ORDER_SHIPPED'")
            .await,
        0
    );
    store.close().await;
}
on_both_backends!(a_refused_attempt_gives_its_consent_back_and_a_resend_keeps_the_kind);

/// A row whose wait has no start (an app wrote `created_at` that is no time) fails at once
/// with that reason, rather than starting the wait again on each claim; ledger entries that
/// allow nothing are pruned with the old rows, consents in force are kept.
async fn odd_rows_end_and_the_ledger_is_pruned(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sim = Sim::start(SimSettings::default()).await;
    let _daemon = daemon_with_callback(&db, &sim, false, "").await;
    // What each column type admits: text that is no time, infinity, year 270000.
    let odd_times = match backend {
        Backend::Sqlite => ["'not a time'", "'270000-01-01 00:00:00'"],
        Backend::Postgres => ["'-infinity'", "'270000-01-01 00:00:00+00'"],
    };
    for (i, odd_time) in odd_times.iter().enumerate() {
        db.app
            .exec(&format!(
                "INSERT INTO outbox (kind, touser, template_id, data, created_at) \
                 VALUES ('subscribe', 'oSubOdd0000{i}', '{ONE_TIME}', '{SHIPPED}', {odd_time})"
            ))
            .await
            .unwrap();
    }
    wait_for(&db, "outbox", "status = 'failed'", 2, WAIT).await;
    for row in db.app.rows().await {
        let reason = row.last_error.unwrap();
        assert!(reason.contains("is not a time the wait"), "{reason}");
    }

    let store = db.store().await;
    let old = "'2020-01-01 00:00:00'";
    db.app
        .exec(&format!(
            "INSERT INTO consents (account, openid, template_id, status, granted, used, source, updated_at) VALUES \
             ('default', 'oOld1', '{ONE_TIME}', 'reject', 0, 0, 'change', {old}), \
             ('default', 'oOld2', '{ONE_TIME}', 'accept', 0, 1, 'popup', {old}), \
             ('default', 'oOld3', '{ONE_TIME}', 'accept', 1, 0, 'popup', {old}), \
             ('default', 'oOld4', '{LONG_TERM}', 'accept', 0, 5, 'popup', {old})"
        ))
        .await
        .unwrap();
    wait_for(&db, "subscribe_templates", "1 = 1", 2, WAIT).await;
    store
        .prune(chrono::Utc::now() - chrono::Duration::days(1), 100)
        .await
        .unwrap();
    let mut kept = Vec::new();
    for i in 1..=4 {
        kept.push(
            db.app
                .count_in("consents", &format!("openid = 'oOld{i}'"))
                .await,
        );
    }
    assert_eq!(kept, [0, 0, 1, 1], "rejected and used-up go; in force stay");
    store.close().await;
}
on_both_backends!(odd_rows_end_and_the_ledger_is_pruned);
