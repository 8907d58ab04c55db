//! The refreshd binary: parses the command line, loads and validates the settings
//! (exit 64 on bad configuration, before anything is bound), initialises logging and
//! runs the chosen role until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use refreshd::{LoadOptions, Role, Settings};
use tokio_util::sync::CancellationToken;

/// Keeps the stored bank data of open-banking consents fresh.
#[derive(Debug, Parser)]
#[command(name = "refreshd", version)]
struct Cli {
    /// The role to run.
    #[arg(value_enum)]
    role: Role,
    /// A configuration file layered over config/default.toml and config/{REFRESHD_ENV}.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::var("REFRESHD_ENV")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| cli.role.default_env().map(str::to_owned));
    let options = LoadOptions {
        env,
        config_dir: std::env::var_os("REFRESHD_CONFIG_DIR").map(PathBuf::from),
        config_file: cli.config.clone(),
        environment_variables: true,
        overrides: Vec::new(),
    };
    let settings = match Settings::load(&options).and_then(|s| s.validate(cli.role).map(|()| s)) {
        Ok(settings) => settings,
        Err(error) => {
            #[allow(
                clippy::print_stderr,
                reason = "logging is not set up before the settings are valid"
            )]
            {
                eprintln!("refreshd: bad configuration: {error}");
            }
            return ExitCode::from(64);
        }
    };
    refreshd::telemetry::init(settings.log.format, cli.role == Role::Dev);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let role = cli.role;
    let result = runtime.block_on(async move {
        let grace = refreshd::grace(&settings);
        let shutdown = CancellationToken::new();
        let run = refreshd::run(role, settings, shutdown.clone());
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => result,
            () = signal() => {
                tracing::info!(grace_secs = grace.as_secs(), "shutting down");
                shutdown.cancel();
                match tokio::time::timeout(grace, run).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("grace period over; exiting with work still running");
                        Ok(())
                    }
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(role = role.name(), error = %error, source = ?std::error::Error::source(&error), "refreshd stopped");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
