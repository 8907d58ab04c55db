//! The HTTP API of SPEC §3 (the routes that need no worker to answer).

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get, routing::post};
use chrono::{DateTime, TimeDelta, Utc};
use refresh_core::{
    ConsentId, ConsentStatus, Problem, ProblemCode, ProviderId, RefreshId, RefreshRecord,
    RequestedBy, TenantId,
};
use refresh_pg::{ConsentRow, KeyReservation, NewConsent, StoreError};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::admission::{Decision, RefreshRequest};
use crate::auth::Principal;
use crate::error::{ApiError, problem_response};
use crate::state::AppState;

/// Largest accepted request body (SPEC §3).
pub const BODY_LIMIT: usize = 64 * 1024;
/// Longest `Prefer: wait=N`.
const MAX_WAIT_SECS: u64 = 60;
/// How long a repeated Idempotency-Key waits for the first request's answer.
const KEY_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/consents", post(register_consent))
        .route("/v1/consents/{consent_id}", get(get_consent))
        .route("/v1/consents/{consent_id}/refresh", post(request_refresh))
        .route("/v1/consents/{consent_id}/refreshes", get(history))
        .route("/v1/consents/{consent_id}/revoke", post(revoke))
        .route(
            "/v1/consents/{consent_id}/accounts",
            get(crate::data::accounts),
        )
        .route(
            "/v1/consents/{consent_id}/balances",
            get(crate::data::balances),
        )
        .route(
            "/v1/consents/{consent_id}/transactions",
            get(crate::data::transactions),
        )
        .route(
            "/v1/consents/{consent_id}/parties",
            get(crate::data::parties),
        )
        .route(
            "/v1/consents/{consent_id}/beneficiaries",
            get(crate::data::beneficiaries),
        )
        .route(
            "/v1/consents/{consent_id}/direct-debits",
            get(crate::data::direct_debits),
        )
        .route(
            "/v1/consents/{consent_id}/standing-orders",
            get(crate::data::standing_orders),
        )
        .route(
            "/v1/consents/{consent_id}/scheduled-payments",
            get(crate::data::scheduled_payments),
        )
        .route(
            "/v1/consents/{consent_id}/statements",
            get(crate::data::statements),
        )
        .route(
            "/v1/consents/{consent_id}/products",
            get(crate::data::products),
        )
        .route("/v1/refreshes/{refresh_id}", get(get_refresh))
        .route(
            "/v1/refreshes/{refresh_id}/changes",
            get(crate::data::changes),
        )
        .route(
            "/v1/apps/{tenant_id}/settings",
            get(get_settings).put(put_settings),
        )
        .route(
            "/stored-data/v1/consents/{consent_id}/refresh",
            post(sync_refresh),
        )
        .route("/cfa/consent/{consent_id}/refresh", post(async_refresh))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

// --- extractors ---------------------------------------------------------------------

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.verifier.verify(header).map_err(ApiError::from)
    }
}

/// A JSON body whose rejections are problems: 413 over 64 KiB, 400 otherwise.
pub(crate) struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::BytesRejection(r))
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::from(Problem::payload_too_large()))
            }
            Err(rejection) => Err(ApiError::from(Problem::bad_request(rejection.body_text()))),
        }
    }
}

pub(crate) fn consent_id(raw: &str) -> Result<ConsentId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::from(Problem::bad_request(format!(
            "consentId {raw:?} is not a UUID"
        )))
    })
}

pub(crate) fn refresh_id(raw: &str) -> Result<RefreshId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::from(Problem::bad_request(format!(
            "refreshId {raw:?} is not a UUID"
        )))
    })
}

fn source(principal: &Principal, tenant_source: RequestedBy) -> RequestedBy {
    if principal.admin {
        RequestedBy::Admin
    } else {
        tenant_source
    }
}

