//! The ingress (SPEC §2–§4): admission shared by every channel, the HTTP API, the
//! upstream request consumer, and the outbox relay that publishes status events.

mod admission;
mod auth;
mod error;
pub mod events;
pub mod metrics;
mod portal;
pub mod relay;
mod routes;
mod state;
pub mod upstream;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub use admission::{Admitter, Decision, RefreshRequest, Unavailable};
pub use auth::{AuthConfigError, Principal, SCOPE_ADMIN, SCOPE_STORED_DATA, Verifier, mint_hs256};
pub use error::{ApiError, error_chain};
pub use metrics::Metrics;
use refresh_amqp::Broker;
use refresh_pg::Store;
use refresh_redis::{ConnectionManager, Gate};
pub use routes::BODY_LIMIT;
use tokio_util::sync::CancellationToken;

/// What the HTTP API needs besides the adapters.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub providers: BTreeSet<String>,
    pub retention_days: u32,
    pub sync_wait: Duration,
    /// The live event fan-out the SSE streams follow (fed by [`events::run`]).
    pub events: events::EventHub,
    /// Prefix of the portal's Redis keys (the namespace).
    pub namespace: String,
    /// `Secure` on the portal's cookies; off only in `dev`, which serves plain HTTP.
    pub secure_cookies: bool,
}

/// The HTTP API as a router (tests and `serve`).
#[allow(
    clippy::too_many_arguments,
    reason = "the wiring hands over each adapter once"
)]
pub fn router(
    admitter: Admitter,
    store: Store,
    gate: Gate,
    broker: Broker,
    redis: ConnectionManager,
    verifier: Verifier,
    metrics: Arc<Metrics>,
    config: HttpConfig,
) -> axum::Router {
    let sessions = refresh_redis::Sessions::new(redis.clone(), config.namespace);
    let state = state::AppState {
        admitter,
        store,
        gate,
        broker,
        redis,
        verifier,
        metrics,
        providers: Arc::new(config.providers),
        retention_days: config.retention_days,
        sync_wait: config.sync_wait,
        events: config.events,
        sessions,
        secure_cookies: config.secure_cookies,
    };
    // The portal has its own pages and headers; the API keeps the fallback.
    portal::router(state.clone()).merge(routes::router(state))
}

/// Only `/metrics`, for processes without the API (a standalone worker).
pub fn metrics_router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
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
