//! The benchmark of docs/benchmarks.md: drain, latency and slow-WeChat runs against a fresh
//! SQLite file and a fresh PostgreSQL database, with the daemon as a child process (so its CPU
//! time and peak memory are its own) and the simulator and the inserting client in this one.
//!
//! With `--api-url` the daemon sends to an outside stand-in instead (the peer kit's nginx stub);
//! with `--peer` it runs alternately with graphile-worker on the kit's stubs and prints both.
//!
//! `cargo run --release --bin bench -- --help`
#![forbid(unsafe_code)]

mod dashboard;
mod db;
mod host;
mod peer;
mod run;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};
use clap::Parser;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use wechat_outbox::config::Config;
use wechat_outbox::simulator::{Faults, SimSettings};

use run::{Run, StandIn};

#[derive(Parser, Debug)]
#[command(about = "Measure drain throughput, insert-to-sent latency and slow-WeChat throughput")]
pub struct Args {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    pub backend: String,
    /// Rows pre-inserted for each drain run (comma-separated; 0 skips them); add 1000000 for
    /// the 1M run.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub drain: Vec<u64>,
    /// Insert rates for the latency runs, rows per second (comma-separated; 0 skips them).
    #[arg(long, value_delimiter = ',', default_value = "50,500,2000")]
    pub rates: Vec<u64>,
    /// How long each latency run inserts.
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    /// The simulator's answer delay in the slow-WeChat run, in milliseconds (0 skips the run).
    #[arg(long, default_value_t = 50)]
    pub slow_ms: u64,
    /// Rows in the slow-WeChat run.
    #[arg(long, default_value_t = 16000)]
    pub slow_rows: u64,
    /// workers.claim_ahead of the daemon.
    #[arg(long, default_value_t = 512)]
    pub claim_ahead: usize,
    /// workers.concurrency of the daemon.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// workers.batch_size of the daemon.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// workers.order of the daemon: none or per_user (its cost, with one row per recipient).
    #[arg(long, default_value = "none")]
    pub order: String,
    /// RUST_LOG of the daemon (`info` logs a line per message).
    #[arg(long, default_value = "warn")]
    pub daemon_log: String,
    /// Daemons started on the run's database, each with the settings above (scale-out; on
    /// SQLite they share the one file).
    #[arg(long, default_value_t = 1)]
    pub daemons: usize,
    /// Server for the Postgres runs (a database is created and dropped per run).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres_url: String,
    /// Send to this stand-in for WeChat instead of the simulator (say the peer kit's nginx
    /// stub, `http://127.0.0.1:9980`); rows then name its templates TPL_0 … TPL_9.
    #[arg(long)]
    pub api_url: Option<String>,
    /// With `--api-url`: the slow run's stand-in (the kit's `http://127.0.0.1:9981`); without
    /// it the slow run is skipped. `--slow-ms` must give its delay.
    #[arg(long)]
    pub slow_api_url: Option<String>,
    /// Side by side with graphile-worker: the peer kit's drains (fast stub, then the slow one
    /// unless `--slow-ms 0`) and latency runs, alternated with the daemon's on the same stubs.
    /// Needs the kit's node and nginx; opt-in, never part of `cargo test`.
    #[arg(long)]
    pub peer: bool,
    /// Rounds of the side-by-side mode; medians and ranges over them.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The peer kit (its README says what it installs).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/peers"))]
    pub peer_kit: PathBuf,
    /// Only the dashboard's answer times, with this many rows in the table (say 1000000).
    #[arg(long, default_value_t = 0)]
    pub dashboard_rows: u64,
    /// Internal: run the daemon with this config (the benchmark starts itself this way).
    #[arg(long, hide = true)]
    pub daemon: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(config) = &args.daemon {
        wechat_outbox::telemetry::init("warn", wechat_outbox::telemetry::LogFormat::Text);
        let config = Config::load(config)?;
        let shutdown = CancellationToken::new();
        return runtime.block_on(async {
            wechat_outbox::app::cancel_on_signal(shutdown.clone());
            wechat_outbox::app::run(config, shutdown).await
        });
    }
    runtime.block_on(bench(args))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

async fn bench(args: Args) -> Result<()> {
    let backends = match args.backend.as_str() {
        "sqlite" => vec![Backend::Sqlite],
        "postgres" => vec![Backend::Postgres],
        "both" => vec![Backend::Sqlite, Backend::Postgres],
        other => bail!("--backend {other:?}: sqlite, postgres or both"),
    };
    print_settings(&args);
    if backends.contains(&Backend::Postgres) {
        print_server_settings(&args.postgres_url).await?;
    }
    if args.peer {
        return peer::side_by_side(&args, &backends).await;
    }
    if args.dashboard_rows > 0 {
        for backend in backends {
            dashboard::dashboard(&args, backend, args.dashboard_rows).await?;
        }
        return Ok(());
    }
    let stand_in = |settings: SimSettings| match &args.api_url {
        Some(url) => StandIn::External(url.clone()),
        None => StandIn::Simulator(Box::new(settings)),
    };
    for backend in backends {
        for &n in args.drain.iter().filter(|&&n| n > 0) {
            let run = Run::new(&args, backend, stand_in(SimSettings::default())).await?;
            run.drain(n, "drain").await?;
        }
        for &rate in args.rates.iter().filter(|&&rate| rate > 0) {
            let run = Run::new(&args, backend, stand_in(SimSettings::default())).await?;
            run.latency(rate, args.latency_secs).await?;
        }
        let slow = match (&args.api_url, &args.slow_api_url) {
            _ if args.slow_ms == 0 => None,
            (None, _) => Some(StandIn::Simulator(Box::new(SimSettings {
                faults: Faults {
                    delay_ms: args.slow_ms,
                    ..Faults::default()
                },
                ..SimSettings::default()
            }))),
            (Some(_), Some(url)) => Some(StandIn::External(url.clone())),
            (Some(_), None) => None,
        };
        if let Some(stand_in) = slow {
            let run = Run::new(&args, backend, stand_in).await?;
            let rate = run.drain(args.slow_rows, "slow").await?.from_ready;
            let bound = args.concurrency as f64 / (args.slow_ms as f64 / 1000.0);
            println!(
                "{:<8} slow     bound concurrency/latency = {bound:.0} msg/s; reached {:.1}%",
                backend.name(),
                100.0 * rate / bound
            );
        }
    }
    Ok(())
}

fn print_settings(args: &Args) {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "wechat-outbox bench  commit {}  {cpus} CPUs ({model})",
        commit.trim()
    );
    let stand_in = match (&args.api_url, args.peer) {
        (_, true) => "the peer kit's stubs".to_string(),
        (Some(url), _) => url.clone(),
        (None, _) => "the simulator in the bench process".to_string(),
    };
    println!(
        "daemon: concurrency {} claim_ahead {} batch_size {} order {} RUST_LOG={}; WeChat: {stand_in}; inserting client in the bench process",
        args.concurrency, args.claim_ahead, args.batch_size, args.order, args.daemon_log
    );
    println!(
        "drain: N rows inserted before the daemon starts, timed from its /readyz (and from the first row's sent_at) to the last row ended"
    );
    println!(
        "latency: one INSERT per row on its own connection at a fixed rate for {} s; latency = sent_at - the INSERT's start",
        args.latency_secs
    );
    println!(
        "cpu: the daemon's user+system time over the run; host cpu: the whole machine's busy time (/proc/stat); rss: the daemon's peak (VmHWM); postgres: commits and WAL bytes over the run"
    );
}

/// The server settings a Postgres figure depends on. Without autovacuum (or with it waking
/// rarely) the claimed rows' entries pile up at the head of the claim's index and every claim
/// walks them: a 1M drain ran 20-30 % slower with it off.
async fn print_server_settings(url: &str) -> Result<()> {
    let mut admin = PgConnection::connect(url).await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM pg_settings
         WHERE name IN ('server_version', 'autovacuum', 'autovacuum_naptime', 'max_wal_size',
                        'shared_buffers', 'synchronous_commit')
         ORDER BY name",
    )
    .fetch_all(&mut admin)
    .await?;
    let line: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("postgres server: {}", line.join(" "));
    Ok(())
}
