//! The consent as the API shows it, shared by the consent routes and the listing.

use chrono::{DateTime, Utc};
use refresh_core::{ConsentId, ConsentStatus, ProviderId, RefreshId, RequestedBy, TenantId};
use refresh_pg::ConsentRow;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QuotaView {
    pub(crate) limit: u32,
    pub(crate) used: u32,
    pub(crate) window: String,
    #[serde(serialize_with = "refresh_core::time::millis_opt")]
    pub(crate) next_refresh_possible_at: Option<DateTime<Utc>>,
}

/// A consent as the API shows it (never the bank token).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConsentView {
    pub(crate) consent_id: ConsentId,
    pub(crate) tenant_id: TenantId,
    pub(crate) provider_id: ProviderId,
    pub(crate) bank_consent_id: String,
    pub(crate) status: ConsentStatus,
    #[serde(serialize_with = "refresh_core::time::millis")]
    pub(crate) expires_at: DateTime<Utc>,
    #[serde(serialize_with = "refresh_core::time::millis")]
    pub(crate) created_at: DateTime<Utc>,
    #[serde(serialize_with = "refresh_core::time::millis_opt")]
    pub(crate) last_refreshed_at: Option<DateTime<Utc>>,
    pub(crate) refreshing: bool,
    pub(crate) refresh_id: Option<RefreshId>,
    pub(crate) quota: Option<QuotaView>,
}

pub(crate) async fn consent_view(
    state: &AppState,
    consent: ConsentRow,
    quota_source: RequestedBy,
) -> Result<ConsentView, ApiError> {
    let in_flight = state.store.in_flight(consent.consent_id).await?;
    let quota = state
        .admitter
        .quota(consent.consent_id, quota_source)
        .await?
        .map(|q| QuotaView {
            limit: q.limit,
            used: q.used,
            window: q.window.to_string(),
            next_refresh_possible_at: q.next_refresh_possible_at,
        });
    let now = Utc::now();
    let status = consent.status.at(consent.expires_at, now);
    Ok(ConsentView {
        consent_id: consent.consent_id,
        tenant_id: consent.tenant_id,
        provider_id: consent.provider_id,
        bank_consent_id: consent.bank_consent_id,
        status,
        expires_at: consent.expires_at,
        created_at: consent.created_at,
        last_refreshed_at: consent.last_refreshed_at,
        refreshing: in_flight.is_some(),
        refresh_id: in_flight,
        quota,
    })
}
