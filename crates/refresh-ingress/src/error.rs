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
        database_failed(&error)
    }
}

/// 503 when the database could not be reached, else 500 (a bug); logged either way.
fn database_failed(error: &refresh_pg::StoreError) -> ApiError {
    if error.is_unavailable() {
        tracing::warn!(error = %error_chain(error), "database unavailable");
        ApiError::from(Problem::unavailable())
    } else {
        tracing::error!(error = %error_chain(error), "database error");
        ApiError::from(Problem::internal())
    }
}

/// A batched statement (an idempotency key's reservation) that failed, or whose
/// batching task is gone because the role is stopping.
impl From<refresh_admission::GroupError<refresh_pg::StoreError>> for ApiError {
    fn from(error: refresh_admission::GroupError<refresh_pg::StoreError>) -> Self {
        match error {
            refresh_admission::GroupError::Failed(error) => database_failed(&error),
            refresh_admission::GroupError::Stopped => {
                tracing::warn!("refusing with 503: the ingress is stopping");
                Self::from(Problem::unavailable())
            }
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

/// Every error answer is a problem (SPEC §3), also those axum makes by itself: a
/// rejection by one of its extractors (`text/plain`, with the parser's wording) or an
/// empty one (a wrong method, an unknown route). Answers that already are a problem,
/// a portal page (HTML) or a compatibility route's own JSON shape pass unchanged.
pub(crate) async fn problem_for_rejections(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !(content_type.is_empty() || content_type.starts_with("text/plain")) {
        return response;
    }
    let problem = match status {
        StatusCode::NOT_FOUND => Problem::not_found("No such route"),
        StatusCode::METHOD_NOT_ALLOWED => Problem::new(
            ProblemCode::MethodNotAllowed,
            "This route does not take this method; the Allow header lists those it takes",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::payload_too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::bad_request(
            "the body has a content type this route does not take (JSON routes take \
             application/json, the portal's forms application/x-www-form-urlencoded)",
        ),
        s if s.is_client_error() => Problem::bad_request(
            "the request is malformed: check its path, query string, headers and body",
        ),
        StatusCode::SERVICE_UNAVAILABLE => Problem::unavailable(),
        _ => Problem::internal(),
    };
    let mut answer = problem_response(&problem);
    if let Some(allow) = response.headers().get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the layer makes of an answer: (status, content type, code).
    async fn check(response: Response, expected: (u16, &str, Option<&str>)) {
        let answer = problem_for_rejections(response).await;
        let content_type = answer
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = answer.status().as_u16();
        let bytes = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        assert_eq!((status, content_type.as_str(), code.as_deref()), expected);
    }

    fn plain(status: StatusCode) -> Response {
        (
            status,
            "Invalid URL: Cannot parse `\\0\\u{fffd}` to a `String`",
        )
            .into_response()
    }

    #[tokio::test]
    async fn axum_answers_become_problems_and_ours_pass() {
        let problem = PROBLEM_JSON;
        check(
            plain(StatusCode::BAD_REQUEST),
            (400, problem, Some("bad_request")),
        )
        .await;
        check(
            plain(StatusCode::UNPROCESSABLE_ENTITY),
            (400, problem, Some("bad_request")),
        )
        .await;
        check(
            plain(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            (400, problem, Some("bad_request")),
        )
        .await;
        check(
            plain(StatusCode::PAYLOAD_TOO_LARGE),
            (413, problem, Some("payload_too_large")),
        )
        .await;
        check(
            StatusCode::METHOD_NOT_ALLOWED.into_response(),
            (405, problem, Some("method_not_allowed")),
        )
        .await;
        check(
            StatusCode::NOT_FOUND.into_response(),
            (404, problem, Some("not_found")),
        )
        .await;
        check(
            plain(StatusCode::INTERNAL_SERVER_ERROR),
            (500, problem, Some("internal")),
        )
        .await;
        // Answers that already have their shape pass unchanged.
        let page = (StatusCode::FORBIDDEN, axum::response::Html("<p>no</p>")).into_response();
        check(page, (403, "text/html; charset=utf-8", None)).await;
        let compat = (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({"statusCode": 409})),
        )
            .into_response();
        check(compat, (409, "application/json", None)).await;
        check(
            plain(StatusCode::OK),
            (200, "text/plain; charset=utf-8", None),
        )
        .await;
    }
}
