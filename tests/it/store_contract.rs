//! The store's contract, method by method, on both backends (after River's `riverdrivertest`):
//! each public method of `Store` is called directly on a fresh database, with rows set up and
//! read back by plain SQL. No daemon, no simulator, no sleeps: every time is passed in, so a
//! test reads as "at this moment, this call does that". A change to `src/store/` that keeps the
//! methods' signatures must keep these passing on both backends.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use wechat_outbox::store::{
    AccountLimitsRow, ClaimRequest, Claimed, CountTerms, Finish, HeldFor, HoldLimits, InboundEvent,
    JoinCounts, JoinPass, Outcome, QuotaReservation, Recorded, Reserved, SignedPush, Store,
    StoredToken, SyncedTemplate, TemplateUse, TokenLease,
};

use wechat_outbox::domain::status::Status;

use crate::helpers::{AppDb, Backend, TestDb};
use crate::on_both_backends;

/// The quota periods the tests count in (any names do: the store compares them as given).
const MONTH: &str = "2026-11";
const DAY: &str = "2026-11-28";
/// How long a claim's lease lasts in these tests.
const LEASE_SECS: i64 = 60;

/// One test's database, its store, and the moment the test calls "now" (whole milliseconds,
/// which both backends store exactly).
struct Fx {
    db: TestDb,
    store: Store,
    now: DateTime<Utc>,
}

/// One outbox row as the tests read it back: times as Unix milliseconds, so that both backends
/// compare alike.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Snap {
    status: String,
    attempts: i64,
    lease_owner: Option<String>,
    lease_ms: Option<i64>,
    next_ms: i64,
    in_doubt: i64,
    doubt_ms: Option<i64>,
    msgid: Option<i64>,
    sent_ms: Option<i64>,
    last_errcode: Option<i64>,
    last_error: Option<String>,
    held_for: Option<String>,
    quota_month: Option<String>,
    quota_day: Option<String>,
    delivery_status: Option<String>,
    updated_ms: i64,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// No row is counted by the claim (each test that wants counting gives its own terms).
fn no_terms(_: &wechat_outbox::domain::message::RawMessage) -> Option<CountTerms> {
    None
}

impl Fx {
    async fn new(backend: Backend) -> Fx {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
        Fx { db, store, now }
    }

    /// `now` plus `secs` seconds.
    fn t(&self, secs: i64) -> DateTime<Utc> {
        self.now + chrono::Duration::seconds(secs)
    }

    /// A time as an SQL literal of this backend.
    fn lit(&self, t: DateTime<Utc>) -> String {
        match self.db.backend {
            Backend::Sqlite => format!("'{}'", wechat_outbox::store::time::ts(t)),
            Backend::Postgres => format!("'{}'", t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        }
    }

    /// `now` plus `secs` seconds, as an SQL literal.
    fn at(&self, secs: i64) -> String {
        self.lit(self.t(secs))
    }

    /// A time column as Unix milliseconds, in this backend's SQL.
    fn millis(&self, column: &str) -> String {
        match self.db.backend {
            Backend::Sqlite => {
                format!("CAST(round((julianday({column}) - 2440587.5) * 86400000.0) AS INTEGER)")
            }
            Backend::Postgres => {
                format!("CAST(round(extract(epoch FROM {column}) * 1000) AS BIGINT)")
            }
        }
    }

    /// Inserts one row for `touser` (template `TPL`, due a second ago); `columns` add to or
    /// override those values, as SQL. Returns its id.
    async fn insert(&self, touser: &str, columns: &[(&str, String)]) -> i64 {
        let mut values: Vec<(&str, String)> = vec![
            ("touser", format!("'{touser}'")),
            ("template_id", "'TPL'".into()),
            ("data", "'{}'".into()),
            ("next_attempt_at", self.at(-1)),
        ];
        for (column, value) in columns {
            match values.iter_mut().find(|(c, _)| *c == *column) {
                Some(slot) => slot.1 = value.clone(),
                None => values.push((*column, value.clone())),
            }
        }
        let names: Vec<&str> = values.iter().map(|(c, _)| *c).collect();
        let literals: Vec<&str> = values.iter().map(|(_, v)| v.as_str()).collect();
        let sql = format!(
            "INSERT INTO outbox ({}) VALUES ({}) RETURNING id",
            names.join(", "),
            literals.join(", ")
        );
        self.scalar(&sql).await
    }

    /// A row in `status`, otherwise as `insert` makes it.
    async fn insert_in(&self, touser: &str, status: &str, columns: &[(&str, String)]) -> i64 {
        let mut all = vec![("status", format!("'{status}'"))];
        all.extend(columns.iter().cloned());
        self.insert(touser, &all).await
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &self.db.app {
            AppDb::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            AppDb::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .expect("scalar")
    }

    async fn exec(&self, sql: &str) {
        self.db.app.exec(sql).await.expect(sql);
    }

    /// Sets columns of one row (`assignments` as in `UPDATE … SET`).
    async fn set(&self, id: i64, assignments: &str) {
        self.exec(&format!("UPDATE outbox SET {assignments} WHERE id = {id}"))
            .await;
    }

    async fn count(&self, condition: &str) -> i64 {
        self.db.app.count(condition).await
    }

    async fn count_in(&self, table: &str, condition: &str) -> i64 {
        self.db.app.count_in(table, condition).await
    }

    async fn snap(&self, id: i64) -> Snap {
        let int = |e: &str| match self.db.backend {
            Backend::Sqlite => format!("CAST({e} AS INTEGER)"),
            Backend::Postgres => format!("CAST(CAST({e} AS INTEGER) AS BIGINT)"),
        };
        let sql = format!(
            "SELECT status, {attempts} AS attempts, lease_owner, {lease} AS lease_ms,
                    {next} AS next_ms, {in_doubt} AS in_doubt, {doubt} AS doubt_ms,
                    msgid, {sent} AS sent_ms, {errcode} AS last_errcode, last_error, held_for,
                    quota_month, quota_day, delivery_status, {updated} AS updated_ms
             FROM outbox WHERE id = {id}",
            attempts = int("attempts"),
            lease = self.millis("lease_expires_at"),
            next = self.millis("next_attempt_at"),
            in_doubt = int("in_doubt"),
            doubt = self.millis("in_doubt_since"),
            sent = self.millis("sent_at"),
            errcode = int("last_errcode"),
            updated = self.millis("updated_at"),
        );
        let sql = sqlx::AssertSqlSafe(sql);
        match &self.db.app {
            AppDb::Sqlite(pool) => sqlx::query_as(sql).fetch_one(pool).await,
            AppDb::Postgres(pool) => sqlx::query_as(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("row {id}: {e}"))
    }

    fn request<'a>(&self, owner: &'a str, limit: usize, now: DateTime<Utc>) -> ClaimRequest<'a> {
        ClaimRequest {
            owner,
            limit,
            lease_until: now + chrono::Duration::seconds(LEASE_SECS),
            now,
            month: MONTH,
            day: DAY,
            per_user_since: None,
        }
    }

    /// Claims up to `limit` rows for `owner` at `now` without counting any; the claimed rows.
    async fn claim_at(&self, owner: &str, limit: usize, now: DateTime<Utc>) -> Vec<Claimed> {
        self.store
            .claim(&self.request(owner, limit, now), &no_terms)
            .await
            .expect("claim")
    }

    /// The ids `claim_at(owner, limit, now)` claimed, sorted.
    async fn claim_ids(&self, owner: &str, limit: usize) -> Vec<i64> {
        ids(&self.claim_at(owner, limit, self.now).await)
    }

    /// A finish of `id` at `now` whose attempt began at `now` too.
    fn finish(&self, id: i64, outcome: Outcome) -> Finish {
        Finish {
            id,
            outcome,
            now: self.now,
            attempt_began: self.now,
        }
    }

    fn reservation<'a>(
        &self,
        owner: &'a str,
        id: i64,
        template_id: &'a str,
    ) -> QuotaReservation<'a> {
        reservation(owner, id, template_id, 10, 100, self.now)
    }
}

fn reservation<'a>(
    owner: &'a str,
    id: i64,
    template_id: &'a str,
    monthly_limit: u32,
    daily_limit: u32,
    now: DateTime<Utc>,
) -> QuotaReservation<'a> {
    QuotaReservation {
        owner,
        id,
        account: "default",
        template_id,
        month: MONTH,
        day: DAY,
        monthly_limit,
        daily_limit,
        now,
    }
}

fn ids(claimed: &[Claimed]) -> Vec<i64> {
    let mut ids: Vec<i64> = claimed.iter().map(|c| c.raw.id).collect();
    ids.sort_unstable();
    ids
}

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------------------------
// claim

/// Only due rows are claimed: not a future `next_attempt_at` or `send_after`, not a row in any
/// other status, not a paused account's row.
async fn claim_takes_only_due_rows(backend: Backend) {
    let fx = Fx::new(backend).await;
    let due = fx.insert("oDue", &[]).await;
    let due_send_after = fx.insert("oAfter", &[("send_after", fx.at(-5))]).await;
    fx.insert("oLater", &[("next_attempt_at", fx.at(30))]).await;
    fx.insert("oNotYet", &[("send_after", fx.at(30))]).await;
    for status in ["held", "sending", "sent", "failed", "cancelled", "unknown"] {
        fx.insert_in(&format!("o{status}"), status, &[]).await;
    }
    fx.insert("oPaused", &[("account", "'paused'".into())])
        .await;
    fx.store
        .pause_account("paused", fx.t(60), 45009, "daily limit", fx.now)
        .await
        .unwrap();

    assert_eq!(fx.claim_ids("me", 100).await, [due, due_send_after]);
    assert!(fx.claim_ids("me", 100).await.is_empty(), "claimed twice");
}
on_both_backends!(claim_takes_only_due_rows);

/// Rows are claimed by priority, then `next_attempt_at`, then id, and never more than the limit.
async fn claim_takes_rows_by_priority_up_to_the_limit(backend: Backend) {
    let fx = Fx::new(backend).await;
    let old = fx.insert("oOld", &[("next_attempt_at", fx.at(-20))]).await;
    let newer = fx
        .insert("oNewer", &[("next_attempt_at", fx.at(-10))])
        .await;
    let urgent = fx
        .insert(
            "oUrgent",
            &[("priority", "5".into()), ("next_attempt_at", fx.at(-1))],
        )
        .await;
    let same_time = fx.insert("oSame", &[("next_attempt_at", fx.at(-10))]).await;

    assert_eq!(fx.claim_ids("me", 2).await, sorted(vec![urgent, old]));
    assert_eq!(fx.claim_ids("me", 1).await, [newer]);
    assert_eq!(fx.claim_ids("me", 1).await, [same_time]);
    assert_eq!(fx.count("status = 'sending'").await, 4);
}
on_both_backends!(claim_takes_rows_by_priority_up_to_the_limit);

