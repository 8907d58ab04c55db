//! The admission gate (SPEC §2 rules 3–5, and 1–2 on the consent's mirrored facts) and
//! the workers' start slots, as atomic Redis scripts.
//!
//! Key layout (every key starts with `{namespace}:`; the `{…}` after it is the
//! Redis Cluster hash tag, so each script touches one slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{ns}:{c:<consentId>}:lock` | string, PX lease | the refresh id in flight |
//! | `{ns}:{c:<consentId>}:facts` | string, PX 7 days | the consent's admission facts as last looked up or written through ([`ConsentFacts`]): `<status> <expiresAt ms> <tenant> <provider>` |
//! | `{ns}:{c:<consentId>}:q:<rule>` | sorted set | admissions counted by `quota.rules[rule]`: member refresh id, score admission time (ms); expires 24 h after the newest (rolling) or at the next local midnight (calendar day) |
//! | `{ns}:{stagger:<bucket>}` | string, expires a period after the slot | the last on-demand start slot handed out: `<ms>:<refresh id>` |
//! | `{ns}:{stagger:<bucket>}:autosync` | string, expires a period after the slot | the last `AUTOSYNC` start slot handed out, likewise |
//! | `{ns}:{stagger:<bucket>}:slots` | sorted set | every start slot not yet past: member refresh id, score slot (ms); keeps any two slots `period / limit` apart |
//! | `{ns}:{stagger:<bucket>}:starts` | sorted set | bank refresh starts of the last period: member attempt id, score start time (ms) |
//! | `{ns}:{e:<k>}:epoch` | string | one per hash slot (`k` chosen so the key lies in that slot): the slot's state is whole; written last by a rebuild |
//! | `{ns}:{rebuild}` | string, PX | the replica rebuilding the state from PostgreSQL |
//!
//! Redis is a copy of PostgreSQL's history (SPEC §2). Every deciding script first
//! checks its slot's epoch key; a missing one means Redis lost that slot's state,
//! and the script refuses ([`GateError::Rebuilding`], answered 503) until one
//! replica, holding the rebuild lock, has written the state back from the
//! admissions still in their windows ([`Gate::rebuild`]) and then the epochs.
//!
//! On one Redis an admission is one script (`admit_with_slot`): lock and quota
//! checked, the start slot taken, then the lock taken and the admission counted;
//! a refusal writes nothing. On a cluster the consent and the stagger bucket live
//! in different slots, so it is two: `admit` (lock, then quota; on success the lock
//! is taken and the admission counted) and `take_slot`. When `take_slot` refuses
//! `backlog_full`, `release_admission` undoes `admit`. In the few milliseconds
//! between those two, a concurrent request for the same consent sees the lock and
//! is refused 409 with the id of a refresh that never comes to exist, and a quota
//! status read counts it; the lock never outlives the undo (or, if Redis fails in
//! between, its lease).
//!
//! Every record is keyed by the refresh id, so undoing is idempotent, and after a
//! timeout (when a script may or may not have run) the gate undoes blindly.
//!
//! The consent's facts (tenant, provider, status, expiry) are a cache of
//! PostgreSQL's, checked by the admit scripts first so that an admission needs no
//! lookup: stored when a caller looked the consent up, and written through when a
//! consent is registered or changes ([`Gate::mirror`]). Missing or refusing facts
//! send the caller to the database ([`GateDecision::LookUp`]); facts that admit but
//! are stale are caught by the admission statement, which checks the consent again.

mod epoch;
mod lua;
mod reply;

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::TryStreamExt as _;
use redis::{ErrorKind, Script, ScriptInvocation, ServerErrorKind, Value};
use refresh_core::{
    ConsentFacts, ConsentId, Problem, ProviderId, QuotaRule, QuotaWindow, RefreshId, RequestedBy,
    StaggerSettings, TenantId,
};

use crate::ConnectionManager;
use reply::{AdmitReply, AdmitSlotReply, InFlightReply, SlotReply, StartReply, UsageReply};

/// What the gate needs from the settings.
#[derive(Clone, Debug)]
pub struct GateConfig {
    /// Prefix of every key.
    pub namespace: String,
    /// `quota.rules`. A rule's position names its keys: reordering the rules
    /// reassigns the counts already made.
    pub rules: Vec<QuotaRule>,
    /// `quota.time_zone`, for `calendar_day` rules.
    pub time_zone: chrono_tz::Tz,
    /// `stagger`.
    pub stagger: StaggerSettings,
    /// `lock.lease_secs`: how long a lock lives without renewal.
    pub lease: Duration,
}

/// One request to admit.
#[derive(Clone, Debug)]
pub struct GateRequest {
    pub consent_id: ConsentId,
    /// The consent's tenant as looked up, or else the caller's: the mirrored facts
    /// must name it (SPEC §2 rule 1).
    pub tenant_id: TenantId,
    /// The consent's facts when the caller looked it up in the database and they
    /// passed rules 1 and 2: they become the mirror (see [`Gate::mirror`]). `None`:
    /// the mirrored facts decide rules 1 and 2, and missing or refusing ones answer
    /// [`GateDecision::LookUp`].
    pub facts: Option<ConsentFacts>,
    pub requested_by: RequestedBy,
    /// The id the refresh gets if admitted; the lock holds it.
    pub refresh_id: RefreshId,
    /// `false` for the initial connection load, which no quota counts or limits.
    pub count_quota: bool,
}

/// A consent's facts as the admit script reads them: '<status> <expires at, ms>
/// <tenant> <provider>' (ids never hold a space).
fn encoded(facts: &ConsentFacts) -> String {
    format!(
        "{} {} {} {}",
        facts.status.as_str(),
        facts.expires_at.timestamp_millis().max(0),
        facts.tenant_id,
        facts.provider_id
    )
}

