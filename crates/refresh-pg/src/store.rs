//! The ingress's view of the database: consents, refresh records and history,
//! idempotency keys, tenant settings, and the event outbox.

use chrono::{DateTime, SubsecRound as _, Utc};
use refresh_core::{
    ConsentFacts, ConsentId, ConsentStatus, EventId, ProblemCode, ProviderId, RefreshError,
    RefreshId, RefreshRecord, RefreshStatus, RefreshSummary, RequestedBy, TenantId, TraceContext,
};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::crypto::{CryptoError, TokenCipher};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The connection failed after a statement was sent: it may have committed.
    #[error("database unavailable; the statement may have committed")]
    InDoubt(#[source] sqlx::Error),
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
    #[error("a row with this key exists already")]
    Conflict,
    #[error("the gate's state was rebuilt after this admission was decided")]
    StaleGate,
    #[error("the consent may not be refreshed")]
    ConsentRefused,
    #[error("a stored value is invalid: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// The gate's advisory lock, between admissions writing their records (shared, in
/// `admit_refreshes`) and a gate rebuild advancing `gate_epoch` (exclusive); one per
/// schema, since advisory locks are the database's.
const GATE_LOCK_EXCLUSIVE: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('refreshd gate ' || current_schema(), 0))";

impl StoreError {
    /// Whether the database could not be reached (answer 503) rather than a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::InDoubt(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(error),
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict,
            _ => Self::Query(error),
        }
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A consent as stored (the token stays encrypted; see [`Store::access_token`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentRow {
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub bank_consent_id: String,
    pub expires_at: DateTime<Utc>,
    pub status: ConsentStatus,
    pub created_at: DateTime<Utc>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
}

impl ConsentRow {
    /// What the gate mirrors of the consent.
    pub fn facts(&self) -> ConsentFacts {
        ConsentFacts {
            tenant_id: self.tenant_id.clone(),
            provider_id: self.provider_id.clone(),
            status: self.status,
            expires_at: self.expires_at,
        }
    }
}

/// A consent to register.
#[derive(Debug)]
pub struct NewConsent {
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub bank_consent_id: String,
    pub access_token: SecretString,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// What registering a consent did.
#[derive(Clone, Debug, PartialEq)]
pub enum Registration {
    /// Registered now.
    New(ConsentRow),
    /// Registered before: this id, or the tenant's same provider and bank consent.
    Exists(ConsentId),
}

/// An event to publish through the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    pub event_id: EventId,
    pub routing_key: String,
    pub payload: Value,
}

impl OutboxEvent {
    /// The event of `record`'s current status (INITIALIZED, UPDATED, ERROR), carrying
    /// the refresh's trace: the one builder every writer of a refresh event uses.
    pub fn refresh(
        record: &RefreshRecord,
        traceparent: Option<TraceContext>,
        event_id: EventId,
        at: DateTime<Utc>,
    ) -> Self {
        let event = refresh_core::CloudEvent::refresh(record, event_id, at).with_trace(traceparent);
        Self {
            event_id: event.id,
            routing_key: event.routing_key(),
            // Serializing plain data with string keys cannot fail.
            payload: serde_json::to_value(&event).unwrap_or_default(),
        }
    }
}

/// An outbox row not yet published.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    pub id: i64,
    pub event: OutboxEvent,
}

/// A tenant's auto-sync and inactivation settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantSettingsRow {
    pub autosync_interval_hours: Option<i32>,
    pub inactivation_days: i32,
}

/// What an idempotency key says about a request.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyReservation {
    /// The key is new (or its earlier reservation outlived its lease) and now
    /// reserved for this request.
    Reserved(KeyFence),
    /// A request with this key finished; here is its answer.
    Done { http_status: u16, response: Value },
    /// A request with this key is still being answered.
    Pending,
}

/// Which reservation of a key a request holds: a later takeover of the key (after the
/// reservation's lease) makes the earlier holder's completion a no-op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFence(DateTime<Utc>);

/// Placeholder status of a reserved, unanswered idempotency key.
const PENDING_STATUS: i32 = 0;

/// The database, with the cipher that keeps bank tokens encrypted at rest.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    cipher: TokenCipher,
}

