//! The operator's commands that read or change limits: `templates …` and `quota`.

use anyhow::{Result, bail};

use crate::cli::{TemplateAdd, TemplateChoice, TemplatesAction};
use crate::config::Config;
use crate::domain::clock::Clock;
use crate::domain::content_rules::{ContentRules, IGNORED_PARAMETERS};
use crate::domain::quota::{ACCOUNT_SCOPE, periods};
use crate::domain::template::parameters;
use crate::domain::text::{loggable, loggable_within};
use crate::store::{Store, TemplateUse};
use crate::templates;
use crate::wechat::api::WechatApi;
use crate::wechat::token::TokenManager;

pub async fn templates(action: TemplatesAction) -> Result<()> {
    match action {
        TemplatesAction::List(args) => {
            let (config, store) = open(&Config::load(&args.config)?).await?;
            println!(
                "{:<12} {:<46} {:<22} {:<7} {:<24} {:<40} note",
                "account", "template_id", "kind", "in use", "title", "parameters"
            );
            for t in store.list_templates().await? {
                let in_use = if t.in_use { "yes" } else { "no" };
                let shown = parameters_shown(t.content.as_deref(), config.templates.content_rules);
                // The table holds WeChat's text, which SQL can change: escaped for the terminal.
                println!(
                    "{:<12} {:<46} {:<22} {:<7} {:<24} {:<40} {}",
                    loggable(&t.account),
                    loggable(&t.template_id),
                    t.kind,
                    in_use,
                    loggable(&t.title.unwrap_or_default()),
                    loggable_within(&shown, LIST_CELL_CHARS),
                    loggable_within(&t.note.unwrap_or_default(), LIST_CELL_CHARS)
                );
            }
        }
        TemplatesAction::Add(args) => add_template(args).await?,
        TemplatesAction::Delete(choice) => delete_template(choice).await?,
        TemplatesAction::Activate(choice) => {
            let (config, store) = open(&Config::load(&choice.config.config)?).await?;
            let limit = account_limits(&config, &choice.account)?.active_templates;
            let now = Clock::default().now();
            match store
                .take_template_into_use(&choice.account, &choice.template_id, limit, now)
                .await?
            {
                TemplateUse::InUse => {
                    println!("{} is in use for {}", choice.template_id, choice.account)
                }
                TemplateUse::NoRoom { in_use } => {
                    bail!(
                        "{} already uses {in_use} of its {limit} templates: deactivate one first",
                        choice.account
                    )
                }
            }
        }
        TemplatesAction::Deactivate(choice) => {
            let (config, store) = open(&Config::load(&choice.config.config)?).await?;
            account_limits(&config, &choice.account)?;
            let now = Clock::default().now();
            let was = store
                .retire_template(
                    &choice.account,
                    &choice.template_id,
                    "deactivated by an operator",
                    now,
                )
                .await?;
            println!(
                "{} is {}out of use for {}",
                choice.template_id,
                if was { "now " } else { "already " },
                choice.account
            );
        }
        TemplatesAction::Sync(args) => {
            let config = Config::load(&args.config)?;
            let (config, store) = open(&config).await?;
            let accounts = config.accounts()?;
            let (api, tokens) = wechat(&config, &store)?;
            for account in &accounts {
                let n = templates::sync_account(
                    &store,
                    &api,
                    &tokens,
                    &account.name,
                    &Clock::default(),
                )
                .await?;
                println!("{}: {n} templates listed by WeChat", account.name);
                if config.subscribe.sync_templates {
                    let listed = templates::sync_subscribe_account(
                        &store,
                        &api,
                        &tokens,
                        &account.name,
                        &Clock::default(),
                    )
                    .await?;
                    match listed {
                        Ok(n) => println!(
                            "{}: {n} subscription templates listed by WeChat",
                            account.name
                        ),
                        Err(reply) => println!(
                            "{}: no subscription templates (WeChat answered errcode {}: {})",
                            account.name,
                            reply.errcode,
                            loggable(&reply.errmsg)
                        ),
                    }
                }
            }
        }
    }
    Ok(())
}

pub async fn quota(config: &Config) -> Result<()> {
    let (config, store) = open(config).await?;
    let p = periods(Clock::default().now(), config.timezone()?);
    let usage = store.quota_usage(&p.month, &p.day).await?;
    let wechat = store.wechat_quota().await?;
    println!(
        "periods: month {} and day {} ({})",
        p.month, p.day, config.limits.timezone
    );
    println!(
        "{:<12} {:<46} {:<8} {:>8} {:>8} {:>10}",
        "account", "scope", "period", "used", "limit", "remaining"
    );
    for account in config.accounts()? {
        let rows: Vec<_> = usage.iter().filter(|(a, ..)| *a == account.name).collect();
        let day_used = rows
            .iter()
            .find(|(_, s, period, _)| s == ACCOUNT_SCOPE && *period == p.day)
            .map_or(0, |r| r.3);
        let limits = account.limits;
        let reading = wechat.iter().find(|r| r.account == account.name);
        let line = |scope: &str, period: &str, used: i64, limit: i64| {
            let remaining = (limit - used).max(0);
            println!(
                "{:<12} {scope:<46} {period:<8} {used:>8} {limit:>8} {remaining:>10}",
                account.name
            );
        };
        // A cap that follows WeChat is what WeChat last said, as the daemon reads it.
        let wechat_daily = reading.map_or(0, |r| u64::try_from(r.daily_limit).unwrap_or(0));
        let day_limit = limits.with_wechat_daily(wechat_daily).daily_per_account;
        line("account (today)", &p.day, day_used, day_limit.into());
        if let Some(r) = reading {
            let read_at = r.read_at.with_timezone(&config.timezone()?);
            line(
                &format!(
                    "WeChat's own count (read {}; ours then {})",
                    read_at.format("%m-%d %H:%M"),
                    r.own_used
                ),
                &read_at.format("%Y-%m-%d").to_string(),
                r.used,
                r.daily_limit,
            );
        }
        for (_, scope, period, used) in rows
            .iter()
            .filter(|(_, s, period, _)| s != ACCOUNT_SCOPE && *period == p.month)
        {
            line(scope, period, *used, limits.monthly_per_template.into());
        }
    }
    Ok(())
}