/// The consent if the caller may see it, else 404.
pub(crate) async fn visible_consent(
    state: &AppState,
    principal: &Principal,
    id: ConsentId,
) -> Result<ConsentRow, ApiError> {
    let consent = state.store.consent(id).await?;
    match consent {
        Some(consent)
            if principal
                .scope_tenant()
                .is_none_or(|t| *t == consent.tenant_id) =>
        {
            Ok(consent)
        }
        _ => Err(ApiError::from(Problem::consent_not_found())),
    }
}

// --- wire types ---------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QuotaView {
    limit: u32,
    used: u32,
    window: String,
    next_refresh_possible_at: Option<DateTime<Utc>>,
}

/// A consent as the API shows it (never the bank token).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConsentView {
    consent_id: ConsentId,
    tenant_id: TenantId,
    provider_id: ProviderId,
    bank_consent_id: String,
    status: ConsentStatus,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    last_refreshed_at: Option<DateTime<Utc>>,
    refreshing: bool,
    refresh_id: Option<RefreshId>,
    quota: Option<QuotaView>,
}

async fn consent_view(
    state: &AppState,
    consent: ConsentRow,
    quota_source: RequestedBy,
) -> Result<ConsentView, ApiError> {
    let in_flight = state.store.in_flight(consent.consent_id).await?;
    let quota = state
        .gate
        .quota(consent.consent_id, quota_source)
        .await?
        .map(|q| QuotaView {
            limit: q.limit,
            used: q.used,
            window: q.window.to_string(),
            next_refresh_possible_at: q.next_refresh_possible_at,
        });
    let now = Utc::now();
    let status = if consent.status == ConsentStatus::Active && consent.expires_at <= now {
        ConsentStatus::Expired
    } else {
        consent.status
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_warn_when_fewer_than_two_chances() {
        let check = |hours: Option<i32>, days: i32, warns: bool| {
            let settings = AppSettings {
                autosync_interval_hours: hours,
                inactivation_days: days,
            };
            assert_eq!(
                !settings_warnings(&settings).is_empty(),
                warns,
                "{hours:?} h, {days} d"
            );
        };
        check(None, 1, false);
        check(Some(24), 2, true); // 48 h ≥ 48 h
        check(Some(24), 3, false);
        check(Some(720), 60, true);
        check(Some(6), 1, false);
        check(Some(12), 1, true);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RegisterConsent {
    consent_id: Option<String>,
    provider_id: String,
    bank_consent_id: String,
    access_token: String,
    expires_at: DateTime<Utc>,
}

/// The answer of the synchronous compatibility route.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CompatMessage {
    status_code: u16,
    message: String,
}

/// `{items}`: a consent's refresh history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct History {
    items: Vec<RefreshRecord>,
}

/// Tenant settings with the warnings of SPEC §6.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SettingsView {
    #[serde(flatten)]
    settings: AppSettings,
    warnings: Vec<String>,
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    (status, Json(body)).into_response()
}

fn refresh_location(id: RefreshId) -> HeaderValue {
    // A UUID path is always a valid header value.
    HeaderValue::from_str(&format!("/v1/refreshes/{id}"))
        .unwrap_or(HeaderValue::from_static("/v1/refreshes"))
}

// --- handlers -----------------------------------------------------------------------

