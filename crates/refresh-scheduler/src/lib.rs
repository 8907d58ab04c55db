//! The scheduler (SPEC §6): the platform's periodic work, one tick at a time.
//!
//! Each tick, in order: expire consents past `expiresAt`; inactivate consents with no
//! successful refresh for their tenant's `inactivationDays`; remove the stored data of
//! inactive consents in bounded batches; end refreshes that stalled (still
//! `INITIALIZED` long after their start slot with no worker holding their lock); ask
//! for the due auto-syncs through the shared [`Admitter`]; remove history, published
//! outbox rows and idempotency keys past their age; re-encrypt a bounded batch of
//! stored bank tokens sealed with a retired key (`crypto.rekey_batch_size`).
//!
//! Several replicas may tick at once. Every sweep claims its rows in PostgreSQL with
//! `FOR UPDATE SKIP LOCKED` in short transactions that hold no lock across a call to
//! Redis or RabbitMQ, and every change is conditional on the state it changes from, so
//! each piece of due work is done once. A replica killed mid-tick loses nothing: an
//! auto-sync claim moves the consent's next attempt only by its backoff, after which
//! any replica asks again; every other sweep finds its rows as they were.
//!
//! Time comes from a [`Clock`], so tests drive ticks at the instants they choose.

mod metrics;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::StreamExt as _;
use refresh_admission::{Admitter, Decision, RefreshRequest};
use refresh_core::{ConsentId, ConsentSnapshot, EventId, RefreshError, RequestedBy, error_chain};
use refresh_pg::{AutosyncClaim, Finish, RemovedData, Retained, Store, StoreError};
use refresh_redis::Gate;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use metrics::SchedulerMetrics;

/// Where the scheduler's time comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What the scheduler needs from the settings.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// `scheduler.tick_secs`.
    pub tick: Duration,
    /// `scheduler.batch_size`: AUTOSYNC requests per tick at most (and the size of
    /// the other sweeps' batches).
    pub batch_size: u32,
    /// `history.retention_days`.
    pub retention_days: u32,
    /// `scheduler.stalled_after_secs`.
    pub stalled_after: Duration,
    /// `crypto.rekey_batch_size`: tokens re-encrypted per tick at most.
    pub rekey_batch_size: u32,
}

/// Stored data rows removed per table and transaction.
const REMOVAL_BATCH: i64 = 1_000;
/// Retention rows removed per table and statement.
const RETENTION_BATCH: i64 = 1_000;
/// Batches of one sweep per tick at most, so that one tick stays short; what is left
/// is done at the next.
const MAX_BATCHES: usize = 50;
/// AUTOSYNC requests decided at once.
const ADMISSIONS_IN_FLIGHT: usize = 8;
/// Idempotency keys are kept this long (SPEC §3).
const IDEMPOTENCY_TTL: TimeDelta = TimeDelta::hours(24);
/// `inactivationDays` of a tenant without settings (SPEC §6).
const DEFAULT_INACTIVATION_DAYS: u32 = 90;

/// What one tick did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Consents due for auto-sync when the tick began.
    pub due: u64,
    /// AUTOSYNC refreshes admitted.
    pub requested: u64,
    /// AUTOSYNC requests refused, by problem code (`unavailable` when a dependency
    /// was down).
    pub refused: BTreeMap<&'static str, u64>,
    pub expired: u64,
    pub inactivated: u64,
    pub removed: RemovedData,
    pub retained: Retained,
    /// Stalled refreshes ended `ERROR`.
    pub stalled: u64,
    /// Bank tokens re-encrypted with `crypto.key`.
    pub rekeyed: u64,
    /// Tokens of this tick's batch that no configured key decrypts (left as they are).
    pub undecryptable: u64,
    /// Tokens still sealed otherwise than with `crypto.key` after the tick.
    pub to_rekey: u64,
}

/// One scheduler replica.
#[derive(Clone)]
pub struct Scheduler {
    store: Store,
    gate: Gate,
    admitter: Admitter,
    config: SchedulerConfig,
    metrics: SchedulerMetrics,
    /// Wakes the outbox relay after lifecycle events were written.
    outbox: Arc<Notify>,
    /// Where the next re-encryption batch starts (after this consent), so tokens no
    /// key opens never hold up the others.
    rekey_after: Arc<Mutex<Option<ConsentId>>>,
}