/// The gate's answer.
#[derive(Clone, Debug)]
pub enum GateDecision {
    Admitted(Ticket),
    Refused(Problem),
    /// The consent's mirrored facts are missing, or refuse it (rules 1–2): only the
    /// database can answer. Nothing was consumed; ask again with the facts looked up.
    LookUp,
}

/// An admission: the lock is held by `refresh_id`, the quota counted, a start slot taken.
#[derive(Clone, Debug)]
pub struct Ticket {
    pub refresh_id: RefreshId,
    pub consent_id: ConsentId,
    /// The consent's provider (as looked up, or as mirrored).
    pub provider_id: ProviderId,
    /// The start slot.
    pub not_before: DateTime<Utc>,
    /// Redis `TIME` at the decision: the admission time the quota counted.
    pub now: DateTime<Utc>,
    /// The stamp of the rebuild whose state decided (the consent's epoch key): the
    /// record's commit checks that no rebuild began since (`Store::begin_admission`).
    pub epoch: i64,
    /// Indices in `quota.rules` of the rules that counted the admission.
    counted: Vec<usize>,
    bucket: String,
    /// The slot came from the auto-sync chain.
    autosync: bool,
    /// The slot (ms) and the bucket's value before it, to give it back.
    slot: i64,
    previous_slot: Option<String>,
}

/// A consent's standing against its most restrictive quota rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaStatus {
    pub limit: u32,
    pub used: u32,
    pub window: QuotaWindow,
    /// `None` while the rule still admits.
    pub next_refresh_possible_at: Option<DateTime<Utc>>,
}

/// Whether a worker may start a bank refresh now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// Start now; the start is recorded.
    Go,
    /// Nothing recorded; ask again at this time.
    WaitUntil(DateTime<Utc>),
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Redis did not answer (refused, dropped, timed out, loading, failing over), or
    /// refused a script that adds state because it is full:
    /// the caller answers 503. A script runs whole or not at all.
    #[error("redis unavailable")]
    Unavailable(#[source] redis::RedisError),
    /// Redis lost the gate's state (a slot's epoch key is missing): nothing can be
    /// decided until it is rebuilt from PostgreSQL; the caller answers 503.
    #[error("redis lost the gate's state; it is rebuilt from the database first")]
    Rebuilding,
    /// Redis answered something the gate does not understand: a bug or a foreign key.
    #[error("unexpected redis reply to {operation}: {detail}")]
    Script {
        operation: &'static str,
        detail: String,
        #[source]
        source: Option<redis::RedisError>,
    },
}

impl GateError {
    fn reply(operation: &'static str, detail: impl Into<String>) -> Self {
        Self::Script {
            operation,
            detail: detail.into(),
            source: None,
        }
    }

    fn skew(operation: &'static str) -> Self {
        Self::reply(
            operation,
            "redis time is more than two days away from this host's clock",
        )
    }

    /// Whether the failed command may have reached Redis (and so may have run).
    fn may_have_run(&self) -> bool {
        match self {
            Self::Unavailable(e) => !e.is_connection_refusal(),
            Self::Rebuilding => false,
            Self::Script { .. } => true,
        }
    }
}

/// Classifies a failure once: dependency down (transient) or unexpected reply.
fn classify(operation: &'static str, error: redis::RedisError) -> GateError {
    let transient = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.code() == Some("BUSY")
        // Full (`maxmemory` under `noeviction`): a script that adds state is refused
        // whole before it runs (see `lua::WhenFull`).
        || error.code() == Some("OOM")
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        );
    if transient {
        GateError::Unavailable(error)
    } else {
        GateError::Script {
            operation,
            detail: error.to_string(),
            source: Some(error),
        }
    }
}

/// What the gate's scripts decided, before it becomes a [`Ticket`].
enum Gated {
    /// The lock is taken, the admission counted and the start slot taken.
    Admitted {
        /// Redis time of the consent's decision (ms): the admission time counted.
        now: i64,
        /// The stamp of the state that decided.
        epoch: i64,
        /// Redis time of the slot's decision (ms), and the slot.
        slot_now: i64,
        slot: i64,
        /// The class's last slot before it, to give the slot back.
        previous: Option<String>,
        /// The lock already lasts until a lease past the slot.
        held_across: bool,
        /// The consent's provider, as mirrored.
        provider: String,
    },
    Refused(Problem),
    LookUp,
}

/// What an admission script's reply other than an admission means: a refusal, a
/// question for the database, or a failure.
fn not_admitted(reply: AdmitReply, rules: &[&QuotaRule]) -> Result<Gated, GateError> {
    match reply {
        AdmitReply::LookUp => Ok(Gated::LookUp),
        other => refusal(other, rules).map(Gated::Refused),
    }
}

/// The refusal (or failure) an admission script's reply other than an admission means.
fn refusal(reply: AdmitReply, rules: &[&QuotaRule]) -> Result<Problem, GateError> {
    match reply {
        AdmitReply::Locked { holder, .. } => holder
            .parse()
            .map(Problem::refresh_in_progress)
            .map_err(|_| GateError::reply("admit", format!("lock holds {holder:?}"))),
        AdmitReply::OverQuota { now, refusals } => {
            reply::quota_problem(rules, &refusals, now).map_err(|e| GateError::reply("admit", e))
        }
        AdmitReply::Skew { .. } => Err(GateError::skew("admit")),
        AdmitReply::Rebuild => Err(GateError::Rebuilding),
        AdmitReply::LookUp | AdmitReply::Admitted { .. } => Err(GateError::reply(
            "admit",
            "an admission without a start slot",
        )),
    }
}