/// A claim writes the lease (owner, expiry, `sending`), counts the attempt, and returns the
/// row's columns.
async fn claim_writes_the_lease_and_counts_the_attempt(backend: Backend) {
    let fx = Fx::new(backend).await;
    let id = fx
        .insert(
            "oLease",
            &[
                ("attempts", "3".into()),
                ("client_msg_id", "'k-1'".into()),
                ("expires_at", fx.at(3600)),
            ],
        )
        .await;
    let claimed = fx.claim_at("me", 10, fx.now).await;
    assert_eq!(claimed.len(), 1);
    let raw = &claimed[0].raw;
    assert_eq!(raw.id, id);
    assert_eq!(raw.account, "default");
    assert_eq!(raw.touser.as_deref(), Some("oLease"));
    assert_eq!(raw.template_id.as_deref(), Some("TPL"));
    assert_eq!(raw.data.as_deref(), Some("{}"));
    assert_eq!(raw.client_msg_id.as_deref(), Some("k-1"));
    assert_eq!(raw.expires_at, Some(fx.t(3600)));
    assert_eq!(raw.attempts, 4, "the attempt is counted in what comes back");
    assert!(!raw.in_doubt && !raw.suppressed && raw.unreadable.is_none());
    assert!(claimed[0].reserved.is_none(), "no terms, no reservation");

    let s = fx.snap(id).await;
    assert_eq!(s.status, "sending");
    assert_eq!(s.attempts, 4);
    assert_eq!(s.lease_owner.as_deref(), Some("me"));
    assert_eq!(s.lease_ms, Some(ms(fx.t(LEASE_SECS))));
    assert_eq!(s.updated_ms, ms(fx.now));
    assert_eq!((s.quota_month, s.quota_day), (None, None), "not counted");
}
on_both_backends!(claim_writes_the_lease_and_counts_the_attempt);

/// Claims running at the same time, on one store and on a second one, never return the same
/// row, and between them take every row.
async fn concurrent_claims_never_share_a_row(backend: Backend) {
    let fx = Fx::new(backend).await;
    fx.db.app.insert_good(300, "race").await;
    fx.exec(&format!(
        "UPDATE outbox SET next_attempt_at = {}",
        fx.at(-1)
    ))
    .await;
    let second = fx.db.store().await;
    let mut tasks = Vec::new();
    for n in 0..6 {
        let store = if n % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let now = fx.now;
        tasks.push(tokio::spawn(async move {
            let owner = format!("daemon-{n}");
            let mut mine = Vec::new();
            loop {
                let request = ClaimRequest {
                    owner: &owner,
                    limit: 7,
                    lease_until: now + chrono::Duration::seconds(LEASE_SECS),
                    now,
                    month: MONTH,
                    day: DAY,
                    per_user_since: None,
                };
                let claimed = store.claim(&request, &no_terms).await.expect("claim");
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.iter().map(|c| c.raw.id));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a row was claimed twice");
    assert_eq!(all.len(), 300, "every row claimed once");
    assert_eq!(fx.count("status = 'sending' AND attempts = 1").await, 300);
}
on_both_backends!(concurrent_claims_never_share_a_row);

/// While an account is paused, the claim passes over its rows; when the pause ends they are
/// claimed. A second pause replaces the first.
async fn a_paused_account_is_skipped_until_the_pause_ends(backend: Backend) {
    let fx = Fx::new(backend).await;
    let paused = fx.insert("oP", &[("account", "'paused'".into())]).await;
    let other = fx.insert("oQ", &[]).await;
    fx.store
        .pause_account("paused", fx.t(600), 45009, "daily limit", fx.now)
        .await
        .unwrap();
    fx.store
        .pause_account("paused", fx.t(60), 48004, "banned", fx.now)
        .await
        .unwrap();
    assert_eq!(
        fx.count_in(
            "account_pauses",
            "account = 'paused' AND errcode = 48004 AND reason = 'banned'"
        )
        .await,
        1
    );
    assert_eq!(fx.claim_ids("me", 10).await, [other]);
    assert!(ids(&fx.claim_at("me", 10, fx.t(59)).await).is_empty());
    assert_eq!(ids(&fx.claim_at("me", 10, fx.t(61)).await), [paused]);
}
on_both_backends!(a_paused_account_is_skipped_until_the_pause_ends);

// ---------------------------------------------------------------------------------------------
// finish_many

/// Each outcome writes its columns, and every row leaves its lease.
async fn finish_many_writes_each_outcome(backend: Backend) {
    let fx = Fx::new(backend).await;
    let mut rows = Vec::new();
    for n in 0..7 {
        rows.push(fx.insert(&format!("oF{n}"), &[]).await);
    }
    assert_eq!(fx.claim_ids("me", 10).await, rows);
    let began = fx.t(-2);
    let finishes: Vec<Finish> = [
        Outcome::Sent { msgid: Some(42) },
        Outcome::Failed {
            errcode: Some(40003),
            reason: "invalid openid".into(),
        },
        Outcome::Expired {
            reason: "too late".into(),
        },
        Outcome::Unknown {
            errcode: None,
            reason: "timed out".into(),
        },
        Outcome::Retry {
            at: fx.t(30),
            errcode: Some(-1),
            reason: "system busy".into(),
            in_doubt: true,
        },
        Outcome::Release {
            errcode: Some(45009),
            reason: "paused".into(),
            in_doubt: false,
        },
        Outcome::Hold {
            until: fx.t(3600),
            held_for: HeldFor::MonthlyQuota,
            reason: "month used up".into(),
        },
    ]
    .into_iter()
    .zip(&rows)
    .map(|(outcome, &id)| Finish {
        attempt_began: began,
        ..fx.finish(id, outcome)
    })
    .collect();
    assert_eq!(
        fx.store.finish_many("me", &finishes).await.unwrap(),
        [true; 7]
    );

    let mut s = Vec::new();
    for &id in &rows {
        s.push(fx.snap(id).await);
    }
    for (n, s) in s.iter().enumerate() {
        assert_eq!(
            (&s.lease_owner, s.lease_ms),
            (&None, None),
            "row {n}: {s:?}"
        );
        assert_eq!(s.updated_ms, ms(fx.now), "row {n}: {s:?}");
    }
    let sent = &s[0];
    assert_eq!(sent.status, "sent", "{sent:?}");
    assert_eq!(sent.msgid, Some(42));
    assert_eq!(sent.sent_ms, Some(ms(fx.now)));
    assert_eq!((sent.last_errcode, &sent.last_error), (Some(0), &None));
    assert_eq!((sent.attempts, sent.in_doubt, sent.doubt_ms), (1, 0, None));

    let failed = &s[1];
    assert_eq!(failed.status, "failed", "{failed:?}");
    assert_eq!(failed.last_errcode, Some(40003));
    assert_eq!(failed.last_error.as_deref(), Some("invalid openid"));
    assert_eq!((failed.msgid, failed.sent_ms), (None, None));

    let expired = &s[2];
    assert_eq!(expired.status, "expired", "{expired:?}");
    assert_eq!(expired.last_error.as_deref(), Some("too late"));

    let unknown = &s[3];
    assert_eq!(unknown.status, "unknown", "{unknown:?}");
    assert_eq!(unknown.in_doubt, 1);
    assert_eq!(unknown.doubt_ms, Some(ms(began)));

    let retry = &s[4];
    assert_eq!(retry.status, "pending", "{retry:?}");
    assert_eq!(retry.next_ms, ms(fx.t(30)));
    assert_eq!((retry.in_doubt, retry.doubt_ms), (1, Some(ms(began))));
    assert_eq!(retry.attempts, 1, "a retry keeps its attempt");
    assert_eq!(retry.last_errcode, Some(-1));
    assert_eq!(retry.last_error.as_deref(), Some("system busy"));

    let released = &s[5];
    assert_eq!(released.status, "pending", "{released:?}");
    assert_eq!(released.attempts, 0, "a release refunds the attempt");
    assert_eq!(
        released.next_ms,
        ms(fx.now),
        "released rows are due at once"
    );
    assert_eq!((released.in_doubt, released.doubt_ms), (0, None));
    assert_eq!(released.last_errcode, Some(45009));

    let held = &s[6];
    assert_eq!(held.status, "held", "{held:?}");
    assert_eq!(held.held_for.as_deref(), Some("monthly quota"));
    assert_eq!(held.next_ms, ms(fx.t(3600)));
    assert_eq!(held.attempts, 0, "a hold refunds the attempt");
    assert_eq!(held.last_error.as_deref(), Some("month used up"));
}
on_both_backends!(finish_many_writes_each_outcome);

/// In a group, a row whose lease was lost (another owner holds it, or it is no longer being
/// sent) is not written and reported false; the others in the group are written.
async fn finish_many_skips_rows_whose_lease_was_lost(backend: Backend) {
    let fx = Fx::new(backend).await;
    let ours = fx.insert("oOurs", &[]).await;
    let taken = fx.insert("oTaken", &[]).await;
    let rescued = fx.insert("oRescued", &[]).await;
    let also_ours = fx.insert("oAlso", &[]).await;
    assert_eq!(fx.claim_ids("me", 10).await.len(), 4);
    // Our lease on one ran out and another daemon claimed it; another was rescued to pending.
    fx.set(taken, "lease_owner = 'other'").await;
    fx.set(rescued, &format!("lease_expires_at = {}", fx.at(-1)))
        .await;
    assert_eq!(fx.store.rescue_expired_leases(fx.now).await.unwrap(), 1);

    let group: Vec<Finish> = [ours, taken, rescued, also_ours]
        .iter()
        .enumerate()
        .map(|(n, &id)| {
            fx.finish(
                id,
                Outcome::Sent {
                    msgid: Some(100 + n as i64),
                },
            )
        })
        .collect();
    assert_eq!(
        fx.store.finish_many("me", &group).await.unwrap(),
        [true, false, false, true]
    );
    assert_eq!(fx.snap(ours).await.status, "sent");
    assert_eq!(fx.snap(also_ours).await.msgid, Some(103));
    let t = fx.snap(taken).await;
    assert_eq!(
        (t.status.as_str(), t.lease_owner.as_deref(), t.msgid),
        ("sending", Some("other"), None),
        "{t:?}"
    );
    let r = fx.snap(rescued).await;
    assert_eq!(
        (r.status.as_str(), r.msgid, r.sent_ms),
        ("pending", None, None),
        "{r:?}"
    );
    // An empty group writes nothing.
    assert!(fx.store.finish_many("me", &[]).await.unwrap().is_empty());
}
on_both_backends!(finish_many_skips_rows_whose_lease_was_lost);

/// A row in doubt keeps the start of its first doubtful attempt through later ones (the start
/// of WeChat's de-duplication window), whether the next doubt comes from an outcome or a
/// rescued lease.
async fn in_doubt_since_keeps_the_first_attempts_start(backend: Backend) {
    let fx = Fx::new(backend).await;
    let id = fx
        .insert("oDoubt", &[("next_attempt_at", fx.at(-1000))])
        .await;
    let retry = |at| Outcome::Retry {
        at,
        errcode: None,
        reason: "timed out".into(),
        in_doubt: true,
    };
    // First attempt, claimed at t-100, ends in doubt.
    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-100)).await), [id]);
    let first = Finish {
        id,
        outcome: retry(fx.t(-90)),
        now: fx.t(-95),
        attempt_began: fx.t(-100),
    };
    assert_eq!(fx.store.finish_many("me", &[first]).await.unwrap(), [true]);
    // Second attempt, claimed at t-80, ends in doubt too.
    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-80)).await), [id]);
    let second = Finish {
        id,
        outcome: retry(fx.t(-70)),
        now: fx.t(-75),
        attempt_began: fx.t(-80),
    };
    assert_eq!(fx.store.finish_many("me", &[second]).await.unwrap(), [true]);
    assert_eq!(fx.snap(id).await.doubt_ms, Some(ms(fx.t(-100))));
    // Third attempt's daemon dies; the rescue keeps the first start too.
    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-60)).await), [id]);
    assert_eq!(fx.store.rescue_expired_leases(fx.t(1)).await.unwrap(), 1);
    let s = fx.snap(id).await;
    assert_eq!((s.in_doubt, s.doubt_ms), (1, Some(ms(fx.t(-100)))), "{s:?}");
    assert_eq!(s.attempts, 3);
}
on_both_backends!(in_doubt_since_keeps_the_first_attempts_start);

