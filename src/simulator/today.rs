//! What WeChat added after the 2014 interface page, as the simulator plays it: category
//! templates taken from a library (`api_add_template`, `del_private_template`), the account's
//! own quota (`openapi/quota/get`), and what a send may meet since 2023 — a user who refused
//! the template (43101), a duplicate (40241), sends too frequent to one user (43117), the
//! daily limit (45009), and values shown cut to 20 characters. docs/todays-wechat.md gives
//! the sources, and which codes are unconfirmed.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Query, State};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{SimState, SimTemplate, Simulator, TokenQuery, errcode};
use crate::domain::content_rules::{IGNORED_PARAMETERS, as_shown};

/// The call whose quota `openapi/quota/get` reports for the daemon.
pub const TEMPLATE_SEND_PATH: &str = "/cgi-bin/message/template/send";

/// A category template (类目模板) of the public library: its short id and its keywords, each
/// with the parameter name it gets in the account's copy.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryTemplate {
    pub short_id: String,
    pub title: String,
    /// (keyword as the library names it, parameter name).
    pub keywords: Vec<(String, String)>,
}

/// The library the simulator offers out of the box.
pub fn demo_library() -> Vec<LibraryTemplate> {
    let template = |short_id: &str, title: &str, keywords: &[(&str, &str)]| LibraryTemplate {
        short_id: short_id.into(),
        title: title.into(),
        keywords: keywords
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect(),
    };
    vec![
        template(
            "47118",
            "订单发货通知",
            &[
                ("商品名称", "thing1"),
                ("快递公司", "thing2"),
                ("快递单号", "character_string3"),
                ("发货时间", "time4"),
            ],
        ),
        template(
            "43216",
            "支付成功通知",
            &[
                ("名称", "thing1"),
                ("金额", "amount2"),
                ("时间", "time3"),
                ("订单号", "character_string4"),
            ],
        ),
    ]
}

/// Whether a user refused this template: listed in `SimSettings::refusals`, or an openid
/// containing `refuse` (which refuses every template).
pub(super) fn refused(refusals: &[(String, String)], openid: &str, template_id: &str) -> bool {
    openid.contains("refuse")
        || refusals
            .iter()
            .any(|(o, t)| o == openid && t == template_id)
}

