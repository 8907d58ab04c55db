//! The compatibility routes of the two reference platforms (SPEC §3).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use refresh_core::{Problem, RequestedBy};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::extract::{ApiPath, Traceparent, consent_id, json_response, refresh_location, source};
use super::refreshes::wait_terminal;
use crate::auth::Principal;
use crate::error::{ApiError, problem_response};
use crate::state::AppState;
use refresh_admission::{Decision, RefreshRequest};

/// The answer of the synchronous compatibility route.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CompatMessage {
    status_code: u16,
    message: String,
}

/// `POST /stored-data/v1/consents/{id}/refresh`: waits for the terminal status.
#[utoipa::path(
    post,
    path = "/stored-data/v1/consents/{consentId}/refresh",
    tag = "compatibility",
    summary = "Synchronous refresh (compatibility route)",
    params(("consentId" = String, Path, description = "The consent (UUID)"), ("traceparent" = Option<String>, Header, description = "W3C trace context (`00-{trace id}-{parent id}-{flags}`): the refresh keeps it and sends it to the bank, logs it and puts it on its events; missing or malformed starts a new trace")),
    responses(
        (status = 200, description = "Completed", body = CompatMessage),
        (status = 202, description = "Still running after `http.sync_wait_secs`", body = CompatMessage),
        (status = 409, description = "Refused; the same body shape with the problem's status and detail", body = CompatMessage),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn sync_refresh(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    Traceparent(traceparent): Traceparent,
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
        traceparent,
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
    params(("consentId" = String, Path, description = "The consent (UUID)"), ("traceparent" = Option<String>, Header, description = "W3C trace context (`00-{trace id}-{parent id}-{flags}`): the refresh keeps it and sends it to the bank, logs it and puts it on its events; missing or malformed starts a new trace")),
    responses(
        (status = 202, description = "Admitted"),
        (status = 409, description = "A refresh is in flight", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Daily limit or backlog, with `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn async_refresh(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    Traceparent(traceparent): Traceparent,
) -> Result<Response, ApiError> {
    let id = consent_id(&raw)?;
    let request = RefreshRequest {
        consent_id: id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: source(&principal, RequestedBy::Api),
        initial: false,
        traceparent,
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