/// Doubt an earlier attempt left is kept while the row waits, whatever a later outcome says:
/// a release (daemon stopping, lease lost) or a hold writes `in_doubt: false`, yet the earlier
/// request may have reached WeChat, and dropping the doubt would let a resend after the
/// de-duplication window reach the user twice. Only a final outcome ends it.
async fn doubt_is_kept_while_the_row_waits(backend: Backend) {
    let fx = Fx::new(backend).await;
    let id = fx
        .insert("oDoubt", &[("next_attempt_at", fx.at(-1000))])
        .await;
    let finish = |outcome, claimed: i64| Finish {
        id,
        outcome,
        now: fx.t(claimed + 5),
        attempt_began: fx.t(claimed),
    };
    let first_doubt = ms(fx.t(-100));
    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-100)).await), [id]);
    let in_doubt = Outcome::Retry {
        at: fx.t(-90),
        errcode: None,
        reason: "timed out".into(),
        in_doubt: true,
    };
    fx.store
        .finish_many("me", &[finish(in_doubt, -100)])
        .await
        .unwrap();

    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-80)).await), [id]);
    let released = Outcome::Release {
        errcode: None,
        reason: "released at shutdown before it was sent".into(),
        in_doubt: false,
    };
    fx.store
        .finish_many("me", &[finish(released, -80)])
        .await
        .unwrap();
    let s = fx.snap(id).await;
    assert_eq!(
        (s.status.as_str(), s.in_doubt, s.doubt_ms),
        ("pending", 1, Some(first_doubt))
    );

    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-60)).await), [id]);
    let held = Outcome::Hold {
        until: fx.t(-50),
        held_for: HeldFor::Template,
        reason: "no room".into(),
    };
    fx.store
        .finish_many("me", &[finish(held, -60)])
        .await
        .unwrap();
    let s = fx.snap(id).await;
    assert_eq!(
        (s.status.as_str(), s.in_doubt, s.doubt_ms),
        ("held", 1, Some(first_doubt))
    );

    fx.store.release_due_holds(fx.t(-40)).await.unwrap();
    assert_eq!(ids(&fx.claim_at("me", 1, fx.t(-40)).await), [id]);
    let failed = Outcome::Failed {
        errcode: Some(40003),
        reason: "invalid openid".into(),
    };
    fx.store
        .finish_many("me", &[finish(failed, -40)])
        .await
        .unwrap();
    let s = fx.snap(id).await;
    assert_eq!(
        (s.status.as_str(), s.in_doubt, s.doubt_ms),
        ("failed", 0, None)
    );
}
on_both_backends!(doubt_is_kept_while_the_row_waits);

// ---------------------------------------------------------------------------------------------
// leases

/// Only the holder extends a lease, and only while the row is being sent.
async fn extend_lease_only_for_the_holder(backend: Backend) {
    let fx = Fx::new(backend).await;
    let id = fx.insert("oExt", &[]).await;
    fx.claim_ids("me", 1).await;
    assert!(fx.store.extend_lease("me", id, fx.t(300)).await.unwrap());
    assert_eq!(fx.snap(id).await.lease_ms, Some(ms(fx.t(300))));
    assert!(!fx.store.extend_lease("other", id, fx.t(900)).await.unwrap());
    assert_eq!(fx.snap(id).await.lease_ms, Some(ms(fx.t(300))));
    let done = fx.finish(id, Outcome::Sent { msgid: Some(1) });
    fx.store.finish_many("me", &[done]).await.unwrap();
    assert!(!fx.store.extend_lease("me", id, fx.t(900)).await.unwrap());
    assert!(
        !fx.store
            .extend_lease("me", id + 1000, fx.t(900))
            .await
            .unwrap()
    );
}
on_both_backends!(extend_lease_only_for_the_holder);

/// Only rows whose lease has expired are rescued: back to `pending`, due now, in doubt since
/// their claim, with a reason.
async fn rescue_expired_leases_takes_only_expired_rows(backend: Backend) {
    let fx = Fx::new(backend).await;
    let early = || vec![("next_attempt_at", fx.at(-1000))];
    let dead = fx.insert("oDead", &early()).await;
    let alive = fx.insert("oAlive", &early()).await;
    assert_eq!(ids(&fx.claim_at("gone", 2, fx.t(-120)).await).len(), 2);
    fx.set(alive, &format!("lease_expires_at = {}", fx.at(30)))
        .await;
    // A pending row with an old lease time left over is not touched.
    let pending = fx
        .insert("oPending", &[("lease_expires_at", fx.at(-500))])
        .await;

    assert_eq!(fx.store.rescue_expired_leases(fx.now).await.unwrap(), 1);
    let s = fx.snap(dead).await;
    assert_eq!(s.status, "pending", "{s:?}");
    assert_eq!((s.lease_owner.as_deref(), s.lease_ms), (None, None));
    assert_eq!((s.in_doubt, s.doubt_ms), (1, Some(ms(fx.t(-120)))));
    assert_eq!(s.next_ms, ms(fx.now));
    assert!(
        s.last_error.as_deref().unwrap().contains("lease expired"),
        "{s:?}"
    );
    assert_eq!(s.attempts, 1, "the lost attempt stays counted");
    assert_eq!(fx.snap(alive).await.status, "sending");
    assert_eq!(fx.snap(pending).await.in_doubt, 0);
    assert_eq!(fx.store.rescue_expired_leases(fx.now).await.unwrap(), 0);
}
on_both_backends!(rescue_expired_leases_takes_only_expired_rows);

/// At shutdown a daemon releases its own rows, in doubt, and no one else's.
async fn release_owned_releases_only_our_rows(backend: Backend) {
    let fx = Fx::new(backend).await;
    for n in 0..3 {
        fx.insert(&format!("oR{n}"), &[]).await;
    }
    let mine = fx.claim_ids("me", 2).await;
    let theirs = fx.claim_ids("other", 2).await;
    assert_eq!(theirs.len(), 1);

    assert_eq!(fx.store.release_owned("me", fx.t(5)).await.unwrap(), 2);
    for id in mine {
        let s = fx.snap(id).await;
        assert_eq!(s.status, "pending", "{s:?}");
        assert_eq!((s.in_doubt, s.doubt_ms), (1, Some(ms(fx.now))));
        assert_eq!((s.lease_owner, s.next_ms), (None, ms(fx.t(5))));
        assert!(s.last_error.unwrap().contains("released at shutdown"));
    }
    let s = fx.snap(theirs[0]).await;
    assert_eq!(
        (s.status.as_str(), s.lease_owner.as_deref()),
        ("sending", Some("other"))
    );
    assert_eq!(fx.store.release_owned("me", fx.t(5)).await.unwrap(), 0);
}
on_both_backends!(release_owned_releases_only_our_rows);

/// Only pending and held rows past `expires_at` expire; rows being sent or finished keep their
/// status, as do rows with time left or no expiry.
async fn expire_overdue_takes_only_waiting_rows_past_expiry(backend: Backend) {
    let fx = Fx::new(backend).await;
    let past = || vec![("expires_at", fx.at(-1))];
    let pending = fx.insert_in("oPending", "pending", &past()).await;
    let held = fx
        .insert_in(
            "oHeld",
            "held",
            &[
                ("expires_at", fx.at(-1)),
                ("held_for", "'daily quota'".into()),
            ],
        )
        .await;
    let sending = fx.insert_in("oSending", "sending", &past()).await;
    let sent = fx.insert_in("oSent", "sent", &past()).await;
    let later = fx
        .insert_in("oLater", "pending", &[("expires_at", fx.at(60))])
        .await;
    let never = fx.insert_in("oNever", "pending", &[]).await;

    assert_eq!(fx.store.expire_overdue(fx.now).await.unwrap(), 2);
    for id in [pending, held] {
        let s = fx.snap(id).await;
        assert_eq!(s.status, "expired", "{s:?}");
        assert_eq!(s.held_for, None, "an expired row waits for nothing: {s:?}");
        assert!(s.last_error.unwrap().contains("expires_at passed"));
        assert_eq!(s.updated_ms, ms(fx.now));
    }
    for (id, status) in [
        (sending, "sending"),
        (sent, "sent"),
        (later, "pending"),
        (never, "pending"),
    ] {
        assert_eq!(fx.snap(id).await.status, status, "row {id}");
    }
}
on_both_backends!(expire_overdue_takes_only_waiting_rows_past_expiry);

/// Pending rows in doubt since before the window are given up as `unknown`; later doubt, rows
/// not in doubt and rows being sent are not.
async fn give_up_in_doubt_takes_only_old_doubt(backend: Backend) {
    let fx = Fx::new(backend).await;
    let doubt = |secs| {
        vec![
            ("in_doubt", "(1 = 1)".to_string()),
            ("in_doubt_since", fx.at(secs)),
        ]
    };
    let old = fx.insert_in("oOld", "pending", &doubt(-7200)).await;
    let recent = fx.insert_in("oRecent", "pending", &doubt(-60)).await;
    let sending = fx.insert_in("oSending", "sending", &doubt(-7200)).await;
    let sure = fx.insert_in("oSure", "pending", &[]).await;

    assert_eq!(
        fx.store
            .give_up_in_doubt(fx.t(-3600), fx.now)
            .await
            .unwrap(),
        1
    );
    let s = fx.snap(old).await;
    assert_eq!(s.status, "unknown", "{s:?}");
    assert!(
        s.last_error
            .unwrap()
            .contains("de-duplication window has passed")
    );
    for id in [recent, sure] {
        assert_eq!(fx.snap(id).await.status, "pending");
    }
    assert_eq!(fx.snap(sending).await.status, "sending");
}
on_both_backends!(give_up_in_doubt_takes_only_old_doubt);

// ---------------------------------------------------------------------------------------------
// access tokens

