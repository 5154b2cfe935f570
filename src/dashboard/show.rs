//! How values are shown: times in the configured timezone, app text cut and with control
//! characters made visible, openids masked on request, report rows as cells; and the two
//! static files.

use axum::http::header;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Dashboard;
use crate::domain::text::loggable_within;
use crate::store::ViewRows;

/// Characters of an app's value a table cell shows.
pub const CELL_CHARS: usize = 120;

impl Dashboard {
    /// A time in `limits.timezone`, to the second; empty for none.
    pub fn time(&self, time: Option<DateTime<Utc>>) -> String {
        time.map(|t| {
            t.with_timezone(&self.timezone)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
    }

    /// An openid as the settings want it shown.
    pub fn openid(&self, openid: &str) -> String {
        if !self.mask_openids {
            return cell(openid);
        }
        mask(openid)
    }

    /// A report's rows as cells: times in the timezone, everything cut.
    pub fn cells(&self, rows: &ViewRows) -> Vec<Vec<String>> {
        rows.rows
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&rows.columns)
                    .map(|(value, column)| self.value(column, value))
                    .collect()
            })
            .collect()
    }

    fn value(&self, column: &str, value: &Value) -> String {
        match value {
            Value::Null => String::new(),
            Value::String(s) if column == "openid" => self.openid(s),
            Value::String(s) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) if s.len() >= 20 => self.time(Some(t.with_timezone(&Utc))),
                _ => cell(s),
            },
            Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or_default()),
            other => cell(&other.to_string()),
        }
    }
}

/// `oAbc…xyz`: enough to tell two users apart, not enough to write to one.
pub fn mask(openid: &str) -> String {
    let chars: Vec<char> = openid.chars().collect();
    if chars.len() <= 8 {
        return "…".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    cell(&format!("{head}…{tail}"))
}

/// An app's or WeChat's text as a cell shows it (askama escapes it for HTML).
pub fn cell(text: &str) -> String {
    loggable_within(text, CELL_CHARS)
}

/// Longer text (a reason, a row's data), cut at `max` characters.
pub fn long(text: &str, max: usize) -> String {
    loggable_within(text, max)
}

/// What WeChat's errcodes mean (../shared/wechat/NOTES.md, docs/todays-wechat.md); the
/// daemon's own reasons have no errcode.
pub fn errcode_meaning(errcode: Option<i64>) -> &'static str {
    match errcode {
        None => {
            "the daemon's own reason (the row never reached WeChat, or WeChat's answer was unusable)"
        }
        Some(-1) => "system busy: retried with backoff, same client_msg_id",
        Some(40001 | 40014 | 42001) => "access token invalid or expired: refreshed and retried",
        Some(40003) => "invalid openid: not a follower of this account",
        Some(40036) => "invalid template_id size",
        Some(40037) => "invalid template_id: the template is gone or not this account's",
        Some(40241) => "the same message was sent to this user a moment ago (duplicate)",
        Some(43004) => "the user does not follow the account",
        Some(43019) => "the user blacklisted the account",
        Some(43101) => "the user refused this template's messages",
        Some(43117) => "too frequent for this user: waits and is sent later",
        Some(45009) => "the account's daily API limit: the account pauses until tomorrow",
        Some(45011) => "API frequency limit: retried",
        Some(47001) => "body is not valid JSON",
        Some(47003) => "an argument is invalid (WeChat's errmsg names it)",
        Some(48001) => "API not authorised for this account: paused, an operator must act",
        Some(48004) => "API banned for this account: paused",
        Some(50002) => "the user is restricted",
        Some(_) => "not in WeChat's documented list",
    }
}

pub async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("static/app.css"),
    )
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/app.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_openids_keep_a_few_characters() {
        assert_eq!(mask("oAbcdefghijklmnXYZ"), "oAbc…XYZ");
        assert_eq!(mask("short"), "…");
        assert_eq!(mask("o\u{0}bcdefghi\nxyz"), "o\\u{0}bc…xyz");
    }

    #[test]
    fn cells_are_cut_and_show_control_characters() {
        let long_value = "长".repeat(1_000_000);
        assert_eq!(cell(&long_value).chars().count(), CELL_CHARS + 1);
        assert_eq!(cell("a\u{0}b\nc"), "a\\u{0}b\\nc");
    }
}
