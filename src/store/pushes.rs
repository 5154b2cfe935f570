//! WeChat's pushes to the callback endpoint: stored once each, replays refused, the
//! suppression list kept; and the join of delivery events to the rows they report on.

use chrono::{DateTime, Utc};

use super::consents::{Answer, ConsentChange, ConsentKey, WAKE_HELD_FOR_CONSENT, answer};
use super::{Store, StoreResult, Time, bounded, on_backend};
use crate::domain::lifecycle::reason;

/// One accepted push from WeChat, as stored in `inbound_events`.
#[derive(Debug, Clone, Default)]
pub struct InboundEvent {
    pub account: String,
    /// Equal for WeChat's retries of one push; unique per account.
    pub dedup_key: String,
    pub msg_type: Option<String>,
    pub event: Option<String>,
    pub from_user: Option<String>,
    pub to_user: Option<String>,
    pub create_time: Option<i64>,
    pub msgid: Option<i64>,
    pub status: Option<String>,
    pub raw_xml: String,
    /// The template a subscription event's item is about.
    pub template_id: Option<String>,
    /// What a subscription popup or settings change does to the user's consent.
    pub consent: Option<ConsentChange>,
}

impl InboundEvent {
    /// What the event does to the account's suppression list.
    pub(crate) fn suppression(&self) -> Option<bool> {
        match (self.msg_type.as_deref(), self.event.as_deref()) {
            (Some("event"), Some("unsubscribe")) => Some(true),
            (Some("event"), Some("subscribe")) => Some(false),
            _ => None,
        }
    }
}

/// The `timestamp` and `nonce` a push was signed with, and a hash of its body. Remembered for
/// twice the timestamp window (a timestamp may run ahead of our clock by the window), in the
/// database so that daemons behind one load balancer share it: plain mode's signature covers
/// no body, so without this one observed URL would carry any number of forged bodies.
#[derive(Debug, Clone)]
pub struct SignedPush {
    pub timestamp: String,
    pub nonce: String,
    /// Hex sha1 of the body as received.
    pub body_sha1: String,
    /// Remembered pushes received before this are deleted, a bounded few with each push.
    pub forget_before: DateTime<Utc>,
}

/// What became of a push given to `Store::record_push`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    New,
    /// Stored before: WeChat's retry (the same dedup key, or the same timestamp, nonce and body).
    Repeat,
    /// Its timestamp and nonce came before with another body: refused, nothing stored.
    Replayed,
}

/// Old entries of `callback_replays` deleted per push: more than one, so the table shrinks
/// after a burst; bounded, so a push never waits on a long delete.
pub(crate) const REPLAYS_FORGOTTEN_PER_PUSH: i64 = 100;

/// One pass of the join of delivery events.
pub struct JoinPass<'a> {
    pub now: DateTime<Utc>,
    /// Events received before this that have not joined are given up on.
    pub received_before: DateTime<Utc>,
    /// The window, as the reason given for them says it.
    pub window: &'a str,
    /// Only this event (for a pass that isolates an event the batch cannot join).
    pub only: Option<i64>,
}

impl JoinPass<'_> {
    fn no_row_problem(&self) -> String {
        format!(
            "no sent row with this MsgID within {} of its arrival",
            self.window
        )
    }
}

/// What one join pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinCounts {
    /// Rows that took their delivery status from an event.
    pub joined: u64,
    /// Events whose FromUserName is not the touser of the row with their MsgID.
    pub mismatched: u64,
    /// Events given up on after the window.
    pub given_up: u64,
}

/// The events a join pass still looks at: delivery events neither joined nor given up on,
/// all of them or only `$2`.
const UNSETTLED_EVENT: &str = concat!(
    "joined_at IS NULL AND given_up_at IS NULL AND event IN ",
    delivery_events!(),
    " AND (CAST($2 AS BIGINT) IS NULL OR id = $2)"
);

impl Store {
    /// Stores a push from the callback endpoint once, and applies subscribe and unsubscribe to
    /// the suppression list, in one transaction; its signed timestamp and nonce are remembered
    /// in it too, and a second body under them is refused.
    pub async fn record_push(
        &self,
        e: &InboundEvent,
        signed: &SignedPush,
        now: DateTime<Utc>,
    ) -> StoreResult<Recorded> {
        self.record_push_items(std::slice::from_ref(e), signed, now)
            .await
    }

