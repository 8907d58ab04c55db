//! The consent lifecycle and the scheduler's sweeps (SPEC §6): status changes with
//! their `consent.{revoked|expired|inactivated}` events, auto-sync claims, removal of
//! an inactive consent's data, stalled refreshes, and retention.
//!
//! Every sweep is safe with several scheduler replicas at once: rows are claimed with
//! `FOR UPDATE SKIP LOCKED` in short transactions that never span a call to another
//! service, and every change is conditional on the state it changes from, so each
//! piece of work is done once.

use chrono::{DateTime, TimeDelta, Utc};
use refresh_core::{
    CloudEvent, ConsentId, ConsentSnapshot, ConsentStatus, EventId, RefreshId, TenantId,
    autosync_backoff,
};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row as _};

use crate::store::{OutboxEvent, Store, StoreError, consent_row, corrupt, insert_outbox};

/// The consent columns and whether a refresh of it is in flight, for a snapshot.
const SNAPSHOT_COLUMNS: &str = "c.consent_id, c.tenant_id, c.provider_id, c.bank_consent_id, \
     c.expires_at, c.status, c.created_at, c.last_refreshed_at, \
     EXISTS (SELECT 1 FROM refreshes r WHERE r.consent_id = c.consent_id \
             AND r.status = 'INITIALIZED') AS refreshing";

/// A consent due for auto-sync, claimed by one scheduler replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutosyncClaim {
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    /// Auto-sync requests since its last successful refresh, this one included.
    pub attempts: u32,
}

/// Rows of an inactive consent's stored data removed in one batch, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemovedData {
    pub accounts: u64,
    pub parties: u64,
    pub balances: u64,
    pub transactions: u64,
    pub items: u64,
}

impl RemovedData {
    pub fn total(&self) -> u64 {
        self.accounts + self.parties + self.balances + self.transactions + self.items
    }
}

/// Rows removed by retention in one batch, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retained {
    pub history: u64,
    pub outbox: u64,
    pub idempotency_keys: u64,
}

/// A refresh still `INITIALIZED` long after its start slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StalledCandidate {
    pub refresh_id: RefreshId,
    pub consent_id: ConsentId,
}

fn snapshot(row: &PgRow) -> Result<ConsentSnapshot, StoreError> {
    let consent = consent_row(row)?;
    Ok(ConsentSnapshot {
        consent_id: consent.consent_id,
        tenant_id: consent.tenant_id,
        provider_id: consent.provider_id,
        bank_consent_id: consent.bank_consent_id,
        status: consent.status,
        expires_at: consent.expires_at,
        created_at: consent.created_at,
        last_refreshed_at: consent.last_refreshed_at,
        refreshing: row.try_get("refreshing")?,
    })
}

/// The lifecycle event announcing `consent`'s new status, ready for the outbox.
fn consent_event(consent: ConsentSnapshot, at: DateTime<Utc>) -> Option<OutboxEvent> {
    let event = CloudEvent::consent(consent, EventId::from_uuid(uuid::Uuid::now_v7()), at)?;
    Some(OutboxEvent {
        event_id: event.id,
        routing_key: event.routing_key(),
        payload: serde_json::to_value(&event).unwrap_or_default(),
    })
}

/// Writes the lifecycle events of `rows` (consents that just changed status).
async fn announce(
    conn: &mut sqlx::PgConnection,
    rows: &[PgRow],
    at: DateTime<Utc>,
) -> Result<Vec<ConsentSnapshot>, StoreError> {
    let mut changed = Vec::with_capacity(rows.len());
    for row in rows {
        let consent = snapshot(row)?;
        if let Some(event) = consent_event(consent.clone(), at) {
            insert_outbox(&mut *conn, &event, at).await?;
        }
        changed.push(consent);
    }
    Ok(changed)
}

/// Changes a consent's status inside `tx` if it is not already `status`, and writes
/// its lifecycle event; `None` if nothing changed.
pub(crate) async fn transition(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    consent_id: ConsentId,
    status: ConsentStatus,
    at: DateTime<Utc>,
) -> Result<Option<ConsentSnapshot>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE consents c SET status = $2, updated_at = $3, \
         data_removed_at = CASE WHEN $2 = 'INACTIVE' THEN NULL ELSE c.data_removed_at END \
         WHERE c.consent_id = $1 AND c.status <> $2 RETURNING {SNAPSHOT_COLUMNS}"
    )))
    .bind(consent_id.as_uuid())
    .bind(status.as_str())
    .bind(at)
    .fetch_all(&mut **tx)
    .await?;
    let mut changed = announce(tx, &rows, at).await?;
    Ok(changed.pop())
}