fn lease<'a>(owner: &'a str, now: DateTime<Utc>, failing: Option<&'a str>) -> TokenLease<'a> {
    TokenLease {
        account: "default",
        owner,
        now,
        lease_until: now + chrono::Duration::seconds(30),
        refresh_before: now + chrono::Duration::seconds(300),
        failing,
    }
}

/// One owner at a time holds the refresh lease; another gets it once the lease time passes.
async fn the_token_refresh_lease_is_exclusive(backend: Backend) {
    let fx = Fx::new(backend).await;
    assert!(fx.store.load_token("default").await.unwrap().is_none());
    assert!(
        fx.store
            .lease_token_refresh(&lease("a", fx.now, None))
            .await
            .unwrap()
    );
    assert!(
        !fx.store
            .lease_token_refresh(&lease("b", fx.now, None))
            .await
            .unwrap()
    );
    assert!(
        !fx.store
            .lease_token_refresh(&lease("b", fx.t(29), None))
            .await
            .unwrap()
    );
    assert!(
        !fx.store
            .lease_token_refresh(&lease("a", fx.t(1), None))
            .await
            .unwrap()
    );
    assert!(
        fx.store
            .lease_token_refresh(&lease("b", fx.t(31), None))
            .await
            .unwrap()
    );
    // Accounts lease apart.
    let other = TokenLease {
        account: "other",
        ..lease("a", fx.t(31), None)
    };
    assert!(fx.store.lease_token_refresh(&other).await.unwrap());
}
on_both_backends!(the_token_refresh_lease_is_exclusive);

/// Owners racing for the lease at the same moment: exactly one gets it.
async fn racing_token_leases_grant_one(backend: Backend) {
    let fx = Fx::new(backend).await;
    let second = fx.db.store().await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let now = fx.now;
        tasks.push(tokio::spawn(async move {
            let owner = format!("daemon-{n}");
            store
                .lease_token_refresh(&lease(&owner, now, None))
                .await
                .expect("lease")
        }));
    }
    let mut granted = 0;
    for task in tasks {
        granted += usize::from(task.await.unwrap());
    }
    assert_eq!(granted, 1);
}
on_both_backends!(racing_token_leases_grant_one);

/// Only the lease holder saves a token (which ends its lease); others' saves change nothing.
/// `load_token` reads what was saved.
async fn save_token_only_by_the_lease_holder(backend: Backend) {
    let fx = Fx::new(backend).await;
    let token = |text: &str| StoredToken {
        token: text.into(),
        expires_at: fx.t(7200),
    };
    assert!(
        fx.store
            .lease_token_refresh(&lease("a", fx.now, None))
            .await
            .unwrap()
    );
    fx.store
        .save_token("default", "b", &token("from-b"), fx.now)
        .await
        .unwrap();
    assert!(fx.store.load_token("default").await.unwrap().is_none());
    fx.store
        .save_token("default", "a", &token("from-a"), fx.now)
        .await
        .unwrap();
    let loaded = fx
        .store
        .load_token("default")
        .await
        .unwrap()
        .expect("saved");
    assert_eq!(
        (loaded.token.as_str(), loaded.expires_at),
        ("from-a", fx.t(7200))
    );
    // The save ended a's lease: a second save by a is not its to make.
    fx.store
        .save_token("default", "a", &token("again"), fx.now)
        .await
        .unwrap();
    assert_eq!(
        fx.store.load_token("default").await.unwrap().unwrap().token,
        "from-a"
    );
    assert!(fx.store.load_token("other").await.unwrap().is_none());
}
on_both_backends!(save_token_only_by_the_lease_holder);

/// While the stored token is fresh no lease is granted, unless that token is the one failing;
/// one about to expire is refreshed.
async fn a_fresh_token_is_refreshed_only_when_failing(backend: Backend) {
    let fx = Fx::new(backend).await;
    assert!(
        fx.store
            .lease_token_refresh(&lease("a", fx.now, None))
            .await
            .unwrap()
    );
    let fresh = StoredToken {
        token: "tok-1".into(),
        expires_at: fx.t(7200),
    };
    fx.store
        .save_token("default", "a", &fresh, fx.now)
        .await
        .unwrap();

    assert!(
        !fx.store
            .lease_token_refresh(&lease("b", fx.now, None))
            .await
            .unwrap()
    );
    assert!(
        !fx.store
            .lease_token_refresh(&lease("b", fx.now, Some("tok-0")))
            .await
            .unwrap(),
        "an older failing token does not refresh the new one"
    );
    assert!(
        fx.store
            .lease_token_refresh(&lease("b", fx.now, Some("tok-1")))
            .await
            .unwrap()
    );
    fx.store.release_token_lease("default", "b").await.unwrap();
    // Expiring within refresh_before (300 s) of now: refreshed.
    assert!(
        fx.store
            .lease_token_refresh(&lease("c", fx.t(6950), None))
            .await
            .unwrap()
    );
}
on_both_backends!(a_fresh_token_is_refreshed_only_when_failing);

/// Releasing the lease frees it at once, but only the holder's release counts.
async fn release_token_lease_frees_only_the_holders_lease(backend: Backend) {
    let fx = Fx::new(backend).await;
    assert!(
        fx.store
            .lease_token_refresh(&lease("a", fx.now, None))
            .await
            .unwrap()
    );
    fx.store.release_token_lease("default", "b").await.unwrap();
    assert!(
        !fx.store
            .lease_token_refresh(&lease("c", fx.now, None))
            .await
            .unwrap()
    );
    fx.store.release_token_lease("default", "a").await.unwrap();
    assert!(
        fx.store
            .lease_token_refresh(&lease("c", fx.now, None))
            .await
            .unwrap()
    );
}
on_both_backends!(release_token_lease_frees_only_the_holders_lease);

// ---------------------------------------------------------------------------------------------
// quota

/// `(used)` of one counter, or None when it has no row.
async fn used(fx: &Fx, scope: &str, period: &str) -> Option<i64> {
    let rows = fx.store.quota_usage(MONTH, DAY).await.unwrap();
    rows.into_iter()
        .find(|(account, s, p, _)| account == "default" && s == scope && p == period)
        .map(|(_, _, _, used)| used)
}

/// Reservations are granted up to the month's limit and then the day's, exactly, each row all
/// or nothing; a row not ours is LeaseLost; granted rows carry their periods.
async fn reserve_quota_grants_up_to_the_limits(backend: Backend) {
    let fx = Fx::new(backend).await;
    for n in 0..6 {
        fx.insert(&format!("oQ{n}"), &[]).await;
    }
    let rows = fx.claim_ids("me", 10).await;
    let theirs = fx.insert("oTheirs", &[]).await;
    fx.claim_ids("other", 1).await;

    // Month of T1: 3. Day of the account: 4.
    let items: Vec<QuotaReservation> = rows[..4]
        .iter()
        .map(|&id| reservation("me", id, "T1", 3, 4, fx.now))
        .chain([reservation("me", theirs, "T1", 3, 4, fx.now)])
        .collect();
    use Reserved::*;
    assert_eq!(
        fx.store.reserve_quota_many(&items).await.unwrap(),
        [Granted, Granted, Granted, MonthFull, LeaseLost]
    );
    assert_eq!(used(&fx, "template:T1", MONTH).await, Some(3));
    assert_eq!(used(&fx, "account", DAY).await, Some(3));
    // Another template has its own month, but the account's day has one left.
    let items: Vec<QuotaReservation> = rows[4..]
        .iter()
        .map(|&id| reservation("me", id, "T2", 3, 4, fx.now))
        .collect();
    assert_eq!(
        fx.store.reserve_quota_many(&items).await.unwrap(),
        [Granted, DayFull]
    );
    assert_eq!(used(&fx, "template:T2", MONTH).await, Some(1));
    assert_eq!(used(&fx, "account", DAY).await, Some(4));

    let marked = format!("quota_month = '{MONTH}' AND quota_day = '{DAY}'");
    assert_eq!(fx.count(&marked).await, 4);
    for id in [rows[3], rows[5], theirs] {
        let s = fx.snap(id).await;
        assert_eq!((s.quota_month, s.quota_day), (None, None), "row {id}");
    }
    assert!(fx.store.reserve_quota_many(&[]).await.unwrap().is_empty());
    // quota_usage reads the given month and day only.
    let rows = fx.store.quota_usage("2026-12", "2026-12-01").await.unwrap();
    assert!(rows.is_empty(), "{rows:?}");
}
on_both_backends!(reserve_quota_grants_up_to_the_limits);

/// Reservations racing from several tasks and two stores never grant past the limit: exactly
/// the limit is granted and counted.
async fn racing_reservations_never_exceed_the_limit(backend: Backend) {
    const LIMIT: u32 = 25;
    let fx = Fx::new(backend).await;
    fx.db.app.insert_good(80, "quota").await;
    fx.exec(&format!(
        "UPDATE outbox SET next_attempt_at = {}",
        fx.at(-1)
    ))
    .await;
    let second = fx.db.store().await;
    let mut tasks = Vec::new();
    for n in 0..4 {
        let owner = format!("daemon-{n}");
        let rows = fx.claim_ids(&owner, 20).await;
        assert_eq!(rows.len(), 20);
        let store = if n % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let now = fx.now;
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for group in rows.chunks(3) {
                let items: Vec<QuotaReservation> = group
                    .iter()
                    .map(|&id| reservation(&owner, id, "TRACE", LIMIT, 1000, now))
                    .collect();
                results.extend(store.reserve_quota_many(&items).await.expect("reserve"));
            }
            results
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.unwrap());
    }
    let granted = results.iter().filter(|r| **r == Reserved::Granted).count();
    let full = results
        .iter()
        .filter(|r| **r == Reserved::MonthFull)
        .count();
    assert_eq!((granted, full), (LIMIT as usize, 80 - LIMIT as usize));
    assert_eq!(
        used(&fx, "template:TRACE", MONTH).await,
        Some(i64::from(LIMIT))
    );
    assert_eq!(used(&fx, "account", DAY).await, Some(i64::from(LIMIT)));
    assert_eq!(fx.count("quota_month IS NOT NULL").await, i64::from(LIMIT));
}
on_both_backends!(racing_reservations_never_exceed_the_limit);

/// A refused send gives back one count of each counter, only by the lease holder, once, and
/// never below zero.
async fn release_quota_gives_back_one_and_never_below_zero(backend: Backend) {
    let fx = Fx::new(backend).await;
    let a = fx.insert("oA", &[]).await;
    let b = fx.insert("oB", &[]).await;
    fx.claim_ids("me", 2).await;
    let items = [fx.reservation("me", a, "T"), fx.reservation("me", b, "T")];
    assert_eq!(
        fx.store.reserve_quota_many(&items).await.unwrap(),
        [Reserved::Granted; 2]
    );
    assert_eq!(used(&fx, "template:T", MONTH).await, Some(2));

    // Not the lease holder: nothing changes.
    fx.store
        .release_quota(&fx.reservation("other", a, "T"))
        .await
        .unwrap();
    assert_eq!(used(&fx, "template:T", MONTH).await, Some(2));
    assert_eq!(fx.snap(a).await.quota_month.as_deref(), Some(MONTH));

    fx.store.release_quota(&items[0]).await.unwrap();
    assert_eq!(used(&fx, "template:T", MONTH).await, Some(1));
    assert_eq!(used(&fx, "account", DAY).await, Some(1));
    let s = fx.snap(a).await;
    assert_eq!((s.quota_month, s.quota_day), (None, None));
    // Given back once only.
    fx.store.release_quota(&items[0]).await.unwrap();
    assert_eq!(used(&fx, "template:T", MONTH).await, Some(1));

    // The zero floor: counters reset by hand under a counted row stay at zero.
    fx.exec("UPDATE quota_usage SET used = 0").await;
    fx.store.release_quota(&items[1]).await.unwrap();
    assert_eq!(used(&fx, "template:T", MONTH).await, Some(0));
    assert_eq!(used(&fx, "account", DAY).await, Some(0));
    assert_eq!(fx.snap(b).await.quota_month, None);
}
on_both_backends!(release_quota_gives_back_one_and_never_below_zero);

