//! One job, from delivery to outcome: the pipeline of SPEC §5 and the bank-outcome
//! table, decided as an [`Outcome`] that the messaging adapter carries out.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng as _;
use refresh_amqp::Delivery;
use refresh_bank::{BankError, ConsentAccess};
use refresh_core::{
    ConsentStatus, EventId, FetchBasis, Job, Outcome, RefreshError, RefreshId, RefreshStatus,
    error_chain, fetch_scope,
};
use refresh_pg::{AttemptStart, Finish, JobState, Store, StoreError};
use refresh_redis::{GateError, StartDecision};
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::mapping::map_fetch;
use crate::{Provider, WorkerConfig, WorkerDeps};

/// Where a job went.
enum Step {
    /// Settle the delivery so.
    Settle(Outcome),
    /// The job was re-published (a bank retry with a new `notBefore`); ack the original.
    Republished,
}

/// A dependency failed; the job is retried.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("database")]
    Store(#[from] StoreError),
    #[error("redis")]
    Gate(#[from] GateError),
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// The time since `t` (zero if `t` is ahead).
fn since(t: DateTime<Utc>) -> Duration {
    (now() - t).to_std().unwrap_or_default()
}

fn event_id() -> EventId {
    EventId::from_uuid(uuid::Uuid::now_v7())
}

/// The time until `t`, at least a few milliseconds (a zero TTL would skip the wait queue).
fn until(t: DateTime<Utc>) -> Duration {
    (t - now())
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_millis(20))
}

/// Handles one delivery and settles it, unless `abort` (the shutdown grace ran out)
/// interrupts: then the delivery is dropped unsettled and the broker delivers it again.
pub(crate) async fn handle(
    deps: &WorkerDeps,
    config: &WorkerConfig,
    delivery: Delivery,
    abort: &CancellationToken,
) {
    // The bank attempt this delivery runs, once started (0: none).
    let running = AtomicU32::new(0);
    let step = tokio::select! {
        biased;
        () = abort.cancelled() => None,
        step = process(deps, config, &delivery.body, &running) => Some(step),
    };
    let outcome = match step {
        None => {
            debug!("handing an interrupted job back to the broker");
            // Its attempt stopped with this future: free its lease so that the next
            // delivery need not wait for it to run out.
            let attempt = running.load(Ordering::Relaxed);
            if attempt > 0
                && let Some(refresh_id) = Job::refresh_id_of(&delivery.body)
                && let Err(error) = deps.store.end_attempt(refresh_id, attempt).await
            {
                warn!(%refresh_id, error = %error_chain(&error), "cannot end the interrupted attempt's lease; it expires by itself");
            }
            return;
        }
        Some(Step::Settle(outcome)) => outcome,
        Some(Step::Republished) => Outcome::Ack,
    };
    if let Err(error) = delivery.settle(outcome).await {
        warn!(error = %error, "cannot settle a job; the broker will deliver it again");
    }
}

async fn process(
    deps: &WorkerDeps,
    config: &WorkerConfig,
    body: &[u8],
    running: &AtomicU32,
) -> Step {
    let job = match Job::parse(body) {
        Ok(job) => job,
        Err(error) => {
            deps.metrics.dead_lettered();
            let reason = error.to_string();
            if let Some(refresh_id) = Job::refresh_id_of(body) {
                end_dead_lettered(deps, refresh_id, &reason).await;
            }
            return Step::Settle(Outcome::dead_letter(reason));
        }
    };
    // Every line logged about this refresh names it and its trace.
    let span = info_span!(
        "refresh",
        refresh_id = %job.refresh_id,
        trace_id = tracing::field::Empty
    );
    if let Some(trace) = &job.traceparent {
        span.record("trace_id", trace.trace_id());
    }
    match run_job(deps, config, &job, running).instrument(span).await {
        Ok(step) => step,
        Err(error) => {
            warn!(refresh_id = %job.refresh_id, error = %error_chain(&error), "a dependency failed; retrying the job");
            Step::Settle(Outcome::retry(config.dependency_retry))
        }
    }
}

/// Waits between reads of a record not yet visible: the admission commits right
/// after the broker confirmed the job, so a worker that is quick to take it often
/// looks a moment too early. About 0.3 s in all, then the job is retried later.
const RECORD_POLL: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(15),
    Duration::from_millis(30),
    Duration::from_millis(80),
    Duration::from_millis(170),
];

