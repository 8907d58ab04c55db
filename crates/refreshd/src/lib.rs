//! Wiring of the refreshd roles: `run` is what the binary calls and what the
//! integration tests call, so both exercise the same code.

pub mod ingress;
pub mod rekey;
pub mod scheduler;
pub mod services;
pub mod settings;
pub mod telemetry;
pub mod worker;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use settings::{LoadOptions, Settings, SettingsError};

/// The roles of SPEC §7.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// HTTP API, dashboard and the upstream request consumer.
    Ingress,
    /// Runs admitted refreshes against the banks.
    Worker,
    /// Auto-sync, inactivation and history clean-up.
    Scheduler,
    /// The simulated bank (UK Open Banking AIS v3.1).
    BankSim,
    /// Applies the database migrations of the namespace, then exits.
    Migrate,
    /// Every role in one process, for local use.
    Dev,
    /// Re-encrypts every stored bank token with `crypto.key`, then exits.
    Rekey,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Worker => "worker",
            Self::Scheduler => "scheduler",
            Self::BankSim => "bank-sim",
            Self::Migrate => "migrate",
            Self::Dev => "dev",
            Self::Rekey => "rekey",
        }
    }

    /// Roles that verify bearer tokens.
    pub(crate) fn serves_api(self) -> bool {
        matches!(self, Self::Ingress | Self::Dev)
    }

    /// Roles that encrypt or decrypt bank access tokens.
    pub(crate) fn handles_tokens(self) -> bool {
        // The scheduler re-encrypts tokens sealed with a retired key.
        matches!(
            self,
            Self::Ingress | Self::Worker | Self::Scheduler | Self::Dev | Self::Rekey
        )
    }

    /// The environment whose file is layered when `REFRESHD_ENV` is unset.
    pub fn default_env(self) -> Option<&'static str> {
        (self == Self::Dev).then_some("dev")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the {0} role is not available in this build")]
    NotAvailable(&'static str),
    #[error("cannot bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] refresh_pg::PgError),
    #[error("{0} stopped with an error")]
    Role(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

impl RunError {
    /// The process exit code: 69 (EX_UNAVAILABLE) for a role this build lacks, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotAvailable(_) => 69,
            _ => 1,
        }
    }
}

/// Runs `role` until it finishes (`migrate`) or `shutdown` is cancelled.
pub async fn run(
    role: Role,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    match role {
        Role::Migrate => migrate(&settings).await,
        Role::BankSim => bank_sim(&settings, shutdown).await,
        Role::Ingress => ingress::run(&settings, shutdown).await,
        Role::Worker => worker::run(&settings, shutdown).await,
        Role::Dev => dev(&settings, shutdown).await,
        Role::Scheduler => scheduler::run(&settings, shutdown).await,
        Role::Rekey => rekey::run(&settings, &shutdown).await,
    }
}

/// Applies the migrations to the namespace's schema.
pub async fn migrate(settings: &Settings) -> Result<(), RunError> {
    let schema = refresh_pg::Schema::parse(&settings.namespace)?;
    let pool = refresh_pg::connect(&settings.database, &schema)?;
    refresh_pg::migrate(&pool, &schema).await?;
    tracing::info!(schema = schema.as_str(), "database schema is migrated");
    pool.close().await;
    Ok(())
}

/// A listener on `addr`, or [`RunError::Bind`] naming it.
pub(crate) async fn bind(addr: &str) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

async fn bank_sim(settings: &Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let addr = settings.bank_sim.bind.clone();
    let listener = bind(&addr).await?;
    tracing::info!(%addr, "bank simulator listening");
    refresh_banksim::serve(listener, settings.bank_sim.clone(), shutdown)
        .await
        .map_err(|e| RunError::Role("bank-sim", Box::new(e)))
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `bind` for a role without the API,
/// unless `bind` is empty.
pub(crate) async fn serve_ops(
    bind: &str,
    role: &'static str,
    registry: std::sync::Arc<refresh_ops::Registry>,
    readiness: refresh_ops::Readiness,
    shutdown: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<(), RunError> {
    if bind.is_empty() {
        return Ok(());
    }
    let listener = self::bind(bind).await?;
    let router = refresh_ops::router(registry, readiness);
    let stop = shutdown.child_token();
    tracker.spawn(async move {
        if let Err(error) = refresh_ops::serve(listener, router, stop).await {
            tracing::error!(error = %error, role, "the operations listener stopped");
        }
    });
    tracing::info!(addr = %bind, role, "serving /healthz, /readyz and /metrics");
    Ok(())
}

/// `refreshd dev`: the bank simulator, the ingress, a worker and a scheduler in one
/// process. The simulator stops last, so that refreshes in flight at Ctrl-C finish
/// against it rather than spending an attempt.
async fn dev(settings: &Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let sim_tracker = tokio_util::task::TaskTracker::new();
    let sim_addr = settings.bank_sim.bind.clone();
    let sim_listener = bind(&sim_addr).await?;
    let sim_settings = settings.bank_sim.clone();
    let sim_shutdown = CancellationToken::new();
    let sim_stop = sim_shutdown.clone();
    sim_tracker.spawn(async move {
        if let Err(error) = refresh_banksim::serve(sim_listener, sim_settings, sim_stop).await {
            tracing::error!(error = %error, "the bank simulator stopped");
        }
    });
    sim_tracker.close();
    let roles = dev_roles(settings, &shutdown).await;
    sim_shutdown.cancel();
    sim_tracker.wait().await;
    roles
}

/// The ingress, worker and scheduler of `refreshd dev`, until `shutdown` and their drain.
async fn dev_roles(settings: &Settings, shutdown: &CancellationToken) -> Result<(), RunError> {
    let tracker = tokio_util::task::TaskTracker::new();
    let services = services::Services::connect(settings, shutdown, &tracker).await?;
    let listener = bind(&settings.http.bind).await?;
    // One registry: every role's metrics are served with the ingress's at /metrics.
    let registry = std::sync::Arc::new(refresh_ops::Registry::new());
    worker::start(
        settings,
        &services,
        worker::config(settings),
        &registry,
        shutdown,
        &tracker,
    )?;
    let admission_metrics = refresh_admission::AdmissionMetrics::default();
    registry.register(|r| admission_metrics.register(r));
    scheduler::start(
        settings,
        &services,
        &registry,
        admission_metrics.clone(),
        shutdown,
        &tracker,
    );
    ingress::start(
        settings,
        &services,
        registry,
        admission_metrics,
        listener,
        shutdown,
        &tracker,
    )
    .await?;
    until_drained(&tracker, shutdown).await;
    Ok(())
}

/// Waits for `shutdown`, then for every task on `tracker` to finish its drain.
pub(crate) async fn until_drained(
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) {
    tracker.close();
    shutdown.cancelled().await;
    tracker.wait().await;
}

/// How long `run` may take to stop after `shutdown` is cancelled.
pub fn grace(settings: &Settings) -> Duration {
    Duration::from_secs(settings.shutdown.grace_secs)
}
