//! Operations routes: liveness, readiness, metrics.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use refresh_core::Problem;
use serde_json::json;

use super::extract::json_response;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    responses(
        (status = 200, description = "Alive")
    ),
)]
pub(crate) async fn healthz() -> Response {
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
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
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
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
