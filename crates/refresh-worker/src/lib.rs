//! The worker (SPEC §5): consumes admitted refreshes from `{ns}.jobs`, waits for each
//! job's `notBefore`, takes a start slot in the stagger, fetches from the bank while
//! renewing the consent's lock, stores the result by the refresh rules in one fenced
//! database transaction that also records the terminal status and its event, publishes
//! the event, frees the lock and acks.
//!
//! At most `concurrency` refreshes run at once; on shutdown the worker stops taking
//! jobs, lets in-flight ones finish within `drain`, then drops the rest unsettled (the
//! broker delivers them again; a redelivered job is fenced by its refresh id).

mod job;
mod mapping;
mod metrics;

pub use metrics::WorkerMetrics;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use refresh_amqp::Broker;
use refresh_bank::Connector;
use refresh_core::{StaggerScope, WindowRules};
use refresh_pg::Store;
use refresh_redis::Gate;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One configured bank (`providers.{id}`).
#[derive(Clone)]
pub struct Provider {
    pub connector: Arc<dyn Connector>,
    /// The API root, e.g. `http://127.0.0.1:8090/open-banking/v3.1/aisp`.
    pub base_url: String,
    /// Sent as `x-fapi-financial-id`.
    pub financial_id: String,
}

/// The adapters the worker uses.
#[derive(Clone)]
pub struct WorkerDeps {
    pub store: Store,
    pub gate: Gate,
    pub broker: Broker,
    /// By provider id.
    pub providers: BTreeMap<String, Provider>,
    pub metrics: WorkerMetrics,
}

/// How the worker behaves. [`WorkerConfig::new`] gives the defaults for the keys
/// that are not in the settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `worker.concurrency`: refreshes at once.
    pub concurrency: u32,
    /// `worker.max_attempts`: bank attempts (the first included) before
    /// `bank_unavailable`.
    pub max_attempts: u32,
    /// `worker.prefetch`.
    pub prefetch: u16,
    /// `lock.lease_secs`: the lock is renewed every third of it.
    pub lease: Duration,
    /// `stagger.scope`: which start budget a refresh takes its slot from.
    pub stagger_scope: StaggerScope,
    /// How long in-flight refreshes may finish after shutdown began.
    pub drain: Duration,
    /// The first retry's backoff; doubled per attempt, jittered, capped.
    pub backoff_base: Duration,
    /// The longest backoff between bank attempts.
    pub backoff_max: Duration,
    /// The longest single wait in `jobs.wait` (a classic queue expires only its head,
    /// so long waits are taken in hops and `notBefore` is checked on every delivery).
    pub max_wait_hop: Duration,
    /// How long after its `notBefore` a job whose record is not (yet) in the database
    /// is retried (the admission's commit may still be in flight) before it is dropped.
    pub admission_grace: Duration,
    /// The wait before retrying a job when PostgreSQL, Redis or RabbitMQ failed.
    pub dependency_retry: Duration,
    /// `worker.overlap_days` and `worker.history_days`: where a fetch's window starts.
    pub window: WindowRules,
}

impl WorkerConfig {
    /// The defaults, given the settings' values.
    pub fn new(
        concurrency: u32,
        max_attempts: u32,
        prefetch: u16,
        lease: Duration,
        stagger_scope: StaggerScope,
        drain: Duration,
    ) -> Self {
        Self {
            concurrency,
            max_attempts,
            prefetch,
            lease,
            stagger_scope,
            drain,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
            max_wait_hop: Duration::from_secs(30),
            admission_grace: Duration::from_secs(60),
            dependency_retry: Duration::from_secs(5),
            window: WindowRules::from_days(7, 90),
        }
    }
}

/// Consumes `{ns}.jobs` until `shutdown`; returns once in-flight refreshes finished
/// or were handed back.
pub async fn run(deps: WorkerDeps, config: WorkerConfig, shutdown: CancellationToken) {
    let deps = Arc::new(deps);
    let config = Arc::new(config);
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let semaphore = Arc::new(Semaphore::new(config.concurrency.max(1) as usize));
    let jobs = deps.broker.names().jobs.clone();
    let mut consumer = deps.broker.consume(&jobs, config.prefetch);
    tracing::info!(queue = %jobs, concurrency = config.concurrency, "worker consuming");
    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let delivery = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(delivery) => delivery,
                None => break,
            },
        };
        let (deps, config, abort) = (Arc::clone(&deps), Arc::clone(&config), abort.clone());
        tracker.spawn(async move {
            deps.metrics.in_flight().inc();
            job::handle(&deps, &config, delivery, &abort).await;
            deps.metrics.in_flight().dec();
            drop(permit);
        });
    }
    // Stop taking jobs: prefetched, unhanded deliveries return to the queue.
    drop(consumer);
    tracker.close();
    if tokio::time::timeout(config.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight refreshes did not finish within the grace; handing them back");
        abort.cancel();
        tracker.wait().await;
    }
    tracing::info!("worker stopped");
}
