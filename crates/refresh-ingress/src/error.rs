//! Every HTTP error is an RFC 9457 problem (`application/problem+json`), made in one
//! place that hides internals: a dependency failure is logged with its whole source
//! chain and answered as a bare 503 `unavailable`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use refresh_core::{Problem, ProblemCode};

use refresh_admission::Unavailable;

pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// A problem answer.
#[derive(Debug)]
pub struct ApiError(pub Box<Problem>);

impl From<Box<Problem>> for ApiError {
    fn from(problem: Box<Problem>) -> Self {
        Self(problem)
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self(Box::new(problem))
    }
}

impl From<Unavailable> for ApiError {
    fn from(error: Unavailable) -> Self {
        tracing::warn!(error = %error_chain(&error), "refusing with 503: a dependency is unavailable");
        Self::from(Problem::unavailable())
    }
}

impl From<refresh_pg::StoreError> for ApiError {
    fn from(error: refresh_pg::StoreError) -> Self {
        if error.is_unavailable() {
            tracing::warn!(error = %error_chain(&error), "database unavailable");
            Self::from(Problem::unavailable())
        } else {
            tracing::error!(error = %error_chain(&error), "database error");
            Self::from(Problem::internal())
        }
    }
}

impl From<refresh_redis::GateError> for ApiError {
    fn from(error: refresh_redis::GateError) -> Self {
        tracing::warn!(error = %error_chain(&error), "redis unavailable");
        Self::from(Problem::unavailable())
    }
}

pub use refresh_core::error_chain;

/// The problem as a response, with `Retry-After` when it says when to retry and
/// `WWW-Authenticate` on 401.
pub(crate) fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(seconds) = problem.retry_after_seconds {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if problem.code == ProblemCode::Unauthorized {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}
