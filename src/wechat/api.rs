//! The WeChat HTTP API endpoints the daemon calls, and how their failures are told apart.
//!
//! The access token travels in the query string, so no error here ever carries a URL
//! (`reqwest::Error::without_url`), and no `Debug` shows a token or secret.

use std::time::Duration;

use anyhow::Context;
use reqwest::{Client, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::domain::message::MessageKind;
use crate::domain::text::echo;

/// WeChat's answer to a template send (or any call answering with an errcode).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    pub errcode: i64,
    pub errmsg: String,
    pub msgid: Option<i64>,
}

/// One entry of `/wxaapi/newtmpl/gettemplate`: `type` 2 is one-time, 3 long-term.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedSubscribeTemplate {
    #[serde(rename = "priTmplId")]
    pub template_id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub example: String,
    #[serde(rename = "type", default)]
    pub kind: i64,
}

/// A call that produced no errcode: the request failed in transport, or the answer was not
/// WeChat's JSON.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct TransportError {
    pub detail: String,
    /// False only when the request provably never reached WeChat (the connection was refused).
    pub may_have_reached: bool,
}

/// One entry of `get_all_private_template`.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedTemplate {
    pub template_id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub content: String,
}

/// WeChat's count of one call for the day (`openapi/quota/get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct CallQuota {
    pub daily_limit: u64,
    pub used: u64,
    pub remain: u64,
}

/// The path whose quota the daemon reads: the template send.
pub const TEMPLATE_SEND_CGI_PATH: &str = "/cgi-bin/message/template/send";

/// A fresh access token and how long WeChat says it lives.
pub struct IssuedToken {
    pub token: SecretString,
    pub expires_in: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token request failed: {0}")]
    Transport(#[from] TransportError),
    #[error("WeChat refused the token request: errcode {errcode}: {errmsg}")]
    Refused { errcode: i64, errmsg: String },
}

#[derive(Clone)]
pub struct WechatApi {
    http: Client,
    base: Url,
}

/// Builds an HTTP client on the project's one TLS stack (rustls with ring).
pub fn http_client(builder: reqwest::ClientBuilder) -> anyhow::Result<Client> {
    // Installing twice is harmless; the first provider stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    builder.build().context("cannot build the HTTP client")
}

impl WechatApi {
    pub fn new(base_url: &str, timeout: Duration) -> anyhow::Result<WechatApi> {
        let mut base = Url::parse(base_url).context("api.base_url")?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = http_client(
            Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .pool_idle_timeout(Duration::from_secs(50))
                .user_agent(concat!("wechat-outbox/", env!("CARGO_PKG_VERSION"))),
        )?;
        Ok(WechatApi { http, base })
    }

    fn endpoint(&self, path: &str) -> Url {
        self.base
            .join(path)
            .expect("static endpoint paths join onto a base URL")
    }

    /// `POST /cgi-bin/message/template/send?access_token=…`
    pub async fn send_template(
        &self,
        token: &SecretString,
        body: &Value,
    ) -> Result<ApiReply, TransportError> {
        self.send_message(MessageKind::Template, token, body).await
    }

    /// Sends a message of either kind: a template message to `template/send`, a subscription
    /// notification to `subscribe/bizsend`, whose answer carries a `msgid` too (not in WeChat's
    /// documentation, seen by WxJava #3142) that its `subscribe_msg_sent_event` repeats.
    pub async fn send_message(
        &self,
        kind: MessageKind,
        token: &SecretString,
        body: &Value,
    ) -> Result<ApiReply, TransportError> {
        let path = match kind {
            MessageKind::Template => "cgi-bin/message/template/send",
            MessageKind::Subscribe => "cgi-bin/message/subscribe/bizsend",
        };
        reply(&self.post_json(path, token, body).await?)
    }

    /// `GET /wxaapi/newtmpl/gettemplate?access_token=…`: the account's subscription templates,
    /// or WeChat's errcode.
    pub async fn subscribe_templates(
        &self,
        token: &SecretString,
    ) -> Result<Result<Vec<ListedSubscribeTemplate>, ApiReply>, TransportError> {
        let url = self.with_token("wxaapi/newtmpl/gettemplate", token);
        let body = read_body(self.http.get(url).send().await).await?;
        if body.get("errcode").and_then(Value::as_i64).unwrap_or(0) == 0
            && let Some(list) = body.get("data")
        {
            return serde_json::from_value(list.clone())
                .map(Ok)
                .map_err(|e| TransportError {
                    detail: format!("data is not as documented: {}", echo(&e.to_string())),
                    may_have_reached: true,
                });
        }
        Ok(Err(ApiReply {
            errcode: body.get("errcode").and_then(Value::as_i64).unwrap_or(-1),
            errmsg: errmsg(&body, ""),
            msgid: None,
        }))
    }