/// A claim given terms counts its rows in the same transaction; the periods of rows it could
/// not count are taken off again.
async fn claim_counts_rows_it_is_given_terms_for(backend: Backend) {
    let fx = Fx::new(backend).await;
    for n in 0..3 {
        fx.insert(&format!("oC{n}"), &[]).await;
    }
    let terms = |_: &wechat_outbox::domain::message::RawMessage| {
        Some(CountTerms {
            template_id: "TPL".into(),
            monthly_limit: 2,
            daily_limit: 100,
        })
    };
    let claimed = fx
        .store
        .claim(&fx.request("me", 10, fx.now), &terms)
        .await
        .unwrap();
    let mut results: Vec<Option<Reserved>> = claimed.iter().map(|c| c.reserved).collect();
    results.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(
        results,
        [
            Some(Reserved::Granted),
            Some(Reserved::Granted),
            Some(Reserved::MonthFull)
        ]
    );
    assert_eq!(used(&fx, "template:TPL", MONTH).await, Some(2));
    assert_eq!(fx.count(&format!("quota_month = '{MONTH}'")).await, 2);
    assert_eq!(
        fx.count("status = 'sending' AND quota_month IS NULL").await,
        1
    );
}
on_both_backends!(claim_counts_rows_it_is_given_terms_for);

// ---------------------------------------------------------------------------------------------
// templates

/// Templates are taken into use up to the limit; one in use already stays in use; retiring one
/// makes room, notes why, and wakes the rows held for room.
async fn templates_are_taken_into_use_up_to_the_limit(backend: Backend) {
    let fx = Fx::new(backend).await;
    let take = |id: &'static str| fx.store.take_template_into_use("default", id, 2, fx.now);
    assert_eq!(take("T1").await.unwrap(), TemplateUse::InUse);
    assert_eq!(take("T2").await.unwrap(), TemplateUse::InUse);
    assert_eq!(take("T3").await.unwrap(), TemplateUse::NoRoom { in_use: 2 });
    assert_eq!(take("T1").await.unwrap(), TemplateUse::InUse);
    // Another account has its own room.
    assert_eq!(
        fx.store
            .take_template_into_use("other", "T3", 2, fx.now)
            .await
            .unwrap(),
        TemplateUse::InUse
    );

    let held = fx
        .insert_in(
            "oHeld",
            "held",
            &[
                ("held_for", "'template'".into()),
                ("next_attempt_at", fx.at(3600)),
            ],
        )
        .await;
    assert!(
        fx.store
            .retire_template("default", "T1", "40037 invalid template", fx.t(5))
            .await
            .unwrap()
    );
    assert!(
        !fx.store
            .retire_template("default", "T1", "again", fx.t(5))
            .await
            .unwrap(),
        "not in use any more"
    );
    assert_eq!(fx.snap(held).await.next_ms, ms(fx.t(5)), "woken");
    assert_eq!(take("T3").await.unwrap(), TemplateUse::InUse);

    let listed: Vec<(String, String, bool, Option<String>)> = fx
        .store
        .list_templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.account, t.template_id, t.in_use, t.note))
        .collect();
    let row = |a: &str, t: &str, in_use, note: Option<&str>| {
        (a.to_string(), t.to_string(), in_use, note.map(String::from))
    };
    assert_eq!(
        listed,
        [
            row("default", "T2", true, None),
            row("default", "T3", true, None),
            row("default", "T1", false, Some("again")),
            row("other", "T3", true, None),
        ]
    );
}
on_both_backends!(templates_are_taken_into_use_up_to_the_limit);

/// Daemons racing to take templates into use never pass the limit.
async fn racing_template_activations_never_exceed_the_limit(backend: Backend) {
    let fx = Fx::new(backend).await;
    let second = fx.db.store().await;
    let mut tasks = Vec::new();
    for n in 0..10 {
        let store = if n % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let now = fx.now;
        tasks.push(tokio::spawn(async move {
            store
                .take_template_into_use("default", &format!("T{n}"), 3, now)
                .await
                .expect("take")
        }));
    }
    let mut in_use = 0;
    for task in tasks {
        match task.await.unwrap() {
            TemplateUse::InUse => in_use += 1,
            TemplateUse::NoRoom { in_use } => assert_eq!(in_use, 3),
        }
    }
    assert_eq!(in_use, 3);
    assert_eq!(fx.count_in("templates", "in_use = (1 = 1)").await, 3);
}
on_both_backends!(racing_template_activations_never_exceed_the_limit);

/// A sync records WeChat's list; a template missing from a later list gets a note saying so,
/// and one listed again loses it.
async fn sync_templates_notes_the_missing_ones(backend: Backend) {
    let fx = Fx::new(backend).await;
    let synced = |id: &str, title: &str| SyncedTemplate {
        template_id: id.into(),
        title: title.into(),
        content: format!("{{{{{id}.DATA}}}}"),
    };
    fx.store
        .sync_templates(
            "default",
            &[synced("A", "Alpha"), synced("B", "Beta")],
            fx.t(-60),
        )
        .await
        .unwrap();
    fx.store
        .sync_templates("other", &[synced("C", "Gamma")], fx.t(-60))
        .await
        .unwrap();
    fx.store
        .sync_templates("default", &[synced("A", "Alpha 2")], fx.now)
        .await
        .unwrap();
    let listed = fx.store.list_templates().await.unwrap();
    let find = |id: &str| listed.iter().find(|t| t.template_id == id).unwrap();
    assert_eq!(find("C").note, None, "another account's list is its own");
    assert_eq!(find("A").title.as_deref(), Some("Alpha 2"));
    assert_eq!(find("A").note, None);
    assert!(
        find("B")
            .note
            .as_deref()
            .unwrap()
            .contains("missing from WeChat's template list"),
        "{:?}",
        find("B").note
    );
    assert_eq!(
        fx.count_in("templates", "template_id = 'A' AND content = '{{A.DATA}}'")
            .await,
        1
    );
    fx.store
        .sync_templates(
            "default",
            &[synced("A", "Alpha"), synced("B", "Beta")],
            fx.t(60),
        )
        .await
        .unwrap();
    assert!(
        fx.store
            .list_templates()
            .await
            .unwrap()
            .iter()
            .all(|t| t.note.is_none())
    );
}
on_both_backends!(sync_templates_notes_the_missing_ones);

// ---------------------------------------------------------------------------------------------
// holds

/// Held rows whose time has come go back to `pending`; the others stay held.
async fn release_due_holds_takes_only_due_rows(backend: Backend) {
    let fx = Fx::new(backend).await;
    let hold = |secs| {
        vec![
            ("held_for", "'daily quota'".to_string()),
            ("next_attempt_at", fx.at(secs)),
        ]
    };
    let due = fx.insert_in("oDue", "held", &hold(-1)).await;
    let later = fx.insert_in("oLater", "held", &hold(60)).await;
    let pending = fx.insert_in("oPending", "pending", &[]).await;
    assert_eq!(fx.store.release_due_holds(fx.now).await.unwrap(), 1);
    let s = fx.snap(due).await;
    assert_eq!(
        (s.status.as_str(), s.held_for.as_deref()),
        ("pending", None),
        "{s:?}"
    );
    assert_eq!(fx.snap(later).await.status, "held");
    assert_eq!(fx.snap(pending).await.status, "pending");
}
on_both_backends!(release_due_holds_takes_only_due_rows);

/// Held rows are released when what they wait for has room, up to the room, highest priority
/// first: a template's month, the account's day, room among templates in use (and every row
/// whose own template is in use now). Accounts not given are left alone.
async fn release_holds_with_room_releases_up_to_the_room_by_priority(backend: Backend) {
    let fx = Fx::new(backend).await;
    let held = |held_for: &str, template: &str, priority: i32| {
        vec![
            ("held_for", format!("'{held_for}'")),
            ("template_id", format!("'{template}'")),
            ("priority", priority.to_string()),
            ("next_attempt_at", fx.at(3600)),
        ]
    };
    // Month of TM: 9 of 10 used, room for 1.
    let m_low = fx
        .insert_in("oM1", "held", &held("monthly quota", "TM", 0))
        .await;
    let m_high = fx
        .insert_in("oM2", "held", &held("monthly quota", "TM", 3))
        .await;
    // Day: 8 of 10 used, room for 2.
    let d_low = fx
        .insert_in("oD1", "held", &held("daily quota", "TD", 0))
        .await;
    let d_mid = fx
        .insert_in("oD2", "held", &held("daily quota", "TD", 1))
        .await;
    let d_high = fx
        .insert_in("oD3", "held", &held("daily quota", "TD", 5))
        .await;
    // Templates: 1 of 2 in use (TU), room for 1; a row of TU itself goes regardless.
    let t_low = fx
        .insert_in("oT1", "held", &held("template", "TX", 0))
        .await;
    let t_high = fx
        .insert_in("oT2", "held", &held("template", "TY", 2))
        .await;
    let t_own = fx
        .insert_in("oT3", "held", &held("template", "TU", -1))
        .await;
    // Another account's row, not in the limits given.
    let elsewhere = fx
        .insert_in(
            "oE",
            "held",
            &[
                held("daily quota", "TD", 9),
                vec![("account", "'other'".into())],
            ]
            .concat(),
        )
        .await;
    fx.exec(&format!(
        "INSERT INTO quota_usage (account, scope, period, used) VALUES
             ('default', 'template:TM', '{MONTH}', 9), ('default', 'account', '{DAY}', 8)"
    ))
    .await;
    assert_eq!(
        fx.store
            .take_template_into_use("default", "TU", 2, fx.now)
            .await
            .unwrap(),
        TemplateUse::InUse
    );

    let limits = [HoldLimits {
        account: "default",
        active_templates: Some(2),
        monthly_per_template: 10,
        daily_per_account: 10,
    }];
    let released = fx
        .store
        .release_holds_with_room(&limits, MONTH, DAY, fx.now)
        .await
        .unwrap();
    let pending = [m_high, d_high, d_mid, t_high, t_own];
    assert_eq!(released, pending.len() as u64);
    for id in pending {
        let s = fx.snap(id).await;
        assert_eq!(
            (s.status.as_str(), s.held_for.as_deref(), s.next_ms),
            ("pending", None, ms(fx.now)),
            "row {id}"
        );
    }
    for id in [m_low, d_low, t_low, elsewhere] {
        assert_eq!(fx.snap(id).await.status, "held", "row {id}");
    }
    // Nothing left with room: a second pass releases nothing.
    fx.exec("UPDATE outbox SET status = 'sent' WHERE status = 'pending'")
        .await;
    fx.exec(&format!(
        "UPDATE quota_usage SET used = 10 WHERE period IN ('{MONTH}', '{DAY}')"
    ))
    .await;
    fx.store
        .take_template_into_use("default", "TY", 2, fx.now)
        .await
        .unwrap();
    assert_eq!(
        fx.store
            .release_holds_with_room(&limits, MONTH, DAY, fx.now)
            .await
            .unwrap(),
        0
    );
}
on_both_backends!(release_holds_with_room_releases_up_to_the_room_by_priority);

