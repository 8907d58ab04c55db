//! Key rotation at rest: stored bank tokens sealed with a retired key (or in the format
//! before tokens named their key) re-encrypted with `crypto.key`, in batches that lock
//! only the rows they change (`FOR UPDATE SKIP LOCKED`, so a refresh finishing on a
//! consent is never waited for: that row is taken by a later batch); and what is left.

use std::collections::BTreeMap;

use chrono::Utc;
use refresh_core::{ConsentId, EventId, RefreshError, RefreshId};
use sqlx::Row as _;

use crate::crypto::{CryptoError, MAGIC};
use crate::store::{Store, StoreError, corrupt};
use crate::stored::Finish;

/// What one batch of [`Store::rekey_batch`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RekeyBatch {
    /// Rows looked at (sealed otherwise than with `crypto.key`).
    pub examined: u64,
    /// Rows sealed again with `crypto.key`.
    pub rekeyed: u64,
    /// Rows no configured key opens; left as they are.
    pub undecryptable: u64,
    /// The first of those, with the reason (the key id it names, if any).
    pub first_undecryptable: Option<(ConsentId, String)>,
    /// The last consent looked at: the next batch starts after it.
    pub last: Option<ConsentId>,
}

/// How the stored tokens are sealed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenKeys {
    /// Tokens by the id of the key that sealed them (hex), `"none"` for tokens sealed
    /// before they named their key.
    pub by_key: BTreeMap<String, u64>,
    /// Tokens not sealed with `crypto.key` (the work left to a re-encryption).
    pub to_rekey: u64,
}

impl Store {
    /// Re-encrypts with `crypto.key` up to `limit` tokens sealed otherwise, of the
    /// consents after `after` in id order, in one transaction. A token no key opens
    /// is counted and left (it is the refresh's error, see [`Store::access_token`]).
    pub async fn rekey_batch(
        &self,
        after: Option<ConsentId>,
        limit: i64,
    ) -> Result<RekeyBatch, StoreError> {
        let header = self.cipher().key_id().header();
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "SELECT consent_id, access_token_enc FROM consents \
             WHERE substring(access_token_enc FROM 1 FOR $1) <> $2 \
               AND ($3::uuid IS NULL OR consent_id > $3) \
             ORDER BY consent_id LIMIT $4 FOR UPDATE SKIP LOCKED",
        )
        .bind(i32::try_from(header.len()).map_err(corrupt)?)
        .bind(header.as_slice())
        .bind(after.map(|c| *c.as_uuid()))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut batch = RekeyBatch {
            examined: rows.len() as u64,
            ..RekeyBatch::default()
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut sealed = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: uuid::Uuid = row.try_get("consent_id")?;
            let stored: Vec<u8> = row.try_get("access_token_enc")?;
            batch.last = Some(ConsentId::from_uuid(id));
            match self.cipher().reseal(&stored, id.as_bytes()) {
                Ok(Some(new)) => {
                    ids.push(id);
                    sealed.push(new);
                }
                Ok(None) => {}
                Err(error) => {
                    batch.undecryptable += 1;
                    tracing::debug!(consent_id = %id, error = %error, "a stored token cannot be re-encrypted");
                    batch
                        .first_undecryptable
                        .get_or_insert((ConsentId::from_uuid(id), error.to_string()));
                }
            }
        }
        if !ids.is_empty() {
            let updated = sqlx::query(
                "UPDATE consents c SET access_token_enc = v.enc \
                 FROM UNNEST($1::uuid[], $2::bytea[]) AS v(id, enc) WHERE c.consent_id = v.id",
            )
            .bind(&ids)
            .bind(&sealed)
            .execute(&mut *tx)
            .await?;
            batch.rekeyed = updated.rows_affected();
        }
        tx.commit().await?;
        Ok(batch)
    }

    /// How many tokens each key sealed, and how many are not sealed with `crypto.key`.
    pub async fn token_keys(&self) -> Result<TokenKeys, StoreError> {
        let header = self.cipher().key_id().header();
        let rows = sqlx::query(
            "SELECT CASE WHEN substring(access_token_enc FROM 1 FOR 4) = $1 \
                         THEN encode(substring(access_token_enc FROM 5 FOR 8), 'hex') \
                         ELSE 'none' END AS key, \
                    count(*) AS n, \
                    count(*) FILTER (WHERE substring(access_token_enc FROM 1 FOR $2) <> $3) AS other \
             FROM consents GROUP BY 1",
        )
        .bind(MAGIC.as_slice())
        .bind(i32::try_from(header.len()).map_err(corrupt)?)
        .bind(header.as_slice())
        .fetch_all(self.pool())
        .await?;
        let mut keys = TokenKeys::default();
        for row in rows {
            let key: String = row.try_get("key")?;
            let n: i64 = row.try_get("n")?;
            let other: i64 = row.try_get("other")?;
            keys.by_key.insert(key, u64::try_from(n).map_err(corrupt)?);
            keys.to_rekey += u64::try_from(other).map_err(corrupt)?;
        }
        Ok(keys)
    }

    /// Ends the consent's refresh in flight `ERROR` `internal_error` because its bank
    /// token cannot be decrypted (`error` says why, naming the key it was sealed
    /// with); logged, since an operator has to restore the key or the consent.
    pub async fn end_undecryptable(
        &self,
        consent_id: ConsentId,
        error: &CryptoError,
    ) -> Result<(), StoreError> {
        let in_flight: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT refresh_id FROM refreshes WHERE consent_id = $1 AND status = 'INITIALIZED'",
        )
        .bind(consent_id.as_uuid())
        .fetch_optional(self.pool())
        .await?;
        let Some(refresh_id) = in_flight.map(RefreshId::from_uuid) else {
            tracing::warn!(%consent_id, error = %error, "a consent's bank token cannot be decrypted");
            return Ok(());
        };
        let finish = self
            .finish_error(
                refresh_id,
                RefreshError::internal_error(&error.to_string()),
                None,
                EventId::from_uuid(uuid::Uuid::now_v7()),
                Utc::now(),
            )
            .await?;
        if matches!(finish, Finish::Done(_)) {
            tracing::warn!(%consent_id, %refresh_id, error = %error, "ended a refresh ERROR internal_error: its bank token cannot be decrypted");
        }
        Ok(())
    }
}