    /// `GET /cgi-bin/template/get_all_private_template?access_token=…`: the account's templates,
    /// or WeChat's errcode.
    pub async fn private_templates(
        &self,
        token: &SecretString,
    ) -> Result<Result<Vec<ListedTemplate>, ApiReply>, TransportError> {
        let url = self.with_token("cgi-bin/template/get_all_private_template", token);
        let body = read_body(self.http.get(url).send().await).await?;
        template_list(&body)
    }

    /// `POST /cgi-bin/openapi/quota/get`: the day's limit and use of the template send, or
    /// WeChat's errcode.
    pub async fn send_quota(
        &self,
        token: &SecretString,
    ) -> Result<Result<CallQuota, ApiReply>, TransportError> {
        let body = self
            .post_json(
                "cgi-bin/openapi/quota/get",
                token,
                &json!({"cgi_path": TEMPLATE_SEND_CGI_PATH}),
            )
            .await?;
        if let Some(quota) = body.get("quota") {
            return serde_json::from_value(quota.clone())
                .map(Ok)
                .map_err(|_| TransportError {
                    detail: "quota is not as documented (daily_limit, used, remain)".into(),
                    may_have_reached: true,
                });
        }
        reply(&body).map(Err)
    }

    /// `POST /cgi-bin/template/api_add_template`: takes a library template (its short id, and
    /// the keywords wanted, in order) into the account; WeChat answers its `template_id`.
    pub async fn add_template(
        &self,
        token: &SecretString,
        short_id: &str,
        keywords: &[String],
    ) -> Result<Result<String, ApiReply>, TransportError> {
        let body = self
            .post_json(
                "cgi-bin/template/api_add_template",
                token,
                &json!({"template_id_short": short_id, "keyword_name_list": keywords}),
            )
            .await?;
        match body.get("template_id").and_then(Value::as_str) {
            Some(id) if body.get("errcode").and_then(Value::as_i64).unwrap_or(0) == 0 => {
                Ok(Ok(echo(id).into_owned()))
            }
            _ => reply(&body).map(Err),
        }
    }

    /// `POST /cgi-bin/template/del_private_template`.
    pub async fn delete_template(
        &self,
        token: &SecretString,
        template_id: &str,
    ) -> Result<ApiReply, TransportError> {
        let body = self
            .post_json(
                "cgi-bin/template/del_private_template",
                token,
                &json!({"template_id": template_id}),
            )
            .await?;
        reply(&body)
    }

    /// POSTs `body` to an endpoint that takes the access token, and reads WeChat's JSON.
    async fn post_json(
        &self,
        path: &str,
        token: &SecretString,
        body: &Value,
    ) -> Result<Value, TransportError> {
        let url = self.with_token(path, token);
        read_body(self.http.post(url).json(body).send().await).await
    }

    /// The endpoint's URL with the access token in its query (never in an error: see
    /// `transport`).
    fn with_token(&self, path: &str, token: &SecretString) -> Url {
        let mut url = self.endpoint(path);
        url.query_pairs_mut()
            .append_pair("access_token", token.expose_secret());
        url
    }

    /// `POST /cgi-bin/stable_token`: returns the same token while it is valid unless forced.
    pub async fn stable_token(
        &self,
        appid: &str,
        secret: &SecretString,
        force_refresh: bool,
    ) -> Result<IssuedToken, TokenError> {
        let body = json!({
            "grant_type": "client_credential",
            "appid": appid,
            "secret": secret.expose_secret(),
            "force_refresh": force_refresh,
        });
        let response = self
            .http
            .post(self.endpoint("cgi-bin/stable_token"))
            .json(&body)
            .send()
            .await;
        read_token(response).await
    }

