//! wechat-outbox: a durable daemon that sends WeChat template messages from rows apps insert
//! into an `outbox` table (SQLite or PostgreSQL).
//!
//! The path a message takes:
//! - [`config`]: settings from TOML and the environment; secrets redacted.
//! - [`store`]: the only place SQL lives; claims, leases, outcomes, tokens (SQLite, Postgres).
//! - [`domain`]: pure rules: row validation, statuses, errcode classes, retry policy.
//! - [`worker`]: the pool that claims rows and the dispatch of one message.
//! - [`wechat`]: the WeChat HTTP API client, the shared access token, crypto and XML.
//! - [`callback`]: the endpoint for WeChat's pushes.
//! - [`services`]: the background jobs (upkeep of the table, the join of delivery events,
//!   retention, template sync, heartbeat) and the one runner that schedules them.
//! - [`templates`]: syncing WeChat's template list into the `templates` table.
//! - [`app`]: wiring and shutdown; [`admin`]: the operator's `templates` and `quota` commands.
//! - [`simulator`]: a WeChat stand-in for tests and staging.
//! - [`report`]: the operators' report views, printed; [`retention`]: pruning old rows.
//! - [`dashboard`]: the web dashboard over the same views, with audited actions.
//! - [`demo`]: the README's first command.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod callback;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod domain;
pub mod http_server;
pub mod metrics;
pub mod monitor;
#[cfg(test)]
mod proptest_support;
pub mod report;
pub mod retention;
pub mod services;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod wechat;
pub mod worker;
