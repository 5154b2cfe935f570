//! The daemon's settings: defaults < TOML file < environment (`WECHAT_OUTBOX_SECTION__KEY`).
//!
//! `load` fails with a message naming the setting when one is missing or invalid. Secrets are
//! `SecretString`s, so `Debug` prints them as redacted and nothing logs them by accident.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::content_rules::{ContentRules, Overlong};
use crate::domain::errcode::UserErrcodes;
use crate::domain::retry::{InDoubtPolicy, RetryPolicy};
use crate::domain::subscribe::{MAX_CONSENT_WAIT_SECS, SubscribeSettings};
use crate::http_server::ConnectionLimits;

/// Environment variables with this prefix override the file: `WECHAT_OUTBOX_DATABASE_URL`,
/// `WECHAT_OUTBOX_WORKERS__CONCURRENCY` (a double underscore separates section and key).
pub const ENV_PREFIX: &str = "WECHAT_OUTBOX_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `sqlite://PATH` (created if missing) or `postgres://…`.
    pub database_url: String,
    /// Postgres only: the schema that holds the tables, created if missing.
    #[serde(default = "default_schema")]
    pub database_schema: String,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub api: ApiSettings,
    #[serde(default)]
    pub workers: WorkerSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub templates: TemplateSettings,
    #[serde(default)]
    pub errcodes: UserErrcodes,
    /// Subscription notifications (订阅通知): consent, its wait, their own monthly limit.
    #[serde(default)]
    pub subscribe: SubscribeSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    #[serde(default)]
    pub callback: CallbackSettings,
    #[serde(default)]
    pub monitor: MonitorSettings,
    #[serde(default)]
    pub dashboard: DashboardSettings,
    #[serde(default)]
    pub accounts: Vec<AccountSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    /// SQLite: how long a write waits for another process's lock before it reports busy.
    pub busy_timeout_ms: u64,
    /// Postgres: how long one connection serves before it is replaced, so that its statements
    /// are planned again for the table as it is then (see `StoreSettings::connection_lifetime`).
    pub connection_lifetime_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            max_connections: 10,
            busy_timeout_ms: 10_000,
            connection_lifetime_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenEndpoint {
    /// `POST /cgi-bin/stable_token`: does not knock out tokens other services hold.
    Stable,
    /// `GET /cgi-bin/token`: every call invalidates the previous token.
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    pub base_url: String,
    /// Whole-request timeout of one API call.
    pub timeout_ms: u64,
    pub token_endpoint: TokenEndpoint,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            base_url: "https://api.weixin.qq.com".into(),
            timeout_ms: 10_000,
            token_endpoint: TokenEndpoint::Stable,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Requests to WeChat in flight at once.
    pub concurrency: usize,
    /// Rows claimed beyond `concurrency`, so that a free request slot never waits for the
    /// database: they are counted in the quota or have their outcome written meanwhile. Never
    /// more than this daemon's share of the accounts' send rates per second, so that rows do
    /// not wait here for the rate while another daemon could send them.
    pub claim_ahead: usize,
    /// Rows claimed per statement.
    pub batch_size: usize,
    /// Longest wait between looks at the table when no wake-up arrives.
    pub poll_interval_ms: u64,
    /// How long a claimed row belongs to this daemon before another may rescue it.
    pub lease_secs: u64,
    /// On SIGTERM: how long in-flight messages may take before they are released.
    pub shutdown_grace_secs: u64,
    /// `per_user`: one recipient's rows go out one at a time, in claim order.
    pub order: Order,
    /// Under `order = "per_user"`, how long at most a row that is not final (held, waiting
    /// for a retry) holds back the same recipient's later rows, from its first due time.
    pub order_hold_max_secs: u64,
}

