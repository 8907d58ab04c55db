//! The outbox relay: publishes what database transactions wrote for the broker, with
//! confirms, and marks it done. Two outboxes:
//!
//! - jobs (`job_outbox`), written by each admission with its record (SPEC §2: the job
//!   is durable once committed): published to `jobs` (through a wait queue while its
//!   `notBefore` is ahead), then deleted. A crash between the confirm and the delete
//!   publishes the job again; the worker's fence on the refresh id (one attempt per
//!   lease, nothing after a terminal status) makes the copy a no-op.
//! - events (`outbox`): published to `events`, then marked published. A crash
//!   between publish and mark publishes the event again; consumers dedupe on the
//!   CloudEvents `id` (SPEC §4).
//!
//! Each round takes a batch of each, sends the batch at once on one channel and
//! awaits the confirms together, so the broker's cost per job is a fraction of a
//! confirmed publish on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use refresh_amqp::Broker;
use refresh_pg::{OutboxEvent, PendingJob, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use refresh_core::error_chain;

use crate::metrics::AdmissionMetrics;

/// Rows claimed per round.
const BATCH: i64 = 200;
/// A round runs at least this often, even without a nudge (rows written by other
/// processes, or left after a failure).
const TICK: Duration = Duration::from_millis(500);

/// Runs until `shutdown`; `nudge` wakes it early after an admission or an event was
/// written.
pub async fn run(
    store: Store,
    broker: Broker,
    metrics: AdmissionMetrics,
    nudge: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut counted: Option<Instant> = None;
    loop {
        let jobs = relay_jobs(&store, &broker, &metrics).await;
        let events = relay_once(&store, &broker).await;
        for failed in [jobs.as_ref().err(), events.as_ref().err()]
            .into_iter()
            .flatten()
        {
            tracing::warn!(error = %failed, "outbox relay round failed; retrying");
        }
        let full = |round: &Result<usize, String>| matches!(round, Ok(n) if *n as i64 == BATCH);
        if full(&jobs) || full(&events) {
            continue;
        }
        // Idle now: what is left waits for the broker (or another relay's round).
        // Counted once a tick at most, not after every nudged round.
        if counted.is_none_or(|at| at.elapsed() >= TICK) {
            counted = Some(Instant::now());
            match store.pending_jobs().await {
                Ok(pending) => metrics.outbox_jobs(pending),
                Err(error) => {
                    tracing::debug!(error = %error_chain(&error), "cannot count the outbox's jobs")
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                // One last round so what was written during shutdown goes out.
                let _ = relay_jobs(&store, &broker, &metrics).await;
                let _ = relay_once(&store, &broker).await;
                return;
            }
            () = nudge.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One round of jobs: publishes the claimed jobs (confirms awaited together), each
/// with the delay left until its `notBefore`; returns how many were published.
pub async fn relay_jobs(
    store: &Store,
    broker: &Broker,
    metrics: &AdmissionMetrics,
) -> Result<usize, String> {
    let started = Instant::now();
    store
        .publish_pending_jobs(BATCH, |job| {
            let published = publish_job(broker, job);
            async move {
                let result = published.await;
                metrics.publish_latency(started.elapsed());
                result
            }
        })
        .await
        .map_err(|e| error_chain(&e))
}

/// One round of events: publishes the claimed events (sent in order, confirms
/// awaited together); returns how many were published. Workers call it right after
/// their commit, so a terminal event goes out without waiting for a relay.
pub async fn relay_once(store: &Store, broker: &Broker) -> Result<usize, String> {
    store
        .publish_pending(BATCH, |event| publish_event(broker, event))
        .await
        .map_err(|e| error_chain(&e))
}

/// Publishes one job with a confirm, through a wait queue while its slot is ahead.
fn publish_job<'a>(
    broker: &'a Broker,
    job: &PendingJob,
) -> impl Future<Output = Result<(), String>> + use<'a> {
    let delay = (job.not_before - Utc::now())
        .to_std()
        .ok()
        .filter(|d| !d.is_zero());
    let (body, id) = (job.body.clone(), job.refresh_id.to_string());
    async move {
        broker
            .publish_job(&body, &id, delay)
            .await
            .map_err(|e| error_chain(&e))
    }
}

/// Publishes one outbox event with a confirm.
fn publish_event<'a>(
    broker: &'a Broker,
    event: &OutboxEvent,
) -> impl Future<Output = Result<(), String>> + use<'a> {
    let body = serde_json::to_vec(&event.payload).unwrap_or_default();
    let id = event.event_id.to_string();
    let routing_key = event.routing_key.clone();
    async move {
        broker
            .publish_event(&routing_key, &body, &id)
            .await
            .map_err(|e| error_chain(&e))
    }
}