/// How far back a rebuild reads admissions: the longest quota window (a calendar
/// day of 25 h) and a margin for clock skew between hosts.
pub const REBUILD_LOOKBACK: TimeDelta = TimeDelta::hours(26);

/// Writes a rebuild has in flight at once.
const REBUILD_CONCURRENCY: usize = 64;

const DAY_MS: i64 = 86_400_000;

/// A refresh as the rebuild reads it from PostgreSQL.
#[derive(Clone, Debug)]
pub struct AdmittedRefresh {
    pub refresh_id: RefreshId,
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub requested_by: RequestedBy,
    /// The initial connection load, which no quota counts.
    pub initial: bool,
    /// The admission time the quota counted (`dateRequested`).
    pub admitted_at: DateTime<Utc>,
    /// The start slot.
    pub not_before: DateTime<Utc>,
    /// Still `INITIALIZED`: it holds the lock and, until it starts, its slot.
    pub in_flight: bool,
    /// Its latest bank attempt, `(index, start)`: the entry `<refresh id>:<index>` the
    /// worker wrote in the start log ([`Gate::take_start_slot`]).
    pub last_attempt: Option<(u32, DateTime<Utc>)>,
}

/// What a rebuild wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub quota_sets: usize,
    pub locks: usize,
    pub slots: usize,
    /// Bank starts put back in the workers' start log.
    pub starts: usize,
    pub epochs: usize,
}

/// One write of a rebuild.
struct Write {
    script: &'static Script,
    keys: Vec<String>,
    args: Vec<String>,
}

impl Write {
    fn script(script: &'static Script, keys: Vec<String>, args: Vec<String>) -> Self {
        Self { script, keys, args }
    }
}

/// Milliseconds kept exact through Lua's doubles (about 35 000 years).
const MAX_MS: i64 = 1 << 50;

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .map_or(MAX_MS, |ms| ms.min(MAX_MS))
}

/// The admission gate. Cheap to clone; all state is in Redis.
/// How much longer than the stagger period a bank start counts (see
/// [`Gate::take_start_slot`]).
pub const START_MARGIN_MS: i64 = 1_000;

#[derive(Clone)]
pub struct Gate {
    conn: ConnectionManager,
    config: Arc<GateConfig>,
    spacing_ms: i64,
    /// Spacing of the auto-sync chain: the period over auto-sync's share of the limit.
    autosync_spacing_ms: i64,
    max_delay_ms: i64,
    period_ms: i64,
    lease_ms: i64,
}

impl Gate {
    pub fn new(conn: ConnectionManager, config: GateConfig) -> Self {
        // Rounded up, so `limit + 1` slots never fit in one period; an on-demand slot
        // fits between two auto-sync slots (see `slot_spacings_ms`).
        let (spacing_ms, autosync_spacing_ms) = config.stagger.slot_spacings_ms();
        let max_delay_ms = secs_to_ms(config.stagger.max_delay_secs);
        let period_ms = secs_to_ms(config.stagger.period_secs).max(1);
        let lease_ms = i64::try_from(config.lease.as_millis())
            .map_or(MAX_MS, |ms| ms.min(MAX_MS))
            .max(1);
        Self {
            conn,
            config: Arc::new(config),
            spacing_ms,
            autosync_spacing_ms,
            max_delay_ms,
            period_ms,
            lease_ms,
        }
    }

    /// SPEC §2 rules 3–5 in order (lock → quota → stagger); rules 1–2 are checked by the caller against the database first.
    ///
    /// The lock (409 `refresh_in_progress`, naming the holder) and every quota rule
    /// counting `requested_by` (429 `daily_limit_reached`, reporting the rule with
    /// the longest wait) are checked, then the start slot is handed out (or 429
    /// `backlog_full`); only if all pass is the lock taken and the admission counted.
    /// On one Redis that is one script; on a cluster the consent's script takes the
    /// lock and counts first, and is undone if the bucket's script refuses, so in
    /// either case a refusal consumes nothing.
    pub async fn admit(&self, req: &GateRequest) -> Result<GateDecision, GateError> {
        let scope = self.config.stagger.scope;
        let bucket = match &req.facts {
            Some(facts) => scope.bucket(&req.tenant_id, &facts.provider_id),
            None => match scope.bucket_without_provider(&req.tenant_id) {
                Some(bucket) => bucket,
                // The bucket is named before the script runs: a bucket per provider
                // needs the provider looked up first.
                None => return Ok(GateDecision::LookUp),
            },
        };
        let counted: Vec<usize> = if req.count_quota {
            self.rule_indices(req.requested_by)
        } else {
            Vec::new()
        };
        let rules = self.rules_at(&counted);
        let autosync = req.requested_by == RequestedBy::Autosync;
        let gated = if self.conn.is_cluster() {
            self.admit_then_take_slot(req, &counted, &rules, &bucket, autosync)
                .await?
        } else {
            self.admit_with_slot(req, &counted, &rules, &bucket, autosync)
                .await?
        };
        let (now, epoch, slot_now, slot, previous, held_across, provider) = match gated {
            Gated::Admitted {
                now,
                epoch,
                slot_now,
                slot,
                previous,
                held_across,
                provider,
            } => (now, epoch, slot_now, slot, previous, held_across, provider),
            Gated::Refused(problem) => return Ok(GateDecision::Refused(problem)),
            Gated::LookUp => return Ok(GateDecision::LookUp),
        };
        let times = reply::instant(now).and_then(|n| {
            let provider = ProviderId::parse(&provider)
                .map_err(|e| format!("mirrored provider {provider:?}: {e}"))?;
            Ok((n, reply::instant(slot)?, provider))
        });
        let (now, not_before, provider_id) = match times {
            Ok(times) => times,
            Err(detail) => {
                self.forget_quietly(req.consent_id, req.refresh_id, &counted)
                    .await;
                return Err(GateError::reply("take_slot", detail));
            }
        };
        let ticket = Ticket {
            refresh_id: req.refresh_id,
            consent_id: req.consent_id,
            provider_id,
            not_before,
            now,
            epoch,
            counted,
            bucket,
            autosync,
            slot,
            previous_slot: previous,
        };
        // A start further off than half a lease: the lock must outlive the
        // wait, or another refresh of the consent could be admitted meanwhile.
        if !held_across && slot - slot_now > self.lease_ms / 2 {
            let wait = Duration::from_millis(u64::try_from(slot - slot_now).unwrap_or(0));
            if let Err(error) = self
                .hold_lock_across(req.consent_id, req.refresh_id, wait)
                .await
            {
                // Nothing was admitted: the slot goes back with the rest.
                if let Err(undo) = self.undo(&ticket).await {
                    tracing::warn!(
                        error = &undo as &dyn std::error::Error,
                        consent = %req.consent_id,
                        refresh = %req.refresh_id,
                        "could not undo a failed admission; the lock expires with its lease"
                    );
                }
                return Err(error);
            }
        }
        Ok(GateDecision::Admitted(ticket))
    }

