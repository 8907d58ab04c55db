//! refreshctl, the operator's command line (SPEC §7): consents, refreshes and
//! history over the HTTP API; upstream requests, events and dead letters over
//! RabbitMQ; dev tokens from the configuration.
//!
//! Exit codes scripts can rely on: 0 done, 1 refused or failed, 2 usage, 64 bad
//! configuration, 69 a service unreachable.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line prints its results"
)]

mod api;
mod import;
mod output;
mod queue;

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{TimeDelta, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use refresh_core::{ConsentId, RefreshId, TenantId};
use refreshd::{LoadOptions, Role, Settings};

/// Operate a refreshd deployment.
#[derive(Debug, Parser)]
#[command(name = "refreshctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// A configuration file, as for refreshd (for `token`, `request`, `events`, `dlq`).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    http: HttpArgs,
}

#[derive(Debug, Clone, Args)]
struct HttpArgs {
    /// The ingress's HTTP API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token for the HTTP API.
    #[arg(long, global = true, env = "REFRESHCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an HS256 bearer token signed with auth.jwt_hs256_secret (development).
    Token {
        /// The tenant (`tenant_id` claim); omit for an operator token with --admin.
        #[arg(long)]
        tenant: Option<String>,
        /// Grant `api:admin` instead of `api:stored_data`.
        #[arg(long)]
        admin: bool,
        /// Lifetime in hours (1 to 8760).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(i64).range(1..=8760))]
        hours: i64,
    },
    /// Register, import and list consents.
    Consents {
        #[command(subcommand)]
        command: ConsentsCommand,
    },
    /// One consent with its quota and last refresh.
    Consent {
        #[arg(value_parser = parse_consent)]
        id: ConsentId,
    },
    /// Request a refresh of a consent (as the API, `requestedBy` API).
    Refresh {
        #[arg(value_parser = parse_consent)]
        id: ConsentId,
        /// Follow the refresh to its terminal status with a live status line.
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// One refresh record.
    Refreshes {
        #[arg(value_parser = parse_refresh)]
        id: RefreshId,
    },
    /// A consent's refresh history (the last `history.retention_days`).
    History {
        #[arg(value_parser = parse_consent)]
        id: ConsentId,
    },
    /// Publish an upstream refresh request (as an app service would) and print the decision.
    Request {
        #[arg(long, value_parser = parse_consent)]
        consent: ConsentId,
        #[arg(long, value_parser = parse_tenant)]
        tenant: TenantId,
    },
    /// Print status events as they are published (routing key pattern, default `refresh.#`).
    Events {
        #[arg(default_value = "refresh.#")]
        pattern: String,
    },
    /// Dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConsentsCommand {
    /// Register one consent (`POST /v1/consents`); its initial load starts.
    Register {
        #[arg(long)]
        provider: String,
        #[arg(long)]
        bank_consent_id: String,
        #[arg(long, env = "REFRESHCTL_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        /// RFC 3339, e.g. 2027-01-31T00:00:00Z.
        #[arg(long)]
        expires_at: String,
        /// Choose the consent id (a UUID); by default the server picks one.
        #[arg(long, value_parser = parse_consent)]
        consent_id: Option<ConsentId>,
    },
    /// Register many consents from a CSV file (header row: providerId, bankConsentId,
    /// accessToken, expiresAt, optional consentId) or JSON lines (one object a line).
    Import {
        file: PathBuf,
        /// File format; by default from the extension (`.csv`, else JSON lines).
        #[arg(long, value_enum)]
        format: Option<import::Format>,
        /// Registrations in flight at once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: u16,
    },
    /// The caller's consents, newest first (`GET /v1/consents`).
    List {
        #[arg(long)]
        status: Option<String>,
        /// Another tenant's consents (with an `api:admin` token).
        #[arg(long, value_parser = parse_tenant)]
        tenant: Option<TenantId>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start at this page (the `nextCursor` of the previous one).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow `nextCursor` to the last page.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead-lettered messages with their reason, count and first-seen time.
    List {
        #[arg(long, value_enum, default_value_t = DlqQueue::Jobs)]
        queue: DlqQueue,
        /// Most messages listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead-lettered messages back on their queue, each once.
    Replay {
        #[arg(long, value_enum, default_value_t = DlqQueue::Jobs)]
        queue: DlqQueue,
        /// Only the messages with these message ids (all of them without --id).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DlqQueue {
    Jobs,
    Requests,
}

impl From<DlqQueue> for refresh_amqp::DeadQueue {
    fn from(queue: DlqQueue) -> Self {
        match queue {
            DlqQueue::Jobs => Self::Jobs,
            DlqQueue::Requests => Self::Requests,
        }
    }
}

fn parse_consent(raw: &str) -> Result<ConsentId, String> {
    raw.parse::<uuid::Uuid>()
        .map(ConsentId::from_uuid)
        .map_err(|_| format!("{raw:?} is not a consent id (a UUID)"))
}

fn parse_refresh(raw: &str) -> Result<RefreshId, String> {
    raw.parse::<uuid::Uuid>()
        .map(RefreshId::from_uuid)
        .map_err(|_| format!("{raw:?} is not a refresh id (a UUID)"))
}

fn parse_tenant(raw: &str) -> Result<TenantId, String> {
    TenantId::parse(raw).map_err(|e| e.to_string())
}

/// Why a command did not succeed, and the exit code that says so.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The service answered no, or the work failed (exit 1).
    Refused(String),
    /// The command cannot run as given (exit 2).
    Usage(String),
    /// The configuration does not load (exit 64).
    Config(String),
    /// A service did not answer (exit 69).
    Unreachable(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Usage(_) => 2,
            Self::Config(_) => 64,
            Self::Unreachable(_) => 69,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Refused(m) | Self::Usage(m) | Self::Config(m) | Self::Unreachable(m) => m,
        }
    }
}

pub(crate) type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("refreshctl: {}", failure.message());
            ExitCode::from(failure.code())
        }
    }
}

