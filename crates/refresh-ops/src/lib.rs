//! The operational endpoints every role serves (SPEC §7): `/healthz` (the process is
//! alive), `/readyz` (the dependencies it was given answer) and `/metrics` (the
//! process's one Prometheus registry, which each component adds its metrics to).

use std::sync::{Arc, Mutex};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use refresh_amqp::Broker;
use refresh_core::Problem;
use refresh_pg::Store;
use refresh_redis::ConnectionManager;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

/// The content type of the metrics exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process's metric registry (one per process, whatever roles it runs).
pub struct Registry(Mutex<prometheus_client::registry::Registry>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry; every metric is named `refreshd_*`.
    pub fn new() -> Self {
        Self(Mutex::new(
            prometheus_client::registry::Registry::with_prefix("refreshd"),
        ))
    }

    /// Lets a component add its metrics.
    pub fn register<T>(
        &self,
        f: impl FnOnce(&mut prometheus_client::registry::Registry) -> T,
    ) -> T {
        let mut registry = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut registry)
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    /// `/metrics` as a response.
    pub fn response(&self) -> Response {
        let mut response = self.render().into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
        response
    }
}

/// The dependencies a role's readiness depends on (those it was given).
#[derive(Clone, Default)]
pub struct Readiness {
    pub redis: Option<ConnectionManager>,
    pub store: Option<Store>,
    pub broker: Option<Broker>,
}

impl Readiness {
    /// Checks each dependency once: `(all answer, {name: answers})`.
    pub async fn check(&self) -> (bool, Map<String, Value>) {
        let mut checks = Map::new();
        if let Some(redis) = &self.redis {
            checks.insert(
                "redis".into(),
                refresh_redis::health(redis).await.is_ok().into(),
            );
        }
        if let Some(broker) = &self.broker {
            checks.insert("rabbitmq".into(), broker.is_connected().into());
        }
        if let Some(store) = &self.store {
            checks.insert(
                "postgresql".into(),
                refresh_pg::health(store.pool()).await.is_ok().into(),
            );
        }
        let ready = checks.values().all(|v| v.as_bool() == Some(true));
        (ready, checks)
    }

    /// `/readyz` as a response: 200 `{status: ready, checks}`, or 503 problem+json
    /// `unavailable` with the `checks`.
    pub async fn response(&self) -> Response {
        let (ready, checks) = self.check().await;
        if ready {
            let body = json!({ "status": "ready", "checks": checks });
            (StatusCode::OK, axum::Json(body)).into_response()
        } else {
            let mut problem = serde_json::to_value(Problem::unavailable()).unwrap_or_default();
            problem["checks"] = Value::Object(checks);
            let mut response =
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(problem)).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            response
        }
    }
}

/// `/healthz` as a response.
pub fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({ "status": "ok" }))).into_response()
}

/// `/healthz`, `/readyz` and `/metrics`, for roles without the API (worker, scheduler).
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { healthz() }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readiness.response().await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { registry.response() }
            }),
        )
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
