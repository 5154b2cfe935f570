//! Integration tests: the daemon against a real SQLite file and a real PostgreSQL database
//! (a fresh one per test), with WeChat replaced by the project's simulator over HTTP.
//!
//! PostgreSQL: `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) must
//! reach a server where the user may create databases. Tests never skip when it is down.

mod bench_smoke;
mod browser;
mod dashboard;
mod delivery;
mod faults;
mod helpers;
mod hostile_callback;
mod lifecycle;
mod limits;
mod limits_of_input;
mod monitor;
mod packaging;
mod per_user;
mod pipeline;
mod poison;
mod processes;
mod reports;
mod retries;
mod services;
mod simulator_pushes;
mod store_contract;
mod subscribe;
mod todays_wechat;
