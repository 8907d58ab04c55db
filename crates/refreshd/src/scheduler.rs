//! The scheduler role: the connected services, the shared admission and the outbox
//! relay, handed to `refresh_scheduler::Scheduler`.

use std::sync::Arc;
use std::time::Duration;

use refresh_admission::{AdmissionMetrics, Admitter};
use refresh_ops::Registry;
use refresh_scheduler::{Scheduler, SchedulerConfig, SchedulerMetrics, SystemClock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::services::Services;
use crate::{RunError, Settings};

/// The scheduler's configuration from the settings.
pub fn config(settings: &Settings) -> SchedulerConfig {
    SchedulerConfig {
        tick: Duration::from_secs(settings.scheduler.tick_secs),
        batch_size: settings.scheduler.batch_size,
        retention_days: settings.history.retention_days,
        stalled_after: Duration::from_secs(settings.scheduler.stalled_after_secs),
        rekey_batch_size: settings.crypto.rekey_batch_size,
    }
}

/// A scheduler replica over `services`, its metrics added to `registry`, counting its
/// admissions in `admission_metrics` (registered by the caller, once per process);
/// `nudge` wakes the outbox relay that publishes what it writes; its admissions are
/// written by a task on `tracker`.
pub fn build(
    settings: &Settings,
    services: &Services,
    registry: &Registry,
    admission_metrics: AdmissionMetrics,
    nudge: Arc<Notify>,
    tracker: &TaskTracker,
) -> Scheduler {
    let metrics = SchedulerMetrics::default();
    registry.register(|r| metrics.register(r));
    let admitter = Admitter::new(
        services.store.clone(),
        services.gate.clone(),
        services.broker.clone(),
        admission_metrics,
        nudge.clone(),
        tracker,
    );
    Scheduler::new(
        services.store.clone(),
        services.gate.clone(),
        admitter,
        config(settings),
        metrics,
        nudge,
    )
}

/// Starts a scheduler replica and its outbox relay on `tracker`; both stop when
/// `shutdown` is cancelled.
pub fn start(
    settings: &Settings,
    services: &Services,
    registry: &Registry,
    admission_metrics: AdmissionMetrics,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let nudge = Arc::new(Notify::new());
    let scheduler = build(
        settings,
        services,
        registry,
        admission_metrics.clone(),
        nudge.clone(),
        tracker,
    );
    tracker.spawn(refresh_admission::relay::run(
        services.store.clone(),
        services.broker.clone(),
        admission_metrics,
        nudge,
        shutdown.child_token(),
    ));
    tracker.spawn(scheduler.run(Arc::new(SystemClock), shutdown.child_token()));
}

/// `refreshd scheduler`.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let services = Services::connect(settings, &shutdown, &tracker).await?;
    let registry = Arc::new(Registry::new());
    let admission_metrics = AdmissionMetrics::default();
    registry.register(|r| admission_metrics.register(r));
    start(
        settings,
        &services,
        &registry,
        admission_metrics,
        &shutdown,
        &tracker,
    );
    crate::serve_ops(
        &settings.scheduler.metrics_bind,
        "scheduler",
        registry,
        services.readiness(),
        &shutdown,
        &tracker,
    )
    .await?;
    crate::until_drained(&tracker, &shutdown).await;
    Ok(())
}