    /// `GET /cgi-bin/token`: every call invalidates the token issued before.
    pub async fn classic_token(
        &self,
        appid: &str,
        secret: &SecretString,
    ) -> Result<IssuedToken, TokenError> {
        let mut url = self.endpoint("cgi-bin/token");
        url.query_pairs_mut()
            .append_pair("grant_type", "client_credential")
            .append_pair("appid", appid)
            .append_pair("secret", secret.expose_secret());
        read_token(self.http.get(url).send().await).await
    }
}

async fn read_body(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<Value, TransportError> {
    let response = response.map_err(transport)?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(transport)?;
    body_json(status, &bytes)
}

/// An answer's status and bytes as WeChat's JSON.
fn body_json(status: StatusCode, bytes: &[u8]) -> Result<Value, TransportError> {
    if status != StatusCode::OK {
        return Err(TransportError {
            detail: format!("HTTP {status} from WeChat"),
            // A 5xx may come from a proxy after WeChat processed the request.
            may_have_reached: status.is_server_error(),
        });
    }
    serde_json::from_slice(bytes).map_err(|_| TransportError {
        detail: format!("answer is not JSON ({} bytes)", bytes.len()),
        may_have_reached: true,
    })
}

/// WeChat's errcode answer (its errmsg bounded: it becomes the row's `last_error`).
fn reply(body: &Value) -> Result<ApiReply, TransportError> {
    let errcode = body
        .get("errcode")
        .and_then(Value::as_i64)
        .ok_or_else(|| TransportError {
            detail: "answer has no errcode".into(),
            may_have_reached: true,
        })?;
    Ok(ApiReply {
        errcode,
        errmsg: errmsg(body, ""),
        msgid: body.get("msgid").and_then(msgid),
    })
}

/// The answer's errmsg, cut: a proxy or a broken WeChat may answer with anything.
fn errmsg(body: &Value, missing: &str) -> String {
    echo(
        body.get("errmsg")
            .and_then(Value::as_str)
            .unwrap_or(missing),
    )
    .into_owned()
}

/// `get_all_private_template`'s answer: the list, or WeChat's errcode.
fn template_list(body: &Value) -> Result<Result<Vec<ListedTemplate>, ApiReply>, TransportError> {
    if let Some(list) = body.get("template_list") {
        return serde_json::from_value(list.clone())
            .map(Ok)
            .map_err(|e| TransportError {
                // serde's message quotes the offending value, which may be any size.
                detail: format!(
                    "template_list is not as documented: {}",
                    echo(&e.to_string())
                ),
                may_have_reached: true,
            });
    }
    Ok(Err(ApiReply {
        errcode: body.get("errcode").and_then(Value::as_i64).unwrap_or(-1),
        errmsg: errmsg(body, ""),
        msgid: None,
    }))
}

/// msgid overflows 32 bits; take it as a 64-bit number, or a numeric string.
fn msgid(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|u| u as i64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

async fn read_token(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<IssuedToken, TokenError> {
    token_answer(&read_body(response).await?)
}

/// The longest token lifetime believed (WeChat's is 2 hours).
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// A token answer: the token, or WeChat's refusal.
fn token_answer(body: &Value) -> Result<IssuedToken, TokenError> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        expires_in: u64,
    }
    if let Ok(granted) = serde_json::from_value::<Granted>(body.clone()) {
        return Ok(IssuedToken {
            token: SecretString::from(granted.access_token),
            // WeChat says 7200; a lifetime of millions of years made `now + lifetime` panic.
            expires_in: Duration::from_secs(granted.expires_in.min(MAX_TOKEN_LIFETIME_SECS)),
        });
    }
    Err(TokenError::Refused {
        errcode: body.get("errcode").and_then(Value::as_i64).unwrap_or(-1),
        errmsg: errmsg(body, "no errmsg"),
    })
}

/// Describes a reqwest failure without its URL (which holds the token or the secret).
fn transport(error: reqwest::Error) -> TransportError {
    let may_have_reached = !error.is_connect();
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "failed reading the answer"
    } else {
        "request failed"
    };
    let error = error.without_url();
    let cause = std::error::Error::source(&error)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    TransportError {
        detail: format!("{kind}{cause}"),
        may_have_reached,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lifetime_beyond_chronos_range_is_capped() {
        // 10^13 s (317,000 years) is inside chrono's Duration but not its DateTime range.
        for lifetime in [10_000_000_000_000_u64, u64::MAX] {
            let answer = json!({"access_token": "t", "expires_in": lifetime});
            let issued = token_answer(&answer).unwrap();
            assert_eq!(
                issued.expires_in,
                Duration::from_secs(MAX_TOKEN_LIFETIME_SECS)
            );
            // What the token manager does with it: this panicked before the cap.
            let lifetime = chrono::Duration::from_std(issued.expires_in).unwrap_or_default();
            let _ = chrono::Utc::now() + lifetime;
        }
    }

    #[test]
    fn a_megabyte_errmsg_is_cut() {
        let answer = json!({"errcode": 40003, "errmsg": "e".repeat(1 << 20)});
        let reply = reply(&answer).unwrap();
        assert_eq!(reply.errcode, 40003);
        assert!(reply.errmsg.ends_with('…') && reply.errmsg.chars().count() < 300);
        let Err(TokenError::Refused { errmsg, .. }) = token_answer(&answer) else {
            panic!("refused")
        };
        assert!(errmsg.chars().count() < 300);
        let listed = template_list(
            &json!({"template_list": [{"template_id": "x".repeat(1 << 20), "content": 7}]}),
        );
        let detail = listed.unwrap_err().detail;
        assert!(
            detail.chars().count() < 300,
            "{} chars",
            detail.chars().count()
        );
    }

    #[test]
    fn msgids_beyond_32_bits_survive() {
        assert_eq!(msgid(&json!(3_147_483_648_u64)), Some(3_147_483_648));
        assert_eq!(msgid(&json!("200228332")), Some(200_228_332));
        assert_eq!(msgid(&json!(null)), None);
    }

    #[tokio::test]
    async fn a_refused_connection_is_known_not_to_have_reached_wechat_and_leaks_no_token() {
        // Bind then drop a listener, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api =
            WechatApi::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap();
        let token = SecretString::from("TOKEN-THAT-MUST-NOT-LEAK".to_string());
        let err = api.send_template(&token, &json!({})).await.unwrap_err();
        assert!(!err.may_have_reached, "{err}");
        let printed = format!("{err} {err:?}");
        assert!(!printed.contains("TOKEN-THAT-MUST-NOT-LEAK"), "{printed}");
        assert!(!printed.contains("access_token"), "{printed}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,30}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 30, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("errcode".to_string()),
                        Just("errmsg".to_string()),
                        Just("msgid".to_string()),
                        Just("access_token".to_string()),
                        Just("expires_in".to_string()),
                        Just("template_list".to_string()),
                        Just("template_id".to_string()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Every failure to read an answer is a readable, bounded message.
    fn readable(detail: &str) -> Result<(), TestCaseError> {
        prop_assert!(!detail.trim().is_empty());
        prop_assert!(
            detail.chars().count() <= 400,
            "{} chars",
            detail.chars().count()
        );
        Ok(())
    }

    proptest! {
        /// Any bytes with any status: JSON for a 200 that holds it, else a bounded refusal
        /// that says whether the request may have reached WeChat.
        #[test]
        fn any_answer_bytes_are_read_or_refused(
            status in prop_oneof![Just(200u16), 100u16..600],
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                json().prop_map(|v| v.to_string().into_bytes()),
            ],
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            match body_json(status, &bytes) {
                Ok(value) => {
                    prop_assert_eq!(status, StatusCode::OK);
                    prop_assert_eq!(Some(value), serde_json::from_slice::<Value>(&bytes).ok());
                }
                Err(e) => {
                    readable(&e.detail)?;
                    if status.is_server_error() {
                        prop_assert!(e.may_have_reached);
                    }
                }
            }
        }

        /// Any JSON as a send answer, a template list or a token answer: no panic, an errcode
        /// only when the answer has an integer one, messages bounded.
        #[test]
        fn any_json_answer_is_read_or_refused(body in json(), long in 0usize..5_000) {
            let mut body = body;
            if let Value::Object(map) = &mut body
                && map.get("errmsg").is_some_and(Value::is_string)
            {
                map.insert("errmsg".into(), json!("m".repeat(long)));
            }
            match reply(&body) {
                Ok(r) => {
                    prop_assert_eq!(Some(r.errcode), body.get("errcode").and_then(Value::as_i64));
                    prop_assert!(r.errmsg.chars().count() <= crate::domain::text::ECHO_CHARS + 1);
                    let _ = crate::domain::errcode::classify(r.errcode);
                }
                Err(e) => readable(&e.detail)?,
            }
            match template_list(&body) {
                Ok(Ok(_)) => {}
                Ok(Err(r)) => prop_assert!(r.errmsg.chars().count() <= crate::domain::text::ECHO_CHARS + 1),
                Err(e) => readable(&e.detail)?,
            }
            match token_answer(&body) {
                Ok(issued) => {
                    prop_assert!(issued.expires_in.as_secs() <= MAX_TOKEN_LIFETIME_SECS);
                    let _ = chrono::Utc::now() + chrono::Duration::from_std(issued.expires_in).unwrap();
                }
                Err(e) => readable(&e.to_string())?,
            }
        }

        #[test]
        fn msgid_is_read_from_any_json_without_panic(v in json(), s in "[0-9-]{0,25}") {
            let _ = msgid(&v);
            prop_assert_eq!(msgid(&json!(s)), s.parse().ok());
        }
    }
}