/// `templates add`: the template is added at WeChat, its content synced, and taken into use
/// unless asked not to. The templates-in-use limit is checked before WeChat is asked, so
/// that no template is added that could not be used.
async fn add_template(args: TemplateAdd) -> Result<()> {
    let (config, store) = open(&Config::load(&args.config.config)?).await?;
    let limit = account_limits(&config, &args.account)?.active_templates;
    let keywords: Vec<String> = args
        .keywords
        .split([',', '，'])
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect();
    if keywords.is_empty() {
        bail!("--keywords names none: give the library template's keywords, comma-separated");
    }
    if !args.out_of_use {
        let in_use = store
            .list_templates()
            .await?
            .iter()
            .filter(|t| t.account == args.account && t.in_use && t.kind == "template")
            .count();
        if in_use >= limit as usize {
            bail!(
                "{} already uses {in_use} of its {limit} templates: deactivate or delete one \
                 first, or add it with --out-of-use",
                args.account
            );
        }
    }
    let (api, tokens) = wechat(&config, &store)?;
    let template_id =
        templates::add_template(&api, &tokens, &args.account, &args.short_id, &keywords).await?;
    println!("{}", loggable(&template_id));
    let clock = Clock::default();
    templates::sync_account(&store, &api, &tokens, &args.account, &clock).await?;
    if args.out_of_use {
        eprintln!("added to {} out of use", args.account);
        return Ok(());
    }
    match store
        .take_template_into_use(&args.account, &template_id, limit, clock.now())
        .await?
    {
        TemplateUse::InUse => eprintln!("added to {} and in use", args.account),
        TemplateUse::NoRoom { in_use } => eprintln!(
            "added to {}, but not in use: another template took the last place ({in_use} of \
             {limit} in use)",
            args.account
        ),
    }
    Ok(())
}

/// `templates delete`: deleted at WeChat, then out of use here (rows held for room go on).
async fn delete_template(choice: TemplateChoice) -> Result<()> {
    let (config, store) = open(&Config::load(&choice.config.config)?).await?;
    account_limits(&config, &choice.account)?;
    let (api, tokens) = wechat(&config, &store)?;
    templates::delete_template(&api, &tokens, &choice.account, &choice.template_id).await?;
    let now = Clock::default().now();
    store
        .retire_template(
            &choice.account,
            &choice.template_id,
            "deleted at WeChat by an operator",
            now,
        )
        .await?;
    // Left waiting, they would take the template into use again and fail one by one on 40037.
    let failed = store
        .fail_waiting_rows_of_template(&choice.account, &choice.template_id, now)
        .await?;
    println!(
        "{} deleted at WeChat and out of use for {}; {failed} rows waiting for it failed",
        choice.template_id, choice.account
    );
    Ok(())
}

/// The API and a token manager for a command of the operator's.
fn wechat(config: &Config, store: &Store) -> Result<(WechatApi, TokenManager)> {
    let api = WechatApi::new(
        &config.api.base_url,
        std::time::Duration::from_millis(config.api.timeout_ms),
    )?;
    let tokens = TokenManager::new(
        store.clone(),
        api.clone(),
        config.api.token_endpoint,
        format!("cli-{}", std::process::id()),
        &config.accounts()?,
        Default::default(),
    );
    Ok((api, tokens))
}

async fn open(config: &Config) -> Result<(Config, Store)> {
    let store = Store::connect(&config.store_settings()).await?;
    store.migrate().await?;
    Ok((config.clone(), store))
}

fn account_limits(config: &Config, name: &str) -> Result<crate::config::Limits> {
    match config.accounts()?.into_iter().find(|a| a.name == name) {
        Some(account) => Ok(account.limits),
        None => bail!("account {name:?} is not configured"),
    }
}

/// The most of a parameter list or a note that `templates list` prints.
const LIST_CELL_CHARS: usize = 400;

/// A template's parameters as `templates list` shows them: those WeChat no longer shows under
/// the 2023 rules marked so; `?` when the content is not known (not in WeChat's list yet).
fn parameters_shown(content: Option<&str>, rules: ContentRules) -> String {
    let Some(content) = content else {
        return "?".into();
    };
    parameters(content)
        .into_iter()
        .map(|name| {
            if rules == ContentRules::Rules2023 && IGNORED_PARAMETERS.contains(&name.as_str()) {
                format!("{name} (not shown)")
            } else {
                name
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
