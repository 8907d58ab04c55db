//! What the route modules share: the bearer-token and JSON-body extractors, id
//! parsing, the tenant visibility rule and small response helpers.

use axum::Json;
use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use refresh_core::{ConsentId, Problem, RefreshId, RequestedBy, TraceContext};
use refresh_pg::ConsentRow;
use serde::Serialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

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

/// The one path parameter of a route (an id, a tenant), raw: the handler parses it
/// into its type with a detail naming it. A segment whose percent-escapes do not
/// decode to UTF-8 (`%00%ff`) is a 400 problem, not axum's plain-text rejection.
pub(crate) struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => Ok(Self(raw)),
            Err(PathRejection::FailedToDeserializePathParams(error))
                if matches!(error.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Err(ApiError::from(Problem::bad_request(
                    "the path is not valid: its percent-escapes must decode to UTF-8 text",
                )))
            }
            Err(_) => Err(ApiError::from(Problem::bad_request(
                "the path does not name a resource of this API",
            ))),
        }
    }
}

/// The request's W3C trace context: its `traceparent` header when that is a valid
/// version-00 value, else a new trace. Never a rejection: a client's broken tracing
/// must not cost it its refresh.
pub(crate) struct Traceparent(pub TraceContext);

impl<S: Send + Sync> FromRequestParts<S> for Traceparent {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(traceparent(&parts.headers)))
    }
}

/// The trace context of a request's headers (see [`Traceparent`]).
pub(crate) fn traceparent(headers: &axum::http::HeaderMap) -> TraceContext {
    refresh_admission::trace_or_new(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// A JSON body whose rejections are problems: 413 over 64 KiB, otherwise 400 with a
/// detail that names the field and what it must be (never the parser's wording).
pub(crate) struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json")
                    || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let bytes = match Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::from(Problem::payload_too_large()));
            }
            Err(_) => {
                return Err(ApiError::from(Problem::bad_request(
                    "the request body could not be read",
                )));
            }
        };
        if !is_json {
            return Err(ApiError::from(Problem::bad_request(
                "the body must be JSON, sent with Content-Type: application/json",
            )));
        }
        // Syntax first, then the shape: every body of this API is an object (serde
        // would also fill a struct from an array, silently by position).
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::from(Problem::bad_request(syntax_detail(&e))))?;
        if !value.is_object() {
            return Err(ApiError::from(Problem::bad_request(
                "the body must be a JSON object",
            )));
        }
        let value = serde_path_to_error::deserialize(value)
            .map_err(|e| ApiError::from(Problem::bad_request(body_error_detail(&e))))?;
        Ok(Self(value))
    }
}

/// A person's reading of a body that is not JSON.
fn syntax_detail(error: &serde_json::Error) -> String {
    match error.classify() {
        serde_json::error::Category::Eof => {
            "the body is not valid JSON: it ends before the value is complete".to_owned()
        }
        _ => format!(
            "the body is not valid JSON (line {}, column {})",
            error.line(),
            error.column()
        ),
    }
}

/// A person's reading of a JSON object that does not fit the expected shape.
pub(crate) fn body_error_detail(error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner();
    let path = error.path().to_string();
    let at_root = path == ".";
    // serde's data messages, without the position it appends.
    let message = inner.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m)
        .replace('`', "");
    let prefix = if at_root {
        String::new()
    } else {
        format!("{path}.")
    };
    if let Some(field) = message.strip_prefix("missing field ") {
        return format!("{prefix}{field} is required");
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // The path ends with the unknown field itself.
        let prefix = path
            .rsplit_once('.')
            .map_or(String::new(), |(p, _)| format!("{p}."));
        return match rest.split_once(", expected ") {
            Some((field, allowed)) => format!(
                "{prefix}{field} is not a known field; expected {}",
                allowed.trim_start_matches("one of ")
            ),
            None => format!("{prefix}{rest} is not a known field"),
        };
    }
    let expected = message.rsplit_once(", expected ").map(|(_, e)| e);
    match (at_root, expected) {
        (true, _) => "the body must be a JSON object".to_owned(),
        (false, Some(expected)) => format!("{path} must be {}", humane(expected)),
        (false, None) => format!("{path} has a value that is not allowed"),
    }
}

/// serde's names of expected types, as a person says them.
fn humane(expected: &str) -> &str {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "isize" | "usize" => {
            "a whole number"
        }
        "f32" | "f64" => "a number",
        "a boolean" | "a string" => expected,
        e if e.starts_with("struct ") || e.starts_with("a map") => "an object",
        e if e.starts_with("a sequence") => "a list",
        e => e,
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

pub(crate) fn source(principal: &Principal, tenant_source: RequestedBy) -> RequestedBy {
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

pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    (status, Json(body)).into_response()
}

pub(crate) fn refresh_location(id: RefreshId) -> HeaderValue {
    // A UUID path is always a valid header value.
    HeaderValue::from_str(&format!("/v1/refreshes/{id}"))
        .unwrap_or(HeaderValue::from_static("/v1/refreshes"))
}

/// The query string as (name, value) pairs; each name at most once and one of
/// `allowed`.
pub(crate) fn query_pairs(uri: &Uri, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(|_| {
        ApiError::from(Problem::bad_request(
            "the query string is not valid URL encoding",
        ))
    })?;
    for (i, (name, _)) in pairs.iter().enumerate() {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::from(Problem::bad_request(format!(
                "unknown query parameter {name:?}; expected one of {}",
                allowed.join(", ")
            ))));
        }
        if pairs[..i].iter().any(|(n, _)| n == name) {
            return Err(ApiError::from(Problem::bad_request(format!(
                "query parameter {name:?} is given more than once"
            ))));
        }
    }
    Ok(pairs)
}

pub(crate) fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}