pub(crate) const CONSENT_COLUMNS: &str = "consent_id, tenant_id, provider_id, bank_consent_id, expires_at, \
     status, created_at, last_refreshed_at";

pub(crate) const REFRESH_COLUMNS: &str = "refresh_id, consent_id, tenant_id, requested_by, status, \
     date_requested, not_before, started_at, finished_at, error_code, error_message, summary";

pub(crate) fn consent_row(row: &PgRow) -> Result<ConsentRow, StoreError> {
    Ok(ConsentRow {
        consent_id: ConsentId::from_uuid(row.try_get("consent_id")?),
        tenant_id: TenantId::parse(row.try_get::<&str, _>("tenant_id")?).map_err(corrupt)?,
        provider_id: ProviderId::parse(row.try_get::<&str, _>("provider_id")?).map_err(corrupt)?,
        bank_consent_id: row.try_get("bank_consent_id")?,
        expires_at: row.try_get("expires_at")?,
        status: row.try_get::<&str, _>("status")?.parse().map_err(corrupt)?,
        created_at: row.try_get("created_at")?,
        last_refreshed_at: row.try_get("last_refreshed_at")?,
    })
}

pub(crate) fn refresh_record(row: &PgRow) -> Result<RefreshRecord, StoreError> {
    let error = match row.try_get::<Option<&str>, _>("error_code")? {
        Some(code) => Some(RefreshError {
            code: code.parse::<ProblemCode>().map_err(corrupt)?,
            message: row
                .try_get::<Option<String>, _>("error_message")?
                .unwrap_or_default(),
        }),
        None => None,
    };
    let summary = match row.try_get::<Option<Value>, _>("summary")? {
        Some(value) => Some(serde_json::from_value::<RefreshSummary>(value).map_err(corrupt)?),
        None => None,
    };
    Ok(RefreshRecord {
        refresh_id: RefreshId::from_uuid(row.try_get("refresh_id")?),
        consent_id: ConsentId::from_uuid(row.try_get("consent_id")?),
        tenant_id: TenantId::parse(row.try_get::<&str, _>("tenant_id")?).map_err(corrupt)?,
        requested_by: row
            .try_get::<&str, _>("requested_by")?
            .parse::<RequestedBy>()
            .map_err(corrupt)?,
        status: row
            .try_get::<&str, _>("status")?
            .parse::<RefreshStatus>()
            .map_err(corrupt)?,
        date_requested: row.try_get("date_requested")?,
        not_before: row.try_get("not_before")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        error,
        summary,
    })
}

/// An admission's rows: the INITIALIZED record, its event and its job, written by
/// [`write_admissions`] (a batch of admissions in one statement).
#[derive(Clone, Debug)]
pub struct Admission {
    pub record: RefreshRecord,
    pub initial: bool,
    pub traceparent: Option<TraceContext>,
    pub event: OutboxEvent,
    /// The job as published to `jobs` (the relay sends it as is).
    pub job: Vec<u8>,
    /// The stamp of the gate state that admitted it (the gate ticket's).
    pub epoch: i64,
    /// The answer to record for the request's idempotency key, if it has one.
    pub key: Option<KeyAnswer>,
}

/// The answer an admission records for its idempotency key in its own statement
/// (only while the reservation `fence` is still pending, as [`Store::complete_key`]).
#[derive(Clone, Debug)]
pub struct KeyAnswer {
    pub tenant: TenantId,
    pub key: String,
    pub fence: KeyFence,
    pub http_status: u16,
    pub response: Value,
}

/// What became of one admission of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Record, event and job written.
    Admitted,
    /// A gate rebuild began after the state that admitted it (SPEC §2: the rebuild
    /// counts every admission of the lost state, or it never happened); nothing
    /// written.
    StaleGate,
    /// Another refresh of the consent is still INITIALIZED; nothing written.
    InFlight,
    /// The consent is gone, of another tenant, not ACTIVE or expired at the
    /// admission's time (the gate decided on stale facts); nothing written.
    ConsentRefused,
}

