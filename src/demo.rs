//! `wechat-outbox demo`: the whole path on the embedded default, with nothing to set up.
//! Starts the simulator and the daemon on a new SQLite file, inserts rows with plain SQL from a
//! separate connection (as an app would), waits for each to reach its final status, shows them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::simulator::subscribe::ConsentAnswer;
use crate::simulator::{self, CallbackTarget, SimSettings, Simulator};

const CALLBACK_TOKEN: &str = "demo-callback-token";

/// What the demo inserts: each row shows one behaviour.
const ROWS: &str = r##"
INSERT INTO outbox (touser, template_id, data) VALUES
  ('oDemoUser0001', 'ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY',
   '{"first":{"value":"您好，您已成功消费。"},"keynote1":"巧克力","keynote2":"39.8元","keynote3":"2014年9月16日","remark":{"value":"欢迎再次购买。","color":"#173177"}}');
INSERT INTO outbox (touser, template_id, data) VALUES
  ('o_block_Demo08', 'TEMPLATE_ID', '{"first":"this user blocks the account"}');
INSERT INTO outbox (touser, template_id, data, priority, client_msg_id) VALUES
  ('oDemoUser0002', 'TEMPLATE_ID', '{"first":"urgent first"}', 10, 'order-1001-paid');
INSERT INTO outbox (touser, template_id, data, send_after) VALUES
  ('oDemoUser0003', 'TEMPLATE_ID', '{"first":"sent a second later"}', datetime('now', '+1 second'));
INSERT INTO outbox (touser, template_id, data) VALUES
  ('oDemoUser0004', 'TEMPLATE_ID', '{"first": broken json');
INSERT INTO outbox (touser, template_id, data) VALUES
  ('not-an-openid', 'TEMPLATE_ID', '{"first":"WeChat refuses this openid"}');
INSERT INTO outbox (account, touser, template_id, data) VALUES
  ('no-such-account', 'oDemoUser0005', 'TEMPLATE_ID', '{"first":"x"}');
INSERT INTO outbox (touser, template_id, data, send_after) VALUES
  ('oDemoUser0006', 'TEMPLATE_ID', '{"first":"cancelled before it was due"}', datetime('now', '+1 hour'));
UPDATE outbox SET status = 'cancelled' WHERE touser = 'oDemoUser0006' AND status = 'pending';
INSERT INTO outbox (touser, template_id, data, expires_at) VALUES
  ('oDemoUser0007', 'TEMPLATE_ID', '{"first":"too late"}', datetime('now', '-1 minute'));
INSERT INTO outbox (touser, template_id, data) VALUES
  ('oDemoUser0008', 'ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY',
   '{"first":"您好，您的订单已发货。","keynote1":"比利时手工黑巧克力礼盒（72%可可，十二枚装，附赠贺卡）","keynote2":"398元","keynote3":"2026年12月3日","remark":"WeChat no longer shows first and remark"}');
INSERT INTO outbox (touser, template_id, data) VALUES
  ('o_refuse_Demo9', 'TEMPLATE_ID', '{"first":"this user refused the template (43101)"}');
INSERT INTO outbox (touser, template_id, data, send_after) VALUES
  ('o_refuse_Demo9', 'TEMPLATE_ID', '{"first":"not sent: the refusal is remembered"}', datetime('now', '+2 seconds'));
INSERT INTO outbox (kind, touser, template_id, data, page) VALUES
  ('subscribe', 'oDemoUser0010', 'SUB_ORDER_SHIPPED',
   '{"character_string1":"SO-2026-1203","phrase2":"已发货","time3":"2026年12月3日 15:01"}',
   'https://example.com/orders/SO-2026-1203');
"##;

/// The demo's subscription notification: held until this user accepts the popup.
const SUBSCRIBER: &str = "oDemoUser0010";
const DEMO_APPID: &str = "wxdemo0000000001";

/// The demo row whose keyword value is longer than WeChat shows since 2023.
const LONG_VALUE_USER: &str = "oDemoUser0008";

pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let temp = tempfile_dir()?;
    let dir = dir.unwrap_or_else(|| temp.clone());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = dir.join("demo.db");
    let _ = std::fs::remove_file(&db);

    let shutdown = CancellationToken::new();
    let sim = Simulator::new(SimSettings::default());
    let sim_addr = simulator::spawn("127.0.0.1:0".parse()?, sim.clone(), shutdown.clone()).await?;

    let config = Config::from_toml(&format!(
        r#"
        database_url = "sqlite://{}"
        [api]
        base_url = "http://{sim_addr}"
        [workers]
        poll_interval_ms = 200
        [callback]
        listen = "127.0.0.1:0"
        [monitor]
        listen = "127.0.0.1:0"
        [dashboard]
        enabled = false
        [[accounts]]
        name = "default"
        appid = "{DEMO_APPID}"
        secret = "demo-secret"
        token = "{CALLBACK_TOKEN}"
        "#,
        db.display()
    ))?;
    let running = crate::app::start(config, shutdown.clone()).await?;
    let callback = running
        .callback_addr
        .context("the callback endpoint did not start")?;
    // The simulator pushes each delivery event back to the daemon, as WeChat would.
    sim.set_callback(Some(CallbackTarget {
        url: format!("http://{callback}/wechat/default"),
        token: CALLBACK_TOKEN.into(),
        encoding_aes_key: None,
    }));
    println!("simulator:         http://{sim_addr}");
    println!("callback endpoint: http://{callback}/wechat/default");
    println!("database:          {}", db.display());

    // An app's own connection, as from sqlite3 or any driver.
    let mut app = SqliteConnectOptions::new().filename(&db).connect().await?;
    sqlx::raw_sql(ROWS)
        .execute(&mut app)
        .await
        .context("inserting the demo rows")?;
    println!(
        "\ninserted 13 rows with plain SQL (one a subscription notification, kind = 'subscribe')"
    );
    // The subscription notification waits for its user's consent: the user accepts the
    // popup, WeChat pushes subscribe_msg_popup_event, and the daemon sends it.
    sim.subscribe_popup(&ConsentAnswer {
        appid: DEMO_APPID.into(),
        openid: SUBSCRIBER.into(),
        template_ids: vec!["SUB_ORDER_SHIPPED".into()],
        accept: true,
    })
    .await;
    println!(
        "{SUBSCRIBER} accepted the subscription popup; waiting for each row's final status…\n"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // `sent` is not final here: WeChat's delivery event follows within moments.
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'sending', 'sent')
                OR (status = 'held' AND held_for = 'consent')",
        )
        .fetch_one(&mut app)
        .await?;
        if open == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{open} rows still open after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    type Shown = (i64, String, String, Option<i64>, Option<String>);
    let rows: Vec<Shown> = sqlx::query_as(
        "SELECT id, touser, status, msgid, COALESCE(last_error, 'delivery event: ' || delivery_status)
         FROM outbox ORDER BY id",
    )
    .fetch_all(&mut app)
    .await?;
    println!(
        "{:>3}  {:<14} {:<11} {:<11} why",
        "id", "touser", "status", "msgid"
    );
    for (id, touser, status, msgid, why) in rows {
        let msgid = msgid.map(|m| m.to_string()).unwrap_or_default();
        println!(
            "{id:>3}  {touser:<14} {status:<11} {msgid:<11} {}",
            why.unwrap_or_default()
        );
    }
    if let Some(sent) = sim
        .deliveries()
        .iter()
        .find(|d| d.touser == LONG_VALUE_USER)
    {
        println!(
            "\n{LONG_VALUE_USER}'s keynote1 went out as WeChat shows it since 2023 (20 characters): {}",
            sent.data["keynote1"]["value"].as_str().unwrap_or_default()
        );
    }
    let stats = sim.stats();
    println!(
        "\nsimulator: {} delivered, {} delivered twice, {} token(s) issued, {} delivery events acknowledged",
        stats.delivered, stats.duplicate_deliveries, stats.tokens_issued, stats.events_acknowledged
    );
    app.close().await?;
    shutdown.cancel();
    running.wait().await?;
    if temp.exists() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wechat-outbox-demo-{}", std::process::id()));
    Ok(dir)
}