#[utoipa::path(
    post,
    path = "/v1/consents",
    tag = "consents",
    summary = "Register a consent and start its initial load",
    responses(
        (status = 201, description = "Registered; `initialRefresh` is the initial load's record (or `{problem}`)", body = ConsentView),
        (status = 400, description = "Malformed body, unknown provider, or the id exists (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB (`payload_too_large`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn register_consent(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<RegisterConsent>,
) -> Result<Response, ApiError> {
    let Some(tenant) = principal.tenant.clone() else {
        return Err(ApiError::from(Problem::bad_request(
            "An operator token must name the tenant (tenant_id) to register a consent",
        )));
    };
    let consent_id = match body.consent_id.as_deref() {
        Some(raw) => consent_id(raw)?,
        None => ConsentId::from_uuid(uuid::Uuid::new_v4()),
    };
    let provider_id = ProviderId::parse(&body.provider_id)
        .ok()
        .filter(|p| state.providers.contains(p.as_str()))
        .ok_or_else(|| {
            ApiError::from(Problem::bad_request(format!(
                "providerId {:?} is not a configured provider",
                body.provider_id
            )))
        })?;
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::from(Problem::bad_request(what.to_owned())))
        }
    };
    check(
        !body.bank_consent_id.trim().is_empty() && body.bank_consent_id.len() <= 256,
        "bankConsentId must have 1 to 256 characters",
    )?;
    check(
        !body.access_token.trim().is_empty() && body.access_token.len() <= 8192,
        "accessToken must have 1 to 8192 characters",
    )?;
    let now = Utc::now();
    check(body.expires_at > now, "expiresAt must be in the future")?;
    let inserted = state
        .store
        .insert_consent(&NewConsent {
            consent_id,
            tenant_id: tenant.clone(),
            provider_id,
            bank_consent_id: body.bank_consent_id,
            access_token: SecretString::from(body.access_token),
            expires_at: body.expires_at,
            created_at: now,
        })
        .await;
    let consent = match inserted {
        Ok(consent) => consent,
        Err(StoreError::Conflict) => {
            return Err(ApiError::from(Problem::new(
                ProblemCode::BadRequest,
                format!("consent {consent_id} exists already"),
            )));
        }
        Err(error) => return Err(error.into()),
    };
    // The initial connection load: a refresh like any other, counted against no quota.
    let initial = state
        .admitter
        .request(&RefreshRequest {
            consent_id,
            tenant: Some(tenant),
            requested_by: RequestedBy::App,
            initial: true,
        })
        .await;
    let initial_refresh = match initial {
        Ok(Decision::Admitted(record)) => json!(record),
        Ok(Decision::Refused(problem)) => json!({ "problem": problem }),
        Err(error) => json!({ "problem": *ApiError::from(error).0 }),
    };
    let view = consent_view(&state, consent, RequestedBy::Api).await?;
    let mut body = serde_json::to_value(view).unwrap_or_default();
    body["initialRefresh"] = initial_refresh;
    let mut response = json_response(StatusCode::CREATED, &body);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/consents/{consent_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/v1/consents/{consentId}",
    tag = "consents",
    summary = "A consent with its refresh state and quota",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 200, description = "The consent", body = ConsentView),
        (status = 404, description = "Unknown or another tenant's consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn get_consent(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let consent = visible_consent(&state, &principal, consent_id(&raw)?).await?;
    let view = consent_view(&state, consent, source(&principal, RequestedBy::Api)).await?;
    Ok(json_response(StatusCode::OK, &view))
}

#[utoipa::path(
    post,
    path = "/v1/consents/{consentId}/revoke",
    tag = "consents",
    summary = "Mark a consent revoked",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 200, description = "The revoked consent", body = ConsentView),
        (status = 404, description = "Unknown consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let consent = visible_consent(&state, &principal, consent_id(&raw)?).await?;
    state
        .store
        .set_consent_status(consent.consent_id, ConsentStatus::Revoked, Utc::now())
        .await?;
    let consent = visible_consent(&state, &principal, consent.consent_id).await?;
    let view = consent_view(&state, consent, source(&principal, RequestedBy::Api)).await?;
    Ok(json_response(StatusCode::OK, &view))
}

#[utoipa::path(
    get,
    path = "/v1/consents/{consentId}/refreshes",
    tag = "refreshes",
    summary = "The consent's refresh requests of the retention window, newest first",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 200, description = "`{items: [RefreshRecord]}`", body = History),
        (status = 404, description = "Unknown consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn history(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let consent = visible_consent(&state, &principal, consent_id(&raw)?).await?;
    let since = Utc::now() - TimeDelta::days(state.retention_days.into());
    let items = state.store.history(consent.consent_id, since).await?;
    Ok(json_response(StatusCode::OK, &History { items }))
}

