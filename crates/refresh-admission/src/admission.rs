//! Admission: SPEC §2 for one request, whatever channel it came by.
//!
//! Order: the gate (one Redis script per slot: rules 1–2 on the consent's facts as
//! mirrored in Redis, then rules 3–5), then the record, its INITIALIZED event and its
//! job written by one statement shared with concurrent admissions, which checks the
//! consent again (PostgreSQL is the record). The consent is looked up in the database
//! only when the mirror cannot decide (facts missing or refusing), when the gate
//! refuses (rules 1–2 come first), when the statement refuses the consent, and for a
//! platform operator. Anything failing after the gate undoes the gate (lock, quota,
//! slot), so nothing is half-done.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use refresh_amqp::Broker;
use refresh_core::{
    Caller, CloudEvent, ConsentFacts, ConsentId, EventId, Job, Problem, ProblemCode, RefreshId,
    RefreshRecord, RejectedRequest, RequestedBy, TenantId, TraceContext, consent_refusal,
};
use refresh_pg::{Admission, ConsentRow, KeyAnswer, KeyFence, OutboxEvent, Store, StoreError};
use refresh_redis::{Gate, GateDecision, GateError, GateRequest, QuotaStatus, Ticket};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::metrics::AdmissionMetrics;
use crate::rebuild::GateRebuild;
use crate::writer::{AdmissionWriter, WriteError};

/// Who asks, and for which consent.
#[derive(Clone, Debug)]
pub struct RefreshRequest {
    pub consent_id: ConsentId,
    /// `None` for a platform operator (`api:admin`), who may act on any tenant.
    pub tenant: Option<TenantId>,
    pub requested_by: RequestedBy,
    /// The initial connection load: all data kinds, counted against no quota.
    pub initial: bool,
    /// The request's W3C trace context (the caller's, or a new one when it sent none
    /// or a malformed one): kept with the refresh and carried by its events.
    pub traceparent: TraceContext,
}

/// The answer to a request.
#[derive(Clone, Debug)]
pub enum Decision {
    Admitted(RefreshRecord),
    Refused(Problem),
}

