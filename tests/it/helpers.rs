//! Shared test fixtures: databases, the simulator, the daemon in-process or as a process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool, SqlitePool};
use tokio_util::sync::CancellationToken;
use wechat_outbox::config::Config;
use wechat_outbox::simulator::{self, SimSettings, Simulator};

/// The schema the Postgres tests use, to prove the tables need not live in `public`.
pub const PG_SCHEMA: &str = "wechat";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one async test body on both backends, each as its own `#[test]`.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    };
}

fn admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// An app's connection to the outbox: what a producer would use to insert.
#[derive(Clone)]
pub enum AppDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One row as the tests read it back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub touser: Option<String>,
    pub status: String,
    pub msgid: Option<i64>,
    pub last_error: Option<String>,
    pub last_errcode: Option<i64>,
    pub attempts: i64,
    pub has_sent_at: i64,
    pub client_msg_id: Option<String>,
}

const ROWS: &str = "SELECT id, touser, status, msgid, last_error,
        CAST(last_errcode AS BIGINT) AS last_errcode, CAST(attempts AS BIGINT) AS attempts,
        CAST(CASE WHEN sent_at IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_sent_at, client_msg_id
    FROM outbox ORDER BY id";

impl AppDb {
    /// Executes SQL as an app would (no binds; literal values).
    pub async fn exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            AppDb::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            AppDb::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
    }

    pub async fn rows(&self) -> Vec<Row> {
        match self {
            AppDb::Sqlite(pool) => sqlx::query_as(ROWS).fetch_all(pool).await,
            AppDb::Postgres(pool) => sqlx::query_as(ROWS).fetch_all(pool).await,
        }
        .expect("read rows")
    }

    pub async fn count(&self, condition: &str) -> i64 {
        self.count_in("outbox", condition).await
    }

    /// Rows of `table` that meet `condition`.
    pub async fn count_in(&self, table: &str, condition: &str) -> i64 {
        let sql = AssertSqlSafe(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {condition}"
        ));
        match self {
            AppDb::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            AppDb::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .expect("count rows")
    }

    /// Gathers the planner's statistics for `outbox` as a DBA (or autovacuum) would.
    pub async fn analyze_outbox(&self) {
        let sql = match self {
            AppDb::Sqlite(_) => "ANALYZE",
            AppDb::Postgres(_) => "ANALYZE outbox",
        };
        self.exec(sql).await.expect("analyze");
    }

    /// An SQL expression for "now plus `seconds`" in this backend's dialect.
    pub fn now_plus(&self, seconds: i64) -> String {
        match self {
            AppDb::Sqlite(_) => format!("datetime('now', '{seconds:+} seconds')"),
            AppDb::Postgres(_) => format!("now() + interval '{seconds} seconds'"),
        }
    }

    /// Inserts `n` well-formed rows for distinct users; returns nothing, read them back.
    pub async fn insert_good(&self, n: usize, tag: &str) {
        let values: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "('o{tag}{i:05}', 'TEMPLATE_ID', '{{\"first\":{{\"value\":\"{tag} {i}\"}}}}')"
                )
            })
            .collect();
        for chunk in values.chunks(500) {
            self.exec(&format!(
                "INSERT INTO outbox (touser, template_id, data) VALUES {}",
                chunk.join(",")
            ))
            .await
            .expect("insert rows");
        }
    }

    /// Waits until no row is `pending` or `sending`; panics with the open rows after `limit`.
    pub async fn wait_settled(&self, limit: Duration) -> Vec<Row> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let open = self.count("status IN ('pending', 'sending')").await;
            if open == 0 {
                return self.rows().await;
            }
            if tokio::time::Instant::now() > deadline {
                let rows: Vec<Row> = self
                    .rows()
                    .await
                    .into_iter()
                    .filter(|r| r.status == "pending" || r.status == "sending")
                    .take(5)
                    .collect();
                panic!("{open} rows still open after {limit:?}, for example {rows:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A database of its own for one test: a SQLite file in a temporary directory, or a new
/// Postgres database dropped when the test ends.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub app: AppDb,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("outbox.db");
                let url = format!("sqlite://{}", path.display());
                migrate(backend, &url).await;
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .busy_timeout(Duration::from_secs(10));
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await
                    .expect("app sqlite");
                TestDb {
                    backend,
                    url,
                    app: AppDb::Sqlite(pool),
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("wo_test_{:016x}", fastrand::u64(..));
                let admin = PgConnectOptions::from_url(&admin_url().parse().unwrap())
                    .expect("TEST_POSTGRES_URL");
                let mut conn = admin
                    .connect()
                    .await
                    .expect("PostgreSQL must be running for the tests (see README)");
                sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let url = base_url_for(&name);
                migrate(backend, &url).await;
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .connect_with(admin.database(&name).options([("search_path", PG_SCHEMA)]))
                    .await
                    .expect("app postgres");
                TestDb {
                    backend,
                    url,
                    app: AppDb::Postgres(pool),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// Postgres: refuses new connections to this database and ends the daemon's sessions,
    /// as when the server goes away.
    pub async fn terminate_connections_and_refuse(&self) {
        let name = self.pg_name.as_ref().expect("a Postgres test database");
        self.admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .await;
        self.admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{name}' AND application_name = 'wechat-outbox'"
        ))
        .await;
    }

    pub async fn allow_connections(&self) {
        let name = self.pg_name.as_ref().expect("a Postgres test database");
        self.admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            .await;
    }

    async fn admin(&self, sql: &str) {
        let mut conn = PgConnectOptions::from_url(&admin_url().parse().unwrap())
            .expect("TEST_POSTGRES_URL")
            .connect()
            .await
            .expect("admin connection");
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .expect("admin statement");
    }

    pub fn config_toml(&self, api_base: &str, extra: &str) -> String {
        config_toml(self.backend, &self.url, api_base, extra)
    }

    pub fn config(&self, api_base: &str, extra: &str) -> Config {
        Config::from_toml(&self.config_toml(api_base, extra)).expect("test config")
    }

    /// The daemon's own store on this database, for tests that call it directly (no WeChat).
    pub async fn store(&self) -> wechat_outbox::store::Store {
        wechat_outbox::store::Store::connect(
            &self.config("http://127.0.0.1:9", "").store_settings(),
        )
        .await
        .expect("connect the store")
    }
}

async fn migrate(backend: Backend, url: &str) {
    let config =
        Config::from_toml(&config_toml(backend, url, "http://127.0.0.1:9", "")).expect("config");
    wechat_outbox::app::migrate(&config).await.expect("migrate");
}

/// A daemon configuration for a database and a simulator, fast enough for tests; `extra` is
/// TOML merged over it key by key (so `[retry]\nmax_attempts = 3` overrides one key).
fn config_toml(backend: Backend, url: &str, api_base: &str, extra: &str) -> String {
    let schema = if backend == Backend::Postgres {
        PG_SCHEMA
    } else {
        "public"
    };
    let base = format!(
        r#"
            database_url = "{url}"
            database_schema = "{schema}"
            [workers]
            poll_interval_ms = 100
            lease_secs = 10
            shutdown_grace_secs = 5
            [api]
            base_url = "{api_base}"
            timeout_ms = 2000
            [retry]
            base_delay_ms = 20
            max_delay_secs = 1
            max_attempts = 40
            [limits]
            rate_per_second = 100000
            [callback]
            listen = "127.0.0.1:0"
            [monitor]
            listen = "127.0.0.1:0"
            [dashboard]
            listen = "127.0.0.1:0"
            refresh_secs = 1
            [[accounts]]
            name = "default"
            appid = "wxtest0000000001"
            secret = "test-app-secret-value"
            "#
    );
    let mut merged: toml::Table = base.parse().expect("base TOML");
    merge(&mut merged, extra.parse().expect("extra TOML"));
    merged.to_string()
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(more)) => merge(inner, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn base_url_for(database: &str) -> String {
    let mut url: reqwest::Url = admin_url().parse().expect("TEST_POSTGRES_URL is a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside async; use a small runtime of its own on another thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = PgConnectOptions::from_url(&admin_url().parse().unwrap()).unwrap();
                if let Ok(mut conn) = admin.connect().await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Simulator settings that answer every send after `delay_ms`.
pub fn slow_sim(delay_ms: u64) -> SimSettings {
    SimSettings {
        faults: wechat_outbox::simulator::Faults {
            delay_ms,
            ..Default::default()
        },
        ..SimSettings::default()
    }
}

/// A simulator on a free port, stopped when dropped.
pub struct Sim {
    pub sim: Arc<Simulator>,
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Sim {
    pub async fn start(settings: SimSettings) -> Sim {
        let sim = Simulator::new(settings);
        let stop = CancellationToken::new();
        let addr = simulator::spawn("127.0.0.1:0".parse().unwrap(), sim.clone(), stop.clone())
            .await
            .expect("simulator");
        Sim { sim, addr, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The daemon running inside the test process.
pub struct Daemon {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where its callback endpoint listens.
    pub callback: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub monitor: SocketAddr,
    /// Where the dashboard is served, if enabled.
    pub dashboard: Option<SocketAddr>,
    /// Its clock, which a test may move (to turn a quota period).
    pub clock: Arc<wechat_outbox::domain::clock::Clock>,
}

impl Daemon {
    pub async fn start(config: Config) -> Daemon {
        let stop = CancellationToken::new();
        let running = wechat_outbox::app::start(config, stop.clone())
            .await
            .expect("daemon starts");
        let callback = running.callback_addr.expect("callback endpoint enabled");
        let monitor = running.monitor_addr.expect("monitor endpoint enabled");
        let clock = running.clock.clone();
        Daemon {
            stop,
            dashboard: running.dashboard_addr,
            task: tokio::spawn(running.wait()),
            callback,
            monitor,
            clock,
        }
    }

    /// The URL WeChat (the simulator) pushes to for `account`.
    pub fn callback_url(&self, account: &str) -> String {
        format!("http://{}/wechat/{account}", self.callback)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("daemon task")
            .expect("daemon exits cleanly");
    }
}

/// The real binary as a child process, for signals and `kill -9`.
pub struct Process {
    pub child: Child,
    pub stderr_path: PathBuf,
    /// The configuration file it was started with (a test may rewrite it and send SIGHUP).
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn start(config_toml: &str, args: &[&str]) -> Process {
        Process::start_with_env(config_toml, args, &[])
    }

    pub fn start_with_env(config_toml: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stdout_path = dir.path().join("stdout.log");
        let child = Command::new(env!("CARGO_BIN_EXE_wechat-outbox"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start the daemon binary");
        Process {
            child,
            stderr_path,
            config_path: config,
            _dir: dir,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the daemon says it has started its workers.
    pub async fn wait_started(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.stderr().contains("wechat-outbox started") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not start: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The callback endpoint's address, from the daemon's start-up log line.
    pub async fn callback_addr(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.stderr();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("callback endpoint listening"))
                && let Some(addr) = line.split("addr=").nth(1)
            {
                return addr.split_whitespace().next().unwrap().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no callback address in: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stderr_path.with_file_name("stdout.log")).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Rows that reached a user more than once, or requests that reached WeChat for no row.
pub fn assert_each_sent_once(sim: &Simulator, rows: &[Row]) {
    let stats = sim.stats();
    assert_eq!(
        stats.duplicate_deliveries, 0,
        "a user got a message twice: {stats:?}"
    );
    // Rows joined to their delivery event were sent too.
    let sent: Vec<&Row> = rows
        .iter()
        .filter(|r| ["sent", "delivered", "blocked", "undelivered"].contains(&r.status.as_str()))
        .collect();
    assert_eq!(
        stats.delivered as usize,
        sent.len(),
        "deliveries vs sent rows: {stats:?}"
    );
    let deliveries = sim.deliveries();
    for row in sent {
        let key = row
            .client_msg_id
            .clone()
            .unwrap_or_else(|| format!("wechat-outbox-{}", row.id));
        let found: Vec<_> = deliveries
            .iter()
            .filter(|d| d.client_msg_id.as_deref() == Some(key.as_str()))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "row {} delivered {} times",
            row.id,
            found.len()
        );
        assert_eq!(
            Some(found[0].msgid),
            row.msgid,
            "row {} has the msgid WeChat gave",
            row.id
        );
        assert_eq!(row.has_sent_at, 1, "row {} has sent_at", row.id);
    }
}
