//! The worker role: the connected services plus one bank connector per configured
//! provider, handed to `refresh_worker::run`.

use std::collections::BTreeMap;
use std::time::Duration;

use refresh_bank::ConnectorSettings;
use refresh_ops::Registry;
use refresh_worker::{Provider, WorkerConfig, WorkerDeps, WorkerMetrics};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::services::Services;
use crate::{RunError, Settings};

/// One connector per `providers.{id}`; the provider id doubles as the
/// `x-fapi-financial-id` the bank is called with.
pub fn providers(settings: &Settings) -> Result<BTreeMap<String, Provider>, RunError> {
    let mut out = BTreeMap::new();
    for (id, provider) in &settings.providers {
        let timeout = Duration::from_secs(provider.timeout_secs);
        let connector = refresh_bank::build_connector(
            provider.kind,
            ConnectorSettings {
                request_timeout: timeout,
                ..ConnectorSettings::default()
            },
        )
        .map_err(|e| RunError::Role("worker", Box::new(e)))?;
        out.insert(
            id.clone(),
            Provider {
                connector,
                base_url: provider.base_url.clone(),
                financial_id: id.clone(),
            },
        );
    }
    Ok(out)
}

/// The worker's configuration from the settings, with the built-in defaults for the rest.
pub fn config(settings: &Settings) -> WorkerConfig {
    let grace = Duration::from_secs(settings.shutdown.grace_secs);
    let mut config = WorkerConfig::new(
        settings.worker.concurrency,
        settings.worker.max_attempts,
        settings.worker.prefetch,
        Duration::from_secs(settings.lock.lease_secs),
        settings.stagger.scope,
        // Leave a little of the grace to settle and close connections.
        grace
            .saturating_sub(Duration::from_secs(2))
            .max(Duration::from_secs(1)),
    );
    config.window = refresh_core::WindowRules::from_days(
        settings.worker.overlap_days,
        settings.worker.history_days,
    );
    config
}

/// Starts the worker on `tracker` with `config`; it stops when `shutdown` is cancelled.
pub fn start(
    settings: &Settings,
    services: &Services,
    config: WorkerConfig,
    registry: &Registry,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), RunError> {
    let worker_metrics = WorkerMetrics::default();
    registry.register(|r| worker_metrics.register(r));
    let deps = WorkerDeps {
        store: services.store.clone(),
        gate: services.gate.clone(),
        broker: services.broker.clone(),
        providers: providers(settings)?,
        metrics: worker_metrics,
    };
    tracker.spawn(refresh_worker::run(deps, config, shutdown.child_token()));
    Ok(())
}

/// `refreshd worker`.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let services = Services::connect(settings, &shutdown, &tracker).await?;
    let registry = std::sync::Arc::new(Registry::new());
    start(
        settings,
        &services,
        config(settings),
        &registry,
        &shutdown,
        &tracker,
    )?;
    crate::serve_ops(
        &settings.worker.metrics_bind,
        "worker",
        registry,
        services.readiness(),
        &shutdown,
        &tracker,
    )
    .await?;
    crate::until_drained(&tracker, &shutdown).await;
    Ok(())
}