/// In what order rows may go out (`[workers] order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Any order: rows are claimed by priority and due time, and sent in parallel.
    None,
    /// Rows to the same account and openid go out one at a time, in claim order (priority,
    /// first due time, id), so "paid" never arrives after "shipped".
    PerUser,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 64,
            // Measured in issue 16 against 64 and 192: a claim of 256 rows costs little more
            // than one of 64, and 512 rows ahead keep 64 requests busy while a group of
            // outcomes commits (docs/benchmarks.md). The rate share caps the rows ahead anyway.
            claim_ahead: 512,
            batch_size: 256,
            poll_interval_ms: 1000,
            lease_secs: 60,
            shutdown_grace_secs: 20,
            order: Order::None,
            order_hold_max_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_secs: u64,
    /// WeChat de-duplicates `client_msg_id` for 10 minutes; stay inside that.
    pub dedup_window_secs: u64,
    /// `unknown` (default) or `resend`: what happens to a row that may have reached WeChat once
    /// the window has passed.
    pub in_doubt: InDoubtPolicy,
    /// How long an account is held after 48001/48004 before one message probes it again.
    pub not_authorised_pause_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 10,
            base_delay_ms: 1000,
            max_delay_secs: 300,
            dedup_window_secs: 570,
            in_doubt: InDoubtPolicy::Unknown,
            not_authorised_pause_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Templates in use at once per account.
    pub active_templates: u32,
    /// Take a template into use on its first send when there is room.
    pub auto_activate_templates: bool,
    /// Sends per template per calendar month.
    pub monthly_per_template: u32,
    /// Sends per account per day: a number, or `"wechat"` for WeChat's own figure.
    pub daily_per_account: DailyCap,
    /// Where months and days begin (IANA name).
    pub timezone: String,
    /// Sends per second per account, for the whole cluster.
    pub rate_per_second: u32,
    /// The least time between two sends to one openid of an account, across daemons; 0: off.
    pub per_user_interval_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            active_templates: 10,
            auto_activate_templates: true,
            monthly_per_template: 10_000,
            daily_per_account: DailyCap::Fixed(100_000),
            timezone: "Asia/Shanghai".into(),
            rate_per_second: 50,
            per_user_interval_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSettings {
    /// How often WeChat's template list is synced (also at start).
    pub sync_interval_secs: u64,
    /// Which display rules keyword values are held to before anything is spent on them.
    pub content_rules: ContentRules,
    /// What a value over those rules gets: cut as WeChat shows it, or the row fails.
    pub overlong: Overlong,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        TemplateSettings {
            sync_interval_secs: 3600,
            content_rules: ContentRules::Rules2023,
            overlong: Overlong::Cut,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Terminal rows and stored pushes older than this are deleted.
    pub keep_days: u32,
    /// Rows deleted per statement, so that pruning never holds a long lock.
    pub batch_size: u32,
    /// How often the daemon prunes.
    pub interval_secs: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            keep_days: 90,
            batch_size: 1000,
            interval_secs: 3600,
        }
    }
}

/// One account's limits, after per-account overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub active_templates: u32,
    pub auto_activate_templates: bool,
    pub monthly_per_template: u32,
    /// The cap in force: the configured number, or with `daily_follows_wechat` WeChat's
    /// figure once read (`WECHAT_DAILY_FLOOR` before).
    pub daily_per_account: u32,
    /// `daily_per_account = "wechat"`: the cap follows `openapi/quota/get`.
    pub daily_follows_wechat: bool,
    pub rate_per_second: u32,
}

impl Limits {
    /// These limits with WeChat's last daily figure in force, when the cap follows WeChat and
    /// a figure was read (0: none). Clamped to what `account_limits` holds on both backends.
    pub fn with_wechat_daily(mut self, wechat_daily: u64) -> Limits {
        if self.daily_follows_wechat && wechat_daily > 0 {
            self.daily_per_account = wechat_daily.min(i32::MAX as u64) as u32;
        }
        self
    }
}

/// The daily cap WeChat gives every account that sends template messages, raised with its
/// followers: the cap in force with `daily_per_account = "wechat"` until WeChat's own figure
/// is read.
pub const WECHAT_DAILY_FLOOR: u32 = 100_000;

/// An account's daily cap as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DailyCap {
    Fixed(u32),
    /// WeChat's own figure (`openapi/quota/get`), read at start and hourly.
    Wechat,
}

impl DailyCap {
    /// The cap in force before anything is read from WeChat, and whether it follows WeChat.
    fn initial(self) -> (u32, bool) {
        match self {
            DailyCap::Fixed(n) => (n, false),
            DailyCap::Wechat => (WECHAT_DAILY_FLOOR, true),
        }
    }
}

