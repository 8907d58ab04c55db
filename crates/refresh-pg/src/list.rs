//! Reads for listings and live feeds: a tenant's consents in keyset pages, and the
//! outbox events after a given one (to resume an event stream).

use chrono::{DateTime, Utc};
use refresh_core::{ConsentId, ConsentStatus, EventId, TenantId};
use serde_json::Value;
use sqlx::Row;

use crate::store::{CONSENT_COLUMNS, ConsentRow, Store, StoreError, consent_row};

/// Where a page of consents continues: after this (created_at, consent_id), newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsentCursor {
    pub created_at: DateTime<Utc>,
    pub consent_id: ConsentId,
}

/// Which consents a listing shows.
#[derive(Clone, Debug)]
pub struct ConsentFilter {
    /// Only this tenant's; `None`: every tenant (operators).
    pub tenant: Option<TenantId>,
    /// Only consents with this status as the API shows it (an `ACTIVE` consent past
    /// its expiry counts as `EXPIRED`, swept or not).
    pub status: Option<ConsentStatus>,
    /// The instant that decides "past its expiry".
    pub now: DateTime<Utc>,
}

/// An outbox event read back to resume a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayedEvent {
    pub event_id: EventId,
    pub routing_key: String,
    pub payload: Value,
}

impl Store {
    /// Up to `limit` consents matching `filter`, newest first, after `cursor`.
    pub async fn consents_page(
        &self,
        filter: &ConsentFilter,
        cursor: Option<ConsentCursor>,
        limit: u32,
    ) -> Result<Vec<ConsentRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consents \
             WHERE ($1::text IS NULL OR tenant_id = $1) \
               AND ($2::text IS NULL OR (CASE WHEN status = 'ACTIVE' AND expires_at <= $6 \
                    THEN 'EXPIRED' ELSE status END) = $2) \
               AND ($3::timestamptz IS NULL OR (created_at, consent_id) < ($3, $4)) \
             ORDER BY created_at DESC, consent_id DESC LIMIT $5"
        )))
        .bind(filter.tenant.as_ref().map(TenantId::as_str))
        .bind(filter.status.map(|s| s.to_string()))
        .bind(cursor.map(|c| c.created_at))
        .bind(cursor.map(|c| *c.consent_id.as_uuid()))
        .bind(i64::from(limit))
        .bind(filter.now)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(consent_row).collect()
    }

    /// Up to `limit` events written after `after` (oldest first), of `tenant` (every
    /// tenant when `None`) and, when given, about `subject` (a consent id). When
    /// `after` is no longer kept, the events since `after_time` (the time inside a
    /// UUID v7 event id) are the best replay there is.
    pub async fn events_after(
        &self,
        after: EventId,
        after_time: DateTime<Utc>,
        tenant: Option<&TenantId>,
        subject: Option<ConsentId>,
        limit: u32,
    ) -> Result<Vec<(i64, ReplayedEvent)>, StoreError> {
        self.events_from(None, after, after_time, tenant, subject, limit)
            .await
    }

    /// The page of [`Store::events_after`] that follows the outbox row `from_id`.
    pub async fn events_after_row(
        &self,
        from_id: i64,
        tenant: Option<&TenantId>,
        subject: Option<ConsentId>,
        limit: u32,
    ) -> Result<Vec<(i64, ReplayedEvent)>, StoreError> {
        self.events_from(
            Some(from_id),
            EventId::from_uuid(uuid::Uuid::nil()),
            DateTime::<Utc>::MIN_UTC,
            tenant,
            subject,
            limit,
        )
        .await
    }

    async fn events_from(
        &self,
        from_id: Option<i64>,
        after: EventId,
        after_time: DateTime<Utc>,
        tenant: Option<&TenantId>,
        subject: Option<ConsentId>,
        limit: u32,
    ) -> Result<Vec<(i64, ReplayedEvent)>, StoreError> {
        // Routing keys are `{kind}.{status}.{tenantId}`; a tenant id may contain dots.
        let rows = sqlx::query(
            "SELECT id, event_id, routing_key, payload FROM outbox \
             WHERE id > COALESCE($1::bigint, \
                     (SELECT id FROM outbox WHERE event_id = $2), \
                     (SELECT COALESCE(max(id), 0) FROM outbox WHERE created_at <= $3)) \
               AND ($4::text IS NULL OR substring(routing_key from '^[^.]+\\.[^.]+\\.(.*)$') = $4) \
               AND ($5::text IS NULL OR payload->>'subject' = $5) \
             ORDER BY id LIMIT $6",
        )
        .bind(from_id)
        .bind(after.as_uuid())
        .bind(after_time)
        .bind(tenant.map(TenantId::as_str))
        .bind(subject.map(|s| s.to_string()))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("id")?,
                    ReplayedEvent {
                        event_id: EventId::from_uuid(row.try_get("event_id")?),
                        routing_key: row.try_get("routing_key")?,
                        payload: row.try_get("payload")?,
                    },
                ))
            })
            .collect()
    }
}

impl Store {
    /// The tenants that have consents, in name order (the portal's tenant picker).
    pub async fn tenants(&self, limit: u32) -> Result<Vec<TenantId>, StoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT tenant_id FROM consents ORDER BY tenant_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        names
            .iter()
            .map(|n| TenantId::parse(n).map_err(crate::store::corrupt))
            .collect()
    }
}