// ---------------------------------------------------------------------------------------------
// inbound pushes and delivery events

fn signed(timestamp: &str, nonce: &str, body: &str, now: DateTime<Utc>) -> SignedPush {
    SignedPush {
        timestamp: timestamp.into(),
        nonce: nonce.into(),
        body_sha1: body.into(),
        forget_before: now - chrono::Duration::seconds(600),
    }
}

fn template_event(account: &str, key: &str, msgid: i64, from: &str, status: &str) -> InboundEvent {
    InboundEvent {
        account: account.into(),
        dedup_key: key.into(),
        msg_type: Some("event".into()),
        event: Some("TEMPLATESENDJOBFINISH".into()),
        from_user: Some(from.into()),
        to_user: Some("gh_account".into()),
        create_time: Some(1_767_225_600),
        msgid: Some(msgid),
        status: Some(status.into()),
        raw_xml: format!("<xml><MsgID>{msgid}</MsgID></xml>"),
        ..InboundEvent::default()
    }
}

/// A push is stored once: WeChat's retry (same dedup key, or same timestamp, nonce and body)
/// is a Repeat; the same timestamp and nonce with another body is Replayed and stores nothing.
async fn record_push_stores_each_push_once(backend: Backend) {
    let fx = Fx::new(backend).await;
    let event = template_event("default", "k1", 1, "oA", "success");
    let push = |ts: &str, nonce: &str, body: &str| signed(ts, nonce, body, fx.now);
    let record = |e: InboundEvent, s: SignedPush| {
        let store = fx.store.clone();
        let now = fx.now;
        async move { store.record_push(&e, &s, now).await.unwrap() }
    };
    assert_eq!(
        record(event.clone(), push("100", "n1", "h1")).await,
        Recorded::New
    );
    assert_eq!(
        record(event.clone(), push("100", "n1", "h1")).await,
        Recorded::Repeat
    );
    assert_eq!(
        record(event.clone(), push("100", "n1", "h2")).await,
        Recorded::Replayed
    );
    assert_eq!(
        record(event.clone(), push("101", "n2", "h1")).await,
        Recorded::Repeat
    );
    // A forged body under the same signature is refused even with a new dedup key.
    let forged = template_event("default", "k-forged", 2, "oB", "success");
    assert_eq!(
        record(forged, push("100", "n1", "h9")).await,
        Recorded::Replayed
    );
    // Another account's push with the same key is its own.
    let other = template_event("other", "k1", 1, "oA", "success");
    assert_eq!(record(other, push("100", "n1", "h1")).await, Recorded::New);
    // Signatures remembered before `forget_before` are forgotten by a later push.
    let old = SignedPush {
        forget_before: fx.t(-7200),
        ..signed("old", "n0", "h0", fx.t(-3600))
    };
    let old_event = template_event("default", "k-old", 3, "oC", "success");
    assert_eq!(
        fx.store
            .record_push(&old_event, &old, fx.t(-3600))
            .await
            .unwrap(),
        Recorded::New
    );
    assert_eq!(
        fx.count_in("callback_replays", "timestamp_param = 'old'")
            .await,
        1
    );
    let late = template_event("default", "k-late", 4, "oD", "success");
    assert_eq!(record(late, push("102", "n3", "h3")).await, Recorded::New);
    assert_eq!(
        fx.count_in("callback_replays", "timestamp_param = 'old'")
            .await,
        0
    );

    assert_eq!(
        fx.count_in("inbound_events", "account = 'default'").await,
        3
    );
    assert_eq!(fx.count_in("inbound_events", "account = 'other'").await, 1);
    assert_eq!(
        fx.count_in(
            "inbound_events",
            "dedup_key = 'k1' AND msgid = 1 AND from_user = 'oA' AND status = 'success'
             AND event = 'TEMPLATESENDJOBFINISH' AND raw_xml LIKE '<xml>%'"
        )
        .await,
        2
    );
}
on_both_backends!(record_push_stores_each_push_once);

/// Unsubscribe adds the user to the account's suppression list (a claim then reports the row
/// suppressed); subscribe takes them off; a repeated push changes nothing again.
async fn subscribe_and_unsubscribe_change_the_suppression_list(backend: Backend) {
    let fx = Fx::new(backend).await;
    let follow = |key: &str, event: &str| InboundEvent {
        account: "default".into(),
        dedup_key: key.into(),
        msg_type: Some("event".into()),
        event: Some(event.into()),
        from_user: Some("oFan".into()),
        raw_xml: "<xml/>".into(),
        ..InboundEvent::default()
    };
    let suppressed = "account = 'default' AND openid = 'oFan'";
    let push = |n: &str| signed(n, n, n, fx.now);
    assert_eq!(
        fx.store
            .record_push(&follow("u1", "unsubscribe"), &push("1"), fx.now)
            .await
            .unwrap(),
        Recorded::New
    );
    assert_eq!(fx.count_in("suppressed_openids", suppressed).await, 1);
    let id = fx.insert("oFan", &[]).await;
    let other = fx.insert("oOther", &[]).await;
    let claimed = fx.claim_at("me", 10, fx.now).await;
    let flag = |id: i64| {
        claimed
            .iter()
            .find(|c| c.raw.id == id)
            .unwrap()
            .raw
            .suppressed
    };
    assert!(flag(id));
    assert!(!flag(other));

    fx.store
        .record_push(&follow("s1", "subscribe"), &push("2"), fx.now)
        .await
        .unwrap();
    assert_eq!(fx.count_in("suppressed_openids", suppressed).await, 0);
    // WeChat retrying the old unsubscribe does not suppress the user again.
    assert_eq!(
        fx.store
            .record_push(&follow("u1", "unsubscribe"), &push("3"), fx.now)
            .await
            .unwrap(),
        Recorded::Repeat
    );
    assert_eq!(fx.count_in("suppressed_openids", suppressed).await, 0);
}
on_both_backends!(subscribe_and_unsubscribe_change_the_suppression_list);

/// Template events join their sent rows by account, msgid and openid: success → delivered,
/// a user block → blocked, another failure → undelivered. An event whose FromUserName is not
/// the row's touser is given up with a problem and the row is left as it was; an event with no
/// row is given up only once older than the window.
async fn delivery_events_join_by_account_msgid_and_openid(backend: Backend) {
    let fx = Fx::new(backend).await;
    let sent = |msgid: i64| vec![("msgid", msgid.to_string()), ("sent_at", fx.at(-30))];
    let delivered = fx.insert_in("oA", "sent", &sent(101)).await;
    let blocked = fx.insert_in("oB", "sent", &sent(102)).await;
    let undelivered = fx.insert_in("oC", "sent", &sent(103)).await;
    let mismatched = fx.insert_in("oD", "sent", &sent(104)).await;
    let elsewhere = fx
        .insert_in(
            "oE",
            "sent",
            &[sent(105), vec![("account", "'other'".into())]].concat(),
        )
        .await;

    let events = [
        ("e1", "default", 101, "oA", "success", 0),
        ("e2", "default", 102, "oB", "failed:user block", 0),
        ("e3", "default", 103, "oC", "failed: system failed", 0),
        ("e4", "default", 104, "oIntruder", "success", 0),
        // The msgid of another account's row.
        ("e5", "default", 105, "oE", "success", 0),
        // No row, arrived an hour ago: past the window.
        ("e6", "default", 999, "oZ", "success", -3600),
    ];
    for (n, (key, account, msgid, from, status, secs)) in events.iter().enumerate() {
        let event = template_event(account, key, *msgid, from, status);
        let n = n.to_string();
        fx.store
            .record_push(&event, &signed(&n, &n, &n, fx.t(*secs)), fx.t(*secs))
            .await
            .unwrap();
    }
    let pass = JoinPass {
        now: fx.now,
        received_before: fx.t(-600),
        window: "10 minutes",
        only: None,
    };
    assert_eq!(
        fx.store.join_delivery_events(&pass).await.unwrap(),
        JoinCounts {
            joined: 3,
            mismatched: 1,
            given_up: 1,
        }
    );
    for (id, status, delivery) in [
        (delivered, "delivered", "success"),
        (blocked, "blocked", "failed:user block"),
        (undelivered, "undelivered", "failed: system failed"),
    ] {
        let s = fx.snap(id).await;
        assert_eq!(
            (s.status.as_str(), s.delivery_status.as_deref()),
            (status, Some(delivery)),
            "{s:?}"
        );
        assert_eq!(
            fx.count_in(
                "inbound_events",
                &format!("outbox_id = {id} AND joined_at IS NOT NULL AND given_up_at IS NULL")
            )
            .await,
            1
        );
    }
    let s = fx.snap(mismatched).await;
    assert_eq!(
        (s.status.as_str(), s.delivery_status.as_deref()),
        ("sent", None),
        "{s:?}"
    );
    assert_eq!(
        fx.count_in(
            "inbound_events",
            "dedup_key = 'e4' AND given_up_at IS NOT NULL AND joined_at IS NULL
             AND join_problem LIKE 'FromUserName is not the touser%'"
        )
        .await,
        1
    );
    assert_eq!(fx.snap(elsewhere).await.status, "sent");
    assert_eq!(
        fx.count_in(
            "inbound_events",
            "dedup_key = 'e6' AND given_up_at IS NOT NULL
             AND join_problem = 'no sent row with this MsgID within 10 minutes of its arrival'"
        )
        .await,
        1
    );
    // The other account's msgid waits inside the window, and is all that waits.
    let waiting = fx.store.unjoined_events(10).await.unwrap();
    let e5 = fx
        .scalar("SELECT id FROM inbound_events WHERE dedup_key = 'e5'")
        .await;
    assert_eq!(waiting, [e5]);
    // A second pass finds nothing new.
    assert_eq!(
        fx.store.join_delivery_events(&pass).await.unwrap(),
        JoinCounts::default()
    );
    // A joined event is never given up afterwards.
    let e1 = fx
        .scalar("SELECT id FROM inbound_events WHERE dedup_key = 'e1'")
        .await;
    fx.store.give_up_event(e1, "late", fx.now).await.unwrap();
    assert_eq!(
        fx.count_in(
            "inbound_events",
            &format!("id = {e1} AND given_up_at IS NULL AND join_problem IS NULL")
        )
        .await,
        1
    );
}
on_both_backends!(delivery_events_join_by_account_msgid_and_openid);

