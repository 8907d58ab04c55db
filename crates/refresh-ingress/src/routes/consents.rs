//! Consent routes: register, read, revoke.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use refresh_core::{
    ConsentId, ConsentStatus, Problem, ProblemCode, ProviderId, RequestedBy, TenantId,
};
use refresh_pg::{ConsentCursor, ConsentFilter, NewConsent, Registration};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::extract::{
    ApiJson, ApiPath, Traceparent, consent_id, json_response, param, query_pairs, source,
    visible_consent,
};
use super::views::{ConsentView, consent_view};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use refresh_admission::{Decision, RefreshRequest};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RegisterConsent {
    /// The id to register it under (UUID); one is made when left out.
    #[schema(format = Uuid)]
    consent_id: Option<String>,
    /// A configured provider (bank), e.g. `sim`.
    provider_id: String,
    /// The bank's id of the consent (1 to 256 characters).
    bank_consent_id: String,
    /// The bank access token (1 to 8192 characters); stored encrypted, never returned.
    access_token: String,
    /// RFC 3339, in the future.
    #[schema(format = DateTime)]
    expires_at: String,
}

#[utoipa::path(
    post,
    path = "/v1/consents",
    tag = "consents",
    summary = "Register a consent and start its initial load",
    request_body(content = RegisterConsent, content_type = "application/json"),
    params(("traceparent" = Option<String>, Header, description = "W3C trace context of the initial load (see the refresh route); missing or malformed starts a new trace")),
    responses(
        (status = 201, description = "Registered; `initialRefresh` is the initial load's record (or `{problem}`); `Location` names the consent", body = ConsentView,
            headers(("Location" = String, description = "`/v1/consents/{consentId}`"))),
        (status = 400, description = "Malformed body or unknown provider (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Registered before, by id or by `providerId` + `bankConsentId` (`consent_exists`, with `consentId`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down (`unavailable`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB (`payload_too_large`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn register_consent(
    State(state): State<AppState>,
    principal: Principal,
    Traceparent(traceparent): Traceparent,
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
    let expires_at = DateTime::parse_from_rfc3339(&body.expires_at)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::from(Problem::bad_request(
                "expiresAt must be an RFC 3339 timestamp, e.g. 2027-01-31T00:00:00Z",
            ))
        })?;
    let now = Utc::now();
    check(expires_at > now, "expiresAt must be in the future")?;
    let registered = state
        .store
        .register_consent(&NewConsent {
            consent_id,
            tenant_id: tenant.clone(),
            provider_id,
            bank_consent_id: body.bank_consent_id,
            access_token: SecretString::from(body.access_token),
            expires_at,
            created_at: now,
        })
        .await?;
    let consent = match registered {
        Registration::New(consent) => consent,
        Registration::Exists(existing) => {
            return Err(ApiError::from(Problem::consent_exists(existing)));
        }
    };
    // The initial connection load: a refresh like any other, counted against no quota.
    let initial = state
        .admitter
        .request(&RefreshRequest {
            consent_id,
            tenant: Some(tenant),
            requested_by: RequestedBy::App,
            initial: true,
            traceparent,
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
pub(crate) async fn get_consent(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
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
pub(crate) async fn revoke(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
) -> Result<Response, ApiError> {
    let consent = visible_consent(&state, &principal, consent_id(&raw)?).await?;
    state
        .store
        .set_consent_status(consent.consent_id, ConsentStatus::Revoked, Utc::now())
        .await?;
    let consent = visible_consent(&state, &principal, consent.consent_id).await?;
    state
        .admitter
        .write_through([(consent.consent_id, consent.facts())])
        .await;
    let view = consent_view(&state, consent, source(&principal, RequestedBy::Api)).await?;
    Ok(json_response(StatusCode::OK, &view))
}

/// Page size of `GET /v1/consents` when `limit` is not given.
const DEFAULT_LIST_LIMIT: u32 = 50;
/// Largest `limit` of `GET /v1/consents`.
const MAX_LIST_LIMIT: u32 = 200;

/// `{items, nextCursor}`: a page of consents, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConsentPage {
    pub(crate) items: Vec<ConsentView>,
    /// Give it as `cursor` for the next page; `null` on the last.
    pub(crate) next_cursor: Option<String>,
}

/// The opaque cursor of a consent page: where the last item of the page sits.
pub(crate) fn encode_cursor(cursor: ConsentCursor) -> String {
    format!(
        "{:x}-{}",
        cursor.created_at.timestamp_micros(),
        cursor.consent_id.as_uuid().simple()
    )
}

pub(crate) fn decode_cursor(raw: &str) -> Result<ConsentCursor, ApiError> {
    let bad = || ApiError::from(Problem::bad_request("cursor is not one this API gave out"));
    let (micros, id) = raw.split_once('-').ok_or_else(bad)?;
    let micros = i64::from_str_radix(micros, 16).map_err(|_| bad())?;
    Ok(ConsentCursor {
        created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
        consent_id: ConsentId::from_uuid(uuid::Uuid::try_parse(id).map_err(|_| bad())?),
    })
}

/// What a listing shows: the caller's tenant, or for `api:admin` every tenant or the
/// one named by `tenantId`.
pub(crate) fn list_tenant(
    principal: &Principal,
    requested: Option<&str>,
) -> Result<Option<TenantId>, ApiError> {
    let requested = requested
        .map(|raw| {
            TenantId::parse(raw).map_err(|_| {
                ApiError::from(Problem::bad_request(
                    "tenantId must be 1 to 64 letters, digits, '.', '_' or '-'",
                ))
            })
        })
        .transpose()?;
    match (principal.scope_tenant(), requested) {
        (None, requested) => Ok(requested),
        (Some(own), Some(requested)) if *own != requested => Err(ApiError::from(Problem::new(
            ProblemCode::InsufficientScope,
            "Only an api:admin token may name another tenant",
        ))),
        (Some(own), _) => Ok(Some(own.clone())),
    }
}

/// One page of consents for `principal`; shared with the portal.
pub(crate) async fn consent_page(
    state: &AppState,
    principal: &Principal,
    filter: ConsentFilter,
    cursor: Option<ConsentCursor>,
    limit: u32,
) -> Result<ConsentPage, ApiError> {
    // One more than asked tells whether there is a next page.
    let mut rows = state
        .store
        .consents_page(&filter, cursor, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more.then(|| rows.last()).flatten().map(|last| {
        encode_cursor(ConsentCursor {
            created_at: last.created_at,
            consent_id: last.consent_id,
        })
    });
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        items.push(consent_view(state, row, source(principal, RequestedBy::Api)).await?);
    }
    Ok(ConsentPage { items, next_cursor })
}

#[utoipa::path(
    get,
    path = "/v1/consents",
    tag = "consents",
    summary = "The caller's consents, newest first, in keyset pages",
    params(
        ("status" = Option<ConsentStatus>, Query, description = "Only consents with this status"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "Page size (default 50)"),
        ("tenantId" = Option<String>, Query, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "`api:admin` only: this tenant's consents (default: every tenant's)")
    ),
    responses(
        (status = 200, description = "`{items, nextCursor}`", body = ConsentPage),
        (status = 400, description = "Malformed parameter (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data, or another tenant without api:admin (`insufficient_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down (`unavailable`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_consents(
    State(state): State<AppState>,
    principal: Principal,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri, &["status", "cursor", "limit", "tenantId"])?;
    let status = param(&pairs, "status")
        .map(|raw| {
            raw.parse::<ConsentStatus>().map_err(|_| {
                ApiError::from(Problem::bad_request(
                    "status must be ACTIVE, REVOKED, EXPIRED or INACTIVE",
                ))
            })
        })
        .transpose()?;
    let cursor = param(&pairs, "cursor").map(decode_cursor).transpose()?;
    let limit = match param(&pairs, "limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIST_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::from(Problem::bad_request(format!(
                    "limit must be a whole number from 1 to {MAX_LIST_LIMIT}"
                )))
            })?,
    };
    let tenant = list_tenant(&principal, param(&pairs, "tenantId"))?;
    let filter = ConsentFilter {
        tenant,
        status,
        now: Utc::now(),
    };
    let page = consent_page(&state, &principal, filter, cursor, limit).await?;
    Ok(json_response(StatusCode::OK, &page))
}
