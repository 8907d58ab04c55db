//! Refresh routes: request one (idempotency keys, `Prefer: wait`), read one, a
//! consent's history.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{TimeDelta, Utc};
use refresh_core::{
    ConsentId, Problem, ProblemCode, RefreshId, RefreshRecord, RequestedBy, TenantId, TraceContext,
};
use refresh_pg::KeyReservation;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::BODY_LIMIT;
use super::extract::{
    ApiPath, consent_id, json_response, refresh_id, refresh_location, source, traceparent,
    visible_consent,
};
use crate::auth::Principal;
use crate::error::{ApiError, problem_response};
use crate::idempotency::remembered;
use crate::state::AppState;
use refresh_admission::{Decision, RefreshRequest, Remember};

/// Longest `Prefer: wait=N`.
const MAX_WAIT_SECS: u64 = 60;
/// How long a repeated Idempotency-Key waits for the first request's answer.
const KEY_WAIT: Duration = Duration::from_secs(10);
/// `{items}`: a consent's refresh history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct History {
    items: Vec<RefreshRecord>,
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
pub(crate) async fn history(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
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
pub(crate) async fn get_refresh(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
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
pub(crate) fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
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
pub(crate) async fn wait_terminal(
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
pub(crate) fn admitted_response(record: &RefreshRecord) -> Response {
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

/// What an idempotency key keeps of a request's answer (not to be confused with
/// `refresh_pg::KeyAnswer`, the answer an admission writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKeeps {
    /// Admitted: its 202 was recorded with the admission itself.
    Admitted,
    /// A refusal that cannot change: to be recorded.
    Remember,
    /// A refusal that may change: the key is released.
    Forget,
}

/// The answer an admission records for its idempotency key, in its own statement:
/// the 202 with the record (a `Prefer: wait` answer replaces it afterwards).
fn admitted_answer(record: &RefreshRecord) -> (u16, Value) {
    (202, serde_json::to_value(record).unwrap_or(Value::Null))
}

/// Runs one refresh request to its HTTP answer (an admission records
/// `remember`'s key's answer with itself), and says what its key keeps of it.
pub(crate) async fn refresh_answer(
    state: &AppState,
    principal: &Principal,
    id: ConsentId,
    wait: Option<Duration>,
    traceparent: TraceContext,
    remember: Option<&Remember>,
) -> Result<(Response, KeyKeeps), ApiError> {
    let request = RefreshRequest {
        consent_id: id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: source(principal, RequestedBy::Api),
        initial: false,
        traceparent,
    };
    let decision = state.admitter.request_answering(&request, remember).await?;
    let kept = match &decision {
        Decision::Admitted(_) => KeyKeeps::Admitted,
        refused if remembered(refused) => KeyKeeps::Remember,
        Decision::Refused(_) => KeyKeeps::Forget,
    };
    let response = match decision {
        Decision::Refused(problem) => problem_response(&problem),
        Decision::Admitted(record) => {
            let record = match wait {
                Some(wait) => wait_terminal(state, record, wait).await?,
                None => record,
            };
            admitted_response(&record)
        }
    };
    Ok((response, kept))
}

#[utoipa::path(
    post,
    path = "/v1/consents/{consentId}/refresh",
    tag = "refreshes",
    summary = "Request a refresh",
    params(("consentId" = String, Path, description = "The consent (UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "A repeat within 24 h returns the first answer when it was an admission or a refusal that cannot change (403 consent revoked, expired or inactive; 404); a 409, 429 or 503 is not remembered, so a retry with the key is decided afresh"), ("Prefer" = Option<String>, Header, description = "`wait=N` (N ≤ 60): hold the answer until the refresh is terminal"), ("traceparent" = Option<String>, Header, description = "W3C trace context (`00-{trace id}-{parent id}-{flags}`): the refresh keeps it and sends it to the bank, logs it and puts it on its events; missing or malformed starts a new trace")),
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
pub(crate) async fn request_refresh(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = consent_id(&raw)?;
    let wait = prefer_wait(&headers);
    let trace = traceparent(&headers);
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
        return Ok(refresh_answer(&state, &principal, id, wait, trace, None)
            .await?
            .0);
    };
    // Keys are per tenant (operators share one space) and per consent.
    let key_tenant = match principal.scope_tenant() {
        Some(tenant) => tenant.clone(),
        None => TenantId::parse("_admin").map_err(|_| ApiError::from(Problem::internal()))?,
    };
    let key = format!("POST /v1/consents/{id}/refresh {key}");
    let deadline = tokio::time::Instant::now() + KEY_WAIT;
    let fence = loop {
        match state.key_reserver.reserve(&key_tenant, &key).await? {
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
            KeyReservation::Reserved(fence) => break fence,
        }
    };
    // An admission records the key's 202 in its own statement, so an admitted
    // request's key is never left unanswered (a crash, or the database lost right
    // after the admission, would otherwise let a retry admit again once the
    // reservation's lease ran out).
    let remember = Remember {
        tenant: key_tenant.clone(),
        key: key.clone(),
        fence,
        answer: admitted_answer,
    };
    match refresh_answer(&state, &principal, id, wait, trace, Some(&remember)).await {
        // Without a wait the answer is the 202 the admission recorded.
        Ok((response, KeyKeeps::Admitted)) if wait.is_none() => Ok(response),
        Ok((response, kept @ (KeyKeeps::Admitted | KeyKeeps::Remember))) => {
            let status = response.status();
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, BODY_LIMIT * 16)
                .await
                .unwrap_or_default();
            let stored: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if kept == KeyKeeps::Admitted {
                // The wait's answer (200, the refresh's problem, or a 202 with the
                // record as it then was) replaces the 202 recorded with the admission; if that fails, a repeat gets the 202,
                // whose record tells how the refresh ended.
                match state
                    .store
                    .revise_key(&key_tenant, &key, fence, 202, status.as_u16(), &stored)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        "an idempotency key's answer was taken over before the wait's answer replaced it"
                    ),
                    Err(error) => tracing::warn!(
                        error = %crate::error_chain(&error),
                        "cannot record the wait's answer for an idempotency key; a repeat gets the 202"
                    ),
                }
            } else if !state
                .store
                .complete_key(&key_tenant, &key, fence, status.as_u16(), &stored)
                .await?
            {
                tracing::warn!(
                    "an idempotency key's reservation was taken over before its answer was recorded"
                );
            }
            Ok(Response::from_parts(parts, axum::body::Body::from(bytes)))
        }
        other => {
            // Not an answer to remember (it may change, or a dependency failed): a
            // retry with this key is decided afresh.
            state.key_releases.release(&key_tenant, &key, fence).await;
            other.map(|(response, _)| response)
        }
    }
}

/// The stored first answer of an idempotent request.
pub(crate) fn replay(http_status: u16, body: Value) -> Response {
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
