//! Pushing `TEMPLATESENDJOBFINISH` events to the account's server URL, signed like WeChat
//! (`signature = sha1(sorted([token, timestamp, nonce]))`), encrypted in safe mode when the
//! target has an EncodingAESKey, and retried like WeChat: up to three more times when the
//! answer is not `success` (or empty) within 5 seconds.

use std::sync::Arc;
use std::time::Duration;

use super::{CallbackTarget, Simulator};
use crate::wechat::crypto::{MessageCrypto, signature};

/// WeChat sends the first push and then retries three times.
const PUSH_TRIES: usize = 4;

/// One event, as its XML fields.
#[derive(Debug, Clone)]
pub struct Event {
    /// The account the message was sent from (its appid seals safe-mode pushes).
    pub appid: String,
    pub to_user_name: String,
    pub from_user_name: String,
    pub create_time: i64,
    pub msgid: i64,
    pub status: &'static str,
    /// The fields after `MsgType` of any other event (subscription popups, changes, sends).
    pub body: Option<String>,
}

impl Event {
    /// The delivery event for a message; its status follows the openid (see the module docs).
    pub fn template_finished(appid: &str, openid: &str, msgid: i64) -> Event {
        let appid = appid.to_string();
        let status = if openid.contains("block") {
            "failed:user block"
        } else if openid.contains("sysfail") {
            "failed: system failed"
        } else if openid.contains("freqlimit") {
            "failed:freq limit"
        } else {
            "success"
        };
        Event {
            to_user_name: format!("gh_{appid}"),
            appid,
            from_user_name: openid.to_string(),
            create_time: chrono::Utc::now().timestamp(),
            msgid,
            status,
            body: None,
        }
    }

    /// An event from `openid` whose fields after `MsgType` are `body` (`<Event>…`).
    pub fn with_body(appid: &str, openid: &str, body: String) -> Event {
        Event {
            to_user_name: format!("gh_{appid}"),
            appid: appid.to_string(),
            from_user_name: openid.to_string(),
            create_time: chrono::Utc::now().timestamp(),
            msgid: 0,
            status: "",
            body: Some(body),
        }
    }

    pub fn to_xml(&self) -> String {
        if let Some(body) = &self.body {
            return format!(
                "<xml><ToUserName><![CDATA[{}]]></ToUserName><FromUserName><![CDATA[{}]]></FromUserName>\
                 <CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType>{body}</xml>",
                self.to_user_name, self.from_user_name, self.create_time
            );
        }
        format!(
            "<xml><ToUserName><![CDATA[{}]]></ToUserName><FromUserName><![CDATA[{}]]></FromUserName>\
             <CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>{}</MsgID>\
             <Status><![CDATA[{}]]></Status></xml>",
            self.to_user_name, self.from_user_name, self.create_time, self.msgid, self.status
        )
    }
}

/// Pushes `event` after `delay`, in the background.
pub fn spawn_event(
    sim: Arc<Simulator>,
    target: CallbackTarget,
    event: Event,
    delay: Duration,
    copies: u32,
) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        push_event(&sim, &target, &event, copies).await;
    });
}

/// Pushes `event` `copies` times (each one retried like WeChat) and counts the outcome.
pub async fn push_event(sim: &Simulator, target: &CallbackTarget, event: &Event, copies: u32) {
    for _ in 0..copies {
        let acknowledged = push(&sim.http, target, event).await;
        let mut state = sim.state.lock().expect("sim state");
        if acknowledged {
            state.stats.events_acknowledged += 1;
        } else {
            state.stats.events_failed += 1;
        }
    }
}

async fn push(http: &reqwest::Client, target: &CallbackTarget, event: &Event) -> bool {
    let crypto = match &target.encoding_aes_key {
        Some(key) => match MessageCrypto::new(key, &event.appid) {
            Ok(crypto) => Some(crypto),
            Err(_) => return false,
        },
        None => None,
    };
    for _ in 0..PUSH_TRIES {
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let nonce = fastrand::u32(..).to_string();
        let Ok(mut url) = reqwest::Url::parse(&target.url) else {
            return false;
        };
        url.query_pairs_mut()
            .append_pair(
                "signature",
                &signature(&[&target.token, &timestamp, &nonce]),
            )
            .append_pair("timestamp", &timestamp)
            .append_pair("nonce", &nonce)
            .append_pair("openid", &event.from_user_name);
        // Safe mode: a fresh envelope per try, as each carries its own timestamp and nonce.
        let body = match &crypto {
            None => event.to_xml(),
            Some(crypto) => {
                let sealed = crypto.encrypt(&event.to_xml());
                let msg_signature = signature(&[&target.token, &timestamp, &nonce, &sealed]);
                url.query_pairs_mut()
                    .append_pair("encrypt_type", "aes")
                    .append_pair("msg_signature", &msg_signature);
                format!(
                    "<xml><ToUserName><![CDATA[{}]]></ToUserName><Encrypt><![CDATA[{sealed}]]></Encrypt></xml>",
                    event.to_user_name
                )
            }
        };
        let answer = http
            .post(url)
            .header("content-type", "text/xml")
            .body(body)
            .send()
            .await;
        if let Ok(response) = answer
            && response.status().is_success()
            && let Ok(text) = response.text().await
            && (text.is_empty() || text == "success")
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_status_follows_the_openid_convention() {
        assert_eq!(
            Event::template_finished("wx", "oUserA", 1).status,
            "success"
        );
        assert_eq!(
            Event::template_finished("wx", "o_block_1", 1).status,
            "failed:user block"
        );
        assert_eq!(
            Event::template_finished("wx", "o_sysfail", 1).status,
            "failed: system failed"
        );
        assert!(
            Event::template_finished("wx", "oA", 5)
                .to_xml()
                .contains("<MsgID>5</MsgID>")
        );
    }
}
