//! Pure types and rules, no I/O: what a row must hold, how WeChat's answers are read, when to retry.

pub mod errcode;
pub mod message;
pub mod retry;
pub mod status;
