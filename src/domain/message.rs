//! A row as an app wrote it, and the checks that turn it into a template send request.
//!
//! Every check names the column and the problem, because the reason ends up in `last_error`
//! where the app's developer reads it.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::subscribe::ValueType;
use super::text::echo;

/// Size limits of our own, far above what WeChat renders, that catch a runaway app early.
pub const MAX_ID_CHARS: usize = 128;
pub const MAX_URL_BYTES: usize = 2048;
pub const MAX_DATA_BYTES: usize = 64 * 1024;
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 128;

/// A claimed row as the store read it: the app's columns unchecked, plus the daemon's bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct RawMessage {
    pub id: i64,
    pub account: String,
    pub touser: Option<String>,
    pub template_id: Option<String>,
    pub data: Option<String>,
    pub url: Option<String>,
    pub miniprogram: Option<String>,
    pub client_msg_id: Option<String>,
    /// `kind` as the app wrote it: `template` (or NULL) or `subscribe`.
    pub kind: Option<String>,
    /// A subscribe row's link (`page`); a template row links with `url`.
    pub page: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// When the row was first due (`send_after`, else `created_at`): a subscribe row waits for
    /// the user's consent from then.
    pub first_due: Option<DateTime<Utc>>,
    /// Attempts including the one just claimed.
    pub attempts: i32,
    /// When the first attempt that may have reached WeChat began (its window's start).
    pub in_doubt_since: Option<DateTime<Utc>>,
    /// An earlier attempt may have reached WeChat (timeout, crash mid-flight).
    pub in_doubt: bool,
    /// A column the store could not read at all (for example text that is not UTF-8).
    pub unreadable: Option<String>,
    /// The recipient unsubscribed from the account (see `suppressed_openids`).
    pub suppressed: bool,
    /// The recipient refused this template and the refusal stands (see `refusals`).
    pub refused: bool,
    /// The month period this row's send is already counted in (a retry is not counted again).
    pub quota_month: Option<String>,
    pub quota_day: Option<String>,
    /// Whether the row's template is in use; `None` when the templates table does not list it.
    pub template_in_use: Option<bool>,
    /// The template's content when a sync has seen it.
    pub template_content: Option<String>,
    /// A subscribe row's template is long-term (长期订阅) by the last sync; `None` when no sync
    /// has listed it (treated as one-time).
    pub long_term: Option<bool>,
}

impl RawMessage {
    /// What the row sends; a template message when `kind` is unreadable (such a row fails in
    /// `TemplateMessage::from_raw`, which names the column).
    pub fn kind(&self) -> MessageKind {
        MessageKind::of_row(self.kind.as_deref()).unwrap_or_default()
    }
}

/// What a row sends: a template message or a subscription notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageKind {
    #[default]
    Template,
    Subscribe,
}

