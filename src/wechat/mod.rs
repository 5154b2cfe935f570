//! Talking to WeChat: the HTTP API client and the access token manager.

pub mod api;
pub mod crypto;
pub mod token;
pub mod xml;