/// Writes `admissions` in one statement (the function `admit_refreshes`), under the
/// gate's advisory lock shared; one [`Written`] per admission, in order. On the pool
/// it commits by itself, all or nothing: once it returns, the jobs written are
/// durable and the relay publishes them. In a transaction the lock is held, and
/// nothing is published, until that commits.
pub async fn write_admissions(
    executor: impl sqlx::PgExecutor<'_>,
    admissions: &[Admission],
) -> Result<Vec<Written>, StoreError> {
    // One array per column: `admit_refreshes` unnests them into rows.
    fn column<'a, T>(items: &'a [Admission], f: impl Fn(&'a Admission) -> T) -> Vec<T> {
        items.iter().map(f).collect()
    }
    let refresh_ids = column(admissions, |a| *a.record.refresh_id.as_uuid());
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT admitted, outcome FROM admit_refreshes($1, $2, $3, $4, $5, $6, $7, $8, $9, \
         $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(&refresh_ids)
    .bind(column(admissions, |a| *a.record.consent_id.as_uuid()))
    .bind(column(admissions, |a| a.record.tenant_id.as_str()))
    .bind(column(admissions, |a| a.record.requested_by.as_str()))
    .bind(column(admissions, |a| a.initial))
    .bind(column(admissions, |a| a.record.date_requested))
    .bind(column(admissions, |a| a.record.not_before))
    .bind(column(admissions, |a| a.traceparent.map(|t| t.to_string())))
    .bind(column(admissions, |a| a.epoch))
    .bind(column(admissions, |a| *a.event.event_id.as_uuid()))
    .bind(column(admissions, |a| a.event.routing_key.as_str()))
    .bind(column(admissions, |a| &a.event.payload))
    .bind(column(admissions, |a| a.job.as_slice()))
    .bind(column(admissions, |a| {
        a.key.as_ref().map(|k| k.tenant.as_str())
    }))
    .bind(column(admissions, |a| {
        a.key.as_ref().map(|k| k.key.as_str())
    }))
    .bind(column(admissions, |a| a.key.as_ref().map(|k| k.fence.0)))
    .bind(column(admissions, |a| {
        a.key.as_ref().map(|k| i32::from(k.http_status))
    }))
    .bind(column(admissions, |a| a.key.as_ref().map(|k| &k.response)))
    .fetch_all(executor)
    .await?;
    refresh_ids
        .iter()
        .map(|id| {
            let (_, outcome) = rows
                .iter()
                .find(|(admitted, _)| admitted == id)
                .ok_or_else(|| corrupt(format!("admit_refreshes answered nothing for {id}")))?;
            match outcome.as_str() {
                "written" => Ok(Written::Admitted),
                "stale" => Ok(Written::StaleGate),
                "in_flight" => Ok(Written::InFlight),
                "consent" => Ok(Written::ConsentRefused),
                other => Err(corrupt(format!("admit_refreshes answered {other:?}"))),
            }
        })
        .collect()
}

/// Which of `ids` have a refresh record.
async fn recorded(
    executor: impl sqlx::PgExecutor<'_>,
    ids: &[RefreshId],
) -> Result<std::collections::HashSet<RefreshId>, StoreError> {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| *id.as_uuid()).collect();
    let found: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT refresh_id FROM refreshes WHERE refresh_id = ANY($1)")
            .bind(&uuids)
            .fetch_all(executor)
            .await?;
    Ok(found.into_iter().map(RefreshId::from_uuid).collect())
}

/// Writes one admission ([`write_admissions`]): [`StoreError::StaleGate`] if a gate
/// rebuild began since its state, `Conflict` when another refresh of the consent is
/// still INITIALIZED, [`StoreError::ConsentRefused`] when the consent may not be
/// refreshed (anymore).
pub async fn write_admission(
    executor: impl sqlx::PgExecutor<'_>,
    admission: &Admission,
) -> Result<(), StoreError> {
    match write_admissions(executor, std::slice::from_ref(admission)).await?[..] {
        [Written::Admitted] => Ok(()),
        [Written::StaleGate] => Err(StoreError::StaleGate),
        [Written::InFlight] => Err(StoreError::Conflict),
        [Written::ConsentRefused] => Err(StoreError::ConsentRefused),
        _ => Err(corrupt("admit_refreshes answered another number of rows")),
    }
}

