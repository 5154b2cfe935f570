//! Subscription notifications in the simulator: the account's subscription templates
//! (`/wxaapi/newtmpl/gettemplate`), users' consents (given by `popup`, withdrawn by `change`,
//! each pushed to the callback like WeChat's `subscribe_msg_popup_event` and
//! `subscribe_msg_change_event`), and `bizsend`, which checks the typed values, uses a
//! one-time consent once, de-duplicates nothing, and pushes `subscribe_msg_sent_event`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::push::{self, Event};
use super::{Delivery, SimSettings, SimState, Simulator, TokenQuery, errcode};
use crate::domain::subscribe::ValueType;

/// A subscription template as `gettemplate` lists it (`type` 2 one-time, 3 long-term).
#[derive(Debug, Clone, Serialize)]
pub struct SimSubscribeTemplate {
    #[serde(rename = "priTmplId")]
    pub template_id: String,
    pub title: String,
    pub content: String,
    pub example: String,
    #[serde(rename = "type")]
    pub kind: i64,
}

/// The subscription templates the simulator lists out of the box: one one-time, one long-term.
pub fn demo_subscribe_templates() -> Vec<SimSubscribeTemplate> {
    vec![
        SimSubscribeTemplate {
            template_id: "SUB_ORDER_SHIPPED".into(),
            title: "订单发货通知".into(),
            content:
                "订单号:{{character_string1.DATA}}\n状态:{{phrase2.DATA}}\n时间:{{time3.DATA}}\n"
                    .into(),
            example: "订单号:SO-1\n状态:已发货\n时间:2026年12月3日 15:01\n".into(),
            kind: 2,
        },
        SimSubscribeTemplate {
            template_id: "SUB_APPOINTMENT".into(),
            title: "预约提醒".into(),
            content: "事项:{{thing1.DATA}}\n日期:{{date2.DATA}}\n".into(),
            example: "事项:门诊复查\n日期:2026年12月3日\n".into(),
            kind: 3,
        },
    ]
}

/// One user's consent to one template, as the simulated WeChat keeps it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SimConsent {
    /// One-time sends allowed and not yet used.
    granted: u64,
    accepted: bool,
}

/// `POST /sim/subscribe/popup` and `/sim/subscribe/change`: a user answered a popup (or
/// rejected in the settings) for these templates.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsentAnswer {
    pub appid: String,
    pub openid: String,
    pub template_ids: Vec<String>,
    pub accept: bool,
}

impl Simulator {
    /// A user answers a subscription popup: each accept allows one more one-time send (and
    /// long-term sends); a reject withdraws. Pushes `subscribe_msg_popup_event` to the callback.
    pub async fn subscribe_popup(&self, answer: &ConsentAnswer) {
        self.answer_consent(
            answer,
            "subscribe_msg_popup_event",
            "SubscribeMsgPopupEvent",
        )
        .await;
    }

    /// A user rejects templates in the notification settings (WeChat pushes only rejections):
    /// `subscribe_msg_change_event`.
    pub async fn subscribe_change(&self, answer: &ConsentAnswer) {
        self.answer_consent(
            answer,
            "subscribe_msg_change_event",
            "SubscribeMsgChangeEvent",
        )
        .await;
    }

    async fn answer_consent(&self, answer: &ConsentAnswer, event: &str, element: &str) {
        let popup = event == "subscribe_msg_popup_event";
        {
            let mut state = self.state.lock().expect("sim state");
            for template_id in &answer.template_ids {
                let key = (
                    answer.appid.clone(),
                    answer.openid.clone(),
                    template_id.clone(),
                );
                let consent = state.consents.entry(key).or_default();
                if answer.accept {
                    consent.accepted = true;
                    if popup {
                        consent.granted += 1;
                    }
                } else {
                    *consent = SimConsent::default();
                }
            }
        }
        let status = if answer.accept { "accept" } else { "reject" };
        let items: String = answer
            .template_ids
            .iter()
            .map(|t| {
                let scene = if popup {
                    "<PopupScene>2</PopupScene>"
                } else {
                    ""
                };
                format!(
                    "<List><TemplateId><![CDATA[{t}]]></TemplateId>\
                     <SubscribeStatusString><![CDATA[{status}]]></SubscribeStatusString>{scene}</List>"
                )
            })
            .collect();
        let inner = format!("<Event><![CDATA[{event}]]></Event><{element}>{items}</{element}>");
        let pushed = Event::with_body(&answer.appid, &answer.openid, inner);
        if let Some(target) = self.settings().callback {
            push::push_event(self, &target, &pushed, 1).await;
        }
    }

