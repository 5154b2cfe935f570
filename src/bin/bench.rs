//! The benchmark of docs/benchmarks.md: drain, latency and slow-WeChat runs against a fresh
//! SQLite file and a fresh PostgreSQL database, with the daemon as a child process (so its CPU
//! time and peak memory are its own) and the simulator and the inserting client in this one.
//!
//! `cargo run --release --bin bench -- --help`
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};
use tokio_util::sync::CancellationToken;
use wechat_outbox::config::Config;
use wechat_outbox::simulator::{self, Faults, SimSettings, Simulator};

#[derive(Parser, Debug)]
#[command(about = "Measure drain throughput, insert-to-sent latency and slow-WeChat throughput")]
struct Args {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Rows pre-inserted for each drain run (comma-separated); add 1000000 for the 1M run.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    drain: Vec<u64>,
    /// Insert rates for the latency runs, rows per second (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "50,500,2000")]
    rates: Vec<u64>,
    /// How long each latency run inserts.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// The simulator's answer delay in the slow-WeChat run, in milliseconds (0 skips the run).
    #[arg(long, default_value_t = 50)]
    slow_ms: u64,
    /// Rows in the slow-WeChat run.
    #[arg(long, default_value_t = 16000)]
    slow_rows: u64,
    /// workers.claim_ahead of the daemon.
    #[arg(long, default_value_t = 192)]
    claim_ahead: usize,
    /// workers.concurrency of the daemon.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// workers.batch_size of the daemon.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// RUST_LOG of the daemon (`info` logs a line per message).
    #[arg(long, default_value = "warn")]
    daemon_log: String,
    /// Server for the Postgres runs (a database is created and dropped per run).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Internal: run the daemon with this config (the benchmark starts itself this way).
    #[arg(long, hide = true)]
    daemon: Option<PathBuf>,
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
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
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
    for backend in backends {
        for &n in &args.drain {
            let run = Run::new(&args, backend, SimSettings::default()).await?;
            run.drain(n, "drain").await?;
        }
        for &rate in &args.rates {
            let run = Run::new(&args, backend, SimSettings::default()).await?;
            run.latency(rate, args.latency_secs).await?;
        }
        if args.slow_ms > 0 {
            let settings = SimSettings {
                faults: Faults {
                    delay_ms: args.slow_ms,
                    ..Faults::default()
                },
                ..SimSettings::default()
            };
            let run = Run::new(&args, backend, settings).await?;
            let rate = run.drain(args.slow_rows, "slow").await?;
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
    println!(
        "daemon: concurrency {} claim_ahead {} batch_size {} RUST_LOG={}; simulator and inserting client in the bench process",
        args.concurrency, args.claim_ahead, args.batch_size, args.daemon_log
    );
    println!(
        "drain: N rows inserted before the daemon starts, timed from its start to the last row `sent`"
    );
    println!(
        "latency: one INSERT per row on its own connection at a fixed rate for {} s; latency = sent_at - the INSERT's start",
        args.latency_secs
    );
    println!(
        "cpu: the daemon's user+system time over the run; rss: its peak (VmHWM); postgres: commits and WAL bytes over the run"
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

/// One run: a fresh database, the simulator, and the daemon started on demand.
struct Run<'a> {
    args: &'a Args,
    backend: Backend,
    sim: Arc<Simulator>,
    stop_sim: CancellationToken,
    dir: PathBuf,
    database_url: String,
    pg_name: Option<String>,
    config: PathBuf,
    monitor: String,
}

impl<'a> Run<'a> {
    async fn new(args: &'a Args, backend: Backend, settings: SimSettings) -> Result<Run<'a>> {
        let sim = Simulator::new(settings);
        let stop_sim = CancellationToken::new();
        let sim_addr =
            simulator::spawn("127.0.0.1:0".parse()?, sim.clone(), stop_sim.clone()).await?;
        let dir = std::env::temp_dir().join(format!("wo-bench-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir)?;
        let (database_url, pg_name) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.join("outbox.db").display()),
                None,
            ),
            Backend::Postgres => {
                let name = format!("wo_bench_{:08x}", fastrand::u32(..));
                let mut admin = PgConnection::connect(&args.postgres_url).await?;
                sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await?;
                let mut url: reqwest::Url = args.postgres_url.parse()?;
                url.set_path(&format!("/{name}"));
                (url.to_string(), Some(name))
            }
        };
        let monitor = free_port()?;
        let toml = format!(
            r#"
            database_url = "{database_url}"
            [api]
            base_url = "http://{sim_addr}"
            [workers]
            concurrency = {concurrency}
            claim_ahead = {claim_ahead}
            batch_size = {batch}
            [limits]
            rate_per_second = 1000000
            monthly_per_template = 100000000
            daily_per_account = 100000000
            [retention]
            interval_secs = 86400
            [callback]
            enabled = false
            [monitor]
            listen = "{monitor}"
            [[accounts]]
            name = "default"
            appid = "wxbench000000001"
            secret = "bench-secret"
            "#,
            concurrency = args.concurrency,
            claim_ahead = args.claim_ahead,
            batch = args.batch_size,
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, &toml)?;
        wechat_outbox::app::migrate(&Config::from_toml(&toml)?).await?;
        Ok(Run {
            args,
            backend,
            sim,
            stop_sim,
            dir,
            database_url,
            pg_name,
            config,
            monitor,
        })
    }

    /// Starts the daemon and waits for `/readyz`.
    async fn start_daemon(&self) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--daemon")
            .arg(&self.config)
            .env("RUST_LOG", &self.args.daemon_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let readyz = format!("http://{}/readyz", self.monitor);
        loop {
            if let Ok(r) = reqwest::get(&readyz).await
                && r.status() == 200
            {
                return Ok(child);
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon not ready; see {}",
                    self.dir.join("daemon.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn sql(&self) -> Result<Db> {
        Ok(match self.backend {
            Backend::Sqlite => Db::Sqlite(SqliteConnection::connect(&self.database_url).await?),
            Backend::Postgres => Db::Postgres(PgConnection::connect(&self.database_url).await?),
        })
    }

    /// Inserts `n` rows, starts the daemon, times until all are sent; returns messages/s.
    async fn drain(self, n: u64, label: &str) -> Result<f64> {
        let mut db = self.sql().await?;
        let insert_began = Instant::now();
        db.insert_many(n).await?;
        let insert_secs = insert_began.elapsed().as_secs_f64();
        let db_before = db.work().await?;
        let mut child = self.start_daemon().await?;
        let pid = child.id();
        let cpu_before = cpu_secs(pid)?;
        let began = Instant::now();
        // The simulator counts deliveries without touching the database; check the rows last.
        let mut checked = Instant::now();
        while self.sim.stats().delivered < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if checked.elapsed() > Duration::from_secs(5) {
                checked = Instant::now();
                // Read the count after the rows: the last rows may have ended since the loop looked.
                if !db.any_open().await? && self.sim.stats().delivered < n {
                    stop(&mut child)?;
                    bail!("rows ended without being delivered: {:?}", self.sim.stats());
                }
            }
        }
        while db.any_open().await? {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secs = began.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid)? - cpu_before;
        let rss = peak_rss_mib(pid)?;
        let db_after = db.work().await?;
        let sent = db.count("status = 'sent'").await?;
        stop(&mut child)?;
        let rate = n as f64 / secs;
        println!(
            "{:<8} {label:<8} n={n:<8} {rate:>8.0} msg/s  {secs:>7.2} s  cpu {:.3} ms/msg  peak rss {rss:.1} MiB  {}  (insert {insert_secs:.1} s; {sent} sent, {} duplicate deliveries)",
            self.backend.name(),
            1000.0 * cpu / n as f64,
            db_work(&db_before, &db_after, n),
            self.sim.stats().duplicate_deliveries,
        );
        if sent != n as i64 {
            bail!("{sent} of {n} rows sent");
        }
        self.finish().await?;
        Ok(rate)
    }

    /// Inserts one row at a time at `rate` per second for `secs`; prints insert-to-sent latency.
    async fn latency(self, rate: u64, secs: u64) -> Result<()> {
        let mut child = self.start_daemon().await?;
        let pid = child.id();
        // The daemon idle for two seconds: what waiting for rows costs.
        let idle_before = cpu_secs(pid)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = (cpu_secs(pid)? - idle_before) / 2.0;
        let mut db = self.sql().await?;
        let db_before = db.work().await?;
        let cpu_before = cpu_secs(pid)?;
        let total = rate * secs;
        let mut starts = Vec::with_capacity(total as usize);
        let began = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(began + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            starts.push(epoch_ms(SystemTime::now()));
            db.insert_one(i).await?;
        }
        let achieved = total as f64 / began.elapsed().as_secs_f64();
        while db.any_open().await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = db.count("status = 'sent'").await?;
        if sent != total as i64 {
            stop(&mut child)?;
            bail!("{sent} of {total} rows sent: {:?}", self.sim.stats());
        }
        let cpu = cpu_secs(pid)? - cpu_before;
        let rss = peak_rss_mib(pid)?;
        let db_after = db.work().await?;
        let sent_at = db.sent_at_ms().await?;
        stop(&mut child)?;
        let mut latencies: Vec<f64> = sent_at
            .iter()
            .map(|(i, at)| at - starts[*i as usize])
            .collect();
        latencies.sort_by(f64::total_cmp);
        let p = |q: f64| {
            latencies[((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1]
        };
        println!(
            "{:<8} latency  rate={rate:<5} (achieved {achieved:.0}/s)  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  cpu {:.3} ms/msg  idle cpu {:.1}%  peak rss {rss:.1} MiB  {}",
            self.backend.name(),
            p(0.50),
            p(0.95),
            p(0.99),
            latencies.last().copied().unwrap_or_default(),
            1000.0 * cpu / total as f64,
            100.0 * idle,
            db_work(&db_before, &db_after, total),
        );
        self.finish().await
    }

    async fn finish(self) -> Result<()> {
        self.stop_sim.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(name) = &self.pg_name {
            let mut admin = PgConnection::connect(&self.args.postgres_url).await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
        }
        Ok(())
    }
}

/// The inserting client: an app's single connection.
enum Db {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

const DATA: &str = r#"{"first":{"value":"bench"}}"#;

/// Database work so far: (commits, WAL bytes) on Postgres.
type Work = Option<(i64, i64)>;

impl Db {
    async fn insert_many(&mut self, n: u64) -> Result<()> {
        let sql = match self {
            Db::Sqlite(_) => format!(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})
                 INSERT INTO outbox (touser, template_id, data)
                 SELECT 'obench' || i, 'TEMPLATE_ID', '{DATA}' FROM s"
            ),
            Db::Postgres(_) => format!(
                "INSERT INTO outbox (touser, template_id, data)
                 SELECT 'obench' || i, 'TEMPLATE_ID', '{DATA}' FROM generate_series(1, {n}) i;
                 ANALYZE outbox"
            ),
        };
        self.exec(&sql).await
    }

    async fn insert_one(&mut self, i: u64) -> Result<()> {
        let sql = format!(
            "INSERT INTO outbox (touser, template_id, data) VALUES ('obench{i}', 'TEMPLATE_ID', '{DATA}')"
        );
        self.exec(&sql).await
    }

    async fn exec(&mut self, sql: &str) -> Result<()> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Db::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop)?,
            Db::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop)?,
        }
        Ok(())
    }

    async fn count(&mut self, condition: &str) -> Result<i64> {
        let sql = AssertSqlSafe(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM outbox WHERE {condition}"
        ));
        Ok(match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
        })
    }