/// A job of the outbox not yet confirmed by the broker.
#[derive(Clone, Debug)]
pub struct PendingJob {
    pub id: i64,
    pub refresh_id: RefreshId,
    pub body: Vec<u8>,
    pub not_before: DateTime<Utc>,
}

/// Unpublished outbox rows, locked against other relays until committed.
pub struct ClaimedEvents {
    tx: Transaction<'static, Postgres>,
    pub events: Vec<PendingEvent>,
}

impl ClaimedEvents {
    /// Marks `ids` published and releases the claim on the rest.
    pub async fn finish(mut self, published: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        if !published.is_empty() {
            sqlx::query("UPDATE outbox SET published_at = $2 WHERE id = ANY($1)")
                .bind(published)
                .bind(at)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await.map_err(StoreError::from)
    }
}

/// Hands every claimed outbox row to `publish` at once (the calls are started in
/// order, so a publisher on one channel keeps their order on the wire, and their
/// confirms are awaited together); the ids of the rows published, the others told to
/// `failed`.
async fn publish_claimed<T, F, Fut, E>(
    rows: &[T],
    publish: F,
    id: impl Fn(&T) -> i64,
    failed: impl Fn(&T, &E),
) -> Vec<i64>
where
    F: FnMut(&T) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let results = futures_util::future::join_all(rows.iter().map(publish)).await;
    let mut published = Vec::with_capacity(rows.len());
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => published.push(id(row)),
            Err(error) => failed(row, &error),
        }
    }
    published
}

pub(crate) async fn insert_outbox(
    executor: impl sqlx::PgExecutor<'_>,
    event: &OutboxEvent,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO outbox (event_id, routing_key, payload, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event.event_id.as_uuid())
    .bind(&event.routing_key)
    .bind(&event.payload)
    .bind(at)
    .execute(executor)
    .await?;
    Ok(())
}