#[utoipa::path(
    get,
    path = "/v1/refreshes/{refreshId}",
    tag = "refreshes",
    summary = "A refresh record",
    params(("refreshId" = String, Path, description = "The refresh (UUID v7)")),
    responses(
        (status = 200, description = "The record", body = RefreshRecord),
        (status = 404, description = "Unknown refresh (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn get_refresh(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = refresh_id(&raw)?;
    match state.store.refresh(id).await? {
        Some(record)
            if principal
                .scope_tenant()
                .is_none_or(|t| *t == record.tenant_id) =>
        {
            Ok(json_response(StatusCode::OK, &record))
        }
        _ => Err(ApiError::from(Problem::not_found("Refresh not found"))),
    }
}

/// `Prefer: wait=N` (N ≤ 60), if present.
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|part| {
            let seconds: u64 = part.trim().strip_prefix("wait=")?.trim().parse().ok()?;
            Some(Duration::from_secs(seconds.min(MAX_WAIT_SECS)))
        })
}

/// Polls the record until it is terminal or `wait` has passed.
async fn wait_terminal(
    state: &AppState,
    record: RefreshRecord,
    wait: Duration,
) -> Result<RefreshRecord, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut record = record;
    while !record.status.is_terminal() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
        if let Some(latest) = state.store.refresh(record.refresh_id).await? {
            record = latest;
        }
    }
    Ok(record)
}

/// The answer to an admitted refresh: 202 (or, after a wait, 200 / the problem).
fn admitted_response(record: &RefreshRecord) -> Response {
    let mut response = if let Some(problem) = record.problem() {
        problem_response(&problem)
    } else if record.status.is_terminal() {
        json_response(StatusCode::OK, record)
    } else {
        json_response(StatusCode::ACCEPTED, record)
    };
    response
        .headers_mut()
        .insert(header::LOCATION, refresh_location(record.refresh_id));
    response
}