    /// Rules 3–5 in one script: on one Redis every key is on the same server.
    async fn admit_with_slot(
        &self,
        req: &GateRequest,
        counted: &[usize],
        rules: &[&QuotaRule],
        bucket: &str,
        autosync: bool,
    ) -> Result<Gated, GateError> {
        let mut invocation = lua::ADMIT_WITH_SLOT_SCRIPT.prepare_invoke();
        self.add_slot(&mut invocation, bucket, req.refresh_id, autosync);
        self.add_admission(&mut invocation, req, counted, rules);
        let decided = self.eval("admit", &invocation).await.and_then(|value| {
            reply::parse_admit_with_slot(value).map_err(|e| GateError::reply("admit", e))
        });
        match decided {
            Ok(AdmitSlotReply::Admitted {
                now,
                epoch,
                slot,
                previous,
                provider,
            }) => Ok(Gated::Admitted {
                now,
                epoch,
                slot_now: now,
                slot,
                previous,
                held_across: true,
                provider,
            }),
            Ok(AdmitSlotReply::Consent(refused)) => not_admitted(refused, rules),
            Ok(AdmitSlotReply::Full { retry_after_ms, .. }) => Ok(Gated::Refused(
                Problem::backlog_full(TimeDelta::milliseconds(retry_after_ms)),
            )),
            Err(error) => {
                if error.may_have_run() {
                    self.forget_quietly(req.consent_id, req.refresh_id, counted)
                        .await;
                }
                Err(error)
            }
        }
    }

    /// Rules 3–4 on the consent's slot, then rule 5 on the bucket's: on a cluster
    /// the two may be on different nodes. A refused or failed second script undoes
    /// the first.
    async fn admit_then_take_slot(
        &self,
        req: &GateRequest,
        counted: &[usize],
        rules: &[&QuotaRule],
        bucket: &str,
        autosync: bool,
    ) -> Result<Gated, GateError> {
        let mut invocation = lua::ADMIT_SCRIPT.prepare_invoke();
        self.add_admission(&mut invocation, req, counted, rules);
        let decided = self
            .eval("admit", &invocation)
            .await
            .and_then(|value| reply::parse_admit(value).map_err(|e| GateError::reply("admit", e)));
        let (now, epoch, provider) = match decided {
            Ok(AdmitReply::Admitted {
                now,
                epoch,
                provider,
            }) => (now, epoch, provider),
            Ok(refused) => return not_admitted(refused, rules),
            Err(error) => {
                if error.may_have_run() {
                    self.forget_quietly(req.consent_id, req.refresh_id, counted)
                        .await;
                }
                return Err(error);
            }
        };
        match self.take_slot(bucket, req.refresh_id, autosync).await {
            Ok(SlotReply::Slot {
                slot,
                previous,
                now: slot_now,
            }) => Ok(Gated::Admitted {
                now,
                epoch,
                slot_now,
                slot,
                previous,
                held_across: false,
                provider,
            }),
            Ok(SlotReply::Rebuild) => {
                // The bucket's slot lost its state, the consent's did not: undo.
                self.forget(req.consent_id, req.refresh_id, counted).await?;
                Err(GateError::Rebuilding)
            }
            Ok(SlotReply::Full { retry_after_ms, .. }) => {
                self.forget(req.consent_id, req.refresh_id, counted).await?;
                Ok(Gated::Refused(Problem::backlog_full(
                    TimeDelta::milliseconds(retry_after_ms),
                )))
            }
            Err(error) => {
                self.forget_quietly(req.consent_id, req.refresh_id, counted)
                    .await;
                Err(error)
            }
        }
    }