/// Join passes from several daemons at once (the method says it is safe): none fails, each row
/// joins once, and every event is joined.
async fn concurrent_join_passes_join_each_row_once(backend: Backend) {
    const ROWS: i64 = 60;
    let fx = Fx::new(backend).await;
    for n in 0..ROWS {
        let user = format!("oJ{n}");
        fx.insert_in(&user, "sent", &[("msgid", (1000 + n).to_string())])
            .await;
        let event = template_event("default", &format!("j{n}"), 1000 + n, &user, "success");
        let key = n.to_string();
        fx.store
            .record_push(&event, &signed(&key, &key, &key, fx.now), fx.now)
            .await
            .unwrap();
    }
    let second = fx.db.store().await;
    let mut tasks = Vec::new();
    for n in 0..6 {
        let store = if n % 2 == 0 {
            fx.store.clone()
        } else {
            second.clone()
        };
        let now = fx.now;
        tasks.push(tokio::spawn(async move {
            let pass = JoinPass {
                now,
                received_before: now - chrono::Duration::seconds(600),
                window: "10 minutes",
                only: None,
            };
            store.join_delivery_events(&pass).await
        }));
    }
    let mut joined = 0;
    for task in tasks {
        let counts = task.await.unwrap().expect("a concurrent join pass failed");
        assert_eq!((counts.mismatched, counts.given_up), (0, 0));
        joined += counts.joined;
    }
    assert_eq!(joined, ROWS as u64, "each row joined once");
    assert_eq!(fx.count("status = 'delivered'").await, ROWS);
    assert_eq!(
        fx.count_in(
            "inbound_events",
            "joined_at IS NOT NULL AND outbox_id IS NOT NULL"
        )
        .await,
        ROWS
    );
}
on_both_backends!(concurrent_join_passes_join_each_row_once);

/// `unjoined_events` lists waiting template events oldest first, up to the limit;
/// `give_up_event` ends one with its reason; a pass limited to one event touches only it.
async fn unjoined_events_oldest_first_and_given_up_one_by_one(backend: Backend) {
    let fx = Fx::new(backend).await;
    let mut ids = Vec::new();
    for (n, secs) in [-30, -20, -10].into_iter().enumerate() {
        let key = format!("e{n}");
        let event = template_event("default", &key, 500 + n as i64, "oA", "success");
        let n = n.to_string();
        fx.store
            .record_push(&event, &signed(&n, &n, &n, fx.t(secs)), fx.t(secs))
            .await
            .unwrap();
        ids.push(
            fx.scalar(&format!(
                "SELECT id FROM inbound_events WHERE dedup_key = '{key}'"
            ))
            .await,
        );
    }
    // A push that is not a template event never waits to join.
    let text = InboundEvent {
        account: "default".into(),
        dedup_key: "m1".into(),
        msg_type: Some("text".into()),
        raw_xml: "<xml/>".into(),
        ..InboundEvent::default()
    };
    fx.store
        .record_push(&text, &signed("9", "9", "9", fx.now), fx.now)
        .await
        .unwrap();

    assert_eq!(fx.store.unjoined_events(10).await.unwrap(), ids);
    assert_eq!(fx.store.unjoined_events(2).await.unwrap(), ids[..2]);
    fx.store
        .give_up_event(ids[0], "cannot be joined: a data error", fx.now)
        .await
        .unwrap();
    assert_eq!(fx.store.unjoined_events(10).await.unwrap(), ids[1..]);
    assert_eq!(
        fx.count_in(
            "inbound_events",
            &format!(
                "id = {} AND given_up_at IS NOT NULL AND join_problem = 'cannot be joined: a data error'",
                ids[0]
            )
        )
        .await,
        1
    );
    // A pass for one event gives up only that one, however old the others.
    let pass = JoinPass {
        now: fx.now,
        received_before: fx.now,
        window: "0 seconds",
        only: Some(ids[2]),
    };
    assert_eq!(
        fx.store.join_delivery_events(&pass).await.unwrap().given_up,
        1
    );
    assert_eq!(fx.store.unjoined_events(10).await.unwrap(), [ids[1]]);
}
on_both_backends!(unjoined_events_oldest_first_and_given_up_one_by_one);

// ---------------------------------------------------------------------------------------------
// daemons, retention, reports

/// A heartbeat counts the daemons that beat since `alive_since`: an old heartbeat is not
/// counted (and one an hour older still is forgotten); a removed daemon is not counted.
async fn heartbeat_counts_live_daemons(backend: Backend) {
    let fx = Fx::new(backend).await;
    let since = fx.t(-30);
    assert_eq!(fx.store.heartbeat("a", fx.now, since).await.unwrap(), 1);
    assert_eq!(fx.store.heartbeat("b", fx.now, since).await.unwrap(), 2);
    assert_eq!(
        fx.store.heartbeat("stale", fx.t(-60), since).await.unwrap(),
        2
    );
    assert_eq!(
        fx.store
            .heartbeat("ancient", fx.t(-7200), since)
            .await
            .unwrap(),
        2
    );
    assert_eq!(fx.count_in("daemons", "owner = 'ancient'").await, 0);
    assert_eq!(fx.count_in("daemons", "owner = 'stale'").await, 1);
    assert_eq!(fx.store.heartbeat("a", fx.t(1), since).await.unwrap(), 2);
    fx.store.remove_daemon("b").await.unwrap();
    assert_eq!(fx.store.heartbeat("a", fx.t(2), since).await.unwrap(), 1);
    assert_eq!(fx.count_in("daemons", "owner = 'b'").await, 0);
}
on_both_backends!(heartbeat_counts_live_daemons);

/// Retention deletes terminal rows last changed before the cutoff, up to the batch per call,
/// and stored pushes received before it; never a waiting row, however old. Quota rows stay
/// for 400 days.
async fn prune_deletes_only_old_terminal_rows_up_to_the_batch(backend: Backend) {
    let fx = Fx::new(backend).await;
    let old = || vec![("updated_at", fx.at(-10 * 86400))];
    let terminal = Status::ALL.into_iter().filter(|s| s.is_terminal());
    for status in terminal.map(Status::as_str) {
        fx.insert_in(&format!("o{status}"), status, &old()).await;
    }
    let recent = fx
        .insert_in("oRecent", "sent", &[("updated_at", fx.at(-3600))])
        .await;
    let mut waiting = Vec::new();
    for status in ["pending", "held", "sending"] {
        waiting.push(fx.insert_in(&format!("w{status}"), status, &old()).await);
    }
    for (n, secs) in [-10 * 86400, -9 * 86400, -8 * 86400, -60]
        .into_iter()
        .enumerate()
    {
        let event = template_event("default", &format!("e{n}"), n as i64, "oA", "success");
        let n = n.to_string();
        fx.store
            .record_push(&event, &signed(&n, &n, &n, fx.t(secs)), fx.t(secs))
            .await
            .unwrap();
    }
    fx.exec(&format!(
        "INSERT INTO quota_usage (account, scope, period, used, updated_at) VALUES
             ('default', 'account', '2024-01-01', 5, {}), ('default', 'account', '2026-01-01', 5, {})",
        fx.at(-500 * 86400),
        fx.at(-300 * 86400)
    ))
    .await;

    let cutoff = fx.t(-86400);
    assert_eq!(fx.store.prune(cutoff, 5).await.unwrap(), (5, 3));
    assert_eq!(fx.store.prune(cutoff, 5).await.unwrap(), (3, 0));
    assert_eq!(fx.store.prune(cutoff, 5).await.unwrap(), (0, 0));
    let left: Vec<i64> = fx.db.app.rows().await.iter().map(|r| r.id).collect();
    assert_eq!(left, [vec![recent], waiting].concat());
    assert_eq!(fx.count_in("inbound_events", "1 = 1").await, 1);
    assert_eq!(fx.count_in("quota_usage", "period = '2026-01-01'").await, 1);
    assert_eq!(fx.count_in("quota_usage", "period = '2024-01-01'").await, 0);
}
on_both_backends!(prune_deletes_only_old_terminal_rows_up_to_the_batch);

/// The limits written by `record_limits` (rewritten on a second call) are what `report_quota`
/// shows against the counters of the current month and day.
async fn recorded_limits_show_in_the_quota_report(backend: Backend) {
    let fx = Fx::new(backend).await;
    let limits = |monthly| AccountLimitsRow {
        account: "default".into(),
        active_templates: 10,
        monthly_per_template: monthly,
        daily_per_account: 50,
        rate_per_second: 20,
        timezone: "UTC".into(),
        utc_offset_minutes: 0,
    };
    fx.store
        .record_limits(&[limits(1000)], fx.t(-60))
        .await
        .unwrap();
    fx.store
        .record_limits(&[limits(100)], fx.now)
        .await
        .unwrap();
    assert_eq!(
        fx.count_in(
            "account_limits",
            "account = 'default' AND monthly_per_template = 100 AND daily_per_account = 50
             AND active_templates = 10 AND rate_per_second = 20 AND timezone = 'UTC'"
        )
        .await,
        1
    );
    let today = Utc::now();
    let (month, day) = (
        today.format("%Y-%m").to_string(),
        today.format("%Y-%m-%d").to_string(),
    );
    fx.exec(&format!(
        "INSERT INTO quota_usage (account, scope, period, used) VALUES
             ('default', 'template:TR', '{month}', 7), ('default', 'account', '{day}', 3)"
    ))
    .await;

    let report = fx
        .store
        .read_view("report_quota", "account, template_id")
        .await
        .unwrap();
    assert_eq!(report.rows.len(), 1, "{:?}", report.rows);
    let value = |column: &str| {
        let i = report
            .columns
            .iter()
            .position(|c| c == column)
            .unwrap_or_else(|| panic!("no column {column} in {:?}", report.columns));
        report.rows[0][i].clone()
    };
    use serde_json::json;
    assert_eq!(value("account"), json!("default"));
    assert_eq!(value("template_id"), json!("TR"));
    assert_eq!(value("month"), json!(month));
    assert_eq!(value("month_used"), json!(7));
    assert_eq!(value("month_limit"), json!(100));
    assert_eq!(value("month_remaining"), json!(93));
    assert_eq!(value("day"), json!(day));
    assert_eq!(value("day_used"), json!(3));
    assert_eq!(value("day_remaining"), json!(47));
}
on_both_backends!(recorded_limits_show_in_the_quota_report);