impl MessageKind {
    /// The row's `kind` column; NULL is a template message (rows from before the column).
    pub fn of_row(kind: Option<&str>) -> Result<MessageKind, String> {
        match kind {
            None | Some("template") => Ok(MessageKind::Template),
            Some("subscribe") => Ok(MessageKind::Subscribe),
            Some(other) => Err(format!(
                "kind is {:?}: it must be 'template' (the default) or 'subscribe'",
                echo(other)
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Template => "template",
            MessageKind::Subscribe => "subscribe",
        }
    }
}

/// A message that passed every check, ready to be posted.
#[derive(Debug, Clone)]
pub struct TemplateMessage {
    pub id: i64,
    pub kind: MessageKind,
    pub touser: String,
    pub template_id: String,
    pub client_msg_id: String,
    /// The JSON body of `POST /cgi-bin/message/template/send`, or of
    /// `POST /cgi-bin/message/subscribe/bizsend` for a subscription notification (which takes
    /// no `client_msg_id`: the key stays the app's idempotency key in the table).
    pub body: Value,
}

/// The `client_msg_id` sent for a row without one of its own. Stable across retries and daemons.
pub fn derived_client_msg_id(id: i64) -> String {
    format!("wechat-outbox-{id}")
}

impl TemplateMessage {
    /// Checks every column an app wrote; the error is the reason recorded on the row.
    pub fn from_raw(raw: &RawMessage) -> Result<TemplateMessage, String> {
        if let Some(problem) = &raw.unreadable {
            return Err(problem.clone());
        }
        let kind = MessageKind::of_row(raw.kind.as_deref())?;
        let touser = identifier("touser", raw.touser.as_deref())?;
        let template_id = identifier("template_id", raw.template_id.as_deref())?;
        let data = template_data(raw.data.as_deref())?;
        if kind == MessageKind::Subscribe {
            typed_values(&data)?;
        }
        let client_msg_id = match raw.client_msg_id.as_deref() {
            None => derived_client_msg_id(raw.id),
            Some(own) => {
                if own.trim().is_empty() {
                    return Err("client_msg_id is empty: leave it NULL or give a key".into());
                }
                if own.chars().count() > MAX_CLIENT_MSG_ID_CHARS {
                    return Err(format!(
                        "client_msg_id is longer than {MAX_CLIENT_MSG_ID_CHARS} characters"
                    ));
                }
                own.to_string()
            }
        };

        let mut body = Map::new();
        body.insert("touser".into(), json!(touser));
        body.insert("template_id".into(), json!(template_id));
        // Each kind links with its own column; the other one set is a mistake worth a reason,
        // not a link silently dropped.
        let (link, other) = match kind {
            MessageKind::Template => (("url", raw.url.as_deref()), ("page", raw.page.as_deref())),
            MessageKind::Subscribe => (("page", raw.page.as_deref()), ("url", raw.url.as_deref())),
        };
        if other.1.is_some_and(|text| !text.is_empty()) {
            return Err(format!(
                "{} is not used by a {} row: link with {}",
                other.0,
                kind.as_str(),
                link.0
            ));
        }
        if let Some(url) = optional_url(link.0, link.1)? {
            body.insert(link.0.into(), json!(url));
        }
        if let Some(mini) = miniprogram(raw.miniprogram.as_deref())? {
            body.insert("miniprogram".into(), mini);
        }
        body.insert("data".into(), data);
        if kind == MessageKind::Template {
            body.insert("client_msg_id".into(), json!(client_msg_id));
        }
        Ok(TemplateMessage {
            id: raw.id,
            kind,
            touser: touser.to_string(),
            template_id: template_id.to_string(),
            client_msg_id,
            body: Value::Object(body),
        })
    }
}

/// An openid or a template id: required, one token, bounded.
fn identifier<'a>(column: &str, value: Option<&'a str>) -> Result<&'a str, String> {
    let value = value.ok_or_else(|| format!("{column} is missing (NULL)"))?;
    if value.trim().is_empty() {
        return Err(format!("{column} is empty"));
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(format!("{column} is longer than {MAX_ID_CHARS} characters"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{column} contains whitespace or control characters"
        ));
    }
    Ok(value)
}

/// `data`: `{"key":{"value":"…","color":"#…"}}`, or the shorthand `{"key":"…"}`.
fn template_data(text: Option<&str>) -> Result<Value, String> {
    let text = text.ok_or("data is missing (NULL): give a JSON object of template parameters")?;
    if text.len() > MAX_DATA_BYTES {
        return Err(format!("data is larger than {MAX_DATA_BYTES} bytes"));
    }
    let parsed: Value =
        serde_json::from_str(text).map_err(|e| format!("data is not valid JSON: {e}"))?;
    let Value::Object(params) = parsed else {
        return Err("data must be a JSON object such as {\"first\":{\"value\":\"…\"}}".into());
    };
    let mut out = Map::new();
    for (key, value) in params {
        if key.trim().is_empty() {
            return Err("data has an empty parameter name".into());
        }
        let item = match value {
            Value::String(text) => json!({ "value": text }),
            Value::Number(n) => json!({ "value": n.to_string() }),
            Value::Object(fields) => parameter(&key, fields)?,
            other => {
                return Err(format!(
                    "data.{} must be a string or {{\"value\":…}}, not {}",
                    echo(&key),
                    json_kind(&other)
                ));
            }
        };
        out.insert(key, item);
    }
    Ok(Value::Object(out))
}