    /// Undo an admission whose publish or commit failed: release the lock (only if still owned by this refresh id), give the quota back, free the stagger slot where possible (e.g. if it is still the last one handed out).
    ///
    /// Idempotent. A slot followed by later ones stays taken: that only leaves a gap.
    pub async fn undo(&self, ticket: &Ticket) -> Result<(), GateError> {
        let admission = self
            .forget(ticket.consent_id, ticket.refresh_id, &ticket.counted)
            .await;
        let mut invocation = lua::RETURN_SLOT_SCRIPT.prepare_invoke();
        invocation
            .key(self.chain_key(&ticket.bucket, ticket.autosync))
            .key(reply::slots_key(&self.config.namespace, &ticket.bucket))
            .arg(reply::slot_value(ticket.slot, ticket.refresh_id))
            .arg(ticket.previous_slot.as_deref().unwrap_or_default())
            .arg(ticket.refresh_id.to_string());
        let slot = self.eval("return_slot", &invocation).await;
        admission?;
        slot.map(|_| ())
    }

    /// Extends the lock to a full `lease` if `refresh` still holds it (compare-and-pexpire).
    pub async fn renew_lock(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
    ) -> Result<bool, GateError> {
        self.pexpire_lock(consent, refresh, self.lease_ms).await
    }

    /// Extends the lock to `wait` plus a full `lease` if `refresh` still holds it: a
    /// job that waits (for its `notBefore`, its start slot, a bank retry) keeps its
    /// consent locked until it runs, however long the wait.
    pub async fn hold_lock_across(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
        wait: Duration,
    ) -> Result<bool, GateError> {
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        self.pexpire_lock(consent, refresh, self.lease_ms.saturating_add(wait_ms))
            .await
    }

    async fn pexpire_lock(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
        ttl_ms: i64,
    ) -> Result<bool, GateError> {
        let mut invocation = lua::RENEW_LOCK_SCRIPT.prepare_invoke();
        invocation
            .key(reply::lock_key(&self.config.namespace, consent))
            .key(self.consent_epoch(consent))
            .arg(refresh.to_string())
            .arg(ttl_ms);
        self.eval_flag("renew_lock", &invocation).await
    }

    /// Frees the lock if `refresh` still holds it (compare-and-delete).
    pub async fn release_lock(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
    ) -> Result<bool, GateError> {
        let mut invocation = lua::RELEASE_LOCK_SCRIPT.prepare_invoke();
        invocation
            .key(reply::lock_key(&self.config.namespace, consent))
            .arg(refresh.to_string());
        self.eval_flag("release_lock", &invocation).await
    }

    /// The refresh holding the consent's lock, if any; [`GateError::Rebuilding`] while
    /// the slot's state is lost (a missing lock then proves nothing).
    pub async fn in_flight(&self, consent: ConsentId) -> Result<Option<RefreshId>, GateError> {
        let mut invocation = lua::IN_FLIGHT_SCRIPT.prepare_invoke();
        invocation
            .key(reply::lock_key(&self.config.namespace, consent))
            .key(self.consent_epoch(consent));
        let value = self.eval("in_flight", &invocation).await?;
        match reply::parse_in_flight(value).map_err(|e| GateError::reply("in_flight", e))? {
            InFlightReply::Held(h) => h
                .parse()
                .map(Some)
                .map_err(|_| GateError::reply("in_flight", format!("lock holds {h:?}"))),
            InFlightReply::Free => Ok(None),
            InFlightReply::Rebuild => Err(GateError::Rebuilding),
        }
    }

    /// The most restrictive applicable rule's status for `source` (None if the source is exempt), for GET /v1/consents/{id}.
    ///
    /// Of the exhausted rules the one that admits again last, otherwise the one
    /// with the fewest admissions left. Reads only.
    pub async fn quota(
        &self,
        consent: ConsentId,
        source: RequestedBy,
    ) -> Result<Option<QuotaStatus>, GateError> {
        let indices = self.rule_indices(source);
        if indices.is_empty() {
            return Ok(None);
        }
        let rules = self.rules_at(&indices);
        let mut invocation = lua::QUOTA_STATUS_SCRIPT.prepare_invoke();
        self.add_rules(&mut invocation, consent, &indices, &rules);
        invocation.key(self.consent_epoch(consent));
        let value = self.eval("quota", &invocation).await?;
        match reply::parse_usage(value, rules.len()).map_err(|e| GateError::reply("quota", e))? {
            UsageReply::Usage(usage) => {
                reply::most_restrictive(&rules, &usage).map_err(|e| GateError::reply("quota", e))
            }
            UsageReply::Skew => Err(GateError::skew("quota")),
            UsageReply::Rebuild => Err(GateError::Rebuilding),
        }
    }