/// Runs one refresh request to its HTTP answer.
async fn refresh_answer(
    state: &AppState,
    principal: &Principal,
    id: ConsentId,
    wait: Option<Duration>,
) -> Result<Response, ApiError> {
    let request = RefreshRequest {
        consent_id: id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: source(principal, RequestedBy::Api),
        initial: false,
    };
    match state.admitter.request(&request).await? {
        Decision::Refused(problem) => Ok(problem_response(&problem)),
        Decision::Admitted(record) => {
            let record = match wait {
                Some(wait) => wait_terminal(state, record, wait).await?,
                None => record,
            };
            Ok(admitted_response(&record))
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/consents/{consentId}/refresh",
    tag = "refreshes",
    summary = "Request a refresh",
    params(("consentId" = String, Path, description = "The consent (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "A repeat within 24 h returns the first answer"), ("Prefer" = Option<String>, Header, description = "`wait=N` (N ≤ 60): hold the answer until the refresh is terminal")),
    responses(
        (status = 202, description = "Admitted (or still running after a wait); `Location` names the record", body = RefreshRecord),
        (status = 200, description = "UPDATED within the wait", body = RefreshRecord),
        (status = 403, description = "Consent revoked, expired or inactive; or the refresh ended in a 403 error", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown consent", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A refresh is in flight (`refresh_in_progress`, with `refreshId`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`daily_limit_reached` or `backlog_full`, with `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down; nothing was admitted (`unavailable`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn request_refresh(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = consent_id(&raw)?;
    let wait = prefer_wait(&headers);
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= 255 => Some(key.to_owned()),
        Some(_) => {
            return Err(ApiError::from(Problem::bad_request(
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )));
        }
    };
    let Some(key) = key else {
        return refresh_answer(&state, &principal, id, wait).await;
    };
    // Keys are per tenant (operators share one space) and per consent.
    let key_tenant = match principal.scope_tenant() {
        Some(tenant) => tenant.clone(),
        None => TenantId::parse("_admin").map_err(|_| ApiError::from(Problem::internal()))?,
    };
    let key = format!("POST /v1/consents/{id}/refresh {key}");
    let deadline = tokio::time::Instant::now() + KEY_WAIT;
    loop {
        let now = Utc::now();
        match state
            .store
            .reserve_key(&key_tenant, &key, now, now - TimeDelta::hours(24))
            .await?
        {
            KeyReservation::Done {
                http_status,
                response,
            } => return Ok(replay(http_status, response)),
            KeyReservation::Pending if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            KeyReservation::Pending => {
                return Err(ApiError::from(Problem::new(
                    ProblemCode::RefreshInProgress,
                    "A request with this Idempotency-Key is still being processed",
                )));
            }
            KeyReservation::Reserved => break,
        }
    }
    let answer = refresh_answer(&state, &principal, id, wait).await;
    match answer {
        Ok(response) if response.status() != StatusCode::SERVICE_UNAVAILABLE => {
            let status = response.status();
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, BODY_LIMIT * 16)
                .await
                .unwrap_or_default();
            let stored: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            state
                .store
                .complete_key(&key_tenant, &key, status.as_u16(), &stored)
                .await?;
            Ok(Response::from_parts(parts, axum::body::Body::from(bytes)))
        }
        other => {
            // 503 or an error: nothing was admitted; a retry with this key starts afresh.
            if let Err(error) = state.store.release_key(&key_tenant, &key).await {
                tracing::warn!(error = %error, "cannot release an idempotency key");
            }
            other
        }
    }
}

/// The stored first answer of an idempotent request.
fn replay(http_status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(&body)).into_response();
    let headers = response.headers_mut();
    if body.get("code").is_some() && body.get("status").is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::error::PROBLEM_JSON),
        );
        if let Some(seconds) = body.get("retryAfterSeconds").and_then(Value::as_u64) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
    }
    if let Some(id) = body
        .get("refreshId")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<RefreshId>().ok())
        && status.is_success()
    {
        headers.insert(header::LOCATION, refresh_location(id));
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// `POST /stored-data/v1/consents/{id}/refresh`: waits for the terminal status.
#[utoipa::path(
    post,
    path = "/stored-data/v1/consents/{consentId}/refresh",
    tag = "compatibility",
    summary = "Synchronous refresh (compatibility route)",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 200, description = "Completed", body = CompatMessage),
        (status = 202, description = "Still running after `http.sync_wait_secs`", body = CompatMessage),
        (status = 409, description = "Refused; the same body shape with the problem's status and detail", body = CompatMessage),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn sync_refresh(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = consent_id(&raw)?;
    let message = |status: StatusCode, message: &str| {
        json_response(
            status,
            &json!({ "statusCode": status.as_u16(), "message": message }),
        )
    };
    let request = RefreshRequest {
        consent_id: id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: source(&principal, RequestedBy::Api),
        initial: false,
    };
    let decision = match state.admitter.request(&request).await {
        Ok(decision) => decision,
        Err(error) => {
            let problem = ApiError::from(error).0;
            return Ok(message(StatusCode::SERVICE_UNAVAILABLE, &problem.detail));
        }
    };
    match decision {
        Decision::Refused(problem) => {
            let status =
                StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = message(status, &problem.detail);
            if let Some(seconds) = problem.retry_after_seconds {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Ok(response)
        }
        Decision::Admitted(record) => {
            let record = wait_terminal(&state, record, state.sync_wait).await?;
            Ok(match record.problem() {
                Some(problem) => message(
                    StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_GATEWAY),
                    &problem.detail,
                ),
                None if record.status.is_terminal() => {
                    message(StatusCode::OK, "Successfully completed data refresh")
                }
                None => {
                    let mut response =
                        message(StatusCode::ACCEPTED, "Data refresh is still in progress");
                    response
                        .headers_mut()
                        .insert(header::LOCATION, refresh_location(record.refresh_id));
                    response
                }
            })
        }
    }
}