/// The job's record, read again a few times while it is not there yet.
async fn committed_job_state(
    deps: &WorkerDeps,
    refresh_id: RefreshId,
) -> Result<Option<JobState>, Failure> {
    for pause in RECORD_POLL {
        if let Some(state) = deps.store.job_state(refresh_id).await? {
            return Ok(Some(state));
        }
        tokio::time::sleep(pause).await;
    }
    Ok(deps.store.job_state(refresh_id).await?)
}

async fn run_job(
    deps: &WorkerDeps,
    config: &WorkerConfig,
    job: &Job,
    running: &AtomicU32,
) -> Result<Step, Failure> {
    let refresh_id = job.refresh_id;
    let Some(state) = committed_job_state(deps, refresh_id).await? else {
        // Still no record: the admission is slow to commit, or failed after the
        // publish. Give it time, then drop the job.
        if now() < job.not_before + config.admission_grace {
            return Ok(Step::Settle(Outcome::retry(Duration::from_secs(2))));
        }
        warn!(%refresh_id, "dropping a job that was never admitted");
        return Ok(Step::Settle(Outcome::Ack));
    };
    if state.record.status != RefreshStatus::Initialized {
        // Done before (a redelivery after completion): make sure its event went out
        // and its lock is free, and never refresh twice.
        after_finish(deps, job).await;
        return Ok(Step::Settle(Outcome::Ack));
    }
    let not_before = job.not_before.max(state.record.not_before);
    if not_before > now() {
        let wait = until(not_before).min(config.max_wait_hop);
        return wait_holding_lock(deps, job, wait).await;
    }
    // Keep the lock alive across waits (each hop is shorter than the lease).
    let locked = deps.gate.renew_lock(job.consent_id, refresh_id).await?;
    if !locked {
        debug!(%refresh_id, "the consent's lock is not held; the database fence guards the refresh");
    }
    if state.attempts >= config.max_attempts {
        let error = RefreshError::bank_unavailable(state.attempts);
        return finish_error(deps, job, error, None).await;
    }
    let consent = deps.store.consent(job.consent_id).await?;
    let Some(consent) = consent else {
        // Deleted with its refreshes: nothing left to write.
        return Ok(Step::Settle(Outcome::Ack));
    };
    if consent.status != ConsentStatus::Active {
        let error = match consent.status.refusal() {
            Some(problem) if consent.status != ConsentStatus::Revoked => {
                RefreshError::new(problem.code, problem.detail)
            }
            _ => RefreshError::consent_revoked(),
        };
        return finish_error(deps, job, error, None).await;
    }
    let Some(provider) = deps.providers.get(job.provider_id.as_str()) else {
        warn!(%refresh_id, provider = %job.provider_id, "no connector is configured for the provider");
        let error = RefreshError::new(
            refresh_core::ProblemCode::BankError,
            "The consent's bank is not configured in this deployment",
        );
        return finish_error(deps, job, error, None).await;
    };
    // The hard invariant at the bank: every attempt takes a start slot.
    let bucket = config
        .stagger_scope
        .bucket(&job.tenant_id, &job.provider_id);
    let attempt_id = format!("{refresh_id}:{}", state.attempts);
    if let StartDecision::WaitUntil(t) = deps.gate.take_start_slot(&bucket, &attempt_id).await? {
        deps.metrics.waited_for_start();
        return wait_holding_lock(deps, job, until(t).min(config.max_wait_hop)).await;
    }
    let started = match deps
        .store
        .start_attempt(refresh_id, state.attempts, now(), config.lease)
        .await?
    {
        AttemptStart::Started(started) => started,
        AttemptStart::Finished => {
            after_finish(deps, job).await;
            return Ok(Step::Settle(Outcome::Ack));
        }
        AttemptStart::Raced => {
            // Another delivery of this job runs this attempt (the broker delivered it
            // again under a worker that is still at it): never call the bank twice.
            // Look again after it finished or its lease ran out.
            deps.metrics.duplicate_delivery_deferred();
            info!(%refresh_id, "another delivery of this job is running it; deferring this one");
            return Ok(Step::Settle(Outcome::retry(
                config.lease.min(config.max_wait_hop),
            )));
        }
    };
    let attempt = started.attempts;
    running.store(attempt, Ordering::Relaxed);
    let Some(token) = deps.store.access_token(job.consent_id).await? else {
        return Ok(Step::Settle(Outcome::Ack));
    };
    let access = ConsentAccess {
        base_url: provider.base_url.clone(),
        access_token: token.expose_secret().to_owned(),
        financial_id: provider.financial_id.clone(),
        bank_consent_id: consent.bank_consent_id.clone(),
        trace: job.traceparent,
    };
    let work = fetch_and_store(
        deps,
        config,
        job,
        &started,
        provider,
        &access,
        consent.last_refreshed_at,
    );
    let step = tokio::select! {
        step = work => step,
        () = keep_alive(deps, job, attempt, config.lease, locked) => {
            warn!(%refresh_id, "lost the consent's lock while refreshing; abandoning this attempt");
            Ok(Step::Settle(Outcome::retry(Duration::from_secs(1))))
        }
    };
    // Anything but a terminal status frees the attempt for the job's next delivery
    // (a terminal one fences it anyway). A failure here leaves the lease to expire.
    if !matches!(step, Ok(Step::Settle(Outcome::Ack)))
        && let Err(error) = deps.store.end_attempt(refresh_id, attempt).await
    {
        warn!(%refresh_id, error = %error_chain(&error), "cannot end the attempt's lease; it expires by itself");
    }
    step
}

