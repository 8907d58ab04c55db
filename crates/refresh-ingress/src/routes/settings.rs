//! A tenant's auto-sync and inactivation settings (SPEC §6).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use refresh_core::{Problem, TenantId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{ApiJson, ApiPath, json_response};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// Tenant settings with the warnings of SPEC §6.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SettingsView {
    #[serde(flatten)]
    settings: AppSettings,
    warnings: Vec<String>,
}

/// Defaults of a tenant that never saved settings: no auto-sync, 90 days to inactivation.
const DEFAULT_INACTIVATION_DAYS: i32 = 90;

/// `autosyncIntervalHours` is required even though it may be `null`: a body that
/// leaves it out is a mistake, not a request to switch auto-sync off.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AppSettings {
    /// Hours between auto-syncs (6 to 720), or `null` for no auto-sync.
    #[serde(deserialize_with = "required_nullable")]
    #[schema(required = true, minimum = 6, maximum = 720)]
    pub(crate) autosync_interval_hours: Option<i32>,
    /// Days without a successful refresh before a consent becomes inactive (1 to 3650).
    #[schema(minimum = 1, maximum = 3650)]
    pub(crate) inactivation_days: i32,
}

/// A field that must be present and may be `null` (serde treats a missing `Option`
/// as `None` unless a `deserialize_with` is given).
fn required_nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    Option::<i32>::deserialize(d)
}

pub(crate) fn settings_warnings(settings: &AppSettings) -> Vec<String> {
    // Both are range-checked before they are saved; a stored value outside the
    // ranges would be a bug, shown as the strictest reading.
    refresh_core::settings_warnings(
        settings
            .autosync_interval_hours
            .map(|h| u32::try_from(h).unwrap_or(0)),
        u32::try_from(settings.inactivation_days).unwrap_or(0),
    )
}

fn settings_tenant(principal: &Principal, raw: &str) -> Result<TenantId, ApiError> {
    let tenant = TenantId::parse(raw).map_err(|_| {
        ApiError::from(Problem::bad_request(format!("tenantId {raw:?} is invalid")))
    })?;
    if principal.scope_tenant().is_some_and(|t| *t != tenant) {
        return Err(ApiError::from(Problem::not_found("Tenant not found")));
    }
    Ok(tenant)
}

fn settings_response(settings: AppSettings) -> Response {
    let warnings = settings_warnings(&settings);
    json_response(StatusCode::OK, &SettingsView { settings, warnings })
}

#[utoipa::path(
    get,
    path = "/v1/apps/{tenantId}/settings",
    tag = "settings",
    summary = "A tenant's auto-sync and inactivation settings",
    params(("tenantId" = String, Path, description = "The tenant")),
    responses(
        (status = 200, description = "The settings with `warnings`", body = SettingsView),
        (status = 404, description = "Another tenant (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_settings(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
) -> Result<Response, ApiError> {
    let tenant = settings_tenant(&principal, &raw)?;
    Ok(settings_response(load(&state, &tenant).await?))
}

/// The tenant's settings, or the defaults when it never saved any.
pub(crate) async fn load(state: &AppState, tenant: &TenantId) -> Result<AppSettings, ApiError> {
    let stored = state.store.tenant_settings(tenant).await?;
    Ok(AppSettings {
        autosync_interval_hours: stored.and_then(|s| s.autosync_interval_hours),
        inactivation_days: stored.map_or(DEFAULT_INACTIVATION_DAYS, |s| s.inactivation_days),
    })
}

/// Checks the ranges of SPEC §3 and saves.
pub(crate) async fn save(
    state: &AppState,
    tenant: &TenantId,
    settings: &AppSettings,
) -> Result<(), ApiError> {
    if settings
        .autosync_interval_hours
        .is_some_and(|h| !(6..=720).contains(&h))
    {
        return Err(ApiError::from(Problem::bad_request(
            "autosyncIntervalHours must be null or 6 to 720",
        )));
    }
    if !(1..=3650).contains(&settings.inactivation_days) {
        return Err(ApiError::from(Problem::bad_request(
            "inactivationDays must be 1 to 3650",
        )));
    }
    let row = refresh_pg::TenantSettingsRow {
        autosync_interval_hours: settings.autosync_interval_hours,
        inactivation_days: settings.inactivation_days,
    };
    state
        .store
        .put_tenant_settings(tenant, row, Utc::now())
        .await?;
    Ok(())
}

#[utoipa::path(
    put,
    path = "/v1/apps/{tenantId}/settings",
    tag = "settings",
    summary = "Change a tenant's settings",
    params(("tenantId" = String, Path, description = "The tenant")),
    request_body(content = AppSettings, content_type = "application/json"),
    responses(
        (status = 200, description = "The saved settings with `warnings`", body = SettingsView),
        (status = 400, description = "Out of range (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Another tenant (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_settings(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    ApiJson(settings): ApiJson<AppSettings>,
) -> Result<Response, ApiError> {
    let tenant = settings_tenant(&principal, &raw)?;
    save(&state, &tenant, &settings).await?;
    Ok(settings_response(settings))
}
