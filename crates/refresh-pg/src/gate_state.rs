//! What the admission gate's state is rebuilt from when Redis lost it (SPEC §2):
//! the admissions still inside a quota window, every refresh in flight, and the
//! latest bank attempt of each (the workers' start log).

use chrono::{DateTime, Utc};
use refresh_core::{ConsentId, ProviderId, RefreshId, RequestedBy, TenantId};
use sqlx::Row as _;

use crate::store::{Store, StoreError, corrupt};

/// One refresh as the gate counted it when it was admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateRow {
    pub refresh_id: RefreshId,
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub requested_by: RequestedBy,
    pub initial: bool,
    pub date_requested: DateTime<Utc>,
    pub not_before: DateTime<Utc>,
    /// Still `INITIALIZED`.
    pub in_flight: bool,
    /// The latest bank attempt: its index (0 for the first) and when it began.
    pub last_attempt: Option<(u32, DateTime<Utc>)>,
}

impl Store {
    /// Every refresh requested since `since`, and every one still `INITIALIZED`
    /// whenever it was requested. Uses the `refreshes_by_date` index and the
    /// partial one-in-flight index.
    pub async fn gate_rows(&self, since: DateTime<Utc>) -> Result<Vec<GateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.refresh_id, r.consent_id, r.tenant_id, c.provider_id, r.requested_by, \
                    r.initial, r.date_requested, r.not_before, r.status = 'INITIALIZED' AS in_flight, \
                    r.attempts, r.last_started_at \
             FROM refreshes r JOIN consents c USING (consent_id) \
             WHERE r.date_requested >= $1 OR r.status = 'INITIALIZED'",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(GateRow {
                    refresh_id: RefreshId::from_uuid(row.try_get("refresh_id")?),
                    consent_id: ConsentId::from_uuid(row.try_get("consent_id")?),
                    tenant_id: TenantId::parse(row.try_get::<&str, _>("tenant_id")?)
                        .map_err(corrupt)?,
                    provider_id: ProviderId::parse(row.try_get::<&str, _>("provider_id")?)
                        .map_err(corrupt)?,
                    requested_by: row
                        .try_get::<&str, _>("requested_by")?
                        .parse::<RequestedBy>()
                        .map_err(corrupt)?,
                    initial: row.try_get("initial")?,
                    date_requested: row.try_get("date_requested")?,
                    not_before: row.try_get("not_before")?,
                    in_flight: row.try_get("in_flight")?,
                    last_attempt: last_attempt(
                        row.try_get("attempts")?,
                        row.try_get("last_started_at")?,
                    )?,
                })
            })
            .collect()
    }
}

/// The attempt index the worker logged (`attempts - 1`) with its start time.
fn last_attempt(
    attempts: i32,
    started: Option<DateTime<Utc>>,
) -> Result<Option<(u32, DateTime<Utc>)>, StoreError> {
    let Some(started) = started else {
        return Ok(None);
    };
    let index = u32::try_from(attempts - 1).map_err(corrupt)?;
    Ok(Some((index, started)))
}
