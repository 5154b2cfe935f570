//! The lifecycle rules that the SQL repeats, checked against their Rust definition on both
//! backends: the status a delivery event gives a sent row.

use sqlx::AssertSqlSafe;
use wechat_outbox::domain::lifecycle::{DELIVERY_STATUS_SQL, delivery_status};

use crate::helpers::{AppDb, Backend, TestDb};
use crate::on_both_backends;

/// The join statements embed `DELIVERY_STATUS_SQL`; for each spelling WeChat has used (and
/// some it has not), the database's answer is `delivery_status`'s, or `sent` kept.
async fn the_joins_status_case_is_the_rust_mapping(backend: Backend) {
    let db = TestDb::new(backend).await;
    for event in [
        "success",
        "SUCCESS",
        "failed:user block",
        "Failed: User Block",
        "failed: system failed",
        "failed",
        "FAILED:BLOCK",
        "successful",
        "blocked",
        "",
        "成功",
    ] {
        let sql = AssertSqlSafe(format!(
            "SELECT {DELIVERY_STATUS_SQL} AS status
             FROM (SELECT CAST('{event}' AS TEXT) AS status) j,
                  (SELECT CAST('sent' AS TEXT) AS status) outbox"
        ));
        let got: String = match &db.app {
            AppDb::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            AppDb::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap();
        let expected = delivery_status(event).map_or("sent", |s| s.as_str());
        assert_eq!(got, expected, "{backend:?}: event status {event:?}");
    }
}
on_both_backends!(the_joins_status_case_is_the_rust_mapping);