    /// The refreshes the consent's quota counts against `source` that were admitted
    /// at least `age` ago (by Redis time). An admission whose record is still missing
    /// after a lease has failed, and its undo did not run (Redis was down too, or the
    /// process died): see [`Self::forget_admission`].
    pub async fn counted_before(
        &self,
        consent: ConsentId,
        source: RequestedBy,
        age: Duration,
    ) -> Result<Vec<RefreshId>, GateError> {
        let indices = self.rule_indices(source);
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = lua::COUNTED_BEFORE_SCRIPT.prepare_invoke();
        for &index in &indices {
            invocation.key(reply::quota_key(&self.config.namespace, consent, index));
        }
        invocation.arg(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let value = self.eval("counted_before", &invocation).await?;
        let Value::Array(members) = value else {
            return Err(GateError::reply("counted_before", format!("{value:?}")));
        };
        members
            .iter()
            .map(|member| match member {
                Value::BulkString(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| {
                        GateError::reply("counted_before", format!("member {member:?}"))
                    }),
                other => Err(GateError::reply("counted_before", format!("{other:?}"))),
            })
            .collect()
    }

    /// Undoes what an admission of `refresh` left in the consent's gate state — its
    /// lock if it still holds it, its entry in every quota set — when the admission
    /// is known to have failed (no record after a lease). Idempotent.
    pub async fn forget_admission(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
    ) -> Result<(), GateError> {
        let all: Vec<usize> = (0..self.config.rules.len()).collect();
        self.forget(consent, refresh, &all).await
    }

    /// The lock's lease (`lock.lease_secs`).
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    /// Worker side (SPEC §2 hard invariant at the bank): across all replicas at most `stagger.limit` bank refresh starts in any `stagger.period_secs` window of the bucket (`StaggerScope::bucket`), counting retries; idempotent per `attempt_id` (taking it twice for the same attempt counts once). Go → the start is recorded; WaitUntil(t) → nothing recorded, try again at t.
    ///
    /// Times are whole milliseconds of Redis `TIME`; a start occupies its period
    /// plus one millisecond, so the truncated sub-millisecond part cannot let a
    /// `limit + 1`-th start into a real period.
    ///
    /// A start is logged here a few milliseconds before the bank sees the call, and
    /// that delay varies; so a start occupies its window for `period` plus
    /// [`START_MARGIN_MS`], and the bank never sees more than `limit` starts in any
    /// `period` unless one call is delayed by more than the margin.
    pub async fn take_start_slot(
        &self,
        bucket: &str,
        attempt_id: &str,
    ) -> Result<StartDecision, GateError> {
        let mut invocation = lua::TAKE_START_SCRIPT.prepare_invoke();
        invocation
            .key(reply::starts_key(&self.config.namespace, bucket))
            .arg(attempt_id)
            .arg(self.config.stagger.limit.max(1))
            .arg(self.period_ms + START_MARGIN_MS);
        let value = self.eval("take_start_slot", &invocation).await?;
        match reply::parse_start(value).map_err(|e| GateError::reply("take_start_slot", e))? {
            StartReply::Go => Ok(StartDecision::Go),
            StartReply::Wait { until } => reply::instant(until)
                .map(StartDecision::WaitUntil)
                .map_err(|e| GateError::reply("take_start_slot", e)),
        }
    }

    /// Writes each consent's facts through to the mirror the admit scripts check
    /// (`None`: the consent is gone), as registration and every change of a consent
    /// do once committed. A change whose write-through fails (Redis down) is still
    /// caught by the admission statement, which checks the consent again; the stale
    /// facts are replaced by the first lookup they send a request to.
    pub async fn mirror(
        &self,
        consents: &[(ConsentId, Option<ConsentFacts>)],
    ) -> Result<(), GateError> {
        futures_util::stream::iter(consents.iter().map(Ok))
            .try_for_each_concurrent(REBUILD_CONCURRENCY, |(consent, facts)| async move {
                let key = reply::facts_key(&self.config.namespace, *consent);
                let mut conn = self.conn.clone();
                let written = match facts {
                    Some(facts) => {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(encoded(facts))
                            .arg("PX")
                            .arg(lua::FACTS_TTL_MS)
                            .query_async::<()>(&mut conn)
                            .await
                    }
                    None => {
                        redis::cmd("DEL")
                            .arg(key)
                            .query_async::<()>(&mut conn)
                            .await
                    }
                };
                written.map_err(|e| classify("mirror", e))
            })
            .await
    }

    /// Takes the rebuild lock for `owner` for `ttl` if no replica holds it.
    pub async fn try_begin_rebuild(&self, owner: &str, ttl: Duration) -> Result<bool, GateError> {
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.rebuild_key())
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await
            .map_err(|e| classify("rebuild_lock", e))?;
        Ok(taken.is_some())
    }

    /// Whether the state looks present: the first slot's epoch exists. For a start-up
    /// check (a new namespace has no epoch at all); a partial loss (one cluster node)
    /// is found by the scripts themselves.
    pub async fn state_present(&self) -> Result<bool, GateError> {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(epoch::key_at(&self.config.namespace, 0))
            .query_async::<i64>(&mut conn)
            .await
            .map(|n| n > 0)
            .map_err(|e| classify("state_present", e))
    }

    /// Frees the rebuild lock if `owner` still holds it.
    pub async fn end_rebuild(&self, owner: &str) -> Result<bool, GateError> {
        let mut invocation = lua::RELEASE_LOCK_SCRIPT.prepare_invoke();
        invocation.key(self.rebuild_key()).arg(owner);
        self.eval_flag("rebuild_unlock", &invocation).await
    }

