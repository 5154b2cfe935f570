//! Pure types and rules, no I/O: what a row must hold, how WeChat's answers are read, when to retry.

pub mod clock;
pub mod content_rules;
pub mod errcode;
pub mod lifecycle;
pub mod message;
pub mod quota;
pub mod retry;
pub mod status;
pub mod subscribe;
pub mod template;
pub mod text;