    /// `record_push` of a push stored as several events (a subscription event's `<List>`
    /// items, each with its own dedup key), in one transaction; consent changes are applied to
    /// the ledger, and rows held for a consent now given look again. `Recorded::New` when any
    /// item was new.
    pub async fn record_push_items(
        &self,
        items: &[InboundEvent],
        signed: &SignedPush,
        now: DateTime<Utc>,
    ) -> StoreResult<Recorded> {
        let Some(e) = items.first() else {
            return Ok(Recorded::Repeat);
        };
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let first = sqlx::query(
                "INSERT INTO callback_replays (account, timestamp_param, nonce, body_sha1,
                        received_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account, timestamp_param, nonce) DO NOTHING",
            )
            .bind(&e.account)
            .bind(&signed.timestamp)
            .bind(&signed.nonce)
            .bind(&signed.body_sha1)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !first {
                let body_sha1: String = sqlx::query_scalar(
                    "SELECT body_sha1 FROM callback_replays
                     WHERE account = $1 AND timestamp_param = $2 AND nonce = $3",
                )
                .bind(&e.account)
                .bind(&signed.timestamp)
                .bind(&signed.nonce)
                .fetch_one(&mut *tx)
                .await?;
                return Ok(if body_sha1 == signed.body_sha1 {
                    Recorded::Repeat
                } else {
                    Recorded::Replayed
                });
            }
            sqlx::query(dialect::FORGET_REPLAYS)
                .bind(Time(signed.forget_before))
                .bind(REPLAYS_FORGOTTEN_PER_PUSH)
                .execute(&mut *tx)
                .await?;
            let mut any_inserted = false;
            for e in items {
                let inserted = sqlx::query(
                    "INSERT INTO inbound_events (account, dedup_key, msg_type, event, from_user,
                            to_user, create_time, msgid, status, raw_xml, received_at,
                            template_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (account, dedup_key) DO NOTHING",
                )
                .bind(&e.account)
                .bind(&e.dedup_key)
                .bind(&e.msg_type)
                .bind(&e.event)
                .bind(&e.from_user)
                .bind(&e.to_user)
                .bind(e.create_time)
                .bind(e.msgid)
                .bind(&e.status)
                .bind(&e.raw_xml)
                .bind(Time(now))
                .bind(&e.template_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                any_inserted |= inserted;
                if let (true, Some(change), Some(openid), Some(template_id)) =
                    (inserted, e.consent, &e.from_user, &e.template_id)
                {
                    let key = ConsentKey {
                        account: &e.account,
                        openid,
                        template_id,
                    };
                    let said = Answer {
                        key,
                        change,
                        source: match e.event.as_deref() {
                            Some("subscribe_msg_change_event") => "change",
                            _ => "popup",
                        },
                        now,
                        unless_after: None,
                    };
                    answer!(&said).execute(&mut *tx).await?;
                    if change != ConsentChange::Withdrawn {
                        sqlx::query(WAKE_HELD_FOR_CONSENT)
                            .bind(&e.account)
                            .bind(openid)
                            .bind(template_id)
                            .bind(Time(now))
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            let inserted = any_inserted;
            if inserted && let (Some(suppress), Some(openid)) = (e.suppression(), &e.from_user) {
                let change = if suppress {
                    sqlx::query(
                        "INSERT INTO suppressed_openids (account, openid, since)
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    )
                    .bind(&e.account)
                    .bind(openid)
                    .bind(Time(now))
                } else {
                    sqlx::query("DELETE FROM suppressed_openids WHERE account = $1 AND openid = $2")
                        .bind(&e.account)
                        .bind(openid)
                };
                change.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(if inserted {
                Recorded::New
            } else {
                Recorded::Repeat
            })
        })
    }

    /// Joins unjoined delivery events (TEMPLATESENDJOBFINISH, subscribe_msg_sent_event) to
    /// their sent rows by account, msgid and openid, and gives up on the events that cannot join: a FromUserName that is not the
    /// row's touser, or no sent row within the window. One transaction; safe to run from
    /// several daemons at once.
    ///
    /// Every statement goes from the unjoined events (few, bounded by the window) to their
    /// rows through `outbox_msgid`, never the other way: left to itself, a planner walked every
    /// sent row's msgid each pass. The first two say so in each dialect's words.
    pub async fn join_delivery_events(&self, pass: &JoinPass<'_>) -> StoreResult<JoinCounts> {
        on_backend!(self, |pool, dialect| {
            let mut tx = dialect::begin_write(pool).await?;
            let joined = sqlx::query(dialect::JOIN_EVENTS_TO_ROWS.as_str())
                .bind(Time(pass.now))
                .bind(pass.only)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(dialect::MARK_EVENTS_JOINED)
                .bind(Time(pass.now))
                .bind(pass.only)
                .execute(&mut *tx)
                .await?;
            let mismatched = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE inbound_events SET given_up_at = $1, join_problem = $3
                 WHERE {UNSETTLED_EVENT}
                   AND EXISTS (SELECT 1 FROM outbox o WHERE o.account = inbound_events.account
                               AND o.msgid = inbound_events.msgid)
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.account = inbound_events.account
                                   AND o.msgid = inbound_events.msgid
                                   AND o.touser = inbound_events.from_user)"
            )))
            .bind(Time(pass.now))
            .bind(pass.only)
            .bind(reason::OPENID_MISMATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let given_up = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE inbound_events SET given_up_at = $1, join_problem = $4
                 WHERE {UNSETTLED_EVENT} AND received_at < $3"
            )))
            .bind(Time(pass.now))
            .bind(pass.only)
            .bind(Time(pass.received_before))
            .bind(pass.no_row_problem())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(JoinCounts {
                joined,
                mismatched,
                given_up,
            })
        })
    }

    /// How the database would run the join pass's update now (its `EXPLAIN`), to check that it
    /// starts from the unjoined events, not from the sent rows.
    pub async fn join_plan(&self, now: DateTime<Utc>) -> StoreResult<String> {
        on_backend!(self, |pool, dialect| dialect::join_plan(pool, now).await)
    }

    /// The oldest delivery events still waiting to join, for a pass one event at a time.
    pub async fn unjoined_events(&self, limit: i64) -> StoreResult<Vec<i64>> {
        on_backend!(self, |pool, _d| {
            sqlx::query_scalar(concat!(
                "SELECT id FROM inbound_events WHERE event IN ",
                delivery_events!(),
                " AND joined_at IS NULL AND given_up_at IS NULL
                     ORDER BY received_at LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(pool)
            .await
        })
    }

    /// Gives up on one event that cannot be joined, with the reason.
    pub async fn give_up_event(
        &self,
        id: i64,
        problem: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_backend!(self, |pool, _d| {
            sqlx::query(
                "UPDATE inbound_events SET given_up_at = $2, join_problem = $3
                 WHERE id = $1 AND joined_at IS NULL",
            )
            .bind(id)
            .bind(Time(now))
            .bind(bounded(problem))
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}
