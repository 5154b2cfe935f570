//! What `/metrics` shows. Counters and the latency histogram count what this process did
//! since it started; the row and quota gauges are read from the database at each scrape, so
//! every daemon of a cluster shows the same, whole-table figures for them. docs/operations.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use std::collections::BTreeSet;

use crate::domain::status::Status;
use crate::store::{HeldFor, Outcome, Store};

/// The pushed `Event` / `MsgType` values a label may name; any other value is `other`, since
/// whoever holds an account's token may push any type (300 made-up ones became 300 labels).
pub const KNOWN_EVENTS: [&str; 17] = [
    "TEMPLATESENDJOBFINISH",
    "subscribe_msg_popup_event",
    "subscribe_msg_change_event",
    "subscribe_msg_sent_event",
    "subscribe",
    "unsubscribe",
    "SCAN",
    "LOCATION",
    "CLICK",
    "VIEW",
    "text",
    "image",
    "voice",
    "video",
    "shortvideo",
    "location",
    "link",
];

/// The label of every account name not in the configuration: apps may write any `account`.
pub const UNCONFIGURED: &str = "unconfigured";

/// The label of a value outside its fixed set.
const OTHER: &str = "other";

/// Why a delivery event was not joined to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotJoined {
    /// The row with its msgid was sent to another openid.
    OpenidMismatch,
    /// No sent row appeared within the join window; given up on.
    NoSentRow,
    /// The join statement failed for this event.
    Unjoinable,
}

impl NotJoined {
    pub fn as_str(self) -> &'static str {
        match self {
            NotJoined::OpenidMismatch => "openid_mismatch",
            NotJoined::NoSentRow => "no_sent_row",
            NotJoined::Unjoinable => "unjoinable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    account: String,
    outcome: &'static str,
    /// WeChat's errcode, or `none` when the outcome came without one.
    errcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    account: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    account: String,
    /// The push's Event (TEMPLATESENDJOBFINISH, subscribe, …) or, for user messages, MsgType,
    /// when in [`KNOWN_EVENTS`]; `other` otherwise.
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// The account in the path when it is configured, `unconfigured` otherwise (the path is
    /// anyone's to choose, and a label per made-up name would grow without bound).
    account: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotJoinedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RowLabels {
    account: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldLabels {
    account: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    account: String,
    /// Empty for the account's daily cap.
    template_id: String,
    period: &'static str,
}

/// Upper bounds of the send latency buckets, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Every label value comes from a fixed set: the configured account names (else
/// `unconfigured`), [`KNOWN_EVENTS`] (else `other`), statuses, reasons; so `/metrics` stays
/// small whatever apps write and pushes say.
pub struct Metrics {
    /// The configured account names: the only account label values besides `unconfigured`.
    accounts: BTreeSet<String>,
    registry: Registry,
    outcomes: Family<OutcomeLabels, Counter>,
    send_seconds: Family<AccountLabels, Histogram>,
    retries: Family<AccountLabels, Counter>,
    token_refreshes: Family<ResultLabels, Counter>,
    events_received: Family<EventLabels, Counter>,
    callback_refused: Family<RefusalLabels, Counter>,
    values_cut: Family<AccountLabels, Counter>,
    events_joined: Counter,
    events_not_joined: Family<NotJoinedLabels, Counter>,
    rows: Family<RowLabels, Gauge>,
    held_rows: Family<HeldLabels, Gauge>,
    quota_remaining: Family<QuotaLabels, Gauge>,
    database_up: Gauge,
    /// Scrapes refill the database gauges; one at a time, so two never interleave.
    scrape: tokio::sync::Mutex<()>,
}

/// No configured accounts: every account label reads `unconfigured`.
impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Vec::<String>::new())
    }
}