impl<'de> Deserialize<'de> for DailyCap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Number(u32),
            Word(String),
        }
        match Given::deserialize(deserializer)? {
            Given::Number(n) => Ok(DailyCap::Fixed(n)),
            Given::Word(w) if w == "wechat" => Ok(DailyCap::Wechat),
            Given::Word(_) => Err(serde::de::Error::custom(
                "daily_per_account must be a number or \"wechat\"",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackSettings {
    /// Serve `/wechat/{account}` for WeChat's pushes.
    pub enabled: bool,
    pub listen: String,
    /// Larger bodies are refused with 413 before they are read.
    pub max_body_bytes: usize,
    /// Pushes whose `timestamp` is further than this from our clock are refused.
    pub timestamp_window_secs: u64,
    /// A delivery event that has not joined a sent row this long after it arrived is given up
    /// on (`inbound_events.given_up_at`): it was for a message another system sent.
    pub join_window_secs: u64,
    /// Open connections at once; a connection beyond them is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A request head must arrive within this, from the accept (or the first byte of a later
    /// request on a kept-alive connection).
    pub header_timeout_secs: u64,
    /// A request body must arrive within this after its head; else 408.
    pub body_timeout_secs: u64,
    /// A kept-alive connection waiting this long for its next request is closed.
    pub idle_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSettings {
    /// Serve `/metrics`, `/healthz` and `/readyz`.
    pub enabled: bool,
    /// Loopback by default: the figures are for the operator's scraper, not the internet.
    pub listen: String,
    /// Open connections at once (the timeouts are `[callback]`'s).
    pub max_connections: usize,
    /// `/healthz` fails once every claim has failed for this long, or a background service has
    /// had no successful pass for this long (or three of its intervals, if longer).
    pub failing_after_secs: u64,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            enabled: true,
            listen: "127.0.0.1:9479".into(),
            max_connections: 64,
            failing_after_secs: 30,
        }
    }
}

/// The web dashboard (docs/dashboard.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSettings {
    /// Serve it, with the daemon (and with `wechat-outbox dashboard`).
    pub enabled: bool,
    /// Loopback by default, like the monitor endpoint.
    pub listen: String,
    /// Allow cancelling rows, sending failed rows again, resuming paused accounts and taking
    /// templates out of use. Needs a password or a token.
    pub actions: bool,
    /// The user name basic auth asks for; written in the audit table as who acted.
    pub user: String,
    /// A file holding the basic-auth password (else `$CREDENTIALS_DIRECTORY/dashboard.password`).
    pub password_file: Option<PathBuf>,
    /// A file holding a bearer token (else `$CREDENTIALS_DIRECTORY/dashboard.token`).
    pub token_file: Option<PathBuf>,
    /// Show openids as `oAbc…xyz`.
    pub mask_openids: bool,
    /// The overview's figures (which count the whole table) are computed at most this often,
    /// however many browsers watch.
    pub refresh_secs: u64,
    /// Open connections at once (the timeouts are `[callback]`'s).
    pub max_connections: usize,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            enabled: true,
            listen: "127.0.0.1:9480".into(),
            actions: false,
            user: "admin".into(),
            password_file: None,
            token_file: None,
            mask_openids: false,
            refresh_secs: 5,
            max_connections: 64,
        }
    }
}

/// The dashboard's credentials, resolved from their files. Never printed.
#[derive(Clone, Default)]
pub struct DashboardCredentials {
    pub password: Option<SecretString>,
    pub token: Option<SecretString>,
}

impl std::fmt::Debug for DashboardCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardCredentials")
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// A dashboard password or token shorter than this is refused: it guards actions on every
/// account's messages.
pub const DASHBOARD_SECRET_MIN_CHARS: usize = 16;

impl Default for CallbackSettings {
    fn default() -> Self {
        CallbackSettings {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 64 * 1024,
            timestamp_window_secs: 300,
            join_window_secs: 900,
            max_connections: 1024,
            header_timeout_secs: 5,
            body_timeout_secs: 10,
            idle_timeout_secs: 30,
        }
    }
}

/// How an account's server configuration (消息加解密方式) has WeChat send its pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageMode {
    /// 明文模式: plain XML, `signature` only.
    Plain,
    /// 兼容模式: plain and encrypted forms both accepted.
    Compatible,
    /// 安全模式: encrypted only.
    Safe,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    pub name: String,
    pub appid: String,
    pub secret: Option<SecretString>,
    pub secret_file: Option<PathBuf>,
    pub token: Option<SecretString>,
    pub encoding_aes_key: Option<SecretString>,
    /// The key before the last rotation, accepted until WeChat uses only the new one.
    pub previous_encoding_aes_key: Option<SecretString>,
    /// Default: `safe` when `encoding_aes_key` is set, else `plain`.
    pub message_mode: Option<MessageMode>,
    pub rate_per_second: Option<u32>,
    pub active_templates: Option<u32>,
    pub monthly_per_template: Option<u32>,
    pub daily_per_account: Option<DailyCap>,
}

/// An account with its secret resolved from wherever it was given.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub appid: String,
    pub secret: SecretString,
    pub token: Option<SecretString>,
    pub encoding_aes_key: Option<SecretString>,
    pub previous_encoding_aes_key: Option<SecretString>,
    pub message_mode: MessageMode,
    pub limits: Limits,
}

fn default_schema() -> String {
    "public".into()
}