    /// Whether any row is still pending or being sent. Two `EXISTS` probes of the partial
    /// indexes the daemon uses, not a `COUNT`: counting a 1M-row table every 5 s took a
    /// parallel scan's worth of the cores the run is measuring.
    async fn any_open(&mut self) -> Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'pending')
                       OR EXISTS (SELECT 1 FROM outbox WHERE status = 'sending')";
        Ok(match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
        })
    }

    /// (row number, sent_at in ms since the epoch) of every row; touser is 'obench' + number.
    async fn sent_at_ms(&mut self) -> Result<Vec<(i64, f64)>> {
        Ok(match self {
            Db::Sqlite(c) => {
                sqlx::query_as(
                    "SELECT CAST(substr(touser, 7) AS INTEGER),
                        (julianday(sent_at) - 2440587.5) * 86400000.0 FROM outbox",
                )
                .fetch_all(c)
                .await?
            }
            Db::Postgres(c) => {
                sqlx::query_as(
                    "SELECT CAST(substr(touser, 7) AS BIGINT),
                        CAST(EXTRACT(EPOCH FROM sent_at) * 1000 AS double precision) FROM outbox",
                )
                .fetch_all(c)
                .await?
            }
        })
    }

    async fn work(&mut self) -> Result<Work> {
        match self {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(c) => {
                // Other sessions report their counts when they go idle, at most once a second.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let (commits, wal): (i64, i64) = sqlx::query_as(
                    "SELECT CAST(xact_commit AS BIGINT),
                            CAST(pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') AS BIGINT)
                     FROM pg_stat_database WHERE datname = current_database()",
                )
                .fetch_one(c)
                .await?;
                Ok(Some((commits, wal)))
            }
        }
    }
}

fn db_work(before: &Work, after: &Work, n: u64) -> String {
    match (before, after) {
        (Some((c0, w0)), Some((c1, w1))) => format!(
            "commits {:.2}/msg  WAL {:.0} B/msg",
            (c1 - c0) as f64 / n as f64,
            (w1 - w0) as f64 / n as f64
        ),
        _ => String::new(),
    }
}

fn stop(child: &mut Child) -> Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

/// User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15, in USER_HZ = 100).
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("VmHWM")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn free_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}