fn parameter(key: &str, fields: Map<String, Value>) -> Result<Value, String> {
    // Names are the app's, up to MAX_DATA_BYTES long: the reason repeats only their start.
    let key = echo(key);
    let mut item = Map::new();
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("value", Value::String(text)) => item.insert(name, Value::String(text)),
            ("value", Value::Number(n)) => item.insert(name, Value::String(n.to_string())),
            ("color", Value::String(color)) => item.insert(name, Value::String(color)),
            ("value" | "color", other) => {
                return Err(format!(
                    "data.{key}.{name} must be a string, not {}",
                    json_kind(&other)
                ));
            }
            // WeChat ignores unknown fields; a typo like "colour" would silently do nothing.
            (other, _) => {
                return Err(format!(
                    "data.{key} has an unknown field \"{}\" (expected value, color)",
                    echo(other)
                ));
            }
        };
    }
    if !item.contains_key("value") {
        return Err(format!("data.{key} has no \"value\""));
    }
    Ok(Value::Object(item))
}

/// A subscription notification's values, each by its key's type (see `subscribe.rs`); they
/// have no colour.
fn typed_values(data: &Value) -> Result<(), String> {
    let Some(params) = data.as_object() else {
        return Ok(());
    };
    for (key, item) in params {
        let Some(value_type) = ValueType::of_key(key) else {
            return Err(format!(
                "data.{} has no type a subscription template uses (its keys are named by type: \
                 thing1, number2, time3, …)",
                echo(key)
            ));
        };
        if item.get("color").is_some() {
            return Err(format!(
                "data.{}.color: subscription notifications have no colour",
                echo(key)
            ));
        }
        let value = item["value"].as_str().unwrap_or_default();
        if !value_type.admits(value) {
            return Err(format!(
                "data.{} = {:?} breaks the rule of its type, {}",
                echo(key),
                echo(value),
                value_type.rule()
            ));
        }
    }
    Ok(())
}

/// A link column (`url`, or a subscribe row's `page`): http or https, one token, bounded.
fn optional_url<'a>(column: &str, url: Option<&'a str>) -> Result<Option<&'a str>, String> {
    let Some(url) = url else { return Ok(None) };
    if url.is_empty() {
        return Ok(None);
    }
    if url.len() > MAX_URL_BYTES {
        return Err(format!("{column} is longer than {MAX_URL_BYTES} bytes"));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{column} must start with http:// or https://"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{column} contains whitespace or control characters"
        ));
    }
    Ok(Some(url))
}