/// A dependency failed: nothing was admitted and nothing consumed (SPEC §2 rule 6).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("database unavailable")]
    Database(#[source] StoreError),
    /// The statement writing the admission's batch failed (shared by its batch).
    #[error("database unavailable")]
    Write(#[source] Arc<StoreError>),
    #[error("redis unavailable")]
    Redis(#[source] GateError),
    #[error("rabbitmq unreachable")]
    Broker(#[source] refresh_amqp::AmqpError),
}

/// A reserved idempotency key whose answer an admission records with itself.
#[derive(Clone, Debug)]
pub struct Remember {
    pub tenant: TenantId,
    pub key: String,
    pub fence: KeyFence,
    /// The status and body the channel answers for an admission.
    pub answer: fn(&RefreshRecord) -> (u16, serde_json::Value),
}

/// The admission service shared by the HTTP API and the upstream request consumer.
#[derive(Clone)]
pub struct Admitter {
    store: Store,
    gate: Gate,
    broker: Broker,
    metrics: AdmissionMetrics,
    /// Wakes the outbox relay when an event was written.
    outbox: Arc<Notify>,
    rebuild: GateRebuild,
    writer: AdmissionWriter,
}

impl Admitter {
    /// The admission service; its group-commit writer runs on `tracker` until the
    /// last clone is dropped.
    pub fn new(
        store: Store,
        gate: Gate,
        broker: Broker,
        metrics: AdmissionMetrics,
        outbox: Arc<Notify>,
        tracker: &TaskTracker,
    ) -> Self {
        Self {
            rebuild: GateRebuild::new(store.clone(), gate.clone()),
            writer: AdmissionWriter::start(store.clone(), tracker),
            store,
            gate,
            broker,
            metrics,
            outbox,
        }
    }

    /// Decides one request; an `Err` means a dependency is down (answer 503).
    pub async fn request(&self, request: &RefreshRequest) -> Result<Decision, Unavailable> {
        self.request_answering(request, None).await
    }

    /// Decides one request whose idempotency key is reserved: an admission records
    /// the key's answer (`remember.answer` of its record) in the statement that writes
    /// the admission, so an admitted request's key is never left unanswered by a
    /// crash. A refusal leaves the key to the caller.
    pub async fn request_answering(
        &self,
        request: &RefreshRequest,
        remember: Option<&Remember>,
    ) -> Result<Decision, Unavailable> {
        let started = Instant::now();
        let decision = self.decide(request, remember).await;
        self.metrics.admission_latency(started.elapsed());
        match &decision {
            Ok(Decision::Admitted(_)) => self.metrics.admitted(request.requested_by),
            Ok(Decision::Refused(problem)) => {
                self.metrics.refused(request.requested_by, problem.code)
            }
            Err(_) => self
                .metrics
                .refused(request.requested_by, ProblemCode::Unavailable),
        }
        decision
    }

    async fn decide(
        &self,
        request: &RefreshRequest,
        remember: Option<&Remember>,
    ) -> Result<Decision, Unavailable> {
        // A tenant's request is decided on the consent's facts as mirrored in Redis
        // (the admit script checks rules 1–2 on them), so that an admission needs no
        // lookup; an operator's names no tenant for them to match, and is looked up.
        let mut looked = None;
        let tenant = match &request.tenant {
            Some(tenant) => tenant.clone(),
            None => match self.look_up(request).await? {
                Ok(consent) => looked.insert(consent).tenant_id.clone(),
                Err(refused) => return Ok(refused),
            },
        };
        let mut gate_request = GateRequest {
            consent_id: request.consent_id,
            tenant_id: tenant,
            facts: looked.as_ref().map(ConsentRow::facts),
            requested_by: request.requested_by,
            refresh_id: RefreshId::from_uuid(uuid::Uuid::now_v7()),
            count_quota: !request.initial,
        };
        let mut decision = self.admit(&gate_request).await?;
        // The mirror cannot decide (facts missing or refusing), or refused by rules
        // 3–5, which come after rules 1–2: only the database tells those for sure.
        if looked.is_none() && !matches!(decision, GateDecision::Admitted(_)) {
            let consent = match self.look_up(request).await? {
                Ok(consent) => looked.insert(consent),
                Err(refused) => return Ok(refused),
            };
            gate_request.tenant_id = consent.tenant_id.clone();
            gate_request.facts = Some(consent.facts());
            if matches!(decision, GateDecision::LookUp) {
                decision = self.admit(&gate_request).await?;
            }
        }
        if let GateDecision::Refused(problem) = &decision
            && let Some(holder) = problem.refresh_id
            && self.release_stale_lock(request.consent_id, holder).await?
        {
            decision = self.admit(&gate_request).await?;
        }
        if let GateDecision::Refused(problem) = &decision
            && problem.code == ProblemCode::DailyLimitReached
            && self
                .heal_quota(request.consent_id, request.requested_by)
                .await?
        {
            decision = self.admit(&gate_request).await?;
        }
        let ticket = match decision {
            GateDecision::Admitted(ticket) => ticket,
            GateDecision::Refused(problem) => {
                return Ok(self.refused(request, looked.as_ref(), problem).await);
            }
            // Facts given, yet refused by them: the consent expired meanwhile.
            GateDecision::LookUp => {
                return match self.look_up(request).await? {
                    Err(refused) => Ok(refused),
                    Ok(_) => Err(Unavailable::Database(StoreError::ConsentRefused)),
                };
            }
        };
        // The job is durable once committed, but a 202 promises it reaches the
        // workers soon: with the broker known to be unreachable, admit nothing (SPEC
        // §2 rule 6), as when a publish could not be confirmed.
        if !self.broker.is_connected() {
            self.undo(&ticket).await;
            return Err(Unavailable::Broker(refresh_amqp::AmqpError::NotConnected));
        }
        match self
            .enqueue(&gate_request.tenant_id, request, &ticket, remember)
            .await
        {
            Ok(record) => {
                self.outbox.notify_one();
                Ok(Decision::Admitted(record))
            }
            Err(failure) => {
                // One that may have been written keeps its lock and quota entry, to
                // lapse with the lease (heal_quota forgets the entry if it never was).
                if !matches!(failure, Enqueue::InDoubt(_)) {
                    self.undo(&ticket).await;
                }
                match failure {
                    Enqueue::InFlight(holder) => {
                        let problem = Problem::refresh_in_progress(holder);
                        Ok(self.refused(request, looked.as_ref(), problem).await)
                    }
                    // Admitted on stale mirrored facts: the database's answer.
                    Enqueue::ConsentRefused => match self.look_up(request).await? {
                        Err(refused) => Ok(refused),
                        Ok(_) => Err(Unavailable::Database(StoreError::ConsentRefused)),
                    },
                    Enqueue::StaleGate => {
                        // The state that admitted this is older than the latest rebuild
                        // begun: that rebuild has not finished (it answers soon), or it
                        // died after stamping. Rebuild again so the state is current,
                        // instead of refusing every admission it decides.
                        self.rebuild.recover().await;
                        Err(Unavailable::Database(StoreError::StaleGate))
                    }
                    Enqueue::Unavailable(error) | Enqueue::InDoubt(error) => Err(error),
                }
            }
        }
    }

    /// The consent from the database (rules 1–2): `Ok` if they admit it, else the
    /// refusal, announced. A refusal also writes the consent's facts through to the
    /// mirror, which may have admitted it on stale ones.
    async fn look_up(
        &self,
        request: &RefreshRequest,
    ) -> Result<Result<ConsentRow, Decision>, Unavailable> {
        let consent = self
            .store
            .consent(request.consent_id)
            .await
            .map_err(Unavailable::Database)?;
        let Some(problem) = refuse_consent(consent.as_ref(), request.tenant.as_ref(), Utc::now())
        else {
            // refuse_consent answers 404 for a missing consent.
            return Ok(consent.ok_or(Decision::Refused(Problem::consent_not_found())));
        };
        let facts = consent.as_ref().map(ConsentRow::facts);
        if let Err(error) = self.gate.mirror(&[(request.consent_id, facts)]).await {
            tracing::warn!(error = %error, consent = %request.consent_id, "cannot write a consent's facts through to the gate");
        }
        Ok(Err(self.refused(request, consent.as_ref(), problem).await))
    }

    /// Undoes the gate of an admission that was not written; a failure is logged
    /// (the lock expires with its lease).
    async fn undo(&self, ticket: &Ticket) {
        if let Err(error) = self.gate.undo(ticket).await {
            tracing::error!(error = %error, refresh_id = %ticket.refresh_id, "cannot undo the gate; the lock expires with its lease");
        }
    }

    async fn admit(&self, request: &GateRequest) -> Result<GateDecision, Unavailable> {
        let started = Instant::now();
        let mut decision = self.gate.admit(request).await;
        // Redis lost the gate's state: decide only once it is rebuilt.
        if matches!(decision, Err(GateError::Rebuilding)) && self.rebuild.recover().await {
            decision = self.gate.admit(request).await;
        }
        let decision = decision.map_err(Unavailable::Redis)?;
        self.metrics.gate_latency(started.elapsed());
        Ok(decision)
    }

    /// Refuses `request` without deciding it (a channel's own rule, e.g. a source the
    /// channel does not accept): counted, and announced as `refresh.rejected`.
    pub async fn refuse(&self, request: &RefreshRequest, problem: Problem) -> Problem {
        self.metrics.refused(request.requested_by, problem.code);
        // The decision is the refusal itself; what matters here is its event.
        let _refusal = self.refused(request, None, problem.clone()).await;
        problem
    }

    /// The consent's quota for `source` as the gate counts it (`None` when the source
    /// is exempt). Like an admission, a read that meets a lost gate state rebuilds it
    /// (or waits a little for the replica that does) and reads again.
    pub async fn quota(
        &self,
        consent: ConsentId,
        source: RequestedBy,
    ) -> Result<Option<QuotaStatus>, GateError> {
        let quota = self.gate.quota(consent, source).await;
        if matches!(quota, Err(GateError::Rebuilding)) && self.rebuild.recover().await {
            return self.gate.quota(consent, source).await;
        }
        quota
    }

    /// Whether every dependency of an admission answers right now: one round trip to
    /// Redis and to PostgreSQL, and the broker's connection up.
    pub async fn dependencies_answer(&self) -> bool {
        let (redis, database) =
            tokio::join!(self.gate.redis_now(), refresh_pg::health(self.store.pool()));
        redis.is_ok() && database.is_ok() && self.broker.is_connected()
    }

    /// Writes consents' changed facts (status, expiry) through to the gate's mirror
    /// once the change committed: revoked, expired and inactivated consents are then
    /// refused by the admit script itself. A failure is logged, not returned: the
    /// change stands, and an admission the stale facts let past the gate is refused
    /// by the admission statement, which checks the consent again.
    pub async fn write_through(
        &self,
        consents: impl IntoIterator<Item = (ConsentId, ConsentFacts)>,
    ) {
        let consents: Vec<_> = consents
            .into_iter()
            .map(|(consent, facts)| (consent, Some(facts)))
            .collect();
        if let Err(error) = self.gate.mirror(&consents).await {
            tracing::warn!(error = %error, consents = consents.len(), "cannot write consents' facts through to the gate; the admission statement checks them");
        }
    }

    /// The gate's rebuild, for the other readers of the gate (the scheduler's
    /// in-flight check) that meet [`GateError::Rebuilding`].
    pub fn gate_rebuild(&self) -> &GateRebuild {
        &self.rebuild
    }

    /// A lock whose refresh already ended is stale: its worker commits the terminal
    /// status before it frees the lock (or died in between). Frees it (only if
    /// `holder` still owns it) and says whether the holder's refresh has ended, so
    /// that the gate is asked again — also when the worker freed the lock itself in
    /// the meantime.
    async fn release_stale_lock(
        &self,
        consent: ConsentId,
        holder: RefreshId,
    ) -> Result<bool, Unavailable> {
        let record = self
            .store
            .refresh(holder)
            .await
            .map_err(Unavailable::Database)?;
        // No record: an admission still committing, or one that failed (its lock goes
        // with its undo or its lease). Only a terminal record proves the lock stale.
        if !record.is_some_and(|r| r.status.is_terminal()) {
            return Ok(false);
        }
        self.gate
            .release_lock(consent, holder)
            .await
            .map_err(Unavailable::Redis)?;
        Ok(true)
    }

    /// A quota that refuses may be counting admissions that failed after the gate
    /// and whose undo never ran (Redis down too, or the process died in between):
    /// any counted refresh admitted more than a lease ago without a record is such
    /// a one (an admission commits within seconds or not at all). Forgets those and
    /// says whether there were any, so that the gate is asked again.
    async fn heal_quota(
        &self,
        consent: ConsentId,
        source: RequestedBy,
    ) -> Result<bool, Unavailable> {
        let counted = self
            .gate
            .counted_before(consent, source, self.gate.lease())
            .await
            .map_err(Unavailable::Redis)?;
        if counted.is_empty() {
            return Ok(false);
        }
        let recorded = self
            .store
            .recorded_refreshes(&counted)
            .await
            .map_err(Unavailable::Database)?;
        let mut healed = false;
        for refresh in counted.into_iter().filter(|id| !recorded.contains(id)) {
            self.gate
                .forget_admission(consent, refresh)
                .await
                .map_err(Unavailable::Redis)?;
            tracing::warn!(%consent, %refresh, "forgot a quota entry of an admission that never committed");
            self.metrics.healed();
            healed = true;
        }
        Ok(healed)
    }

    /// Record, event and job in one statement ([`Store::admit`]): once it returns
    /// the job is durable, and the relay publishes it with a confirm.
    async fn enqueue(
        &self,
        tenant: &TenantId,
        request: &RefreshRequest,
        ticket: &Ticket,
        remember: Option<&Remember>,
    ) -> Result<RefreshRecord, Enqueue> {
        let record = RefreshRecord::initialized(
            ticket.refresh_id,
            ticket.consent_id,
            tenant.clone(),
            request.requested_by,
            ticket.now,
            ticket.not_before,
        );
        let event = OutboxEvent::refresh(
            &record,
            Some(request.traceparent),
            EventId::from_uuid(uuid::Uuid::now_v7()),
            ticket.now,
        );
        let job = Job {
            refresh_id: record.refresh_id,
            consent_id: record.consent_id,
            tenant_id: record.tenant_id.clone(),
            provider_id: ticket.provider_id.clone(),
            requested_by: record.requested_by,
            initial: request.initial,
            not_before: record.not_before,
            traceparent: Some(request.traceparent),
        };
        let admission = Admission {
            record: record.clone(),
            initial: request.initial,
            traceparent: Some(request.traceparent),
            event,
            job: job.to_bytes(),
            epoch: ticket.epoch,
            key: remember.map(|remember| {
                let (http_status, response) = (remember.answer)(&record);
                KeyAnswer {
                    tenant: remember.tenant.clone(),
                    key: remember.key.clone(),
                    fence: remember.fence,
                    http_status,
                    response,
                }
            }),
        };
        let started = Instant::now();
        let written = self.writer.write(admission).await;
        self.metrics.write_latency(started.elapsed());
        match written {
            Ok(()) => Ok(record),
            Err(WriteError::StaleGate) => Err(Enqueue::StaleGate),
            Err(WriteError::ConsentRefused) => Err(Enqueue::ConsentRefused),
            Err(WriteError::InFlight) => {
                // The database still has a refresh in flight whose Redis lock lapsed
                // (its worker died and the job awaits redelivery).
                let holder = self
                    .store
                    .in_flight(ticket.consent_id)
                    .await
                    .map_err(|e| Enqueue::Unavailable(Unavailable::Database(e)))?;
                Err(match holder {
                    Some(holder) => Enqueue::InFlight(holder),
                    None => Enqueue::Unavailable(Unavailable::Database(StoreError::Conflict)),
                })
            }
            Err(WriteError::Failed(error)) => Err(Enqueue::Unavailable(Unavailable::Write(error))),
            Err(WriteError::InDoubt(error)) => Err(Enqueue::InDoubt(Unavailable::Write(error))),
        }
    }

    /// A refusal, also announced as a `refresh.rejected.{tenant}` event (when the
    /// consent, hence the tenant, is known to the caller).
    async fn refused(
        &self,
        request: &RefreshRequest,
        consent: Option<&ConsentRow>,
        problem: Problem,
    ) -> Decision {
        let tenant = match (consent, &request.tenant) {
            (Some(consent), _) if problem.code != ProblemCode::ConsentNotFound => {
                Some(consent.tenant_id.clone())
            }
            (_, Some(tenant)) => Some(tenant.clone()),
            _ => None,
        };
        if let Some(tenant_id) = tenant {
            let now = Utc::now();
            let event = CloudEvent::rejected(
                RejectedRequest {
                    consent_id: request.consent_id,
                    tenant_id,
                    requested_by: request.requested_by,
                    problem: problem.clone(),
                },
                EventId::from_uuid(uuid::Uuid::now_v7()),
                now,
            );
            let outbox = OutboxEvent {
                event_id: event.id,
                routing_key: event.routing_key(),
                payload: serde_json::to_value(&event).unwrap_or_default(),
            };
            match self.store.insert_event(&outbox, now).await {
                Ok(()) => self.outbox.notify_one(),
                Err(error) => tracing::warn!(error = %error, "cannot record the rejected event"),
            }
        }
        Decision::Refused(problem)
    }
}

enum Enqueue {
    InFlight(RefreshId),
    /// The database refused the consent (the gate decided on stale facts).
    ConsentRefused,
    /// A gate rebuild began after the state that admitted it.
    StaleGate,
    Unavailable(Unavailable),
    /// Whether it was written is unknown: the gate must stay.
    InDoubt(Unavailable),
}

/// SPEC §2 rules 1–2: unknown or another tenant's consent → 404; not active → 403.
/// A consent past its `expiresAt` counts as expired.
pub(crate) fn refuse_consent(
    consent: Option<&ConsentRow>,
    tenant: Option<&TenantId>,
    now: DateTime<Utc>,
) -> Option<Problem> {
    let caller = match tenant {
        Some(tenant) => Caller::Tenant(tenant),
        None => Caller::Admin,
    };
    let status = consent.map(|c| (&c.tenant_id, c.status.at(c.expires_at, now)));
    consent_refusal(status, caller)
}

/// A new trace context, from fresh random bytes.
pub fn new_trace() -> TraceContext {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut random = [0u8; 24];
    random[..16].copy_from_slice(a.as_bytes());
    random[16..].copy_from_slice(&b.as_bytes()[..8]);
    TraceContext::new(random)
}

/// The trace context of a request: its `traceparent` when that is a valid one, else a
/// new trace (a malformed header starts a new trace, it never refuses the request).
pub fn trace_or_new(traceparent: Option<&str>) -> TraceContext {
    traceparent
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(new_trace)
}