/// Settles the delivery to come back after `wait`, with the consent's lock extended
/// to cover the wait and a full lease after it, so no other refresh of the consent
/// is admitted while this one waits in a wait queue.
async fn wait_holding_lock(deps: &WorkerDeps, job: &Job, wait: Duration) -> Result<Step, Failure> {
    if !deps
        .gate
        .hold_lock_across(job.consent_id, job.refresh_id, wait)
        .await?
    {
        debug!(refresh_id = %job.refresh_id, "the consent's lock is not held; the database fence guards the refresh");
    }
    Ok(Step::Settle(Outcome::retry(wait)))
}

/// Renews the attempt's lease and the consent's lock every third of the lease while
/// the attempt runs; returns only if the lock was held and is lost (renewal refused,
/// or Redis unreachable for a whole lease).
async fn keep_alive(deps: &WorkerDeps, job: &Job, attempt: u32, lease: Duration, held: bool) {
    let every = (lease / 3).max(Duration::from_millis(100));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let until = now() + chrono::TimeDelta::from_std(lease).unwrap_or_default();
        if let Err(error) = deps
            .store
            .renew_attempt(job.refresh_id, attempt, until)
            .await
        {
            warn!(error = %error_chain(&error), "cannot renew the attempt's lease");
        }
        if !held {
            continue;
        }
        match deps.gate.renew_lock(job.consent_id, job.refresh_id).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => return,
            Err(error) => {
                warn!(error = %error_chain(&error), "cannot renew the consent's lock");
                if last_ok.elapsed() >= lease {
                    return;
                }
            }
        }
    }
}

