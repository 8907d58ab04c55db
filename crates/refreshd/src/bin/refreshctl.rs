//! refreshctl, the operator's command line: mint a dev token, publish an upstream
//! refresh request, and tail the status events of a namespace.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{TimeDelta, Utc};
use clap::{Parser, Subcommand};
use refresh_core::TenantId;
use refreshd::{LoadOptions, Role, Settings};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Operate a refreshd deployment.
#[derive(Debug, Parser)]
#[command(name = "refreshctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// A configuration file, as for refreshd.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an HS256 bearer token signed with auth.jwt_hs256_secret.
    Token {
        /// The tenant (`tenant_id` claim); omit for an operator token with --admin.
        #[arg(long)]
        tenant: Option<String>,
        /// Grant `api:admin` instead of `api:stored_data`.
        #[arg(long)]
        admin: bool,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 24)]
        hours: i64,
    },
    /// Publish an upstream refresh request (as an app service would) and print the decision.
    Request {
        #[arg(long)]
        consent: String,
        #[arg(long)]
        tenant: String,
    },
    /// Print status events as they are published (routing key pattern, default `refresh.#`).
    Events {
        #[arg(default_value = "refresh.#")]
        pattern: String,
    },
}

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line prints its results"
)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = LoadOptions {
        env: std::env::var("REFRESHD_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .or_else(|| Some("dev".to_owned())),
        config_dir: std::env::var_os("REFRESHD_CONFIG_DIR").map(PathBuf::from),
        config_file: cli.config.clone(),
        environment_variables: true,
        overrides: Vec::new(),
    };
    let settings =
        match Settings::load(&options).and_then(|s| s.validate(Role::Migrate).map(|()| s)) {
            Ok(settings) => settings,
            Err(error) => {
                eprintln!("refreshctl: bad configuration: {error}");
                return ExitCode::from(64);
            }
        };
    let outcome = match cli.command {
        Command::Token {
            tenant,
            admin,
            hours,
        } => token(&settings, tenant.as_deref(), admin, hours),
        Command::Request { consent, tenant } => runtime(request(&settings, &consent, &tenant)),
        Command::Events { pattern } => runtime(events(&settings, &pattern)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("refreshctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(work: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(work)
}

#[allow(clippy::print_stdout, reason = "the token is the command's output")]
fn token(settings: &Settings, tenant: Option<&str>, admin: bool, hours: i64) -> Result<(), String> {
    let secret = settings
        .auth
        .jwt_hs256_secret
        .as_ref()
        .ok_or("auth.jwt_hs256_secret is not set")?;
    let tenant = tenant
        .map(TenantId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    if tenant.is_none() && !admin {
        return Err("a tenant token needs --tenant (or use --admin)".to_owned());
    }
    let scope = if admin {
        refresh_ingress::SCOPE_ADMIN
    } else {
        refresh_ingress::SCOPE_STORED_DATA
    };
    let token = refresh_ingress::mint_hs256(
        secret,
        tenant.as_ref(),
        scope,
        Utc::now() + TimeDelta::hours(hours),
    )
    .map_err(|e| e.to_string())?;
    println!("{token}");
    Ok(())
}

async fn broker(
    settings: &Settings,
) -> Result<(refresh_amqp::Broker, CancellationToken, TaskTracker), String> {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let broker = refresh_amqp::Broker::start(
        &settings.amqp,
        &settings.namespace,
        shutdown.clone(),
        &tracker,
    )
    .await
    .map_err(|e| refresh_ingress::error_chain(&e))?;
    Ok((broker, shutdown, tracker))
}

#[allow(clippy::print_stdout, reason = "the decision is the command's output")]
async fn request(settings: &Settings, consent: &str, tenant: &str) -> Result<(), String> {
    let (broker, shutdown, _tracker) = broker(settings).await?;
    let reply_queue = broker
        .declare_reply_queue()
        .await
        .map_err(|e| e.to_string())?;
    let mut replies = broker.consume(&reply_queue, 1);
    let body =
        serde_json::json!({ "consentId": consent, "tenantId": tenant, "requestedBy": "APP" })
            .to_string();
    let id = uuid::Uuid::new_v4().to_string();
    broker
        .publish_request(body.as_bytes(), Some(&id), Some(&reply_queue), Some(&id))
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(std::time::Duration::from_secs(30), replies.next())
        .await
        .map_err(|_| "no decision within 30 s (is the ingress running?)".to_owned())?
        .ok_or("the broker connection closed")?;
    println!("{}", String::from_utf8_lossy(&reply.body));
    let _ = reply.settle(refresh_core::Outcome::Ack).await;
    shutdown.cancel();
    Ok(())
}

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "events are the command's output"
)]
async fn events(settings: &Settings, pattern: &str) -> Result<(), String> {
    let (broker, shutdown, _tracker) = broker(settings).await?;
    let queue = broker
        .declare_probe_queue(pattern)
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = broker.consume(&queue, 16);
    eprintln!(
        "refreshctl: tailing {pattern} on {}.events (Ctrl-C to stop)",
        settings.namespace
    );
    loop {
        let delivery = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else { break };
        println!("{}", String::from_utf8_lossy(&delivery.body));
        let _ = delivery.settle(refresh_core::Outcome::Ack).await;
    }
    shutdown.cancel();
    Ok(())
}