impl Store {
    /// Sets a consent's status (a revoke through the API, for one), announcing the
    /// change as a lifecycle event in the same transaction. Returns whether the
    /// consent exists.
    pub async fn set_consent_status(
        &self,
        consent_id: ConsentId,
        status: ConsentStatus,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        transition(&mut tx, consent_id, status, at).await?;
        tx.commit().await?;
        Ok(self.consent(consent_id).await?.is_some())
    }

    /// Marks up to `limit` consents whose `expiresAt` has passed by `now` `EXPIRED`,
    /// each with its `consent.expired` event.
    pub async fn expire_due(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ConsentSnapshot>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH due AS (SELECT consent_id FROM consents WHERE status = 'ACTIVE' \
               AND expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE consents c SET status = 'EXPIRED', updated_at = $1 FROM due \
             WHERE c.consent_id = due.consent_id RETURNING {SNAPSHOT_COLUMNS}"
        )))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let expired = announce(&mut tx, &rows, now).await?;
        tx.commit().await?;
        Ok(expired)
    }

    /// Marks up to `limit` consents `INACTIVE` that had no successful refresh (nor
    /// registration) for their tenant's `inactivationDays` (`default_days` without
    /// settings), each with its `consent.inactivated` event; their data is removed
    /// afterwards by [`Self::remove_inactive_data`]. `ACTIVE` and `EXPIRED` consents
    /// go inactive; one with a refresh in flight waits for its outcome.
    pub async fn inactivate_due(
        &self,
        now: DateTime<Utc>,
        default_days: u32,
        limit: i64,
    ) -> Result<Vec<ConsentSnapshot>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH due AS (SELECT c.consent_id FROM consents c \
               LEFT JOIN tenant_settings s ON s.tenant_id = c.tenant_id \
               WHERE c.status IN ('ACTIVE', 'EXPIRED') \
                 AND coalesce(c.last_refreshed_at, c.created_at) \
                     <= $1 - make_interval(days => coalesce(s.inactivation_days, $2)) \
                 AND NOT EXISTS (SELECT 1 FROM refreshes r WHERE r.consent_id = c.consent_id \
                                 AND r.status = 'INITIALIZED') \
               ORDER BY coalesce(c.last_refreshed_at, c.created_at) \
               LIMIT $3 FOR UPDATE OF c SKIP LOCKED) \
             UPDATE consents c SET status = 'INACTIVE', updated_at = $1, data_removed_at = NULL \
             FROM due WHERE c.consent_id = due.consent_id RETURNING {SNAPSHOT_COLUMNS}"
        )))
        .bind(now)
        .bind(i32::try_from(default_days).map_err(corrupt)?)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let inactivated = announce(&mut tx, &rows, now).await?;
        tx.commit().await?;
        Ok(inactivated)
    }

    /// Removes up to `limit` rows of each stored data kind of one inactive consent
    /// whose data is still there; marks it done when nothing is left. `None` when no
    /// consent has data left to remove (or the others are being removed by another
    /// replica).
    pub async fn remove_inactive_data(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Option<(ConsentId, RemovedData)>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let consent: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT consent_id FROM consents WHERE status = 'INACTIVE' AND data_removed_at IS NULL \
             ORDER BY updated_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(consent) = consent else {
            tx.rollback().await?;
            return Ok(None);
        };
        let mut removed = RemovedData::default();
        for (table, count) in [
            ("transactions", &mut removed.transactions),
            ("balances", &mut removed.balances),
            ("account_parties", &mut removed.parties),
            ("accounts", &mut removed.accounts),
            ("stored_items", &mut removed.items),
        ] {
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE ctid = ANY (ARRAY (SELECT ctid FROM {table} \
                 WHERE consent_id = $1 LIMIT $2))"
            )))
            .bind(consent)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            *count = done.rows_affected();
        }
        let limit = u64::try_from(limit).unwrap_or(0);
        let finished = [
            removed.transactions,
            removed.balances,
            removed.parties,
            removed.accounts,
            removed.items,
        ]
        .iter()
        .all(|n| *n < limit);
        if finished {
            sqlx::query("UPDATE consents SET data_removed_at = $2 WHERE consent_id = $1")
                .bind(consent)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some((ConsentId::from_uuid(consent), removed)))
    }

    /// How many consents are due for auto-sync at `now` (backing off or not).
    pub async fn autosync_due_count(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM consents c JOIN tenant_settings s ON s.tenant_id = c.tenant_id \
             WHERE {AUTOSYNC_DUE}"
        )))
        .bind(now)
        .fetch_one(self.pool())
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Claims up to `limit` consents due for auto-sync at `now` and not backing off.
    /// Each claim moves the consent's next auto-sync to `now` plus the backoff of its
    /// attempts, before anything is requested: a refused request is asked again after
    /// that (and with a longer backoff if refused again), and so is one whose replica
    /// died before asking. A successful refresh ends the backoff.
    pub async fn claim_autosync(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<AutosyncClaim>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT c.consent_id, c.tenant_id, \
               CASE WHEN c.last_autosync_at IS NULL OR c.last_refreshed_at > c.last_autosync_at \
                    THEN 1 ELSE c.autosync_attempts + 1 END AS attempts \
             FROM consents c JOIN tenant_settings s ON s.tenant_id = c.tenant_id \
             WHERE {AUTOSYNC_DUE} \
               AND (c.next_autosync_at IS NULL OR c.next_autosync_at <= $1 \
                    OR c.last_refreshed_at > c.last_autosync_at) \
             ORDER BY coalesce(c.last_refreshed_at, c.created_at), c.consent_id \
             LIMIT $2 FOR UPDATE OF c SKIP LOCKED"
        )))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut claims = Vec::with_capacity(rows.len());
        let (mut ids, mut attempts, mut next) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let consent_id: uuid::Uuid = row.try_get("consent_id")?;
            let tried: i32 = row.try_get("attempts")?;
            let tried_u = u32::try_from(tried).map_err(corrupt)?;
            ids.push(consent_id);
            attempts.push(tried);
            next.push(now + autosync_backoff(tried_u));
            claims.push(AutosyncClaim {
                consent_id: ConsentId::from_uuid(consent_id),
                tenant_id: TenantId::parse(row.try_get::<&str, _>("tenant_id")?)
                    .map_err(corrupt)?,
                attempts: tried_u,
            });
        }
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE consents c SET last_autosync_at = $4, autosync_attempts = u.attempts, \
                 next_autosync_at = u.next \
                 FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS u(consent_id, attempts, next) \
                 WHERE c.consent_id = u.consent_id",
            )
            .bind(&ids)
            .bind(&attempts)
            .bind(&next)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(claims)
    }

    /// Refreshes still `INITIALIZED` whose start slot passed more than `after` before
    /// `now`, oldest first: their job may be lost or dead-lettered. The caller checks
    /// that no worker holds them before ending them.
    pub async fn stalled_candidates(
        &self,
        now: DateTime<Utc>,
        after: TimeDelta,
        limit: i64,
    ) -> Result<Vec<StalledCandidate>, StoreError> {
        let rows = sqlx::query(
            "SELECT refresh_id, consent_id FROM refreshes WHERE status = 'INITIALIZED' \
             AND not_before <= $1 ORDER BY not_before LIMIT $2",
        )
        .bind(now - after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StalledCandidate {
                    refresh_id: RefreshId::from_uuid(row.try_get("refresh_id")?),
                    consent_id: ConsentId::from_uuid(row.try_get("consent_id")?),
                })
            })
            .collect()
    }

    /// Removes one batch (at most `limit` rows of each kind) of what is past its use:
    /// finished refreshes requested before `history_before` (history and records),
    /// outbox rows published before `outbox_before`, idempotency keys made before
    /// `keys_before`.
    pub async fn remove_expired(
        &self,
        history_before: DateTime<Utc>,
        outbox_before: DateTime<Utc>,
        keys_before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Retained, StoreError> {
        let history = sqlx::query(
            "DELETE FROM refreshes WHERE refresh_id = ANY (ARRAY (SELECT refresh_id FROM refreshes \
             WHERE date_requested < $1 AND status <> 'INITIALIZED' LIMIT $2))",
        )
        .bind(history_before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected();
        let outbox = sqlx::query(
            "DELETE FROM outbox WHERE id = ANY (ARRAY (SELECT id FROM outbox \
             WHERE published_at < $1 LIMIT $2))",
        )
        .bind(outbox_before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected();
        let idempotency_keys = sqlx::query(
            "DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY (SELECT ctid FROM idempotency_keys \
             WHERE created_at < $1 LIMIT $2))",
        )
        .bind(keys_before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(Retained {
            history,
            outbox,
            idempotency_keys,
        })
    }
}

/// SPEC §6: `ACTIVE`, not expired at `$1`, not refreshing, and its last successful
/// refresh (or registration) older than the tenant's interval less the consent's
/// jitter (whole milliseconds, as `refresh_core::autosync_due_at` computes it).
const AUTOSYNC_DUE: &str = "c.status = 'ACTIVE' AND c.expires_at > $1 \
     AND s.autosync_interval_hours IS NOT NULL \
     AND coalesce(c.last_refreshed_at, c.created_at) \
         + (s.autosync_interval_hours::bigint * 3600000 * (10000 - c.autosync_jitter_bp) / 10000) \
           * interval '1 millisecond' <= $1 \
     AND NOT EXISTS (SELECT 1 FROM refreshes r WHERE r.consent_id = c.consent_id \
                     AND r.status = 'INITIALIZED')";