/// What the user sees of `data` under the 2023 rules: `first` and `remark` gone, each value on
/// one line of at most 20 characters.
pub(super) fn shown(data: &Value) -> Value {
    let Some(items) = data.as_object() else {
        return Value::Null;
    };
    items
        .iter()
        .filter(|(name, _)| !IGNORED_PARAMETERS.contains(&name.as_str()))
        .map(|(name, item)| {
            let value = item.get("value").and_then(Value::as_str).unwrap_or("");
            (name.clone(), Value::String(as_shown(value)))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The day WeChat counts quota in (Beijing time).
pub(super) fn quota_day() -> String {
    Utc::now()
        .with_timezone(&chrono_tz::Asia::Shanghai)
        .format("%Y-%m-%d")
        .to_string()
}

impl Simulator {
    /// The appid a call's token belongs to and its JSON body, or WeChat's errcode answer.
    fn authorised_json<T: serde::de::DeserializeOwned>(
        &self,
        q: &TokenQuery,
        body: &[u8],
    ) -> Result<(String, T), Json<Value>> {
        let appid = self
            .check_token(
                q.access_token.as_deref(),
                &self.state.lock().expect("sim state"),
            )
            .map_err(|(code, msg)| errcode(code, msg))?;
        let req = serde_json::from_slice(body).map_err(|_| errcode(47001, "data format error"))?;
        Ok((appid, req))
    }
}

impl SimState {
    /// Template sends accepted for `appid` today.
    pub(super) fn used_today(&self, appid: &str) -> u64 {
        self.quota_used
            .get(&(appid.to_string(), quota_day()))
            .copied()
            .unwrap_or(0)
    }

    /// Whether `openid` got a send from `appid` less than `interval` ago.
    pub(super) fn too_frequent(
        &self,
        appid: &str,
        openid: &str,
        interval: std::time::Duration,
        now: Instant,
    ) -> bool {
        !interval.is_zero()
            && self
                .last_send
                .get(&(appid.to_string(), openid.to_string()))
                .is_some_and(|at| now.duration_since(*at) < interval)
    }
}

#[derive(Deserialize)]
pub(super) struct QuotaRequest {
    cgi_path: Option<String>,
}

/// `POST /cgi-bin/openapi/quota/get`: the day's limit, use and remainder of one call.
pub(super) async fn quota_get(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let (appid, req): (String, QuotaRequest) = match sim.authorised_json(&q, &body) {
        Ok(req) => req,
        Err(answer) => return answer,
    };
    let state = sim.state.lock().expect("sim state");
    if req.cgi_path.as_deref() != Some(TEMPLATE_SEND_PATH) {
        return errcode(76021, "cgi_path not found, please check");
    }
    let limit = sim.settings().daily_limit;
    let used = state.used_today(&appid);
    Json(json!({
        "errcode": 0,
        "errmsg": "ok",
        "quota": {"daily_limit": limit, "used": used, "remain": limit.saturating_sub(used)},
    }))
}

#[derive(Deserialize)]
pub(super) struct AddTemplateRequest {
    template_id_short: Option<String>,
    keyword_name_list: Option<Vec<String>>,
}

/// `POST /cgi-bin/template/api_add_template`: copies a library template, with the keywords
/// asked for in the order given, into the account's templates.
pub(super) async fn add_template(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let (_, req): (String, AddTemplateRequest) = match sim.authorised_json(&q, &body) {
        Ok(req) => req,
        Err(answer) => return answer,
    };
    let short_id = req.template_id_short.unwrap_or_default();
    let mut settings = sim.settings.lock().expect("sim settings");
    if short_id.starts_with("TM") {
        return errcode(40247, "need new category template");
    }
    let Some(library) = settings
        .library
        .iter()
        .find(|t| t.short_id == short_id)
        .cloned()
    else {
        return errcode(40037, "invalid template_id");
    };
    let asked = req.keyword_name_list.unwrap_or_default();
    let chosen: Option<Vec<&(String, String)>> = asked
        .iter()
        .map(|name| library.keywords.iter().find(|(k, _)| k == name))
        .collect();
    let chosen = match chosen {
        Some(chosen) if !chosen.is_empty() => chosen,
        _ => return errcode(40246, "invalid keyword_name_list"),
    };
    if settings.templates.len() >= settings.max_private_templates {
        return errcode(45026, "template num exceeds limit");
    }
    let template_id = format!(
        "SIM{}",
        (0..40)
            .map(|_| fastrand::alphanumeric())
            .collect::<String>()
    );
    let content = chosen
        .iter()
        .map(|(keyword, parameter)| format!("{keyword}：{{{{{parameter}.DATA}}}}"))
        .collect::<Vec<_>>()
        .join("\n");
    settings.templates.push(SimTemplate {
        template_id: template_id.clone(),
        title: library.title,
        content,
    });
    Json(json!({"errcode": 0, "errmsg": "ok", "template_id": template_id}))
}

#[derive(Deserialize)]
pub(super) struct DeleteTemplateRequest {
    template_id: Option<String>,
}

/// `POST /cgi-bin/template/del_private_template`.
pub(super) async fn delete_template(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let (_, req): (String, DeleteTemplateRequest) = match sim.authorised_json(&q, &body) {
        Ok(req) => req,
        Err(answer) => return answer,
    };
    let template_id = req.template_id.unwrap_or_default();
    let mut settings = sim.settings.lock().expect("sim settings");
    let before = settings.templates.len();
    settings.templates.retain(|t| t.template_id != template_id);
    if settings.templates.len() == before {
        return errcode(40037, "invalid template_id");
    }
    errcode(0, "ok")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_see_first_lines_of_twenty_characters_without_first_and_remark() {
        let data = json!({
            "first": {"value": "hello"},
            "keyword1": {"value": "一二三四五六七八九十一二三四五六七八九十一"},
            "keyword2": {"value": "line one\nline two"},
            "remark": {"value": "bye"},
        });
        assert_eq!(
            shown(&data),
            json!({
                "keyword1": "一二三四五六七八九十一二三四五六七八九…",
                "keyword2": "line one…",
            })
        );
    }

    #[test]
    fn refusals_are_per_openid_and_template() {
        let list = vec![("oA".to_string(), "T1".to_string())];
        assert!(refused(&list, "oA", "T1"));
        assert!(!refused(&list, "oA", "T2"));
        assert!(!refused(&list, "oB", "T1"));
        assert!(refused(&list, "o_refuse_all", "T2"));
    }
}
