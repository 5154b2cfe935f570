//! The inserting client: an app's single connection to the outbox, and the bench's own reads.

use std::time::Duration;

use anyhow::Result;
use sqlx::{AssertSqlSafe, PgConnection, SqliteConnection};

/// Which templates the rows name: the simulator's one, or the ten of the peer kit's stub.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// `TEMPLATE_ID` with `first`: what the simulator knows.
    Simulator,
    /// `TPL_0` … `TPL_9` with `first`, `keyword1`, `remark`: what the kit's stubs list.
    KitStub,
}

impl Workload {
    /// SQL for the template and the data of row number `i`.
    fn columns(self) -> (&'static str, &'static str) {
        match self {
            Workload::Simulator => ("'TEMPLATE_ID'", r#"'{"first":{"value":"bench"}}'"#),
            Workload::KitStub => (
                "'TPL_' || CAST(i % 10 AS TEXT)",
                r#"'{"first":{"value":"bench"},"keyword1":{"value":"k"},"remark":{"value":"r"}}'"#,
            ),
        }
    }
}

pub enum Db {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// Database work so far: (commits, WAL bytes) on Postgres.
pub type Work = Option<(i64, i64)>;

impl Db {
    pub async fn insert_many(&mut self, n: u64, workload: Workload) -> Result<()> {
        let (template, data) = workload.columns();
        let sql = match self {
            Db::Sqlite(_) => format!(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})
                 INSERT INTO outbox (touser, template_id, data)
                 SELECT 'obench' || i, {template}, {data} FROM s"
            ),
            Db::Postgres(_) => format!(
                "INSERT INTO outbox (touser, template_id, data)
                 SELECT 'obench' || i, {template}, {data} FROM generate_series(1, {n}) i;
                 ANALYZE outbox"
            ),
        };
        self.exec(&sql).await
    }

    pub async fn insert_one(&mut self, i: u64, workload: Workload) -> Result<()> {
        let (template, data) = workload.columns();
        let sql = format!(
            "INSERT INTO outbox (touser, template_id, data)
             SELECT 'obench' || i, {template}, {data} FROM (SELECT {i} AS i) AS row_number"
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

    pub async fn count(&mut self, condition: &str) -> Result<i64> {
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
    pub async fn any_open(&mut self) -> Result<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM outbox WHERE status = 'pending')
                       OR EXISTS (SELECT 1 FROM outbox WHERE status = 'sending')";
        Ok(match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
        })
    }

    /// (row number, sent_at in ms since the epoch) of every row; touser is 'obench' + number.
    pub async fn sent_at_ms(&mut self) -> Result<Vec<(i64, f64)>> {
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

    /// The first row's `sent_at`, in ms since the epoch.
    pub async fn first_sent_ms(&mut self) -> Result<f64> {
        let sent: Option<f64> = match self {
            Db::Sqlite(c) => {
                sqlx::query_scalar(
                    "SELECT (julianday(MIN(sent_at)) - 2440587.5) * 86400000.0 FROM outbox",
                )
                .fetch_one(c)
                .await?
            }
            Db::Postgres(c) => {
                sqlx::query_scalar(
                    "SELECT CAST(EXTRACT(EPOCH FROM MIN(sent_at)) * 1000 AS double precision) FROM outbox",
                )
                .fetch_one(c)
                .await?
            }
        };
        sent.ok_or_else(|| anyhow::anyhow!("no row was sent"))
    }

    pub async fn work(&mut self) -> Result<Work> {
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

pub fn db_work(before: &Work, after: &Work, n: u64) -> String {
    match (before, after) {
        (Some((c0, w0)), Some((c1, w1))) => format!(
            "commits {:.2}/msg  WAL {:.0} B/msg",
            (c1 - c0) as f64 / n as f64,
            (w1 - w0) as f64 / n as f64
        ),
        _ => String::new(),
    }
}