async fn fetch_and_store(
    deps: &WorkerDeps,
    config: &WorkerConfig,
    job: &Job,
    state: &JobState,
    provider: &Provider,
    access: &ConsentAccess,
    last_refreshed_at: Option<DateTime<Utc>>,
) -> Result<Step, Failure> {
    let refresh_id = job.refresh_id;
    let Some(data_state) = deps.store.data_state(job.consent_id).await? else {
        // Deleted with its refreshes meanwhile: nothing left to write.
        return Ok(Step::Settle(Outcome::Ack));
    };
    let basis = FetchBasis {
        requested_initial: state.initial || job.initial,
        initial_loaded: data_state.initial_loaded,
        last_refreshed_at,
        oldest_pending: data_state.oldest_pending,
    };
    let scope = fetch_scope(&basis, config.window, now());
    debug!(%refresh_id, initial = scope.initial, from = %scope.from, "fetching from the bank");
    let from = scope.from_instant();
    let fetch_started = std::time::Instant::now();
    let fetched = if scope.initial {
        provider.connector.fetch_initial(access, from).await
    } else {
        provider.connector.fetch_refresh(access, from).await
    };
    let failure = fetched.as_ref().err().map(|error| match error {
        BankError::Revoked => "revoked",
        BankError::Expired => "expired",
        BankError::MfaRequired => "mfa_required",
        BankError::Transient { .. } => "transient",
        BankError::Malformed(_) => "malformed",
    });
    deps.metrics
        .bank_fetch(job.provider_id.as_str(), fetch_started.elapsed(), failure);
    let data = match fetched {
        Ok(data) => data,
        Err(BankError::Revoked) => {
            let error = RefreshError::consent_revoked();
            return finish_error(deps, job, error, Some(ConsentStatus::Revoked)).await;
        }
        Err(BankError::Expired) => {
            let problem = refresh_core::Problem::consent_expired();
            let error = RefreshError::new(problem.code, problem.detail);
            return finish_error(deps, job, error, Some(ConsentStatus::Expired)).await;
        }
        Err(BankError::MfaRequired) => {
            return finish_error(deps, job, RefreshError::mfa_required(), None).await;
        }
        Err(BankError::Malformed(reason)) => {
            warn!(%refresh_id, reason, "the bank's data is malformed; nothing stored");
            return finish_error(deps, job, RefreshError::bank_error(), None).await;
        }
        Err(BankError::Transient {
            retry_after,
            reason,
        }) => {
            return retry_bank(deps, config, job, state.attempts, retry_after, &reason).await;
        }
    };
    if !data.deviations.is_empty() {
        info!(%refresh_id, deviations = ?data.deviations, "read past deviations from the bank's schema");
        for (kind, count) in &data.deviations {
            deps.metrics.deviation(kind, *count);
        }
    }
    let requests = data.requests;
    let (stored, dropped) = match map_fetch(data, &scope) {
        Ok(mapped) => mapped,
        Err(error) => {
            warn!(%refresh_id, error = %error, "the bank's data cannot be stored; nothing stored");
            return finish_error(deps, job, RefreshError::bank_error(), None).await;
        }
    };
    if dropped.rejected_without_id > 0 {
        info!(%refresh_id, rejected_without_id = dropped.rejected_without_id, "dropped rejected transactions without an id");
    }
    match deps
        .store
        .finish_updated(refresh_id, &stored, event_id(), now())
        .await?
    {
        Finish::Done(record) => match &record.error {
            None => {
                deps.metrics
                    .finished("UPDATED", None, since(job.not_before));
                info!(%refresh_id, summary = ?record.summary, requests, "refresh UPDATED");
            }
            // The consent was revoked while the refresh ran: nothing was stored.
            Some(error) => {
                deps.metrics
                    .finished("ERROR", Some(error.code.as_str()), since(job.not_before));
                info!(%refresh_id, code = %error.code.as_str(), "refresh ERROR: the consent was revoked meanwhile");
            }
        },
        Finish::Fenced => {
            debug!(%refresh_id, "the refresh was finished elsewhere; nothing written")
        }
    }
    after_finish(deps, job).await;
    Ok(Step::Settle(Outcome::Ack))
}

/// A transient bank failure: re-publish the job with a backed-off `notBefore`, or
/// end it as `bank_unavailable` once the attempts are used up.
async fn retry_bank(
    deps: &WorkerDeps,
    config: &WorkerConfig,
    job: &Job,
    attempts: u32,
    retry_after: Option<Duration>,
    reason: &str,
) -> Result<Step, Failure> {
    if attempts >= config.max_attempts {
        warn!(refresh_id = %job.refresh_id, attempts, reason, "the bank stayed unavailable");
        let error = RefreshError::bank_unavailable(attempts);
        return finish_error(deps, job, error, None).await;
    }
    let delay = backoff(config, attempts, retry_after);
    deps.metrics.retried();
    info!(refresh_id = %job.refresh_id, attempts, ?delay, reason, "the bank is unavailable; retrying later");
    let next = Job {
        not_before: now() + chrono::TimeDelta::from_std(delay).unwrap_or_default(),
        ..job.clone()
    };
    let hop = delay.min(config.max_wait_hop);
    // The consent stays locked while the job waits out its backoff.
    if let Err(error) = deps
        .gate
        .hold_lock_across(job.consent_id, job.refresh_id, delay)
        .await
    {
        warn!(error = %error_chain(&error), "cannot extend the consent's lock over the retry's wait");
    }
    match deps
        .broker
        .publish_job(&next.to_bytes(), &job.refresh_id.to_string(), Some(hop))
        .await
    {
        Ok(()) => Ok(Step::Republished),
        // The copy of the original (old notBefore) waits the first hop instead.
        Err(error) => {
            warn!(error = %error_chain(&error), "cannot re-publish the job; retrying the original");
            Ok(Step::Settle(Outcome::retry(hop)))
        }
    }
}

/// Exponential backoff with jitter after attempt `attempts` (from 1), never shorter
/// than the bank's `Retry-After`.
pub(crate) fn backoff(
    config: &WorkerConfig,
    attempts: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = attempts.saturating_sub(1).min(20);
    let full = config
        .backoff_base
        .saturating_mul(1 << exponent)
        .min(config.backoff_max);
    // "Equal jitter": half fixed, half random, so retries of many refreshes spread out.
    let half = full / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    let delay = half + half.mul_f64(jitter);
    delay.max(retry_after.unwrap_or_default())
}