impl Store {
    pub fn new(pool: PgPool, cipher: TokenCipher) -> Self {
        Self { pool, cipher }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    // --- consents -------------------------------------------------------------------

    /// Registers a consent with its token encrypted; `Conflict` if the id is taken.
    pub async fn insert_consent(&self, consent: &NewConsent) -> Result<ConsentRow, StoreError> {
        let sealed = self.cipher.encrypt(
            &consent.access_token,
            consent.consent_id.as_uuid().as_bytes(),
        )?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO consents (consent_id, tenant_id, provider_id, bank_consent_id, \
             access_token_enc, expires_at, status, created_at, updated_at, autosync_jitter_bp) \
             VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $7, $8) RETURNING {CONSENT_COLUMNS}"
        )))
        .bind(consent.consent_id.as_uuid())
        .bind(consent.tenant_id.as_str())
        .bind(consent.provider_id.as_str())
        .bind(&consent.bank_consent_id)
        .bind(sealed)
        .bind(consent.expires_at)
        .bind(consent.created_at)
        .bind(i32::try_from(refresh_core::autosync_jitter_bp(consent.consent_id)).map_err(corrupt)?)
        .fetch_one(&self.pool)
        .await?;
        consent_row(&row)
    }

    /// Registers a consent unless its id is taken or the tenant has the same
    /// `provider_id` + `bank_consent_id` already (answers the existing id then). An advisory
    /// lock on the bank-side key makes two concurrent registrations of one bank consent
    /// meet here rather than both insert.
    pub async fn register_consent(&self, consent: &NewConsent) -> Result<Registration, StoreError> {
        let sealed = self.cipher.encrypt(
            &consent.access_token,
            consent.consent_id.as_uuid().as_bytes(),
        )?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2 || '/' || $3, 0))",
        )
        .bind(consent.tenant_id.as_str())
        .bind(consent.provider_id.as_str())
        .bind(&consent.bank_consent_id)
        .execute(&mut *tx)
        .await?;
        let existing: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT consent_id FROM consents \
             WHERE consent_id = $1 \
                OR (tenant_id = $2 AND provider_id = $3 AND bank_consent_id = $4) \
             ORDER BY (consent_id = $1) DESC LIMIT 1",
        )
        .bind(consent.consent_id.as_uuid())
        .bind(consent.tenant_id.as_str())
        .bind(consent.provider_id.as_str())
        .bind(&consent.bank_consent_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = existing {
            tx.rollback().await?;
            return Ok(Registration::Exists(ConsentId::from_uuid(id)));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO consents (consent_id, tenant_id, provider_id, bank_consent_id, \
             access_token_enc, expires_at, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $7) RETURNING {CONSENT_COLUMNS}"
        )))
        .bind(consent.consent_id.as_uuid())
        .bind(consent.tenant_id.as_str())
        .bind(consent.provider_id.as_str())
        .bind(&consent.bank_consent_id)
        .bind(sealed)
        .bind(consent.expires_at)
        .bind(consent.created_at)
        .fetch_one(&mut *tx)
        .await?;
        let row = consent_row(&row)?;
        tx.commit().await?;
        Ok(Registration::New(row))
    }

    pub async fn consent(&self, consent_id: ConsentId) -> Result<Option<ConsentRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consents WHERE consent_id = $1"
        )))
        .bind(consent_id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(consent_row).transpose()
    }

    /// The decrypted bank access token (for the connector only; never log it), `None`
    /// when there is nothing to call the bank with: the consent is gone, or its token
    /// cannot be decrypted with `crypto.key` nor any of `crypto.retired_keys`. In that
    /// case no retry can help, so the consent's refresh in flight is ended `ERROR`
    /// `internal_error` naming the cause (see [`Store::end_undecryptable`]).
    pub async fn access_token(
        &self,
        consent_id: ConsentId,
    ) -> Result<Option<SecretString>, StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT access_token_enc FROM consents WHERE consent_id = $1")
                .bind(consent_id.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        match self
            .cipher
            .decrypt(&sealed, consent_id.as_uuid().as_bytes())
        {
            Ok(token) => Ok(Some(token)),
            Err(error) => {
                self.end_undecryptable(consent_id, &error).await?;
                Ok(None)
            }
        }
    }

    /// The cipher of the bank tokens.
    pub fn cipher(&self) -> &TokenCipher {
        &self.cipher
    }

    // --- refreshes ------------------------------------------------------------------

    /// Writes an admission on the pool ([`write_admission`]).
    pub async fn admit(&self, admission: &Admission) -> Result<(), StoreError> {
        write_admission(&self.pool, admission).await
    }

    /// Writes a batch of admissions on the pool, one commit ([`write_admissions`]).
    /// A connection lost once the statement was sent is [`StoreError::InDoubt`]:
    /// the batch may have committed ([`Store::written_admissions`] tells).
    pub async fn admit_many(&self, admissions: &[Admission]) -> Result<Vec<Written>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        write_admissions(&mut *connection, admissions)
            .await
            .map_err(|error| match error {
                StoreError::Unavailable(error) => StoreError::InDoubt(error),
                other => other,
            })
    }

    /// Which of `ids` have a record, once every admission statement under way has
    /// ended: it takes the gate's advisory lock exclusively, which each of them holds
    /// shared until it commits or aborts, also one whose connection is already gone.
    /// Resolves [`StoreError::InDoubt`]: what is not found then was never written.
    /// Gives up on the lock after 2 s (an error; the caller asks again).
    pub async fn written_admissions(
        &self,
        ids: &[RefreshId],
    ) -> Result<std::collections::HashSet<RefreshId>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Admissions queue behind the exclusive request: wait for it briefly, and
        // let the caller ask again rather than hold every admission up.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(GATE_LOCK_EXCLUSIVE).execute(&mut *tx).await?;
        let found = recorded(&mut *tx, ids).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// Marks a gate rebuild as begun, once every admission writing its record has
    /// ended (it takes the gate's advisory lock exclusively): from then on an
    /// admission decided on an older state is refused its record. Call it before
    /// reading the records to rebuild from. The stamp is `now` (Redis time, ms), or
    /// one past the latest stamp stored if that is not older (a Redis whose clock
    /// is behind the last one's, after a failover); the rebuild stamps its state
    /// with the one returned.
    pub async fn begin_gate_rebuild(&self, now: i64) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(GATE_LOCK_EXCLUSIVE).execute(&mut *tx).await?;
        let stamp: i64 = sqlx::query_scalar(
            "INSERT INTO gate_epoch (stamp) VALUES ($1) \
             ON CONFLICT (id) DO UPDATE SET stamp = GREATEST(gate_epoch.stamp + 1, EXCLUDED.stamp) \
             RETURNING stamp",
        )
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stamp)
    }

    pub async fn refresh(
        &self,
        refresh_id: RefreshId,
    ) -> Result<Option<RefreshRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REFRESH_COLUMNS} FROM refreshes WHERE refresh_id = $1"
        )))
        .bind(refresh_id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(refresh_record).transpose()
    }

    /// Which of `ids` have a refresh record (an admission that committed).
    pub async fn recorded_refreshes(
        &self,
        ids: &[RefreshId],
    ) -> Result<std::collections::HashSet<RefreshId>, StoreError> {
        recorded(&self.pool, ids).await
    }

    /// The consent's refreshes requested since `since`, newest first.
    pub async fn history(
        &self,
        consent_id: ConsentId,
        since: DateTime<Utc>,
    ) -> Result<Vec<RefreshRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REFRESH_COLUMNS} FROM refreshes WHERE consent_id = $1 AND date_requested >= $2 \
             ORDER BY date_requested DESC, refresh_id DESC"
        )))
        .bind(consent_id.as_uuid())
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(refresh_record).collect()
    }

    /// The consent's INITIALIZED refresh, if any.
    pub async fn in_flight(&self, consent_id: ConsentId) -> Result<Option<RefreshId>, StoreError> {
        let id: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT refresh_id FROM refreshes WHERE consent_id = $1 AND status = 'INITIALIZED'",
        )
        .bind(consent_id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(RefreshId::from_uuid))
    }

    // --- outbox ---------------------------------------------------------------------

    /// An event on its own (e.g. `refresh.rejected`), through the outbox.
    pub async fn insert_event(
        &self,
        event: &OutboxEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        insert_outbox(&self.pool, event, at).await
    }

    /// Up to `limit` unpublished events, oldest first, locked (SKIP LOCKED) so that
    /// several relays never publish the same row at once.
    pub async fn claim_events(&self, limit: i64) -> Result<ClaimedEvents, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, event_id, routing_key, payload FROM outbox WHERE published_at IS NULL \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let events = rows
            .iter()
            .map(|row| {
                Ok(PendingEvent {
                    id: row.try_get("id")?,
                    event: OutboxEvent {
                        event_id: EventId::from_uuid(row.try_get("event_id")?),
                        routing_key: row.try_get("routing_key")?,
                        payload: row.try_get("payload")?,
                    },
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(ClaimedEvents { tx, events })
    }

    /// One relay round: claims up to `limit` unpublished events, hands them all to
    /// `publish` at once (the calls are started in order, so a publisher that sends
    /// on one channel keeps their order on the wire, and their confirms are awaited
    /// together), and marks the published ones. Returns how many were published.
    /// Used by the ingress relay and by workers right after their commit. An event
    /// that failed stays unpublished for the next round; a crash between publish
    /// and mark publishes again. Consumers absorb both by deduplicating on the
    /// event id (SPEC §4).
    pub async fn publish_pending<F, Fut, E>(
        &self,
        limit: i64,
        mut publish: F,
    ) -> Result<usize, StoreError>
    where
        F: FnMut(&OutboxEvent) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let claimed = self.claim_events(limit).await?;
        let published = publish_claimed(
            &claimed.events,
            |pending| publish(&pending.event),
            |pending| pending.id,
            |pending, error| {
                tracing::warn!(error = %error, event_id = %pending.event.event_id, "cannot publish an event yet");
            },
        )
        .await;
        claimed.finish(&published, Utc::now()).await?;
        Ok(published.len())
    }

    /// One relay round for jobs: claims up to `limit` unpublished jobs of the outbox
    /// (oldest first, SKIP LOCKED so that relays share the work), hands them all to
    /// `publish` at once (confirms awaited together), and deletes the confirmed
    /// ones. A job that failed stays for the next round; a crash between the
    /// confirm and the delete publishes it again, which the worker's fence on the
    /// refresh id absorbs. Returns how many were published.
    pub async fn publish_pending_jobs<F, Fut, E>(
        &self,
        limit: i64,
        mut publish: F,
    ) -> Result<usize, StoreError>
    where
        F: FnMut(&PendingJob) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, refresh_id, body, not_before FROM job_outbox \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let jobs = rows
            .iter()
            .map(|row| {
                Ok(PendingJob {
                    id: row.try_get("id")?,
                    refresh_id: RefreshId::from_uuid(row.try_get("refresh_id")?),
                    body: row.try_get("body")?,
                    not_before: row.try_get("not_before")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let published = publish_claimed(
            &jobs,
            &mut publish,
            |job| job.id,
            |job, error| {
                tracing::warn!(error = %error, refresh_id = %job.refresh_id, "cannot publish a job yet");
            },
        )
        .await;
        if !published.is_empty() {
            sqlx::query("DELETE FROM job_outbox WHERE id = ANY($1)")
                .bind(&published)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(published.len())
    }

    /// How many jobs of the outbox wait for the relay.
    pub async fn pending_jobs(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM job_outbox")
            .fetch_one(&self.pool)
            .await?)
    }

    // --- idempotency ----------------------------------------------------------------

    /// Reserves `key` for this request unless a request with it was answered since
    /// `since` (24 h ago), or is being answered by a reservation made since
    /// `pending_since` (the lease of a reservation: one older than that belongs to a
    /// process that died before answering, and is taken over). An older row is
    /// replaced.
    pub async fn reserve_key(
        &self,
        tenant: &TenantId,
        key: &str,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
        pending_since: DateTime<Utc>,
    ) -> Result<KeyReservation, StoreError> {
        let keys = [(tenant.clone(), key.to_owned())];
        let mut answers = self.reserve_keys(&keys, now, since, pending_since).await?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Corrupt("no reservation answer".to_owned()))
    }

    /// [`Store::reserve_key`] for many keys in one statement and commit (the group
    /// commit of a channel's reservations): one answer per key, in order. A key
    /// named twice is reserved for its first place only; the others are answered
    /// `Pending`, as a second request arriving while the first is answered would be.
    pub async fn reserve_keys(
        &self,
        keys: &[(TenantId, String)],
        now: DateTime<Utc>,
        since: DateTime<Utc>,
        pending_since: DateTime<Utc>,
    ) -> Result<Vec<KeyReservation>, StoreError> {
        let now = now.trunc_subsecs(6);
        let mut first = std::collections::HashSet::new();
        let unique: Vec<&(TenantId, String)> = keys.iter().filter(|k| first.insert(*k)).collect();
        let tenants: Vec<&str> = unique.iter().map(|(t, _)| t.as_str()).collect();
        let names: Vec<&str> = unique.iter().map(|(_, k)| k.as_str()).collect();
        // The outer query reads the snapshot from before the insert: for a key it did
        // not reserve it sees the answer or reservation that stood in the way (or,
        // for one committed meanwhile by another request, nothing: `Pending`).
        let rows = sqlx::query(
            "WITH wanted AS (SELECT * FROM unnest($1::text[], $2::text[]) AS w(tenant_id, key)), \
             reserved AS ( \
               INSERT INTO idempotency_keys (tenant_id, key, created_at, http_status, response) \
               SELECT tenant_id, key, $3, $4, 'null' FROM wanted \
               ON CONFLICT (tenant_id, key) DO UPDATE \
                 SET created_at = EXCLUDED.created_at, http_status = EXCLUDED.http_status, \
                     response = EXCLUDED.response \
                 WHERE idempotency_keys.created_at < $5 \
                    OR (idempotency_keys.http_status = $4 AND idempotency_keys.created_at < $6) \
               RETURNING tenant_id, key) \
             SELECT w.tenant_id, w.key, r.key IS NOT NULL AS reserved, k.http_status, k.response \
             FROM wanted w \
             LEFT JOIN reserved r ON r.tenant_id = w.tenant_id AND r.key = w.key \
             LEFT JOIN idempotency_keys k ON k.tenant_id = w.tenant_id AND k.key = w.key",
        )
        .bind(&tenants)
        .bind(&names)
        .bind(now)
        .bind(PENDING_STATUS)
        .bind(since)
        .bind(pending_since)
        .fetch_all(&self.pool)
        .await?;
        let mut answers = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let key: (String, String) = (row.try_get("tenant_id")?, row.try_get("key")?);
            let answer = if row.try_get("reserved")? {
                KeyReservation::Reserved(KeyFence(now))
            } else {
                match row.try_get::<Option<i32>, _>("http_status")? {
                    Some(status) if status != PENDING_STATUS => KeyReservation::Done {
                        http_status: u16::try_from(status).map_err(corrupt)?,
                        response: row.try_get("response")?,
                    },
                    _ => KeyReservation::Pending,
                }
            };
            answers.insert(key, answer);
        }
        // Every wanted key has its row; a key named again finds its answer taken by
        // its first place and waits as a concurrent duplicate would.
        Ok(keys
            .iter()
            .map(|(tenant, key)| {
                answers
                    .remove(&(tenant.as_str().to_owned(), key.clone()))
                    .unwrap_or(KeyReservation::Pending)
            })
            .collect())
    }

    /// Records the answer given to the request that reserved `key` (if its
    /// reservation was not taken over meanwhile, which answers `false`).
    pub async fn complete_key(
        &self,
        tenant: &TenantId,
        key: &str,
        fence: KeyFence,
        http_status: u16,
        response: &Value,
    ) -> Result<bool, StoreError> {
        self.answer_key(tenant, key, fence, PENDING_STATUS, http_status, response)
            .await
    }

    /// Replaces the answer an admission recorded for `key` (`from`, its status) with
    /// the one its request finally gave (after `Prefer: wait`); false if the row is
    /// no longer that one.
    pub async fn revise_key(
        &self,
        tenant: &TenantId,
        key: &str,
        fence: KeyFence,
        from: u16,
        http_status: u16,
        response: &Value,
    ) -> Result<bool, StoreError> {
        self.answer_key(tenant, key, fence, i32::from(from), http_status, response)
            .await
    }

    async fn answer_key(
        &self,
        tenant: &TenantId,
        key: &str,
        fence: KeyFence,
        from: i32,
        http_status: u16,
        response: &Value,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE idempotency_keys SET http_status = $4, response = $5 \
             WHERE tenant_id = $1 AND key = $2 AND created_at = $3 AND http_status = $6",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(fence.0)
        .bind(i32::from(http_status))
        .bind(response)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Forgets a reservation whose request was not answered with something to
    /// remember (a dependency failed, or the answer may change), so a retry with the
    /// same key is decided afresh.
    pub async fn release_key(
        &self,
        tenant: &TenantId,
        key: &str,
        fence: KeyFence,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE tenant_id = $1 AND key = $2 AND created_at = $3 AND http_status = $4",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(fence.0)
        .bind(PENDING_STATUS)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // --- tenant settings ------------------------------------------------------------

    pub async fn tenant_settings(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<TenantSettingsRow>, StoreError> {
        let row = sqlx::query(
            "SELECT autosync_interval_hours, inactivation_days FROM tenant_settings WHERE tenant_id = $1",
        )
        .bind(tenant.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TenantSettingsRow {
                autosync_interval_hours: row.try_get("autosync_interval_hours")?,
                inactivation_days: row.try_get("inactivation_days")?,
            })
        })
        .transpose()
    }

    pub async fn put_tenant_settings(
        &self,
        tenant: &TenantId,
        settings: TenantSettingsRow,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenant_settings (tenant_id, autosync_interval_hours, inactivation_days, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO UPDATE SET \
             autosync_interval_hours = EXCLUDED.autosync_interval_hours, \
             inactivation_days = EXCLUDED.inactivation_days, updated_at = EXCLUDED.updated_at",
        )
        .bind(tenant.as_str())
        .bind(settings.autosync_interval_hours)
        .bind(settings.inactivation_days)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
