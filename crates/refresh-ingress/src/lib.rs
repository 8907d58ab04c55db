//! The ingress (SPEC §3–§4): the HTTP API and the upstream request consumer, both
//! deciding through the admission of `refresh-admission`.

mod auth;
mod error;
pub mod events;
mod idempotency;
mod portal;
mod routes;
mod state;
pub mod upstream;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{AuthConfigError, Principal, SCOPE_ADMIN, SCOPE_STORED_DATA, Verifier, mint_hs256};
pub use error::{ApiError, error_chain};
pub use idempotency::{KeyReleases, KeyReserver};
use refresh_admission::Admitter;
use refresh_amqp::Broker;
use refresh_ops::Registry;
use refresh_pg::Store;
use refresh_redis::ConnectionManager;
pub use routes::BODY_LIMIT;

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
    /// Where the releases of idempotency keys are retried.
    pub key_releases: KeyReleases,
    /// Reserves the keys of `Idempotency-Key` requests, many per statement.
    pub key_reserver: KeyReserver,
}

/// The HTTP API as a router (tests and `serve`).
#[allow(
    clippy::too_many_arguments,
    reason = "the wiring hands over each adapter once"
)]
pub fn router(
    admitter: Admitter,
    store: Store,
    broker: Broker,
    redis: ConnectionManager,
    verifier: Verifier,
    metrics: Arc<Registry>,
    config: HttpConfig,
) -> axum::Router {
    let sessions = refresh_redis::Sessions::new(redis.clone(), config.namespace);
    let state = state::AppState {
        admitter,
        store,
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
        key_releases: config.key_releases,
        key_reserver: config.key_reserver,
    };
    // The portal has its own pages and headers; the API keeps the fallback.
    portal::router(state.clone())
        .merge(routes::router(state))
        .layer(axum::middleware::map_response(
            error::problem_for_rejections,
        ))
}