    /// Writes the gate's state back from PostgreSQL's records, then every slot's
    /// epoch, after which the scripts decide again.
    ///
    /// `refreshes` are the admissions since [`REBUILD_LOOKBACK`] before now and every
    /// refresh still `INITIALIZED`: their quota entries (by the rules counting their
    /// source, unless an initial load), the in-flight locks (for a lease past the
    /// start slot, since the queued job's worker renews it only once it runs), and
    /// the stagger's slots and each class's last slot. Every write adds and never
    /// removes (a lock only if none is held, a chain only forward), so a rebuild
    /// racing admissions on slots that kept their state, or another rebuild,
    /// changes nothing they decided.
    ///
    /// `epoch` stamps the state (the stamp the rebuild stored in PostgreSQL before it
    /// read the records, `Store::begin_gate_rebuild`): every epoch key that holds no
    /// later stamp gets it, and every admission decided on the state carries it
    /// ([`Ticket::epoch`]).
    pub async fn rebuild(
        &self,
        refreshes: &[AdmittedRefresh],
        epoch: i64,
    ) -> Result<RebuildReport, GateError> {
        let now = self.redis_now().await?;
        let ns = &self.config.namespace;
        let mut quota: HashMap<String, (i64, Vec<(i64, String)>)> = HashMap::new();
        let mut slots: HashMap<String, (i64, Vec<(i64, String)>)> = HashMap::new();
        let mut chains: HashMap<String, (i64, String)> = HashMap::new();
        let mut starts: HashMap<String, (i64, Vec<(i64, String)>)> = HashMap::new();
        let start_window = self.period_ms + START_MARGIN_MS;
        let mut writes = Vec::new();
        for refresh in refreshes {
            let id = refresh.refresh_id.to_string();
            let admitted = refresh.admitted_at.timestamp_millis();
            if let Some((index, started)) = refresh.last_attempt {
                // The start log keeps a start for its window (see `take_start_slot`).
                let started = started.timestamp_millis();
                if started + start_window >= now {
                    let bucket = self
                        .config
                        .stagger
                        .scope
                        .bucket(&refresh.tenant_id, &refresh.provider_id);
                    let entry = starts.entry(reply::starts_key(ns, &bucket)).or_default();
                    entry.0 = entry.0.max(started + start_window + 1);
                    entry.1.push((started, format!("{id}:{index}")));
                }
            }
            if !refresh.initial {
                for index in self.rule_indices(refresh.requested_by) {
                    let Some(rule) = self.config.rules.get(index) else {
                        continue;
                    };
                    // A calendar day may last 25 h; the scripts count only their window.
                    let life = match rule.window {
                        QuotaWindow::Rolling24h => DAY_MS,
                        QuotaWindow::CalendarDay => 2 * DAY_MS,
                    };
                    let entry = quota
                        .entry(reply::quota_key(ns, refresh.consent_id, index))
                        .or_default();
                    entry.0 = entry.0.max(admitted + life);
                    entry.1.push((admitted, id.clone()));
                }
            }
            if !refresh.in_flight {
                continue;
            }
            let slot = refresh.not_before.timestamp_millis();
            let lease = self.lease_ms.max(slot - now + self.lease_ms);
            writes.push(Write::script(
                &lua::REBUILD_LOCK_SCRIPT,
                vec![reply::lock_key(ns, refresh.consent_id)],
                vec![id.clone(), lease.to_string()],
            ));
            if slot + self.period_ms <= now {
                continue;
            }
            let bucket = self
                .config
                .stagger
                .scope
                .bucket(&refresh.tenant_id, &refresh.provider_id);
            let entry = slots.entry(reply::slots_key(ns, &bucket)).or_default();
            entry.0 = entry.0.max(slot + self.period_ms);
            entry.1.push((slot, id.clone()));
            let chain = self.chain_key(&bucket, refresh.requested_by == RequestedBy::Autosync);
            let last = chains.entry(chain).or_insert((slot, id.clone()));
            if slot > last.0 {
                *last = (slot, id);
            }
        }
        let report = RebuildReport {
            quota_sets: quota.len(),
            locks: writes.len(),
            slots: slots.values().map(|(_, s)| s.len()).sum(),
            starts: starts.values().map(|(_, s)| s.len()).sum(),
            epochs: epoch::SLOTS,
        };
        for (key, (expire_at, entries)) in quota.into_iter().chain(slots).chain(starts) {
            if expire_at <= now {
                continue;
            }
            let mut args = vec![expire_at.to_string()];
            for (score, member) in entries {
                args.push(score.to_string());
                args.push(member);
            }
            writes.push(Write::script(&lua::REBUILD_SET_SCRIPT, vec![key], args));
        }
        for (key, (slot, id)) in chains {
            writes.push(Write::script(
                &lua::REBUILD_CHAIN_SCRIPT,
                vec![key],
                vec![slot.to_string(), id, self.period_ms.to_string()],
            ));
        }
        self.write_all(writes).await?;
        // Last: only a whole state lets the scripts decide again. A stamp never goes
        // back: of two overlapping rebuilds the later one's stays, the one
        // `gate_epoch` holds, so admissions are not refused as stale for good.
        let stamp = epoch.to_string();
        let keys: Vec<String> = (0..epoch::SLOTS).map(|s| epoch::key_at(ns, s)).collect();
        // A cluster takes one key per script (each in its own slot); one Redis a few
        // thousand at a time instead of 16 384 round trips.
        let per_call = if self.conn.is_cluster() { 1 } else { 2048 };
        let epochs = keys
            .chunks(per_call)
            .map(|chunk| {
                Write::script(
                    &lua::REBUILD_EPOCHS_SCRIPT,
                    chunk.to_vec(),
                    vec![stamp.clone()],
                )
            })
            .collect();
        self.write_all(epochs).await?;
        Ok(report)
    }

    async fn write_all(&self, writes: Vec<Write>) -> Result<(), GateError> {
        futures_util::stream::iter(writes.into_iter().map(Ok))
            .try_for_each_concurrent(REBUILD_CONCURRENCY, |write| self.write(write))
            .await
    }

    async fn write(&self, write: Write) -> Result<(), GateError> {
        let Write { script, keys, args } = write;
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        self.eval("rebuild", &invocation).await.map(|_| ())
    }

