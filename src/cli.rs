//! Command line: `run`, `migrate`, `check-config`, `simulate`, `demo`, `dashboard`, and the
//! operator's `templates`, `quota`, `prune` and `report`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wechat-outbox",
    version,
    about = "Durable sender of WeChat template messages from an SQL outbox table"
)]
pub struct Cli {
    /// text (default; journald-friendly under systemd) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: apply migrations, then send rows until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Apply database migrations and exit.
    Migrate(ConfigArg),
    /// Validate the configuration (and resolve secrets) without connecting to anything.
    CheckConfig(ConfigArg),
    /// Serve a WeChat API simulator for tests and staging.
    Simulate(SimulateArgs),
    /// Start a simulator and the daemon on a new SQLite file, send a few rows, show their fate.
    Demo(DemoArgs),
    /// Templates per account: list, activate, deactivate, sync, add and delete at WeChat.
    Templates(TemplatesArgs),
    /// Quota used, limit and remaining per account and template, this month and today.
    Quota(ConfigArg),
    /// Delete terminal rows and stored pushes older than retention.keep_days, now.
    Prune(ConfigArg),
    /// Serve the dashboard alone (`[dashboard]`), sending nothing: for a machine that watches.
    Dashboard(ConfigArg),
    /// Print a report view: status, quota, daily, errors, latency, stuck, events, refusals
    /// (docs/reports.md).
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// status, daily, errors, latency or stuck.
    pub name: String,
    #[arg(long, value_enum, default_value = "table")]
    pub format: crate::report::Format,
}

#[derive(Debug, Args)]
pub struct TemplatesArgs {
    #[command(subcommand)]
    pub action: TemplatesAction,
}

#[derive(Debug, Subcommand)]
pub enum TemplatesAction {
    /// Every known template and whether it is in use.
    List(ConfigArg),
    /// Take a template into use, if the account has room.
    Activate(TemplateChoice),
    /// Take a template out of use; rows held for room are retried at once.
    Deactivate(TemplateChoice),
    /// Fetch each account's template list from WeChat now.
    Sync(ConfigArg),
    /// Add a category template (类目模板) from WeChat's library and take it into use.
    Add(TemplateAdd),
    /// Delete a template at WeChat and take it out of use.
    Delete(TemplateChoice),
}

#[derive(Debug, Args)]
pub struct TemplateAdd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The account's name.
    #[arg(long, default_value = "default")]
    pub account: String,
    /// The library template's short id (template_id_short).
    #[arg(long)]
    pub short_id: String,
    /// The keywords wanted, in order, comma-separated: "名称,金额,时间".
    #[arg(long)]
    pub keywords: String,
    /// Add it without taking it into use (when the account has no room).
    #[arg(long)]
    pub out_of_use: bool,
}

#[derive(Debug, Args)]
pub struct TemplateChoice {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The account's name.
    #[arg(long, default_value = "default")]
    pub account: String,
    pub template_id: String,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Fraction of sends answered with errcode -1 (system busy).
    #[arg(long, default_value_t = 0.0)]
    pub busy_rate: f64,
    /// Fraction of sends answered with HTTP 502.
    #[arg(long, default_value_t = 0.0)]
    pub http_error_rate: f64,
    /// Fraction of sends delivered and then never answered.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Fraction of sends delivered and answered with a body that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    pub garbage_rate: f64,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Answer 40037 for template ids the simulator does not list (default: accept any).
    #[arg(long)]
    pub strict_templates: bool,
    /// Template sends accepted per appid per Beijing day; beyond, 45009 (openapi/quota/get
    /// reports it).
    #[arg(long, default_value_t = 100_000)]
    pub daily_limit: u64,
    /// Answer 43117 to a send to an openid that got one less than this ago (0: never).
    #[arg(long, default_value_t = 0)]
    pub per_user_interval_ms: u64,
    /// Answer 40241 to the same template and data to the same openid within this (0: never).
    #[arg(long, default_value_t = 0)]
    pub duplicate_window_secs: u64,
    /// Push TEMPLATESENDJOBFINISH events to this URL after each delivery.
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
    /// The token that signs pushed events.
    #[arg(long, default_value = "wechat-outbox-sim")]
    pub callback_token: String,
    /// Encrypt pushed events (safe mode) with this 43-character EncodingAESKey.
    #[arg(long, value_name = "KEY")]
    pub callback_aes_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to keep the demo's SQLite file (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}
