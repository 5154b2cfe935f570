//! One run: a fresh database (SQLite file or Postgres database), a stand-in for WeChat (the
//! simulator in this process, or an outside stub), and the daemon as a child process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};
use tokio_util::sync::CancellationToken;
use wechat_outbox::config::Config;
use wechat_outbox::simulator::{self, SimSettings, Simulator};

use crate::db::{Db, Workload, db_work};
use crate::host::{HostCpu, cpu_secs, epoch_ms, free_port, peak_rss_mib};
use crate::{Args, Backend};

/// What stands in for WeChat in a run.
pub enum StandIn {
    /// The project's simulator, in this process, with these settings.
    Simulator(Box<SimSettings>),
    /// A server outside the bench (the peer kit's stubs), at this base URL.
    External(String),
}

/// What a drain measured.
pub struct Drained {
    /// Messages per second from the daemon's `/readyz` to the last row ended.
    pub from_ready: f64,
    /// Messages per second from the first row's `sent_at` to the last row ended: the peer
    /// kit's headline (from its first job to the last).
    pub from_first: f64,
    /// The whole machine's busy CPU per message over the run (daemon, database, stand-in,
    /// this bench), in ms.
    pub host_cpu_ms: f64,
}

pub struct Run<'a> {
    args: &'a Args,
    backend: Backend,
    sim: Option<(Arc<Simulator>, CancellationToken)>,
    workload: Workload,
    dir: PathBuf,
    database_url: String,
    pg_name: Option<String>,
    /// Each daemon's config file and monitor address (`--daemons`; one by default).
    daemons: Vec<(PathBuf, String)>,
}