/// `row_counts` groups by account, status and held reason; `status_counts` by status, sorted;
/// `ping` answers; `setting_warnings` names only a Postgres server without autovacuum;
/// migrating again changes nothing; `close` ends the store.
async fn counts_ping_and_close(backend: Backend) {
    let fx = Fx::new(backend).await;
    assert_eq!(
        fx.store.backend_name(),
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    assert!(fx.store.status_counts().await.unwrap().is_empty());
    fx.insert("o1", &[]).await;
    fx.insert("o2", &[]).await;
    fx.insert_in("o3", "sent", &[]).await;
    fx.insert_in(
        "o4",
        "held",
        &[
            ("account", "'other'".into()),
            ("held_for", "'daily quota'".into()),
        ],
    )
    .await;
    let mut rows: Vec<(String, String, Option<String>, i64)> = fx
        .store
        .row_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.account, r.status, r.held_for, r.rows))
        .collect();
    rows.sort();
    let row = |a: &str, s: &str, h: Option<&str>, n: i64| {
        (a.to_string(), s.to_string(), h.map(String::from), n)
    };
    assert_eq!(
        rows,
        [
            row("default", "pending", None, 2),
            row("default", "sent", None, 1),
            row("other", "held", Some("daily quota"), 1),
        ]
    );
    assert_eq!(
        fx.store.status_counts().await.unwrap(),
        [
            ("held".to_string(), 1),
            ("pending".to_string(), 2),
            ("sent".to_string(), 1)
        ]
    );
    fx.store.ping().await.unwrap();
    // Only a Postgres server without autovacuum is warned about.
    let warnings = fx.store.setting_warnings().await.unwrap();
    let autovacuum_off = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => {
            fx.count_in("pg_settings", "name = 'autovacuum' AND setting = 'off'")
                .await
        }
    };
    assert_eq!(warnings.len() as i64, autovacuum_off, "{warnings:?}");
    fx.store.migrate().await.unwrap();
    assert_eq!(fx.count("1 = 1").await, 4);
    fx.store.close().await;
    assert!(
        fx.store.ping().await.is_err(),
        "a closed store answers no more"
    );
}
on_both_backends!(counts_ping_and_close);

/// The plans name the indexes they are built on: the claim reads `outbox_claim`, the join
/// probes `outbox_msgid` from the events.
async fn plans_use_their_indexes(backend: Backend) {
    let fx = Fx::new(backend).await;
    fx.db.app.insert_good(2000, "plan").await;
    fx.exec("UPDATE outbox SET status = 'sent', msgid = id WHERE id % 2 = 0")
        .await;
    fx.db.app.analyze_outbox().await;
    let claim = fx.store.claim_plan(fx.now, None).await.unwrap();
    assert!(claim.contains("outbox_claim"), "{claim}");
    // order = "per_user": the probe for earlier open rows of the recipient goes by its index.
    fx.store.prepare_per_user_order().await.unwrap();
    fx.db.app.analyze_outbox().await;
    let since = fx.now - chrono::Duration::hours(1);
    let per_user = fx.store.claim_plan(fx.now, Some(since)).await.unwrap();
    assert!(per_user.contains("outbox_claim"), "{per_user}");
    assert!(per_user.contains("outbox_recipient_open"), "{per_user}");
    let join = fx.store.join_plan(fx.now).await.unwrap();
    assert!(join.contains("outbox_msgid"), "{join}");
    assert!(join.contains("inbound_events"), "{join}");
}
on_both_backends!(plans_use_their_indexes);

/// The watcher wakes its waiter when another connection commits a new row.
async fn watch_for_rows_wakes_on_a_new_row(backend: Backend) {
    let fx = Fx::new(backend).await;
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (store, wake, stop) = (fx.store.clone(), wake.clone(), stop.clone());
        tokio::spawn(async move { store.watch_for_rows(wake, stop).await })
    };
    // Let the watcher settle: wakes from its start (a new LISTEN connection wakes once) stop.
    let quiet = Duration::from_millis(300);
    let mut settled = false;
    for _ in 0..50 {
        if tokio::time::timeout(quiet, wake.notified()).await.is_err() {
            settled = true;
            break;
        }
    }
    assert!(settled, "the watcher keeps waking with nothing inserted");
    // The SQLite watcher learns the newest id from the first commit it sees, and wakes for a
    // higher one: a second insert must wake it, whichever it saw first.
    let mut woken = false;
    for n in 0..3 {
        fx.insert(&format!("oNew{n}"), &[]).await;
        if tokio::time::timeout(Duration::from_secs(2), wake.notified())
            .await
            .is_ok()
        {
            woken = true;
            break;
        }
    }
    assert!(woken, "no wake for new rows");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watcher stops when cancelled")
        .unwrap();
}
on_both_backends!(watch_for_rows_wakes_on_a_new_row);

// ---------------------------------------------------------------------------------------
// SQLite's one write lock, held by an app (no Postgres counterpart: there rows lock, not
// the file). The daemon's claim and outcomes use a connection without SQLite's busy
// handler, which waits for the lock itself, looking again every 100 µs rather than after
// 1, 2, 5, 10 … ms (issue 16).

/// An app's connection holding the write lock (`BEGIN IMMEDIATE`, one row inserted) until
/// `held` has passed, then committing; `locked` is the moment the lock was taken.
async fn hold_sqlite_lock(fx: &Fx, held: Duration) -> tokio::task::JoinHandle<()> {
    use sqlx::Connection;
    let mut app = sqlx::SqliteConnection::connect(&fx.db.url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::raw_sql("INSERT INTO outbox (touser, template_id, data) VALUES ('oLocker', 'TPL', '{}')")
        .execute(&mut app)
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(held).await;
        sqlx::raw_sql("COMMIT").execute(&mut app).await.unwrap();
    })
}

#[tokio::test]
async fn sqlite_claim_and_outcomes_wait_for_an_apps_lock() {
    let fx = Fx::new(Backend::Sqlite).await;
    let id = fx.insert("oWaits", &[]).await;
    let held = Duration::from_millis(300);

    let app = hold_sqlite_lock(&fx, held).await;
    let began = std::time::Instant::now();
    let claimed = fx.claim_ids("me", 10).await;
    assert!(
        began.elapsed() >= held - Duration::from_millis(50),
        "the claim did not wait for the lock: {:?}",
        began.elapsed()
    );
    assert_eq!(claimed, vec![id]);
    app.await.unwrap();

    let app = hold_sqlite_lock(&fx, held).await;
    let sent = Outcome::Sent { msgid: Some(7) };
    let written = fx
        .store
        .finish_many("me", &[fx.finish(id, sent)])
        .await
        .expect("the outcome waits for the lock, not fails");
    assert_eq!(written, vec![true]);
    app.await.unwrap();
    assert_eq!(fx.snap(id).await.status, "sent");
    assert_eq!(
        fx.count("touser = 'oLocker'").await,
        2,
        "the app's rows are kept"
    );
}

/// A lock held past `busy_timeout_ms` fails the claim with SQLite's "database is locked"
/// (the claim loop backs off and tries again), and the next claim, after the app commits,
/// works on a fresh writer connection.
#[tokio::test]
async fn sqlite_claim_gives_up_after_busy_timeout_and_recovers() {
    let fx = Fx::new(Backend::Sqlite).await;
    let store = Store::connect(
        &fx.db
            .config("http://127.0.0.1:9", "[database]\nbusy_timeout_ms = 200")
            .store_settings(),
    )
    .await
    .unwrap();
    let id = fx.insert("oLater", &[]).await;

    let app = hold_sqlite_lock(&fx, Duration::from_millis(1500)).await;
    let began = std::time::Instant::now();
    let Err(err) = store.claim(&fx.request("me", 10, fx.now), &no_terms).await else {
        panic!("the lock outlasts busy_timeout, yet the claim succeeded");
    };
    let waited = began.elapsed();
    assert!(
        err.to_string().contains("database is locked"),
        "unexpected error: {err}"
    );
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(1400),
        "gave up after {waited:?}, not after busy_timeout"
    );
    app.await.unwrap();

    let claimed = store
        .claim(&fx.request("me", 10, fx.now), &no_terms)
        .await
        .expect("the claim after the lock is gone");
    assert_eq!(ids(&claimed), vec![id]);
}

// ---------------------------------------------------------------------------------------
// Postgres' plan cache. A statement a connection has run five times can be given a generic
// plan, costed for the table as it was then and kept until the table's statistics change;
// with autovacuum off (as CI's server has it) they never do. Connections are replaced after
// `database.connection_lifetime_secs`, and the new ones plan again.

/// Outcome groups look their rows up by primary key once the connections that first wrote
/// them on a young table have been replaced: a plan costed on a near-empty table read the
/// whole table for every group, 3.5 ms a group at 10k rows and growing with it (issue 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outcome_groups_are_planned_again_for_a_grown_table() {
    let mut fx = Fx::new(Backend::Postgres).await;
    fx.exec("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .await;
    let mut settings = fx.db.config("http://127.0.0.1:9", "").store_settings();
    settings.connection_lifetime = Duration::from_secs(1);
    fx.store = Store::connect(&settings).await.unwrap();
    let sent = |fx: &Fx, ids: &[i64]| -> Vec<Finish> {
        ids.iter()
            .map(|&id| fx.finish(id, Outcome::Sent { msgid: Some(id) }))
            .collect()
    };
    // A young table: every connection of the store writes many small groups.
    for n in 0..60 {
        let id = fx.insert(&format!("oYoung{n}"), &[]).await;
        assert_eq!(fx.claim_ids("me", 1).await, [id]);
        let written = fx.store.finish_many("me", &sent(&fx, &[id])).await;
        assert_eq!(written.unwrap(), [true]);
    }
    // The table grows (no ANALYZE, no autovacuum) and rows are claimed. Once the store's
    // connections have outlived their lifetime and ended (a backend reports its counters when
    // it ends), the table's scan counters start from zero.
    fx.exec(
        "INSERT INTO outbox (touser, template_id, data, status)
         SELECT 'oOld' || i, 'TPL', '{}', 'sent' FROM generate_series(1, 20000) i",
    )
    .await;
    let mut rows = Vec::new();
    for n in 0..64 {
        rows.push(fx.insert(&format!("oNow{n}"), &[]).await);
    }
    for group in rows.chunks(8) {
        assert_eq!(fx.claim_ids("me", 8).await, group);
    }
    wait_for_store_sessions_to_end(&fx).await;
    fx.exec("SELECT pg_stat_reset_single_table_counters('outbox'::regclass)")
        .await;
    for group in rows.chunks(8) {
        let written = fx.store.finish_many("me", &sent(&fx, group)).await;
        assert_eq!(written.unwrap(), [true; 8]);
    }
    fx.store.close().await;
    wait_for_store_sessions_to_end(&fx).await;
    let scans = "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'outbox'";
    let index_scans = "SELECT idx_scan FROM pg_stat_user_tables WHERE relname = 'outbox'";
    assert!(
        fx.scalar(index_scans).await >= 8,
        "the groups' scans were reported"
    );
    assert_eq!(
        fx.scalar(scans).await,
        0,
        "an outcome group read the whole outbox table"
    );
}

/// Waits until no session of the daemon's store is left on the test's database (idle ones
/// end once past their lifetime; a closed store's at once).
async fn wait_for_store_sessions_to_end(fx: &Fx) {
    let sessions = "SELECT COUNT(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND application_name = 'wechat-outbox'";
    for _ in 0..200 {
        if fx.scalar(sessions).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store's sessions did not end");
}