/// A configuration error without the values it quotes: the lines of the file a TOML error
/// shows, and the value a type error names (`token = 123456` gives "invalid type: integer
/// `123456`, expected a string"), may be secrets, and errors reach logs and the terminal.
fn without_source(error: &str) -> String {
    error
        .lines()
        .filter(|line| {
            let code = line.trim_start();
            !code.starts_with('|')
                && !code
                    .split_once(" |")
                    .is_some_and(|(number, _)| number.chars().all(|c| c.is_ascii_digit()))
        })
        .map(without_found_value)
        .collect::<Vec<_>>()
        .join(" ")
}

/// "invalid type: <found>, expected …" with the found value left out.
fn without_found_value(line: &str) -> String {
    for marker in ["invalid type: ", "invalid value: "] {
        if let Some((head, rest)) = line.split_once(marker)
            && let Some((_, expected)) = rest.split_once(", expected")
        {
            return format!("{head}{marker}(value not shown), expected{expected}");
        }
    }
    line.to_string()
}

impl Config {
    /// Reads the file, applies the environment, resolves secrets and validates everything.
    pub fn load(path: &Path) -> Result<Config> {
        if !path.is_file() {
            bail!(
                "config file {} does not exist or is not a file",
                path.display()
            );
        }
        let config: Config = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .extract()
            .map_err(|e| {
                anyhow::anyhow!("invalid configuration: {}", without_source(&e.to_string()))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML text with no environment; for tests and the demo.
    pub fn from_toml(text: &str) -> Result<Config> {
        let config: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| {
                anyhow::anyhow!("invalid configuration: {}", without_source(&e.to_string()))
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.database_url.starts_with("sqlite:") || self.is_postgres()) {
            bail!("database_url must start with sqlite:// or postgres://");
        }
        let schema_ok = !self.database_schema.is_empty()
            && self.database_schema.len() <= 63
            && self
                .database_schema
                .starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && self
                .database_schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !schema_ok {
            bail!("database_schema must be a lowercase SQL identifier (letters, digits, _)");
        }
        let url = reqwest::Url::parse(&self.api.base_url)
            .with_context(|| format!("api.base_url is not a URL: {:?}", self.api.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("api.base_url must be an http:// or https:// URL");
        }
        if self.subscribe.consent_wait_secs > MAX_CONSENT_WAIT_SECS {
            bail!(
                "subscribe.consent_wait_secs must be at most {MAX_CONSENT_WAIT_SECS} (ten years)"
            );
        }
        positive(
            "database.max_connections",
            self.database.max_connections as u64,
        )?;
        positive(
            "database.connection_lifetime_secs",
            self.database.connection_lifetime_secs,
        )?;
        positive("api.timeout_ms", self.api.timeout_ms)?;
        positive("workers.concurrency", self.workers.concurrency as u64)?;
        positive("workers.batch_size", self.workers.batch_size as u64)?;
        positive("workers.poll_interval_ms", self.workers.poll_interval_ms)?;
        positive("retry.max_attempts", self.retry.max_attempts as u64)?;
        positive("retry.base_delay_ms", self.retry.base_delay_ms)?;
        positive("limits.rate_per_second", self.limits.rate_per_second as u64)?;
        positive(
            "templates.sync_interval_secs",
            self.templates.sync_interval_secs,
        )?;
        self.timezone()?;
        positive("retention.keep_days", self.retention.keep_days as u64)?;
        positive("retention.batch_size", self.retention.batch_size as u64)?;
        positive("retention.interval_secs", self.retention.interval_secs)?;
        positive("callback.join_window_secs", self.callback.join_window_secs)?;
        positive(
            "monitor.failing_after_secs",
            self.monitor.failing_after_secs,
        )?;
        // A lease must outlive the HTTP call it covers, or another daemon could rescue a row
        // that is still in flight.
        if self.workers.lease_secs * 1000 < self.api.timeout_ms * 2 {
            bail!("workers.lease_secs must be at least twice api.timeout_ms");
        }
        for (key, value) in [
            (
                "callback.max_connections",
                self.callback.max_connections as u64,
            ),
            (
                "callback.header_timeout_secs",
                self.callback.header_timeout_secs,
            ),
            (
                "callback.body_timeout_secs",
                self.callback.body_timeout_secs,
            ),
            (
                "callback.idle_timeout_secs",
                self.callback.idle_timeout_secs,
            ),
            (
                "monitor.max_connections",
                self.monitor.max_connections as u64,
            ),
            (
                "dashboard.max_connections",
                self.dashboard.max_connections as u64,
            ),
            ("dashboard.refresh_secs", self.dashboard.refresh_secs),
        ] {
            positive(key, value)?;
        }
        positive("errcodes.refusal_days", self.errcodes.refusal_days.into())?;
        positive(
            "errcodes.too_frequent_wait_secs",
            self.errcodes.too_frequent_wait_secs,
        )?;
        positive(
            "workers.order_hold_max_secs",
            self.workers.order_hold_max_secs,
        )?;
        if self.workers.order_hold_max_secs > 30 * 86_400 {
            bail!("workers.order_hold_max_secs must be at most 2592000 (30 days)");
        }
        if self.limits.per_user_interval_secs > 86_400 {
            bail!("limits.per_user_interval_secs must be at most 86400");
        }
        if self.errcodes.refusal_days > 3650 || self.errcodes.too_frequent_wait_secs > 86_400 {
            bail!("errcodes.refusal_days must be at most 3650 and too_frequent_wait_secs 86400");
        }
        let e = &self.errcodes;
        for code in e.refused.iter().chain(&e.too_frequent).chain(&e.duplicate) {
            let meanings = [&e.refused, &e.too_frequent, &e.duplicate]
                .iter()
                .filter(|list| list.contains(code))
                .count();
            if meanings > 1 || *code == 0 {
                bail!("errcodes: {code} is given more than one meaning (or is 0, success)");
            }
        }
        // Beyond these a setting is a typo, and a timeout in hours is no protection.
        for (key, value, max) in [
            (
                "callback.max_connections",
                self.callback.max_connections as u64,
                MAX_CONNECTIONS,
            ),
            (
                "monitor.max_connections",
                self.monitor.max_connections as u64,
                MAX_CONNECTIONS,
            ),
            (
                "dashboard.max_connections",
                self.dashboard.max_connections as u64,
                MAX_CONNECTIONS,
            ),
            ("dashboard.refresh_secs", self.dashboard.refresh_secs, 3600),
            (
                "callback.header_timeout_secs",
                self.callback.header_timeout_secs,
                MAX_TIMEOUT_SECS,
            ),
            (
                "callback.body_timeout_secs",
                self.callback.body_timeout_secs,
                MAX_TIMEOUT_SECS,
            ),
            (
                "callback.idle_timeout_secs",
                self.callback.idle_timeout_secs,
                MAX_TIMEOUT_SECS,
            ),
        ] {
            if value > max {
                bail!("{key} must be at most {max}");
            }
        }
        for (key, listen) in [
            ("callback.listen", &self.callback.listen),
            ("monitor.listen", &self.monitor.listen),
            ("dashboard.listen", &self.dashboard.listen),
        ] {
            listen
                .parse::<std::net::SocketAddr>()
                .with_context(|| format!("{key} is not an address: {listen:?}"))?;
        }
        if self.accounts.is_empty() {
            bail!("accounts: configure at least one [[accounts]] with name, appid and secret");
        }
        let mut names = HashSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            let at = format!("accounts[{i}]");
            if account.name.trim().is_empty() {
                bail!("{at}.name is empty");
            }
            if !names.insert(account.name.as_str()) {
                bail!("{at}.name {:?} is used by two accounts", account.name);
            }
            if account.appid.trim().is_empty() {
                bail!("{at}.appid is empty");
            }
            if account.rate_per_second == Some(0) {
                bail!("{at}.rate_per_second must be at least 1");
            }
            for (name, key) in [
                ("encoding_aes_key", &account.encoding_aes_key),
                (
                    "previous_encoding_aes_key",
                    &account.previous_encoding_aes_key,
                ),
            ] {
                if let Some(key) = key
                    && crate::wechat::crypto::MessageCrypto::new(
                        key.expose_secret(),
                        &account.appid,
                    )
                    .is_err()
                {
                    bail!(
                        "{at}.{name} must be the 43-character EncodingAESKey from the WeChat console"
                    );
                }
            }
            let mode = account.message_mode;
            if matches!(mode, Some(MessageMode::Safe | MessageMode::Compatible))
                && account.encoding_aes_key.is_none()
            {
                bail!("{at}.message_mode safe or compatible needs encoding_aes_key");
            }
        }
        Ok(())
    }

    /// What the store needs of the configuration.
    pub fn store_settings(&self) -> crate::store::StoreSettings {
        crate::store::StoreSettings {
            url: self.database_url.clone(),
            schema: self.database_schema.clone(),
            max_connections: self.database.max_connections,
            busy_timeout: std::time::Duration::from_millis(self.database.busy_timeout_ms),
            connection_lifetime: std::time::Duration::from_secs(
                self.database.connection_lifetime_secs,
            ),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres:") || self.database_url.starts_with("postgresql:")
    }

    /// Resolves each account's secret from `secret`, `secret_file`, or
    /// `$CREDENTIALS_DIRECTORY/<name>.secret` (systemd `LoadCredential=`), in that order.
    pub fn accounts(&self) -> Result<Vec<Account>> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        self.accounts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let at = format!("accounts[{i}] ({})", a.name);
                let secret = match (&a.secret, &a.secret_file) {
                    (Some(_), Some(_)) => bail!("{at}: set secret or secret_file, not both"),
                    (Some(secret), None) => secret.clone(),
                    (None, Some(file)) => read_secret(file)
                        .with_context(|| format!("{at}.secret_file {}", file.display()))?,
                    (None, None) => {
                        let from_credentials = credentials
                            .as_ref()
                            .map(|dir| dir.join(format!("{}.secret", a.name)))
                            .filter(|p| p.is_file());
                        match from_credentials {
                            Some(file) => read_secret(&file)
                                .with_context(|| format!("{at}: {}", file.display()))?,
                            None => bail!(
                                "{at}.secret is missing: set secret, secret_file, or provide \
                                 $CREDENTIALS_DIRECTORY/{}.secret",
                                a.name
                            ),
                        }
                    }
                };
                if secret.expose_secret().trim().is_empty() {
                    bail!("{at}.secret is empty");
                }
                let daily = a
                    .daily_per_account
                    .unwrap_or(self.limits.daily_per_account)
                    .initial();
                Ok(Account {
                    name: a.name.clone(),
                    appid: a.appid.clone(),
                    secret,
                    token: a.token.clone(),
                    encoding_aes_key: a.encoding_aes_key.clone(),
                    previous_encoding_aes_key: a.previous_encoding_aes_key.clone(),
                    message_mode: a.message_mode.unwrap_or(if a.encoding_aes_key.is_some() {
                        MessageMode::Safe
                    } else {
                        MessageMode::Plain
                    }),
                    limits: Limits {
                        active_templates: a
                            .active_templates
                            .unwrap_or(self.limits.active_templates),
                        auto_activate_templates: self.limits.auto_activate_templates,
                        monthly_per_template: a
                            .monthly_per_template
                            .unwrap_or(self.limits.monthly_per_template),
                        daily_per_account: daily.0,
                        daily_follows_wechat: daily.1,
                        rate_per_second: a.rate_per_second.unwrap_or(self.limits.rate_per_second),
                    },
                })
            })
            .collect()
    }

    /// The timezone in which quota months and days begin.
    pub fn timezone(&self) -> Result<chrono_tz::Tz> {
        self.limits.timezone.parse().map_err(|_| {
            anyhow::anyhow!(
                "limits.timezone {:?} is not an IANA timezone such as Asia/Shanghai",
                self.limits.timezone
            )
        })
    }

    /// What the callback listener lets its clients take.
    pub fn callback_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.callback.max_connections,
            header_timeout: Duration::from_secs(self.callback.header_timeout_secs),
            body_timeout: Duration::from_secs(self.callback.body_timeout_secs),
            idle_timeout: Duration::from_secs(self.callback.idle_timeout_secs),
        }
    }

    /// The dashboard's password and token, from their files or systemd credentials; an error
    /// when actions are on or the address is not loopback and neither is set.
    pub fn dashboard_credentials(&self) -> Result<DashboardCredentials> {
        let d = &self.dashboard;
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let read = |setting: &str, file: &Option<PathBuf>, credential: &str| {
            let file = file.clone().or_else(|| {
                credentials
                    .as_ref()
                    .map(|dir| dir.join(credential))
                    .filter(|p| p.is_file())
            });
            let Some(file) = file else {
                return Ok(None);
            };
            let secret = read_secret(&file)
                .with_context(|| format!("dashboard.{setting} {}", file.display()))?;
            if secret.expose_secret().trim().chars().count() < DASHBOARD_SECRET_MIN_CHARS {
                bail!(
                    "dashboard.{setting} {}: must hold at least {DASHBOARD_SECRET_MIN_CHARS} characters",
                    file.display()
                );
            }
            Ok(Some(secret))
        };
        let found = DashboardCredentials {
            password: read("password_file", &d.password_file, "dashboard.password")?,
            token: read("token_file", &d.token_file, "dashboard.token")?,
        };
        let loopback = d
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if d.enabled
            && (d.actions || !loopback)
            && found.password.is_none()
            && found.token.is_none()
        {
            bail!(
                "dashboard: actions, or a listen address that is not loopback, need \
                 dashboard.password_file or dashboard.token_file \
                 (or $CREDENTIALS_DIRECTORY/dashboard.password)"
            );
        }
        if d.user.is_empty() || d.user.contains(':') || d.user.chars().any(char::is_control) {
            bail!("dashboard.user must be a name without ':' or control characters");
        }
        Ok(found)
    }

    /// The dashboard listener: its own cap, the callback's timeouts.
    pub fn dashboard_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.dashboard.max_connections,
            ..self.callback_limits()
        }
    }

    /// The monitor listener: its own cap, the callback's timeouts.
    pub fn monitor_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.monitor.max_connections,
            ..self.callback_limits()
        }
    }

    /// File descriptors the daemon may need at once: both listeners full, the database pool,
    /// the requests to WeChat, and some for files and the rest.
    pub fn open_files_needed(&self) -> u64 {
        let listeners = [
            (self.callback.enabled, self.callback.max_connections),
            (self.monitor.enabled, self.monitor.max_connections),
            (self.dashboard.enabled, self.dashboard.max_connections),
        ];
        let served: u64 = listeners
            .iter()
            .filter(|(enabled, _)| *enabled)
            .map(|(_, cap)| *cap as u64 + 1)
            .sum();
        served + u64::from(self.database.max_connections) + self.workers.concurrency as u64 + 64
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry.max_attempts,
            base_delay: Duration::from_millis(self.retry.base_delay_ms),
            max_delay: Duration::from_secs(self.retry.max_delay_secs),
            dedup_window: Duration::from_secs(self.retry.dedup_window_secs),
            in_doubt: self.retry.in_doubt,
        }
    }
}