/// `POST /cfa/consent/{id}/refresh`: 202 with an empty body.
#[utoipa::path(
    post,
    path = "/cfa/consent/{consentId}/refresh",
    tag = "compatibility",
    summary = "Asynchronous refresh (compatibility route): 202 with an empty body",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 202, description = "Admitted"),
        (status = 409, description = "A refresh is in flight", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Daily limit or backlog, with `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn async_refresh(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = consent_id(&raw)?;
    let request = RefreshRequest {
        consent_id: id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: source(&principal, RequestedBy::Api),
        initial: false,
    };
    match state.admitter.request(&request).await? {
        Decision::Refused(problem) => Ok(problem_response(&problem)),
        Decision::Admitted(record) => {
            let mut response = StatusCode::ACCEPTED.into_response();
            response
                .headers_mut()
                .insert(header::LOCATION, refresh_location(record.refresh_id));
            Ok(response)
        }
    }
}

/// Defaults of a tenant that never saved settings: no auto-sync, 90 days to inactivation.
const DEFAULT_INACTIVATION_DAYS: i32 = 90;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AppSettings {
    autosync_interval_hours: Option<i32>,
    inactivation_days: i32,
}

/// SPEC §6: fewer than two auto-sync chances before inactivation.
fn settings_warnings(settings: &AppSettings) -> Vec<String> {
    match settings.autosync_interval_hours {
        Some(hours) if 2 * i64::from(hours) >= i64::from(settings.inactivation_days) * 24 => {
            vec![format!(
                "With auto-sync every {hours} h, a consent gets fewer than two refreshes in the {} days before it becomes inactive and its data is removed",
                settings.inactivation_days
            )]
        }
        _ => Vec::new(),
    }
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
async fn get_settings(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = settings_tenant(&principal, &raw)?;
    let stored = state.store.tenant_settings(&tenant).await?;
    let settings = AppSettings {
        autosync_interval_hours: stored.and_then(|s| s.autosync_interval_hours),
        inactivation_days: stored.map_or(DEFAULT_INACTIVATION_DAYS, |s| s.inactivation_days),
    };
    Ok(settings_response(settings))
}

#[utoipa::path(
    put,
    path = "/v1/apps/{tenantId}/settings",
    tag = "settings",
    summary = "Change a tenant's settings",
    params(("tenantId" = String, Path, description = "The tenant")),
    responses(
        (status = 200, description = "The saved settings with `warnings`", body = SettingsView),
        (status = 400, description = "Out of range (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Another tenant (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn put_settings(
    State(state): State<AppState>,
    principal: Principal,
    Path(raw): Path<String>,
    ApiJson(settings): ApiJson<AppSettings>,
) -> Result<Response, ApiError> {
    let tenant = settings_tenant(&principal, &raw)?;
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
        .put_tenant_settings(&tenant, row, Utc::now())
        .await?;
    Ok(settings_response(settings))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    responses(
        (status = 200, description = "Alive")
    ),
)]
async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness: Redis, RabbitMQ and PostgreSQL reachable",
    responses(
        (status = 200, description = "Ready"),
        (status = 503, description = "A dependency is unreachable, with `checks`", body = Problem, content_type = "application/problem+json")
    ),
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let redis = refresh_redis::health(&state.redis).await.is_ok();
    let database = refresh_pg::health(state.store.pool()).await.is_ok();
    let rabbitmq = state.broker.is_connected();
    let checks = json!({ "redis": redis, "rabbitmq": rabbitmq, "postgresql": database });
    if redis && database && rabbitmq {
        json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "checks": checks }),
        )
    } else {
        let mut problem = serde_json::to_value(Problem::unavailable()).unwrap_or_default();
        problem["checks"] = checks;
        let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &problem);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::error::PROBLEM_JSON),
        );
        response
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics (OpenMetrics text)",
    responses(
        (status = 200, description = "The metrics")
    ),
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn openapi() -> Response {
    let mut response = crate::openapi::document().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::from(Problem::not_found("No such route"))
}
