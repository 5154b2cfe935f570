//! Keeping the `templates` table in step with WeChat's list of the account's templates: at
//! start and every `templates.sync_interval_secs` (services/template_sync.rs), and on
//! `wechat-outbox templates sync`; and adding or deleting the account's templates at WeChat
//! (`templates add`, `templates delete`).

use anyhow::{Context, Result, bail};

use crate::domain::clock::Clock;
use crate::store::{Store, SyncedSubscribeTemplate, SyncedTemplate};
use crate::wechat::api::{ApiReply, WechatApi};
use crate::wechat::token::TokenManager;

/// Fetches one account's template list and records it; returns how many WeChat listed.
pub async fn sync_account(
    store: &Store,
    api: &WechatApi,
    tokens: &TokenManager,
    account: &str,
    clock: &Clock,
) -> Result<usize> {
    let listed = tokens
        .with_token(account, |token| async move {
            api.private_templates(&token).await
        })
        .await
        .context("listing templates")?;
    match listed {
        Ok(list) => {
            let synced: Vec<SyncedTemplate> = list
                .into_iter()
                .map(|t| SyncedTemplate {
                    template_id: t.template_id,
                    title: t.title,
                    content: t.content,
                })
                .collect();
            store.sync_templates(account, &synced, clock.now()).await?;
            Ok(synced.len())
        }
        Err(reply) => bail!(
            "WeChat refused the template list: errcode {}: {}",
            reply.errcode,
            reply.errmsg
        ),
    }
}

/// Fetches one account's subscription templates (`/wxaapi/newtmpl/gettemplate`) and records
/// them; `Ok(None)` when WeChat answered an errcode (an account without subscription
/// notifications gets 48001): nothing is recorded, and nothing is wrong with the daemon.
pub async fn sync_subscribe_account(
    store: &Store,
    api: &WechatApi,
    tokens: &TokenManager,
    account: &str,
    clock: &Clock,
) -> Result<Result<usize, ApiReply>> {
    let listed = tokens
        .with_token(account, |token| async move {
            api.subscribe_templates(&token).await
        })
        .await
        .context("listing subscription templates")?;
    match listed {
        Ok(list) => {
            let synced: Vec<SyncedSubscribeTemplate> = list
                .into_iter()
                .map(|t| SyncedSubscribeTemplate {
                    template_id: t.template_id,
                    title: t.title,
                    content: t.content,
                    example: t.example,
                    long_term: t.kind == 3,
                })
                .collect();
            store
                .sync_subscribe_templates(account, &synced, clock.now())
                .await?;
            Ok(Ok(synced.len()))
        }
        Err(reply) => Ok(Err(reply)),
    }
}

/// Adds a category template (类目模板) from WeChat's library to the account: its short id and
/// the keywords wanted, in order. Returns the new `template_id`.
pub async fn add_template(
    api: &WechatApi,
    tokens: &TokenManager,
    account: &str,
    short_id: &str,
    keywords: &[String],
) -> Result<String> {
    let added = tokens
        .with_token(account, |token| async move {
            api.add_template(&token, short_id, keywords).await
        })
        .await
        .context("adding the template")?;
    added.map_err(|reply| anyhow::anyhow!("{}", explain_template_errcode(&reply)))
}

/// Deletes one of the account's templates at WeChat.
pub async fn delete_template(
    api: &WechatApi,
    tokens: &TokenManager,
    account: &str,
    template_id: &str,
) -> Result<()> {
    let deleted = tokens
        .with_token(account, |token| async move {
            let reply = api.delete_template(&token, template_id).await?;
            Ok(if reply.errcode == 0 {
                Ok(())
            } else {
                Err(reply)
            })
        })
        .await
        .context("deleting the template")?;
    deleted.map_err(|reply| anyhow::anyhow!("{}", explain_template_errcode(&reply)))
}

/// WeChat's answer to a template call, in words (docs/todays-wechat.md has the sources).
pub fn explain_template_errcode(reply: &ApiReply) -> String {
    let meaning = match reply.errcode {
        40037 => {
            "no such template: the short id is not in WeChat's library, or the account has no \
             template with this id"
        }
        40246 => {
            "the keywords are not this library template's: give one or more of its keyword \
             names exactly as the library spells them, in the order wanted"
        }
        40247 => {
            "this is an industry template id (TM…): WeChat now adds only category templates \
             (类目模板); pick one from the category library and give its short id"
        }
        45026 => "the account holds as many templates as WeChat allows (25): delete one first",
        48001 => "the account is not authorised for this call (a verified service account is)",
        _ => "",
    };
    let answer = format!(
        "WeChat answered errcode {}: {}",
        reply.errcode,
        crate::domain::text::loggable(&reply.errmsg)
    );
    if meaning.is_empty() {
        answer
    } else {
        format!("{answer} ({meaning})")
    }
}