/// Upper bounds of the listener settings.
const MAX_CONNECTIONS: u64 = 1_000_000;
const MAX_TIMEOUT_SECS: u64 = 3600;

fn positive(name: &str, value: u64) -> Result<()> {
    if value == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(())
}

fn read_secret(path: &Path) -> Result<SecretString> {
    let text = std::fs::read_to_string(path).context("cannot read")?;
    Ok(SecretString::from(
        text.trim_end_matches(['\r', '\n']).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_does_not_parse_is_refused_without_quoting_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "database_url = \"sqlite:///x.db\"\n[[accounts]]\nname = \"a\"\nsecret = \"s3cr3t-value\n",
        )
        .unwrap();
        let error = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(error.contains("line 4"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
        // A secret written as a number is a type error that would name the value.
        std::fs::write(
            &path,
            "database_url = \"sqlite:///x.db\"\n[[accounts]]\nname = \"a\"\nappid = \"wx1\"\nsecret = 987654321\n",
        )
        .unwrap();
        let error = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(error.contains("invalid type"), "{error}");
        assert!(!error.contains("987654321"), "{error}");
    }

    const MINIMAL: &str = r#"
        database_url = "sqlite://x.db"
        [[accounts]]
        name = "default"
        appid = "wx1"
        secret = "s3cr3t-value"
    "#;

    #[test]
    fn the_dashboard_needs_a_password_for_actions_or_an_open_address() {
        let dir = tempfile::tempdir().unwrap();
        let with = |extra: &str| {
            Config::from_toml(&format!("{MINIMAL}\n[dashboard]\n{extra}"))
                .unwrap()
                .dashboard_credentials()
        };
        assert!(
            with("").unwrap().password.is_none(),
            "loopback, read-only: open"
        );
        for needs in ["actions = true", "listen = \"0.0.0.0:9480\""] {
            let error = format!("{:#}", with(needs).unwrap_err());
            assert!(
                error.contains("dashboard.password_file"),
                "{needs}: {error}"
            );
        }
        assert!(with("enabled = false\nlisten = \"0.0.0.0:9480\"").is_ok());
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let error = format!(
            "{:#}",
            with(&format!(
                "actions = true\npassword_file = \"{}\"",
                short.display()
            ))
            .unwrap_err()
        );
        assert!(
            error.contains("at least 16") && !error.contains("too short"),
            "{error}"
        );
        let good = dir.path().join("good");
        std::fs::write(&good, "a long enough dashboard password\n").unwrap();
        let credentials = with(&format!(
            "actions = true\nlisten = \"0.0.0.0:9480\"\npassword_file = \"{}\"",
            good.display()
        ))
        .unwrap();
        assert_eq!(
            credentials.password.as_ref().unwrap().expose_secret(),
            "a long enough dashboard password"
        );
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("long enough") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(
            with("user = \"a:b\"").is_err(),
            "a user name with ':' cannot log in"
        );
    }

    #[test]
    fn defaults_fill_everything_but_the_database_and_accounts() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(config.workers.concurrency, 64);
        assert_eq!(config.workers.claim_ahead, 512);
        assert_eq!(config.workers.batch_size, 256);
        assert_eq!(config.api.base_url, "https://api.weixin.qq.com");
        assert_eq!(config.api.token_endpoint, TokenEndpoint::Stable);
        assert_eq!(config.accounts().unwrap()[0].limits.rate_per_second, 50);
        let callback = config.callback_limits();
        assert_eq!(callback.max_connections, 1024);
        assert_eq!(callback.header_timeout, Duration::from_secs(5));
        assert_eq!(callback.body_timeout, Duration::from_secs(10));
        assert_eq!(callback.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.monitor_limits().max_connections, 64);
    }

    #[test]
    fn the_daily_cap_is_a_number_or_wechats() {
        let config = Config::from_toml(&format!(
            "{MINIMAL}\ndaily_per_account = 'wechat'\n[limits]\ndaily_per_account = 500"
        ))
        .unwrap();
        let limits = config.accounts().unwrap()[0].limits;
        assert_eq!(
            (limits.daily_per_account, limits.daily_follows_wechat),
            (WECHAT_DAILY_FLOOR, true)
        );
        let config =
            Config::from_toml(&format!("{MINIMAL}\n[limits]\ndaily_per_account = 500")).unwrap();
        let limits = config.accounts().unwrap()[0].limits;
        assert_eq!(
            (limits.daily_per_account, limits.daily_follows_wechat),
            (500, false)
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            (
                "[[accounts]]\nname='a'\nappid='wx'\nsecret='s'",
                "database_url",
            ),
            (
                "database_url='mysql://x'\n[[accounts]]\nname='a'\nappid='wx'\nsecret='s'",
                "database_url",
            ),
            ("database_url='sqlite://x'", "accounts"),
            (
                &format!("{MINIMAL}\n[workers]\nconcurrency = 0"),
                "workers.concurrency",
            ),
            (
                &format!("{MINIMAL}\n[workers]\nconcurency = 3"),
                "concurency",
            ),
            (
                &format!("{MINIMAL}\n[api]\nbase_url = 'not a url'"),
                "api.base_url",
            ),
            (
                &format!("{MINIMAL}\n[callback]\nlisten = 'nowhere'"),
                "callback.listen",
            ),
            (
                &format!("{MINIMAL}\n[retry]\nin_doubt = 'maybe'"),
                "in_doubt",
            ),
            (
                &format!("{MINIMAL}\n[callback]\nmax_connections = 0"),
                "callback.max_connections",
            ),
            (
                &format!("{MINIMAL}\n[callback]\nheader_timeout_secs = 0"),
                "callback.header_timeout_secs",
            ),
            (
                &format!("{MINIMAL}\n[callback]\nbody_timeout_secs = 86400"),
                "callback.body_timeout_secs",
            ),
            (
                &format!("{MINIMAL}\n[monitor]\nmax_connections = 0"),
                "monitor.max_connections",
            ),
            (
                &format!("{MINIMAL}\n[limits]\ndaily_per_account = 'weixin'"),
                "daily_per_account",
            ),
            (
                &format!("{MINIMAL}\n[errcodes]\nduplicate = [43101]"),
                "more than one meaning",
            ),
            (
                &format!("{MINIMAL}\n[errcodes]\nrefusal_days = 0"),
                "errcodes.refusal_days",
            ),
        ];
        for (text, name) in cases {
            let err = format!("{:#}", Config::from_toml(text).unwrap_err());
            assert!(err.contains(name), "{name:?} not named in {err:?}");
        }
    }

    #[test]
    fn a_missing_secret_is_named_and_secrets_never_print() {
        let config =
            Config::from_toml("database_url='sqlite://x'\n[[accounts]]\nname='shop'\nappid='wx'")
                .unwrap();
        let err = format!("{:#}", config.accounts().unwrap_err());
        assert!(
            err.contains("accounts[0] (shop).secret is missing"),
            "{err}"
        );

        let config = Config::from_toml(MINIMAL).unwrap();
        let printed = format!("{config:?} {:?}", config.accounts().unwrap());
        assert!(!printed.contains("s3cr3t-value"), "{printed}");
    }

    #[test]
    fn a_secret_file_is_read_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shop.secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "database_url='sqlite://x'\n[[accounts]]\nname='shop'\nappid='wx'\nsecret_file='{}'",
            file.display()
        );
        let accounts = Config::from_toml(&text).unwrap().accounts().unwrap();
        assert_eq!(accounts[0].secret.expose_secret(), "from-file");
    }
}