/// `miniprogram`: `{"appid":"…","pagepath":"…"}`; WeChat prefers it over `url`.
fn miniprogram(text: Option<&str>) -> Result<Option<Value>, String> {
    let Some(text) = text else { return Ok(None) };
    if text.len() > MAX_URL_BYTES {
        return Err(format!("miniprogram is larger than {MAX_URL_BYTES} bytes"));
    }
    let parsed: Value =
        serde_json::from_str(text).map_err(|e| format!("miniprogram is not valid JSON: {e}"))?;
    let Value::Object(fields) = parsed else {
        return Err("miniprogram must be a JSON object {\"appid\":…,\"pagepath\":…}".into());
    };
    for (name, value) in &fields {
        match (name.as_str(), value) {
            ("appid" | "pagepath", Value::String(_)) => {}
            ("appid" | "pagepath", other) => {
                return Err(format!(
                    "miniprogram.{name} must be a string, not {}",
                    json_kind(other)
                ));
            }
            (other, _) => {
                return Err(format!(
                    "miniprogram has an unknown field \"{}\" (expected appid, pagepath)",
                    echo(other)
                ));
            }
        }
    }
    match fields.get("appid") {
        Some(Value::String(appid)) if !appid.trim().is_empty() => Ok(Some(Value::Object(fields))),
        _ => Err("miniprogram.appid is missing or empty".into()),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(data: &str) -> RawMessage {
        RawMessage {
            id: 7,
            account: "default".into(),
            touser: Some("oUser1".into()),
            template_id: Some("TPL".into()),
            data: Some(data.into()),
            ..RawMessage::default()
        }
    }

    fn reason(raw: RawMessage) -> String {
        TemplateMessage::from_raw(&raw).expect_err("should be refused")
    }

    #[test]
    fn full_and_shorthand_data_give_the_wire_format() {
        let msg = TemplateMessage::from_raw(&row(
            r##"{"first":{"value":"您好","color":"#173177"},"amount":"39.8元","n":3}"##,
        ))
        .unwrap();
        assert_eq!(
            msg.body["data"],
            json!({"first":{"value":"您好","color":"#173177"},"amount":{"value":"39.8元"},"n":{"value":"3"}})
        );
        assert_eq!(msg.body["client_msg_id"], "wechat-outbox-7");
        assert_eq!(msg.body["touser"], "oUser1");
        assert!(msg.body.get("url").is_none());
    }

    #[test]
    fn an_apps_own_client_msg_id_is_kept() {
        let mut raw = row("{}");
        raw.client_msg_id = Some("order-42".into());
        assert_eq!(
            TemplateMessage::from_raw(&raw).unwrap().client_msg_id,
            "order-42"
        );
    }

    #[test]
    fn url_and_miniprogram_are_passed_on() {
        let mut raw = row("{}");
        raw.url = Some("https://example.com/o/1".into());
        raw.miniprogram = Some(r#"{"appid":"wxmini","pagepath":"pages/a"}"#.into());
        let msg = TemplateMessage::from_raw(&raw).unwrap();
        assert_eq!(msg.body["url"], "https://example.com/o/1");
        assert_eq!(msg.body["miniprogram"]["pagepath"], "pages/a");
    }

    #[test]
    fn each_malformed_column_is_named_in_the_reason() {
        let cases: Vec<(RawMessage, &str)> = vec![
            (
                RawMessage {
                    touser: None,
                    ..row("{}")
                },
                "touser is missing",
            ),
            (
                RawMessage {
                    touser: Some("  ".into()),
                    ..row("{}")
                },
                "touser is empty",
            ),
            (
                RawMessage {
                    touser: Some("o".repeat(200)),
                    ..row("{}")
                },
                "touser is longer",
            ),
            (
                RawMessage {
                    template_id: None,
                    ..row("{}")
                },
                "template_id is missing",
            ),
            (
                RawMessage {
                    data: None,
                    ..row("{}")
                },
                "data is missing",
            ),
            (row("{not json"), "data is not valid JSON"),
            (row("[1,2]"), "data must be a JSON object"),
            (
                row(r##"{"a":{"colour":"#fff","value":"x"}}"##),
                "unknown field \"colour\"",
            ),
            (
                row(r##"{"a":{"color":"#fff"}}"##),
                "data.a has no \"value\"",
            ),
            (row(r#"{"a":true}"#), "data.a must be a string"),
            (
                row(&format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_DATA_BYTES))),
                "data is larger",
            ),
            (
                RawMessage {
                    url: Some("ftp://x".into()),
                    ..row("{}")
                },
                "url must start",
            ),
            (
                RawMessage {
                    miniprogram: Some("{}".into()),
                    ..row("{}")
                },
                "miniprogram.appid",
            ),
            (
                RawMessage {
                    miniprogram: Some("nope".into()),
                    ..row("{}")
                },
                "miniprogram is not valid JSON",
            ),
            (
                RawMessage {
                    client_msg_id: Some("".into()),
                    ..row("{}")
                },
                "client_msg_id is empty",
            ),
            (
                RawMessage {
                    unreadable: Some("touser is not valid UTF-8".into()),
                    ..row("{}")
                },
                "not valid UTF-8",
            ),
        ];
        for (raw, expected) in cases {
            let got = reason(raw);
            assert!(got.contains(expected), "expected {expected:?} in {got:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::cases;

    /// A reason repeats at most a few hundred characters of input, whatever the input.
    const MAX_REASON_CHARS: usize = 600;

    const COLUMNS: [&str; 9] = [
        "kind",
        "page",
        "touser",
        "template_id",
        "data",
        "url",
        "miniprogram",
        "client_msg_id",
        "account",
    ];

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Value::String),
            Just(json!("value")),
            Just(json!("color")),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("value".to_string()),
                        Just("color".to_string()),
                        Just("appid".to_string()),
                        Just("pagepath".to_string()),
                        ".{0,12}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Arbitrary text, including NUL, control characters and multi-byte characters.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,60}",
            any::<String>(),
            "[\\x00-\\x20a-z{}\":,\\[\\]]{0,40}",
            Just("http://".to_string()),
            Just("https://x\0y".to_string()),
        ]
    }

    /// Either the row passes and its body is WeChat's shape, or the reason names a column,
    /// is readable and is bounded.
    fn check(raw: &RawMessage) -> Result<(), TestCaseError> {
        match TemplateMessage::from_raw(raw) {
            Ok(msg) => {
                let data = msg.body["data"].as_object().expect("data is an object");
                for item in data.values() {
                    prop_assert!(item["value"].is_string(), "{item}");
                }
                prop_assert!(!msg.client_msg_id.is_empty());
            }
            Err(reason) => {
                prop_assert!(
                    COLUMNS.iter().any(|c| reason.starts_with(c)),
                    "reason names no column: {reason:?}"
                );
                prop_assert!(
                    reason.chars().count() <= MAX_REASON_CHARS,
                    "unbounded reason ({} chars)",
                    reason.chars().count()
                );
            }
        }
        Ok(())
    }

    fn row() -> RawMessage {
        RawMessage {
            id: 1,
            account: "default".into(),
            touser: Some("oUser1".into()),
            template_id: Some("TPL".into()),
            data: Some("{}".into()),
            ..RawMessage::default()
        }
    }

    proptest! {
        #[test]
        fn any_column_text_passes_or_is_refused_with_a_bounded_reason(
            touser in proptest::option::of(text()),
            template_id in proptest::option::of(text()),
            data in proptest::option::of(text()),
            url in proptest::option::of(text()),
            miniprogram in proptest::option::of(text()),
            client_msg_id in proptest::option::of(text()),
        ) {
            check(&RawMessage { touser, template_id, data, url, miniprogram, client_msg_id, ..row() })?;
        }

        #[test]
        fn any_json_as_data_or_miniprogram_passes_or_is_refused_with_a_bounded_reason(
            data in json(),
            miniprogram in proptest::option::of(json()),
        ) {
            check(&RawMessage {
                data: Some(data.to_string()),
                miniprogram: miniprogram.map(|m| m.to_string()),
                ..row()
            })?;
        }
    }

    proptest! {
        #![proptest_config(cases(32))]

        /// Names and values near and past the size limits, in every column: a reason never
        /// repeats a long value whole.
        #[test]
        fn long_names_and_values_are_not_echoed_whole(
            len in 1usize..70_000,
            c in prop_oneof![Just('k'), Just('长'), Just('\0'), Just('"')],
            shape in 0..10,
        ) {
            let name: String = std::iter::repeat_n(c, len).collect();
            let name_json = json!(name).to_string();
            let raw = match shape {
                0 => RawMessage { data: Some(format!("{{{name_json}:true}}")), ..row() },
                1 => RawMessage { data: Some(format!("{{\"a\":{{{name_json}:\"x\"}}}}")), ..row() },
                2 => RawMessage { data: Some(format!("{{{name_json}:{{\"color\":\"#fff\"}}}}")), ..row() },
                3 => RawMessage { miniprogram: Some(format!("{{{name_json}:\"x\"}}")), ..row() },
                4 => RawMessage { touser: Some(name), ..row() },
                5 => RawMessage { template_id: Some(name), ..row() },
                6 => RawMessage { url: Some(format!("https://{name}")), ..row() },
                7 => RawMessage { client_msg_id: Some(name), ..row() },
                8 => RawMessage { data: Some(format!("{{\"a\":{name_json}}}")), ..row() },
                _ => RawMessage { miniprogram: Some(format!("{{\"appid\":{name_json}}}")), ..row() },
            };
            check(&raw)?;
        }
    }

    proptest! {
        /// Times from SQLite text: any text is read or refused; what the daemon writes reads back.
        #[test]
        fn sqlite_time_text_is_read_or_refused_without_panic(text in ".{0,40}", millis in any::<i64>()) {
            let _ = crate::store::time::parse_ts(&text);
            if let Some(time) = DateTime::<Utc>::from_timestamp_millis(millis) {
                let written = crate::store::time::ts(time);
                // Years outside 0..=9999 have no 4-digit form; those must not read back wrong.
                if let Some(read) = crate::store::time::parse_ts(&written) {
                    prop_assert_eq!(read, time);
                }
            }
        }
    }

    /// The case the issue reported: a 60 KB parameter name was echoed whole into `last_error`.
    #[test]
    fn a_60_kb_parameter_name_is_cut_in_the_reason() {
        let name = "p".repeat(60_000);
        let reason = TemplateMessage::from_raw(&RawMessage {
            data: Some(format!(r#"{{"{name}":{{"colour":"red","value":"x"}}}}"#)),
            ..row()
        })
        .unwrap_err();
        assert!(reason.starts_with("data.ppp"), "{reason}");
        assert!(reason.contains("p…"), "{reason}");
        assert!(reason.len() < 400, "{} bytes", reason.len());
        assert!(reason.contains("unknown field \"colour\""), "{reason}");
    }
}