async fn finish_error(
    deps: &WorkerDeps,
    job: &Job,
    error: RefreshError,
    consent_status: Option<ConsentStatus>,
) -> Result<Step, Failure> {
    let code = error.code;
    match deps
        .store
        .finish_error(job.refresh_id, error, consent_status, event_id(), now())
        .await?
    {
        Finish::Done(_) => {
            deps.metrics
                .finished("ERROR", Some(code.as_str()), since(job.not_before));
            info!(refresh_id = %job.refresh_id, code = %code.as_str(), "refresh ERROR");
            // The bank revoked or expired the consent: the gate's mirrored facts are
            // forgotten, so the next request for it asks the database (and is refused).
            if consent_status.is_some()
                && let Err(error) = deps.gate.mirror(&[(job.consent_id, None)]).await
            {
                warn!(error = %error_chain(&error), "cannot forget the consent's facts at the gate; the admission statement checks them");
            }
        }
        Finish::Fenced => {
            debug!(refresh_id = %job.refresh_id, "the refresh was finished elsewhere")
        }
    }
    after_finish(deps, job).await;
    Ok(Step::Settle(Outcome::Ack))
}

/// A job dead-lettered with its refresh id readable: its refresh can never run, so it
/// ends `ERROR` `internal_error` with the reason at once (if still in flight), and its
/// consent is freed. A failure here leaves it to the scheduler's stalled check.
async fn end_dead_lettered(deps: &WorkerDeps, refresh_id: RefreshId, reason: &str) {
    let error = RefreshError::internal_error(&format!("its job was dead-lettered ({reason})"));
    let consent_id = match deps.store.job_state(refresh_id).await {
        Ok(Some(state)) => state.record.consent_id,
        Ok(None) => return,
        Err(error) => {
            warn!(%refresh_id, error = %error_chain(&error), "cannot end the refresh of a dead-lettered job now");
            return;
        }
    };
    match deps
        .store
        .finish_error(refresh_id, error, None, event_id(), now())
        .await
    {
        Ok(Finish::Done(_)) => {
            warn!(%refresh_id, "ended the refresh of a dead-lettered job ERROR internal_error");
            deps.metrics
                .finished("ERROR", Some("internal_error"), Duration::ZERO);
        }
        Ok(Finish::Fenced) => return,
        Err(error) => {
            warn!(%refresh_id, error = %error_chain(&error), "cannot end the refresh of a dead-lettered job now");
            return;
        }
    }
    if let Err(error) = publish_outbox(&deps.store, &deps.broker).await {
        warn!(error = %error, "cannot publish the outbox now; the relay will");
    }
    if let Err(error) = deps.gate.release_lock(consent_id, refresh_id).await {
        warn!(error = %error_chain(&error), "cannot free the consent's lock; its lease will");
    }
}

/// After a terminal status is committed: publish the outbox (the ingress relay also
/// would, so a failure here loses nothing) and free the lock.
async fn after_finish(deps: &WorkerDeps, job: &Job) {
    if let Err(error) = publish_outbox(&deps.store, &deps.broker).await {
        warn!(error = %error, "cannot publish the outbox now; the relay will");
    }
    if let Err(error) = deps.gate.release_lock(job.consent_id, job.refresh_id).await {
        warn!(error = %error_chain(&error), "cannot free the consent's lock; its lease will");
    }
}

/// Publishes the outbox right after a commit, as the relay would.
async fn publish_outbox(store: &Store, broker: &refresh_amqp::Broker) -> Result<usize, String> {
    refresh_admission::relay::relay_once(store, broker).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use refresh_core::StaggerScope;

    fn config() -> WorkerConfig {
        WorkerConfig::new(
            1,
            5,
            1,
            Duration::from_secs(120),
            StaggerScope::Global,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn backoff_doubles_with_jitter_caps_and_honours_retry_after() {
        let c = config();
        for (attempts, full) in [(1, 2), (2, 4), (3, 8), (9, 300), (40, 300)] {
            let d = backoff(&c, attempts, None);
            let full = Duration::from_secs(full);
            assert!(d >= full / 2 && d <= full, "{attempts}: {d:?}");
        }
        assert_eq!(
            backoff(&c, 1, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
    }
}