impl Scheduler {
    pub fn new(
        store: Store,
        gate: Gate,
        admitter: Admitter,
        config: SchedulerConfig,
        metrics: SchedulerMetrics,
        outbox: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            gate,
            admitter,
            config,
            metrics,
            outbox,
            rekey_after: Arc::default(),
        }
    }

    /// Runs ticks every `scheduler.tick_secs` until `shutdown`. A tick under way when
    /// `shutdown` comes stops at its next step; what it left is found again by the
    /// next tick of any replica.
    pub async fn run(self, clock: Arc<dyn Clock>, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(tick = ?self.config.tick, batch = self.config.batch_size, "scheduler started");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            let now = clock.now();
            match self.tick(now, &shutdown).await {
                Ok(report) => tracing::debug!(?report, "scheduler tick"),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "scheduler tick stopped early; the next tick goes on")
                }
            }
        }
        tracing::info!("scheduler stopped");
    }

    /// One tick at `now`. Stops between steps once `stop` is cancelled.
    pub async fn tick(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<TickReport, StoreError> {
        let started = Instant::now();
        let mut report = TickReport::default();
        let outcome = self.steps(now, stop, &mut report).await;
        if report.expired + report.inactivated + report.stalled > 0 {
            self.outbox.notify_one();
        }
        self.metrics
            .tick_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.last_tick.set(Utc::now().timestamp());
        outcome.map(|()| report)
    }

    /// The changed consents' facts written through to the gate's mirror.
    async fn write_through(&self, changed: &[ConsentSnapshot]) {
        self.admitter
            .write_through(changed.iter().map(|c| (c.consent_id, c.facts())))
            .await;
    }

    async fn steps(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
        report: &mut TickReport,
    ) -> Result<(), StoreError> {
        let batch = i64::from(self.config.batch_size);
        report.expired = self
            .repeat(stop, || async {
                let expired = self.store.expire_due(now, batch).await?;
                self.write_through(&expired).await;
                let n = expired.len() as u64;
                Ok((n, n as i64 == batch))
            })
            .await?;
        self.metrics.expired.inc_by(report.expired);

        report.inactivated = self
            .repeat(stop, || async {
                let inactivated = self
                    .store
                    .inactivate_due(now, DEFAULT_INACTIVATION_DAYS, batch)
                    .await?;
                self.write_through(&inactivated).await;
                let n = inactivated.len() as u64;
                Ok((n, n as i64 == batch))
            })
            .await?;
        self.metrics.inactivated.inc_by(report.inactivated);

        self.remove_inactive_data(now, stop, report).await?;
        if stop.is_cancelled() {
            return Ok(());
        }
        report.stalled = self.end_stalled(now).await?;
        if stop.is_cancelled() {
            return Ok(());
        }
        self.autosync(now, report).await?;
        if stop.is_cancelled() {
            return Ok(());
        }
        self.retention(now, stop, report).await?;
        if stop.is_cancelled() {
            return Ok(());
        }
        self.rekey(report).await
    }

    /// Re-encrypts one batch of bank tokens sealed otherwise than with `crypto.key`
    /// (a retired key, or the format before tokens named their key), continuing where
    /// the last tick's batch ended, and counts what is left.
    async fn rekey(&self, report: &mut TickReport) -> Result<(), StoreError> {
        let after = *self
            .rekey_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let limit = i64::from(self.config.rekey_batch_size);
        let batch = self.store.rekey_batch(after, limit).await?;
        let next = if batch.examined < u64::from(self.config.rekey_batch_size) {
            None
        } else {
            batch.last
        };
        *self
            .rekey_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        report.rekeyed = batch.rekeyed;
        report.undecryptable = batch.undecryptable;
        self.metrics.rekeyed.inc_by(batch.rekeyed);
        if let Some((consent_id, reason)) = &batch.first_undecryptable {
            tracing::warn!(%consent_id, undecryptable = batch.undecryptable, reason = %reason, "stored bank tokens cannot be re-encrypted: no configured key decrypts them");
        }
        if batch.rekeyed > 0 {
            tracing::info!(rekeyed = batch.rekeyed, key = %self.store.cipher().key_id(), "re-encrypted stored bank tokens");
        }
        // A batch from the first consent that found nothing: nothing is left (the
        // common case, outside a rotation), without counting every row.
        report.to_rekey = if after.is_none() && batch.examined == 0 {
            0
        } else {
            self.store.token_keys().await?.to_rekey
        };
        self.metrics
            .to_rekey
            .set(i64::try_from(report.to_rekey).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Runs `batch` until it says nothing is left, [`MAX_BATCHES`] times at most or
    /// until `stop`; sums what each batch counted.
    async fn repeat<F, Fut>(
        &self,
        stop: &CancellationToken,
        mut batch: F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(u64, bool), StoreError>>,
    {
        let mut total = 0;
        for _ in 0..MAX_BATCHES {
            if stop.is_cancelled() {
                break;
            }
            let (done, more) = batch().await?;
            total += done;
            if !more {
                break;
            }
        }
        Ok(total)
    }

    async fn remove_inactive_data(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
        report: &mut TickReport,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_BATCHES {
            if stop.is_cancelled() {
                break;
            }
            let Some((consent_id, removed)) =
                self.store.remove_inactive_data(now, REMOVAL_BATCH).await?
            else {
                break;
            };
            tracing::debug!(%consent_id, ?removed, "removed stored data of an inactive consent");
            let total = &mut report.removed;
            total.accounts += removed.accounts;
            total.parties += removed.parties;
            total.balances += removed.balances;
            total.transactions += removed.transactions;
            total.items += removed.items;
            self.metrics.removed("accounts", removed.accounts);
            self.metrics.removed("account_parties", removed.parties);
            self.metrics.removed("balances", removed.balances);
            self.metrics.removed("transactions", removed.transactions);
            self.metrics.removed("stored_items", removed.items);
        }
        Ok(())
    }

    /// Ends refreshes still `INITIALIZED` well past their start slot whose lock no
    /// worker holds (their job was lost, or dead-lettered by the broker), so their
    /// consent can be refreshed again.
    async fn end_stalled(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let after = TimeDelta::from_std(self.config.stalled_after).unwrap_or(TimeDelta::MAX);
        let candidates = self
            .store
            .stalled_candidates(now, after, i64::from(self.config.batch_size))
            .await?;
        let mut ended = 0;
        for candidate in candidates {
            match self.gate.in_flight(candidate.consent_id).await {
                Ok(Some(holder)) if holder == candidate.refresh_id => continue,
                Ok(_) => {}
                Err(refresh_redis::GateError::Rebuilding) => {
                    // Redis lost its locks: rebuild them (from the records) before
                    // telling a live refresh from a lost one; the next tick goes on.
                    self.admitter.gate_rebuild().recover().await;
                    return Ok(ended);
                }
                Err(error) => {
                    // Without Redis nobody can tell a live refresh from a lost one.
                    tracing::warn!(error = %error_chain(&error), "cannot check for stalled refreshes now");
                    return Ok(ended);
                }
            }
            let error = RefreshError::internal_error(
                "its job was lost or dead-lettered, and no worker held it",
            );
            let event_id = EventId::from_uuid(uuid::Uuid::now_v7());
            if let Finish::Done(_) = self
                .store
                .finish_error(candidate.refresh_id, error, None, event_id, Utc::now())
                .await?
            {
                ended += 1;
                self.metrics.stalled.inc();
                tracing::warn!(refresh_id = %candidate.refresh_id, consent_id = %candidate.consent_id, "ended a stalled refresh ERROR internal_error");
            }
        }
        Ok(ended)
    }

    /// Claims the due consents and asks for each through the shared admission, as
    /// `AUTOSYNC` on behalf of its tenant.
    async fn autosync(
        &self,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), StoreError> {
        report.due = self.store.autosync_due_count(now).await?;
        self.metrics
            .due
            .set(i64::try_from(report.due).unwrap_or(i64::MAX));
        let claims = self
            .store
            .claim_autosync(now, i64::from(self.config.batch_size))
            .await?;
        let decisions: Vec<(AutosyncClaim, Result<Decision, _>)> =
            futures_util::stream::iter(claims)
                .map(|claim| async move {
                    let request = RefreshRequest {
                        consent_id: claim.consent_id,
                        tenant: Some(claim.tenant_id.clone()),
                        requested_by: RequestedBy::Autosync,
                        initial: false,
                        // Nobody asked: each auto-sync starts its own trace.
                        traceparent: refresh_admission::new_trace(),
                    };
                    let decision = self.admitter.request(&request).await;
                    (claim, decision)
                })
                .buffer_unordered(ADMISSIONS_IN_FLIGHT)
                .collect()
                .await;
        for (claim, decision) in decisions {
            let code = match decision {
                Ok(Decision::Admitted(record)) => {
                    report.requested += 1;
                    self.metrics.requested.inc();
                    tracing::debug!(consent_id = %claim.consent_id, refresh_id = %record.refresh_id, "auto-sync requested");
                    continue;
                }
                Ok(Decision::Refused(problem)) => problem.code.as_str(),
                Err(error) => {
                    tracing::warn!(consent_id = %claim.consent_id, error = %error_chain(&error), "auto-sync not requested: a dependency is unavailable");
                    refresh_core::ProblemCode::Unavailable.as_str()
                }
            };
            tracing::debug!(consent_id = %claim.consent_id, code, attempts = claim.attempts, "auto-sync refused; asked again after its backoff");
            *report.refused.entry(code).or_default() += 1;
            self.metrics
                .refused
                .get_or_create(&vec![("code", code)])
                .inc();
        }
        Ok(())
    }

    async fn retention(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
        report: &mut TickReport,
    ) -> Result<(), StoreError> {
        let kept = TimeDelta::days(self.config.retention_days.into());
        for _ in 0..MAX_BATCHES {
            if stop.is_cancelled() {
                break;
            }
            let removed = self
                .store
                .remove_expired(
                    now - kept,
                    now - kept,
                    now - IDEMPOTENCY_TTL,
                    RETENTION_BATCH,
                )
                .await?;
            let total = &mut report.retained;
            total.history += removed.history;
            total.outbox += removed.outbox;
            total.idempotency_keys += removed.idempotency_keys;
            self.metrics.removed("history", removed.history);
            self.metrics.removed("outbox", removed.outbox);
            self.metrics
                .removed("idempotency_keys", removed.idempotency_keys);
            let limit = u64::try_from(RETENTION_BATCH).unwrap_or(u64::MAX);
            if removed.history < limit && removed.outbox < limit && removed.idempotency_keys < limit
            {
                break;
            }
        }
        Ok(())
    }
}