fn run(cli: Cli) -> Outcome {
    let json = cli.json;
    let api = || api::Api::new(&cli.http);
    match cli.command {
        Command::Token {
            tenant,
            admin,
            hours,
        } => token(&settings(cli.config)?, tenant.as_deref(), admin, hours),
        Command::Request { consent, tenant } => {
            let settings = settings(cli.config)?;
            runtime(queue::request(&settings, consent, &tenant, json))
        }
        Command::Events { pattern } => {
            let settings = settings(cli.config)?;
            runtime(queue::events(&settings, &pattern, json))
        }
        Command::Dlq { command } => {
            let settings = settings(cli.config)?;
            match command {
                DlqCommand::List { queue, limit } => {
                    runtime(queue::dlq_list(&settings, queue.into(), limit, json))
                }
                DlqCommand::Replay { queue, ids } => {
                    runtime(queue::dlq_replay(&settings, queue.into(), &ids, json))
                }
            }
        }
        Command::Consents { command } => match command {
            ConsentsCommand::Register {
                provider,
                bank_consent_id,
                access_token,
                expires_at,
                consent_id,
            } => {
                let line = import::Line {
                    consent_id: consent_id.map(|c| c.to_string()),
                    provider_id: provider,
                    bank_consent_id,
                    access_token,
                    expires_at,
                };
                let body = line.validate().map_err(Failure::Usage)?;
                runtime(api::register(api()?, body, json))
            }
            ConsentsCommand::Import {
                file,
                format,
                concurrency,
            } => runtime(import::run(api()?, &file, format, concurrency.into(), json)),
            ConsentsCommand::List {
                status,
                tenant,
                limit,
                cursor,
                all,
            } => {
                let query = api::ListQuery {
                    status,
                    tenant,
                    limit,
                    cursor,
                    all,
                };
                runtime(api::list(api()?, query, json))
            }
        },
        Command::Consent { id } => runtime(api::consent(api()?, id, json)),
        Command::Refresh { id, wait, timeout } => {
            runtime(api::refresh(api()?, id, wait.then_some(timeout), json))
        }
        Command::Refreshes { id } => runtime(api::refresh_record(api()?, id, json)),
        Command::History { id } => runtime(api::history(api()?, id, json)),
    }
}

/// The layered settings, as refreshd loads them (`REFRESHD_ENV` defaults to `dev`).
fn settings(config_file: Option<PathBuf>) -> Result<Settings, Failure> {
    let options = LoadOptions {
        env: std::env::var("REFRESHD_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .or_else(|| Some("dev".to_owned())),
        config_dir: std::env::var_os("REFRESHD_CONFIG_DIR").map(PathBuf::from),
        config_file,
        environment_variables: true,
        overrides: Vec::new(),
    };
    Settings::load(&options)
        .and_then(|s| s.validate(Role::Migrate).map(|()| s))
        .map_err(|error| Failure::Config(format!("bad configuration: {error}")))
}

fn runtime(work: impl Future<Output = Outcome>) -> Outcome {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Refused(format!("cannot start the runtime: {e}")))?
        .block_on(work)
}

fn token(settings: &Settings, tenant: Option<&str>, admin: bool, hours: i64) -> Outcome {
    let secret = settings.auth.jwt_hs256_secret.as_ref().ok_or_else(|| {
        Failure::Config("auth.jwt_hs256_secret is not set: no token can be minted".to_owned())
    })?;
    let tenant = tenant
        .map(TenantId::parse)
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if tenant.is_none() && !admin {
        return Err(Failure::Usage(
            "a tenant token needs --tenant (or use --admin)".to_owned(),
        ));
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
    .map_err(|e| Failure::Refused(e.to_string()))?;
    println!("{token}");
    Ok(())
}