impl Metrics {
    /// `accounts`: the configured account names, the values the `account` label may take.
    pub fn new(accounts: impl IntoIterator<Item = impl Into<String>>) -> Metrics {
        let mut registry = Registry::with_prefix("wechat_outbox");
        let outcomes = Family::default();
        registry.register(
            "outcomes",
            "Outcomes written for claimed rows: sent, failed, expired, unknown, retry, released, held",
            outcomes.clone(),
        );
        let send_seconds = Family::<AccountLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "send_request_seconds",
            "Duration of template send requests to WeChat that got an answer",
            send_seconds.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Rows scheduled for another attempt",
            retries.clone(),
        );
        let token_refreshes = Family::default();
        registry.register(
            "token_refreshes",
            "Access tokens fetched from WeChat, by result",
            token_refreshes.clone(),
        );
        let events_received = Family::default();
        registry.register(
            "events_received",
            "Pushes from WeChat verified and stored (retries of a stored push not counted)",
            events_received.clone(),
        );
        let callback_refused = Family::default();
        registry.register(
            "callback_refused",
            "Callback requests refused, by HTTP status",
            callback_refused.clone(),
        );
        let values_cut = Family::default();
        registry.register(
            "values_cut",
            "Keyword values cut to WeChat's 20 characters on one line (2023 rules) before sending",
            values_cut.clone(),
        );
        let events_joined = Counter::default();
        registry.register(
            "events_joined",
            "Delivery events joined to their sent row",
            events_joined.clone(),
        );
        let events_not_joined = Family::default();
        registry.register(
            "events_not_joined",
            "Delivery events that could not be joined to a row, by reason: openid_mismatch, no_sent_row (given up after the window), unjoinable (the join failed for that event)",
            events_not_joined.clone(),
        );
        let rows = Family::default();
        registry.register(
            "rows",
            "Rows in the outbox by status (whole table, read at scrape)",
            rows.clone(),
        );
        let held_rows = Family::default();
        registry.register(
            "held_rows",
            "Held rows by what they wait for (read at scrape)",
            held_rows.clone(),
        );
        let quota_remaining = Family::default();
        registry.register(
            "quota_remaining",
            "Sends left this month per template and today per account (report_quota, read at scrape)",
            quota_remaining.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "1 when the last scrape could read the database",
            database_up.clone(),
        );
        Metrics {
            accounts: accounts.into_iter().map(Into::into).collect(),
            registry,
            outcomes,
            send_seconds,
            retries,
            token_refreshes,
            events_received,
            callback_refused,
            values_cut,
            events_joined,
            events_not_joined,
            rows,
            held_rows,
            quota_remaining,
            database_up,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// The account's label: its name when configured, else `unconfigured`.
    fn account(&self, name: &str) -> String {
        if self.accounts.contains(name) {
            name.to_string()
        } else {
            UNCONFIGURED.to_string()
        }
    }

    fn account_labels(&self, name: &str) -> AccountLabels {
        AccountLabels {
            account: self.account(name),
        }
    }

    /// Counts an outcome once it is written to its row.
    pub fn outcome(&self, account: &str, outcome: &Outcome) {
        let (name, errcode) = match outcome {
            Outcome::Sent { .. } => ("sent", None),
            Outcome::SentEarlier { errcode, .. } => ("sent", Some(*errcode)),
            Outcome::Wait { errcode, .. } => ("waiting", *errcode),
            Outcome::Failed { errcode, .. } => ("failed", *errcode),
            Outcome::Expired { .. } => ("expired", None),
            Outcome::Unknown { errcode, .. } => ("unknown", *errcode),
            Outcome::Retry { errcode, .. } => ("retry", *errcode),
            Outcome::Release { errcode, .. } => ("released", *errcode),
            Outcome::Hold { .. } => ("held", None),
        };
        let labels = OutcomeLabels {
            account: self.account(account),
            outcome: name,
            errcode: errcode.map_or_else(|| "none".to_string(), |c| c.to_string()),
        };
        self.outcomes.get_or_create(&labels).inc();
        if name == "retry" {
            self.retries
                .get_or_create(&self.account_labels(account))
                .inc();
        }
    }

    /// Counts keyword values cut to WeChat's 2023 display limit before they were sent.
    pub fn values_cut(&self, account: &str, n: u64) {
        self.values_cut
            .get_or_create(&self.account_labels(account))
            .inc_by(n);
    }

    pub fn send_request(&self, account: &str, took: std::time::Duration) {
        self.send_seconds
            .get_or_create(&self.account_labels(account))
            .observe(took.as_secs_f64());
    }

    pub fn token_refresh(&self, account: &str, ok: bool) {
        let labels = ResultLabels {
            account: self.account(account),
            result: if ok { "ok" } else { "error" },
        };
        self.token_refreshes.get_or_create(&labels).inc();
    }

    /// `event`: the push's Event, or MsgType for user messages; unknown types count as `other`.
    pub fn event_received(&self, account: &str, event: &str) {
        let labels = EventLabels {
            account: self.account(account),
            event: KNOWN_EVENTS
                .into_iter()
                .find(|known| *known == event)
                .unwrap_or(OTHER),
        };
        self.events_received.get_or_create(&labels).inc();
    }

    pub fn callback_refused(&self, account: &str, status: u16) {
        let labels = RefusalLabels {
            account: self.account(account),
            status,
        };
        self.callback_refused.get_or_create(&labels).inc();
    }

    pub fn events_joined(&self, rows: u64) {
        self.events_joined.inc_by(rows);
    }

    /// Counts `n` delivery events that could not be joined, for `reason`.
    pub fn events_not_joined(&self, reason: NotJoined, n: u64) {
        let labels = NotJoinedLabels {
            reason: reason.as_str(),
        };
        self.events_not_joined.get_or_create(&labels).inc_by(n);
    }

    /// Reads the database gauges and encodes everything in the OpenMetrics text format (which
    /// Prometheus reads; its classic text parser reads it too).
    pub async fn render(&self, store: &Store) -> String {
        let _one_at_a_time = self.scrape.lock().await;
        let read = self.read_database(store).await;
        if let Err(e) = &read {
            tracing::warn!(error = %format!("{e:#}"), "metrics: cannot read the database gauges");
        }
        self.database_up.set(i64::from(read.is_ok()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }

    async fn read_database(&self, store: &Store) -> anyhow::Result<()> {
        let counts = store.row_counts().await?;
        let quota = crate::report::read(store, "report_quota").await?;
        // Statuses that emptied since the last scrape must show 0, not their old value.
        self.rows.clear();
        self.held_rows.clear();
        self.quota_remaining.clear();
        // Several unconfigured accounts (or odd values) fall into one series: add, not set.
        for c in counts {
            let account = self.account(&c.account);
            let labels = RowLabels {
                account: account.clone(),
                status: Status::parse(&c.status).map_or(OTHER, Status::as_str),
            };
            self.rows.get_or_create(&labels).inc_by(c.rows);
            if let Some(reason) = c.held_for.filter(|_| c.status == "held") {
                let held_for = [
                    HeldFor::Template,
                    HeldFor::MonthlyQuota,
                    HeldFor::DailyQuota,
                    HeldFor::Consent,
                ]
                .map(HeldFor::as_str);
                let labels = HeldLabels {
                    account,
                    reason: fixed(&held_for, &reason),
                };
                self.held_rows.get_or_create(&labels).inc_by(c.rows);
            }
        }
        let column = |name: &str| quota.columns.iter().position(|c| c == name);
        let (Some(account), Some(template), Some(month), Some(day)) = (
            column("account"),
            column("template_id"),
            column("month_remaining"),
            column("day_remaining"),
        ) else {
            return Ok(()); // no account has written its limits yet
        };
        for row in &quota.rows {
            let account = row[account].as_str().unwrap_or_default();
            // Quotas are the configured accounts'; remaining sends of others mean nothing.
            if !self.accounts.contains(account) {
                continue;
            }
            let account = account.to_string();
            if let Some(template_id) = row[template].as_str() {
                let labels = QuotaLabels {
                    account: account.clone(),
                    template_id: template_id.to_string(),
                    period: "month",
                };
                self.quota_remaining
                    .get_or_create(&labels)
                    .set(row[month].as_i64().unwrap_or_default());
            }
            let labels = QuotaLabels {
                account,
                template_id: String::new(),
                period: "day",
            };
            self.quota_remaining
                .get_or_create(&labels)
                .set(row[day].as_i64().unwrap_or_default());
        }
        Ok(())
    }
}

/// `value` when it is one of `set`, else `other`.
fn fixed(set: &[&'static str], value: &str) -> &'static str {
    set.iter().find(|s| **s == value).copied().unwrap_or(OTHER)
}
