//! Thin entry point: parse the command line, start logging, hand over; errors become exit 1.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use wechat_outbox::cli::{Cli, Command};
use wechat_outbox::config::Config;
use wechat_outbox::{admin, app, demo, report, simulator, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; its logs would drown it.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    telemetry::init(default_level, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let config = Config::load(&args.config)?;
            let shutdown = CancellationToken::new();
            app::cancel_on_signal(shutdown.clone());
            // Taken before the start, so that a SIGHUP during it (migrations, the first
            // template sync) is kept for later instead of ending the process.
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let running = app::start(config, shutdown.clone()).await?;
            app::reload_on_sighup(
                hangup,
                args.config.clone(),
                running.limits.clone(),
                shutdown,
            );
            running.wait().await
        }
        Command::Migrate(args) => {
            let config = Config::load(&args.config)?;
            app::migrate(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::CheckConfig(args) => {
            let config = Config::load(&args.config)?;
            let accounts = config.accounts()?;
            config.dashboard_credentials()?;
            println!("configuration is valid");
            println!(
                "  database: {}",
                if config.is_postgres() {
                    "postgres"
                } else {
                    "sqlite"
                }
            );
            println!("  api: {}", config.api.base_url);
            for account in accounts {
                println!(
                    "  account {:?}: appid {}, {} sends/s",
                    account.name, account.appid, account.limits.rate_per_second
                );
            }
            Ok(())
        }
        Command::Simulate(args) => {
            let shutdown = CancellationToken::new();
            app::cancel_on_signal(shutdown.clone());
            let settings = simulator::SimSettings {
                faults: simulator::Faults {
                    busy_rate: args.busy_rate,
                    http_error_rate: args.http_error_rate,
                    hang_rate: args.hang_rate,
                    garbage_rate: args.garbage_rate,
                    delay_ms: args.delay_ms,
                    ..simulator::Faults::default()
                },
                strict_templates: args.strict_templates,
                daily_limit: args.daily_limit,
                per_user_interval: std::time::Duration::from_millis(args.per_user_interval_ms),
                duplicate_window: std::time::Duration::from_secs(args.duplicate_window_secs),
                callback: args.callback_url.map(|url| simulator::CallbackTarget {
                    url,
                    token: args.callback_token,
                    encoding_aes_key: args.callback_aes_key,
                }),
                ..simulator::SimSettings::default()
            };
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            println!(
                "WeChat simulator listening on http://{}",
                listener.local_addr()?
            );
            simulator::serve(listener, simulator::Simulator::new(settings), shutdown).await?;
            Ok(())
        }
        Command::Demo(args) => demo::run(args.dir).await,
        Command::Dashboard(args) => {
            wechat_outbox::dashboard::serve_alone(Config::load(&args.config)?).await
        }
        Command::Templates(args) => admin::templates(args.action).await,
        Command::Quota(args) => admin::quota(&Config::load(&args.config)?).await,
        Command::Prune(args) => {
            let config = Config::load(&args.config)?;
            let store = wechat_outbox::store::Store::connect(&config.store_settings()).await?;
            store.migrate().await?;
            let now = chrono::Utc::now();
            let (rows, pushes) =
                wechat_outbox::retention::prune_due(&store, &config.retention, now).await?;
            println!(
                "deleted {rows} rows and {pushes} pushes older than {} days",
                config.retention.keep_days
            );
            Ok(())
        }
        Command::Report(args) => {
            let config = Config::load(&args.config.config)?;
            let store = wechat_outbox::store::Store::connect(&config.store_settings()).await?;
            store.migrate().await?;
            let report = report::read(&store, &args.name).await?;
            print!("{}", report::render(&report, args.format));
            Ok(())
        }
    }
}