impl<'a> Run<'a> {
    pub async fn new(args: &'a Args, backend: Backend, stand_in: StandIn) -> Result<Run<'a>> {
        let (sim, base_url, workload) = match stand_in {
            StandIn::Simulator(settings) => {
                let sim = Simulator::new(*settings);
                let stop = CancellationToken::new();
                let addr =
                    simulator::spawn("127.0.0.1:0".parse()?, sim.clone(), stop.clone()).await?;
                (
                    Some((sim, stop)),
                    format!("http://{addr}"),
                    Workload::Simulator,
                )
            }
            StandIn::External(url) => (None, url, Workload::KitStub),
        };
        let FreshDatabase {
            dir,
            url: database_url,
            pg_name,
        } = FreshDatabase::create(args, backend).await?;
        let mut daemons = Vec::new();
        let mut first_toml = None;
        for i in 0..args.daemons.max(1) {
            let monitor = free_port()?;
            let toml = format!(
                r#"
            database_url = "{database_url}"
            [api]
            base_url = "{base_url}"
            [workers]
            concurrency = {concurrency}
            claim_ahead = {claim_ahead}
            batch_size = {batch}
            order = "{order}"
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
            [dashboard]
            enabled = false
            [[accounts]]
            name = "default"
            appid = "wxbench000000001"
            secret = "bench-secret"
            "#,
                concurrency = args.concurrency,
                claim_ahead = args.claim_ahead,
                batch = args.batch_size,
                order = args.order,
            );
            let config = dir.join(format!("config-{i}.toml"));
            std::fs::write(&config, &toml)?;
            first_toml.get_or_insert(toml);
            daemons.push((config, monitor));
        }
        let toml = first_toml.expect("at least one daemon");
        wechat_outbox::app::migrate(&Config::from_toml(&toml)?).await?;
        Ok(Run {
            args,
            backend,
            sim,
            workload,
            dir,
            database_url,
            pg_name,
            daemons,
        })
    }

    /// Starts the daemons and waits for each one's `/readyz`.
    async fn start_daemons(&self) -> Result<Daemons> {
        let mut started = Daemons(Vec::new());
        for (i, (config, _)) in self.daemons.iter().enumerate() {
            let log = std::fs::File::create(self.dir.join(format!("daemon-{i}.log")))?;
            started.0.push(Daemon(
                Command::new(std::env::current_exe()?)
                    .arg("--daemon")
                    .arg(config)
                    .env("RUST_LOG", &self.args.daemon_log)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = wechat_outbox::wechat::api::http_client(reqwest::Client::builder())?;
        for ((_, monitor), daemon) in self.daemons.iter().zip(&mut started.0) {
            let readyz = format!("http://{monitor}/readyz");
            loop {
                if let Ok(r) = http.get(&readyz).send().await
                    && r.status() == 200
                {
                    break;
                }
                if Instant::now() > deadline || daemon.0.try_wait()?.is_some() {
                    bail!("daemon not ready; see {}", self.dir.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(started)
    }

    async fn sql(&self) -> Result<Db> {
        Ok(match self.backend {
            Backend::Sqlite => Db::Sqlite(SqliteConnection::connect(&self.database_url).await?),
            Backend::Postgres => Db::Postgres(PgConnection::connect(&self.database_url).await?),
        })
    }

    /// Deliveries the stand-in counted twice: the simulator knows; an outside stub does not,
    /// so there a row attempted more than once counts (it may have reached the user twice).
    async fn duplicates(&self, db: &mut Db) -> Result<u64> {
        Ok(match &self.sim {
            Some((sim, _)) => sim.stats().duplicate_deliveries,
            None => db.count("attempts > 1").await? as u64,
        })
    }

    /// Inserts `n` rows, starts the daemon, times until every row has ended.
    pub async fn drain(self, n: u64, label: &str) -> Result<Drained> {
        let mut db = self.sql().await?;
        let insert_began = Instant::now();
        db.insert_many(n, self.workload).await?;
        let insert_secs = insert_began.elapsed().as_secs_f64();
        let db_before = db.work().await?;
        let mut daemons = self.start_daemons().await?;
        let cpu_before = daemons.cpu_secs()?;
        let host_before = HostCpu::now()?;
        let began = Instant::now();
        // Polled as the peer kit polls its queue (every 25 ms there): one cheap probe.
        while db.any_open().await? {
            daemons.check_running(&self.dir)?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done_ms = epoch_ms(SystemTime::now());
        let secs = began.elapsed().as_secs_f64();
        let (host_busy_secs, host_busy) = HostCpu::now()?.since(host_before);
        let cpu = daemons.cpu_secs()? - cpu_before;
        let rss = daemons.peak_rss_mib()?;
        daemons.stop()?;
        let db_after = db.work().await?;
        let sent = db.count("status = 'sent'").await?;
        let first_sent = db.first_sent_ms().await?;
        let duplicates = self.duplicates(&mut db).await?;
        let drained = Drained {
            from_ready: n as f64 / secs,
            from_first: n as f64 / ((done_ms - first_sent) / 1000.0),
            host_cpu_ms: 1000.0 * host_busy_secs / n as f64,
        };
        println!(
            "{:<8} {label:<8} n={n:<8} {:>8.0} msg/s  {secs:>7.2} s  (from the first sent: {:.0} msg/s)  cpu {:.3} ms/msg  host cpu {:.3} ms/msg ({:.0}% busy)  peak rss {rss:.1} MiB  {}  (insert {insert_secs:.1} s; {sent} sent, {duplicates} duplicate deliveries){}",
            self.backend.name(),
            drained.from_ready,
            drained.from_first,
            1000.0 * cpu / n as f64,
            drained.host_cpu_ms,
            100.0 * host_busy,
            db_work(&db_before, &db_after, n),
            daemons.described(),
        );
        if sent != n as i64 {
            bail!("{sent} of {n} rows sent");
        }
        if duplicates > 0 {
            bail!("{duplicates} duplicate deliveries");
        }
        self.finish().await?;
        Ok(drained)
    }

    /// Inserts one row at a time at `rate` per second for `secs`; prints insert-to-sent latency
    /// and returns (p50, p99) in ms.
    pub async fn latency(self, rate: u64, secs: u64) -> Result<(f64, f64)> {
        let mut daemons = self.start_daemons().await?;
        // The daemons idle for two seconds: what waiting for rows costs.
        let idle_before = daemons.cpu_secs()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = (daemons.cpu_secs()? - idle_before) / 2.0;
        let mut db = self.sql().await?;
        let db_before = db.work().await?;
        let cpu_before = daemons.cpu_secs()?;
        let host_before = HostCpu::now()?;
        let total = rate * secs;
        let mut starts = Vec::with_capacity(total as usize);
        // How long the app's own INSERT took (its commit waiting for the lock, on SQLite),
        // apart from the daemon's part of the latency.
        let mut inserts = Vec::with_capacity(total as usize);
        let began = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(began + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            starts.push(epoch_ms(SystemTime::now()));
            let insert_began = std::time::Instant::now();
            db.insert_one(i, self.workload).await?;
            inserts.push(insert_began.elapsed().as_secs_f64() * 1000.0);
        }
        let achieved = total as f64 / began.elapsed().as_secs_f64();
        while db.any_open().await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (host_busy_secs, _) = HostCpu::now()?.since(host_before);
        let sent = db.count("status = 'sent'").await?;
        if sent != total as i64 {
            bail!("{sent} of {total} rows sent");
        }
        let cpu = daemons.cpu_secs()? - cpu_before;
        let rss = daemons.peak_rss_mib()?;
        let db_after = db.work().await?;
        let sent_at = db.sent_at_ms().await?;
        daemons.stop()?;
        let mut latencies: Vec<f64> = sent_at
            .iter()
            .map(|(i, at)| at - starts[*i as usize])
            .collect();
        latencies.sort_by(f64::total_cmp);
        inserts.sort_by(f64::total_cmp);
        let p = |q: f64| percentile(&latencies, q);
        println!(
            "{:<8} latency  rate={rate:<5} (achieved {achieved:.0}/s)  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (the app's INSERT alone: p50 {:.1} ms  p99 {:.1} ms)  cpu {:.3} ms/msg  host cpu {:.3} ms/msg  idle cpu {:.1}%  peak rss {rss:.1} MiB  {}{}",
            self.backend.name(),
            p(0.50),
            p(0.95),
            p(0.99),
            latencies.last().copied().unwrap_or_default(),
            percentile(&inserts, 0.50),
            percentile(&inserts, 0.99),
            1000.0 * cpu / total as f64,
            1000.0 * host_busy_secs / total as f64,
            100.0 * idle,
            db_work(&db_before, &db_after, total),
            daemons.described(),
        );
        let percentiles = (p(0.50), p(0.99));
        self.finish().await?;
        Ok(percentiles)
    }

    async fn finish(self) -> Result<()> {
        if let Some((_, stop)) = &self.sim {
            stop.cancel();
        }
        // The last run's daemon log outlives its folder, to read what `--daemon-log` asked for.
        let _ = std::fs::copy(
            self.dir.join("daemon-0.log"),
            std::env::temp_dir().join(format!("wo-bench-last-{}.log", self.backend.name())),
        );
        FreshDatabase {
            dir: self.dir,
            url: self.database_url,
            pg_name: self.pg_name,
        }
        .drop(self.args)
        .await?;
        Ok(())
    }
}

/// A database of a run's own: a SQLite file in a new folder, or a new Postgres database.
pub struct FreshDatabase {
    pub dir: PathBuf,
    pub url: String,
    pub pg_name: Option<String>,
}

impl FreshDatabase {
    pub async fn create(args: &Args, backend: Backend) -> Result<FreshDatabase> {
        let dir = std::env::temp_dir().join(format!("wo-bench-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir)?;
        let (url, pg_name) = match backend {
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
        Ok(FreshDatabase { dir, url, pg_name })
    }

    /// Removes the folder and drops the Postgres database.
    pub async fn drop(self, args: &Args) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(name) = &self.pg_name {
            let mut admin = PgConnection::connect(&args.postgres_url).await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
        }
        Ok(())
    }
}

/// The `q` quantile of sorted values (the nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The daemons of a run: CPU summed over them, the largest peak memory.
struct Daemons(Vec<Daemon>);

impl Daemons {
    fn cpu_secs(&self) -> Result<f64> {
        self.0.iter().map(|d| cpu_secs(d.0.id())).sum()
    }

    fn peak_rss_mib(&self) -> Result<f64> {
        let peaks: Vec<f64> = self
            .0
            .iter()
            .map(|d| peak_rss_mib(d.0.id()))
            .collect::<Result<_>>()?;
        Ok(peaks.into_iter().fold(0.0, f64::max))
    }

    fn check_running(&mut self, dir: &std::path::Path) -> Result<()> {
        for daemon in &mut self.0 {
            if let Some(status) = daemon.0.try_wait()? {
                bail!("a daemon exited ({status}); see {}", dir.display());
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        self.0.iter_mut().try_for_each(Daemon::stop)
    }

    /// Said at the end of a run's line when there was more than one.
    fn described(&self) -> String {
        match self.0.len() {
            1 => String::new(),
            n => format!("  [{n} daemons: cpu summed, rss of the largest]"),
        }
    }
}

/// The daemon's process, stopped (SIGTERM, then waited for) when the run ends however it
/// ends: a failed run must not leave a daemon behind to load the next one.
struct Daemon(Child);

impl Daemon {
    fn stop(&mut self) -> Result<()> {
        if self.0.try_wait()?.is_none() {
            Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status()?;
            self.0.wait()?;
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
