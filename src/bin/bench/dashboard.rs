//! `--dashboard-rows N`: the dashboard's answer times with N rows in the table (docs/dashboard.md).
//! The rows are written straight into a fresh database as a month of traffic would leave them
//! (80 % delivered, 10 % sent, 5 % failed, 3 % pending, 2 % held; ten templates; 200,000
//! openids); the dashboard is served in this process and asked for each page in turn.

use std::time::{Duration, Instant};

use anyhow::Result;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use wechat_outbox::config::Config;
use wechat_outbox::store::Store;

use crate::run::FreshDatabase;
use crate::{Args, Backend};

/// Requests timed per page (after one not timed).
const TIMED: usize = 20;

/// One month of rows, by the row number `i`, in each backend's dialect.
fn fill_sql(backend: Backend, rows: u64) -> String {
    let status = "CASE WHEN i % 100 < 80 THEN 'delivered' WHEN i % 100 < 90 THEN 'sent'
                  WHEN i % 100 < 95 THEN 'failed' WHEN i % 100 < 98 THEN 'pending'
                  ELSE 'held' END";
    let columns = "touser, template_id, data, status, attempts, created_at, updated_at,
                   next_attempt_at, sent_at, msgid, last_errcode, last_error, held_for";
    match backend {
        Backend::Postgres => format!(
            "INSERT INTO outbox ({columns})
             SELECT 'obench' || (i % 200000), 'TPL_' || (i % 10), '{{\"first\":\"bench\"}}',
                    {status}, 1, t, t, t + interval '1 hour',
                    CASE WHEN i % 100 < 90 THEN t + interval '1 second' END,
                    CASE WHEN i % 100 < 90 THEN i END,
                    CASE WHEN i % 100 BETWEEN 90 AND 94 THEN 43004 END,
                    CASE WHEN i % 100 BETWEEN 90 AND 94 THEN 'WeChat: require subscribe' END,
                    CASE WHEN i % 100 >= 98 THEN 'daily quota' END
             FROM (SELECT i, now() - (({rows} - i) * 2592 / {rows}) * interval '1000 seconds' AS t
                   FROM generate_series(CAST(1 AS BIGINT), {rows}) i) s;
             ANALYZE outbox"
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}),
             timed AS (SELECT i, strftime('%Y-%m-%d %H:%M:%f', 'now',
                              '-' || (({rows} - i) * 2592000 / {rows}) || ' seconds') AS t FROM s)
             INSERT INTO outbox ({columns})
             SELECT 'obench' || (i % 200000), 'TPL_' || (i % 10), '{{\"first\":\"bench\"}}',
                    {status}, 1, t, t, strftime('%Y-%m-%d %H:%M:%f', t, '+1 hour'),
                    CASE WHEN i % 100 < 90 THEN strftime('%Y-%m-%d %H:%M:%f', t, '+1 second') END,
                    CASE WHEN i % 100 < 90 THEN i END,
                    CASE WHEN i % 100 BETWEEN 90 AND 94 THEN 43004 END,
                    CASE WHEN i % 100 BETWEEN 90 AND 94 THEN 'WeChat: require subscribe' END,
                    CASE WHEN i % 100 >= 98 THEN 'daily quota' END
             FROM timed;
             ANALYZE"
        ),
    }
}

pub async fn dashboard(args: &Args, backend: Backend, rows: u64) -> Result<()> {
    let fresh = FreshDatabase::create(args, backend).await?;
    let database_url = fresh.url.clone();
    let config = Config::from_toml(&format!(
        r#"
        database_url = "{database_url}"
        [dashboard]
        listen = "127.0.0.1:0"
        [[accounts]]
        name = "default"
        appid = "wxbench000000001"
        secret = "bench-secret"
        "#
    ))?;
    let store = Store::connect(&config.store_settings()).await?;
    store.migrate().await?;
    let filled = Instant::now();
    let fill = AssertSqlSafe(fill_sql(backend, rows));
    match backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&database_url).await?;
            sqlx::raw_sql(fill).execute(&mut c).await?;
        }
        Backend::Postgres => {
            let mut c = PgConnection::connect(&database_url).await?;
            sqlx::raw_sql(fill).execute(&mut c).await?;
        }
    }
    println!(
        "{:<8} dashboard  {rows} rows written in {:.1} s",
        backend.name(),
        filled.elapsed().as_secs_f64()
    );
    let shutdown = CancellationToken::new();
    let (addr, server) =
        wechat_outbox::dashboard::spawn(&config, store.clone(), shutdown.clone()).await?;
    let http = wechat_outbox::wechat::api::http_client(reqwest::Client::builder())?;
    let base = format!("http://{addr}");
    let middle = rows as i64 / 2;
    // The overview's first view reads the figures before it answers; later views answer from
    // them while they are read again in the background every refresh_secs.
    let first = Instant::now();
    let status = http.get(format!("{base}/")).send().await?.status();
    println!(
        "{:<8} dashboard  {:<44} {status}  {:>8.1} ms (figures read)",
        backend.name(),
        "/ first view",
        first.elapsed().as_secs_f64() * 1000.0
    );
    for path in [
        "/".to_string(),
        "/messages".into(),
        format!("/messages?before={middle}"),
        "/messages?status=failed".into(),
        "/messages?status=held&account=default".into(),
        "/messages?template=TPL_3&status=failed".into(),
        "/messages?errcode=43004".into(),
        "/messages?openid=obench12345".into(),
        "/messages?openid=obench12345&from=2026-01-01T00:00".into(),
        format!("/messages/{middle}"),
        "/held".into(),
        "/errors".into(),
        "/templates".into(),
    ] {
        let url = format!("{base}{path}");
        let answer = http.get(&url).send().await?;
        let status = answer.status();
        answer.bytes().await?;
        let mut times = Vec::with_capacity(TIMED);
        for _ in 0..TIMED {
            let start = Instant::now();
            http.get(&url).send().await?.bytes().await?;
            times.push(start.elapsed());
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<8} dashboard  {path:<44} {status}  median {:>7.1} ms  p95 {:>7.1} ms",
            backend.name(),
            ms(times[TIMED / 2]),
            ms(times[TIMED * 95 / 100 - 1]),
        );
    }
    shutdown.cancel();
    let _ = server.await;
    store.close().await;
    fresh.drop(args).await?;
    Ok(())
}
