//! Rebuilding the gate's Redis state from PostgreSQL once Redis has lost it (SPEC §2):
//! quotas from the admissions still in their windows, in-flight locks from the
//! `INITIALIZED` refreshes, the stagger from their start slots, the workers' start
//! log from the bank attempts begun within a period.
//!
//! Whoever meets [`GateError::Rebuilding`] asks for a rebuild; the replica that gets
//! the rebuild lock in Redis does it, the others keep answering 503 until the epochs
//! are back. While it runs, no admission is decided on a lost slot, so the records
//! read are all there is to count. An admission already past the gate when Redis
//! lost its keys is counted too: before reading, the rebuild stamps itself in
//! PostgreSQL under the gate's advisory lock, which waits for every admission writing
//! its record; an admission that writes after that finds the stamp newer than its
//! ticket's and is refused (503, its gate undone).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use refresh_pg::{GateRow, Store, StoreError};
use refresh_redis::{AdmittedRefresh, Gate, GateError, REBUILD_LOOKBACK, RebuildReport};

/// How long a replica holds the rebuild lock: far longer than a rebuild of 100 000
/// consents takes, short enough that a replica dying mid-rebuild delays the next by little.
const LOCK_TTL: Duration = Duration::from_secs(60);

/// How long the request that noticed the loss waits for the rebuild to finish before
/// it answers 503 (the rebuild goes on without it).
const WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("cannot read the admissions to rebuild from")]
    Database(#[source] StoreError),
    #[error("cannot write the rebuilt gate state")]
    Redis(#[source] GateError),
}

/// Rebuilds the gate of one namespace.
#[derive(Clone)]
pub struct GateRebuild {
    store: Store,
    gate: Gate,
    /// This process's name in the rebuild lock.
    owner: String,
    /// One rebuild at a time in this process: the requests that meet a lost state
    /// together wait for the same rebuild instead of all answering 503.
    running: Arc<tokio::sync::Mutex<()>>,
    /// Rebuilds this process finished, so a waiter can tell one happened meanwhile.
    finished: Arc<AtomicU64>,
}

/// How long [`GateRebuild::ensure`] waits for another replica's rebuild.
const ENSURE_WAIT: Duration = Duration::from_secs(10);

impl GateRebuild {
    pub fn new(store: Store, gate: Gate) -> Self {
        Self {
            store,
            gate,
            owner: uuid::Uuid::new_v4().to_string(),
            running: Arc::new(tokio::sync::Mutex::new(())),
            finished: Arc::new(AtomicU64::new(0)),
        }
    }

    /// At start-up: if the state is missing (a new namespace, or Redis lost it while
    /// no process ran), rebuilds it or waits for the replica that does, so the
    /// first requests find it whole. A failure is only logged: every script checks
    /// its epoch anyway and the first request to meet the loss rebuilds.
    pub async fn ensure(&self) {
        let deadline = Instant::now() + ENSURE_WAIT;
        loop {
            match self.gate.state_present().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %refresh_core::error_chain(&error), "cannot check the gate's state at start-up");
                    return;
                }
            }
            match self.rebuild_now().await {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(error = %refresh_core::error_chain(&error), "cannot rebuild the gate's state at start-up");
                    return;
                }
            }
        }
    }

    /// After a script found its slot's state lost: rebuilds unless another replica
    /// does, waiting a little for it. `true` once this call's rebuild finished, so
    /// the caller may ask the gate again; `false` means answer 503.
    pub async fn recover(&self) -> bool {
        let this = self.clone();
        let seen = self.finished.load(Ordering::Acquire);
        let mut task = tokio::spawn(async move {
            let _one = this.running.lock().await;
            if this.finished.load(Ordering::Acquire) != seen {
                // Rebuilt by this process while this request waited.
                return Ok(Some(RebuildReport::default()));
            }
            this.rebuild_now().await
        });
        match tokio::time::timeout(WAIT, &mut task).await {
            Ok(Ok(Ok(Some(_)))) => true,
            Ok(Ok(Ok(None))) | Err(_) => false,
            Ok(Ok(Err(error))) => {
                tracing::warn!(error = %refresh_core::error_chain(&error), "the gate's state could not be rebuilt; admissions stay refused");
                false
            }
            Ok(Err(join)) => {
                tracing::error!(error = %join, "the gate rebuild task failed");
                false
            }
        }
    }

    /// Rebuilds now if no other replica holds the rebuild lock; `None` if one does.
    pub async fn rebuild_now(&self) -> Result<Option<RebuildReport>, RebuildError> {
        if !self
            .gate
            .try_begin_rebuild(&self.owner, LOCK_TTL)
            .await
            .map_err(RebuildError::Redis)?
        {
            return Ok(None);
        }
        let started = Instant::now();
        let result = self.rebuild_locked().await;
        if let Err(error) = self.gate.end_rebuild(&self.owner).await {
            tracing::warn!(error = %refresh_core::error_chain(&error), "cannot free the rebuild lock; it expires");
        }
        let report = result?;
        self.finished.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(
            quota_sets = report.quota_sets,
            locks = report.locks,
            slots = report.slots,
            starts = report.starts,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "redis had lost the gate's state; rebuilt it from the database"
        );
        Ok(Some(report))
    }

    async fn rebuild_locked(&self) -> Result<RebuildReport, RebuildError> {
        // First the stamp, in the database: every admission of the lost state has
        // committed its record by then, or never will (`Store::begin_admission`).
        let now = self.gate.redis_now().await.map_err(RebuildError::Redis)?;
        let epoch = self
            .store
            .begin_gate_rebuild(now)
            .await
            .map_err(RebuildError::Database)?;
        let rows = self
            .store
            .gate_rows(Utc::now() - REBUILD_LOOKBACK)
            .await
            .map_err(RebuildError::Database)?;
        let refreshes: Vec<AdmittedRefresh> = rows.into_iter().map(admitted).collect();
        self.gate
            .rebuild(&refreshes, epoch)
            .await
            .map_err(RebuildError::Redis)
    }
}

fn admitted(row: GateRow) -> AdmittedRefresh {
    AdmittedRefresh {
        refresh_id: row.refresh_id,
        consent_id: row.consent_id,
        tenant_id: row.tenant_id,
        provider_id: row.provider_id,
        requested_by: row.requested_by,
        initial: row.initial,
        admitted_at: row.date_requested,
        not_before: row.not_before,
        in_flight: row.in_flight,
        last_attempt: row.last_attempt,
    }
}