    /// Checks a bizsend like WeChat does and delivers it; returns the msgid and the event to
    /// push. Nothing is de-duplicated: the same request twice reaches the user twice.
    pub(crate) fn deliver_subscribe(
        &self,
        state: &mut SimState,
        settings: &SimSettings,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<(i64, Option<Event>), (i64, &'static str)> {
        let appid = self.check_token(token, state)?;
        if let Some(code) = settings.subscribe_errcode {
            return Err((code, "api unauthorized"));
        }
        let req: Value = serde_json::from_slice(body).map_err(|_| (47001, "data format error"))?;
        let text = |name: &str| req.get(name).and_then(Value::as_str).unwrap_or_default();
        let touser = text("touser").to_string();
        if !super::valid_openid(&touser) {
            return Err((40003, "invalid openid"));
        }
        let template_id = text("template_id").to_string();
        let Some(template) = settings
            .subscribe_templates
            .iter()
            .find(|t| t.template_id == template_id)
        else {
            return Err((40037, "invalid template_id"));
        };
        let Some(data) = req.get("data").and_then(Value::as_object) else {
            return Err((47003, "argument invalid! data is empty"));
        };
        for (key, item) in data {
            let value = item.get("value").and_then(Value::as_str);
            let fits = match (ValueType::of_key(key), value) {
                (Some(kind), Some(value)) => kind.admits(value),
                _ => false,
            };
            if !fits {
                return Err((47003, "argument invalid! data.value invalid"));
            }
        }
        let key = (appid.clone(), touser.clone(), template_id.clone());
        let consent = state.consents.entry(key).or_default();
        let long_term = template.kind == 3;
        if !consent.accepted || (!long_term && consent.granted == 0) {
            return Err((43101, "user refuse to accept the msg"));
        }
        if !long_term {
            consent.granted -= 1;
        }
        state.stats.subscribe_sends += 1;
        let msgid = state.new_msgid();
        let data = Value::Object(data.clone());
        state.record_delivery(
            format!("subscribe:{template_id}:{data}"),
            Delivery {
                appid: appid.clone(),
                touser: touser.clone(),
                template_id: template_id.clone(),
                client_msg_id: None,
                msgid,
                data,
                shown: Value::Null,
            },
        );
        let status = if touser.contains("block") {
            (43101, "failed:user block")
        } else {
            (0, "success")
        };
        let inner = format!(
            "<Event><![CDATA[subscribe_msg_sent_event]]></Event><SubscribeMsgSentEvent><List>\
             <TemplateId><![CDATA[{template_id}]]></TemplateId><MsgID>{msgid}</MsgID>\
             <ErrorCode>{}</ErrorCode><ErrorStatus><![CDATA[{}]]></ErrorStatus></List>\
             </SubscribeMsgSentEvent>",
            status.0, status.1
        );
        Ok((msgid, Some(Event::with_body(&appid, &touser, inner))))
    }
}

/// `GET /wxaapi/newtmpl/gettemplate`.
pub(crate) async fn get_templates(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
) -> Json<Value> {
    let state = sim.state.lock().expect("sim state");
    if let Err((code, msg)) = sim.check_token(q.access_token.as_deref(), &state) {
        return errcode(code, msg);
    }
    let templates = sim.settings().subscribe_templates;
    Json(json!({"errcode": 0, "errmsg": "ok", "data": templates}))
}

/// `POST /sim/subscribe/popup`.
pub async fn popup(
    State(sim): State<Arc<Simulator>>,
    Json(answer): Json<ConsentAnswer>,
) -> Json<Value> {
    sim.subscribe_popup(&answer).await;
    Json(json!({"ok": true}))
}

/// `POST /sim/subscribe/change`.
pub async fn change(
    State(sim): State<Arc<Simulator>>,
    Json(answer): Json<ConsentAnswer>,
) -> Json<Value> {
    sim.subscribe_change(&answer).await;
    Json(json!({"ok": true}))
}
