//! Command line: `run`, `migrate`, `check-config`, `simulate`, `demo`.

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
    /// Templates in use per account: list, activate, deactivate, sync from WeChat.
    Templates(TemplatesArgs),
    /// Quota used, limit and remaining per account and template, this month and today.
    Quota(ConfigArg),
    /// Delete terminal rows and stored pushes older than retention.keep_days, now.
    Prune(ConfigArg),
    /// Print a report view: status, daily, errors, latency, stuck (docs/reports.md).
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