    /// Redis `TIME` in milliseconds: the clock every script decides by.
    pub async fn redis_now(&self) -> Result<i64, GateError> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(|e| classify("time", e))?;
        Ok(secs * 1000 + micros / 1000)
    }

    fn rebuild_key(&self) -> String {
        format!("{}:{{rebuild}}", self.config.namespace)
    }

    /// Indices of the rules counting `source`, in configuration order.
    fn rule_indices(&self, source: RequestedBy) -> Vec<usize> {
        self.config
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.applies_to(source))
            .map(|(i, _)| i)
            .collect()
    }

    fn rules_at(&self, indices: &[usize]) -> Vec<&QuotaRule> {
        indices
            .iter()
            .filter_map(|&i| self.config.rules.get(i))
            .collect()
    }

    /// Adds each rule's key and `limit, window` arguments, then the local-day
    /// boundaries if a `calendar_day` rule is among them.
    fn add_rules(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        consent: ConsentId,
        indices: &[usize],
        rules: &[&QuotaRule],
    ) {
        for (&index, rule) in indices.iter().zip(rules) {
            invocation
                .key(reply::quota_key(&self.config.namespace, consent, index))
                .arg(rule.limit)
                .arg(rule.window.as_str());
        }
        if rules.iter().any(|r| r.window == QuotaWindow::CalendarDay) {
            // The host clock only chooses which days to send; Redis time picks among them.
            invocation.arg(reply::day_boundaries(Utc::now(), self.config.time_zone));
        }
    }

    /// The epoch key in the consent's slot.
    fn consent_epoch(&self, consent: ConsentId) -> String {
        epoch::key_for(&self.config.namespace, &format!("c:{consent}"))
    }

    /// The epoch key in the stagger bucket's slot.
    fn bucket_epoch(&self, bucket: &str) -> String {
        epoch::key_for(&self.config.namespace, &format!("stagger:{bucket}"))
    }

    /// The key of a class's slot chain in `bucket`.
    fn chain_key(&self, bucket: &str, autosync: bool) -> String {
        if autosync {
            reply::autosync_slot_key(&self.config.namespace, bucket)
        } else {
            reply::slot_key(&self.config.namespace, bucket)
        }
    }

    async fn take_slot(
        &self,
        bucket: &str,
        refresh: RefreshId,
        autosync: bool,
    ) -> Result<SlotReply, GateError> {
        let mut invocation = lua::TAKE_SLOT_SCRIPT.prepare_invoke();
        self.add_slot(&mut invocation, bucket, refresh, autosync);
        let value = self.eval("take_slot", &invocation).await?;
        reply::parse_slot(value).map_err(|e| GateError::reply("take_slot", e))
    }

    /// The stagger script's keys (the class's chain, the bucket's slots, its
    /// epoch) and arguments (spacings, max delay, period, refresh id).
    fn add_slot(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        bucket: &str,
        refresh: RefreshId,
        autosync: bool,
    ) {
        let own_spacing = if autosync {
            self.autosync_spacing_ms
        } else {
            self.spacing_ms
        };
        invocation
            .key(self.chain_key(bucket, autosync))
            .key(reply::slots_key(&self.config.namespace, bucket))
            .key(self.bucket_epoch(bucket))
            .arg(own_spacing)
            .arg(self.max_delay_ms)
            .arg(self.period_ms)
            .arg(self.spacing_ms)
            .arg(refresh.to_string());
    }

    /// The admission script's keys (lock, the `counted` rules' quota sets, the
    /// consent's epoch) and arguments (refresh id, lease, the rules).
    fn add_admission(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        req: &GateRequest,
        counted: &[usize],
        rules: &[&QuotaRule],
    ) {
        invocation
            .key(reply::facts_key(&self.config.namespace, req.consent_id))
            .arg(req.tenant_id.as_str())
            .arg(req.facts.as_ref().map(encoded).unwrap_or_default())
            .key(reply::lock_key(&self.config.namespace, req.consent_id))
            .arg(req.refresh_id.to_string())
            .arg(self.lease_ms);
        self.add_rules(invocation, req.consent_id, counted, rules);
        invocation.key(self.consent_epoch(req.consent_id));
    }

    /// Undoes the consent half of an admission: the lock if `refresh` holds it,
    /// and `refresh`'s entries in the quota sets. Idempotent.
    async fn forget(
        &self,
        consent: ConsentId,
        refresh: RefreshId,
        counted: &[usize],
    ) -> Result<(), GateError> {
        let mut invocation = lua::RELEASE_ADMISSION_SCRIPT.prepare_invoke();
        invocation
            .key(reply::lock_key(&self.config.namespace, consent))
            .arg(refresh.to_string());
        for &index in counted {
            invocation.key(reply::quota_key(&self.config.namespace, consent, index));
        }
        self.eval("release_admission", &invocation)
            .await
            .map(|_| ())
    }

    /// [`Self::forget`] on a path that already fails: a failure here is logged,
    /// and the lease bounds what is left.
    async fn forget_quietly(&self, consent: ConsentId, refresh: RefreshId, counted: &[usize]) {
        if let Err(error) = self.forget(consent, refresh, counted).await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                %consent,
                %refresh,
                "could not undo a failed admission; the lock expires with its lease"
            );
        }
    }

    async fn eval(
        &self,
        operation: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, GateError> {
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| classify(operation, e))
    }

    async fn eval_flag(
        &self,
        operation: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<bool, GateError> {
        match self.eval(operation, invocation).await? {
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(GateError::reply(
                operation,
                format!("expected 0 or 1, got {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_to_millis_saturate() {
        let check = |secs: u64, ms: i64| assert_eq!(secs_to_ms(secs), ms, "{secs}");
        check(0, 0);
        check(60, 60_000);
        check(3600, 3_600_000);
        check(u64::MAX, MAX_MS);
        check(1 << 45, MAX_MS);
    }

    #[test]
    fn errors_read_lowercase() {
        let check = |e: GateError, text: &str| assert_eq!(e.to_string(), text);
        check(
            GateError::reply("admit", "unknown reply tag \"x\""),
            "unexpected redis reply to admit: unknown reply tag \"x\"",
        );
        check(
            GateError::skew("quota"),
            "unexpected redis reply to quota: redis time is more than two days away from this host's clock",
        );
    }
}
