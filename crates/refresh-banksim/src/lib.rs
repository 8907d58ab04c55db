//! A deterministic UK Open Banking (OBIE v3.1) Account Information simulator
//! with a control API, for development, tests and benchmarks
//! (`refreshd bank-sim`).
//!
//! The simulator knows a consent by the bearer token it is called with: the
//! consent key, also its `bankConsentId`. On first sight of a key it generates
//! that consent's data (1–3 accounts with balances, a few hundred transactions
//! over the last 90 days, some pending, a few without `TransactionId`, parties,
//! beneficiaries, direct debits, standing orders, scheduled payments,
//! statements and products) from a PRNG seeded by the key, and keeps it in
//! memory. The OBIE endpoints are served both at the root and under
//! [`API_PREFIX`]; the same datasets in the Berlin Group NextGenPSD2 1.3 dialect
//! under [`BERLIN_GROUP_PREFIX`] (the consent named by `Consent-ID`); the control
//! API is under `/sim`:
//!
//! | call | what |
//! | --- | --- |
//! | `GET /sim/consents/{bankConsentId}` | the dataset: `{accounts, balances, transactions, parties, beneficiaries, directDebits, standingOrders, scheduledPayments, statements, products}`, items in OBIE shapes each with its `AccountId` |
//! | `PUT /sim/consents/{bankConsentId}` | replace the dataset (same shape); 204 |
//! | `GET`/`PATCH /sim/consents/{bankConsentId}/scenario` | `{revoked, mfaRequired, latencyMs, failNext: {count, status}, hangNext, failPercent}` (`failPercent`: that share of the data calls fails, half 503, half never answered, from a fixed sequence); a patch's fields replace, the others stay |
//! | `GET /sim/calls?since=RFC3339&bankConsentId=` | data calls, in arrival order: `[{at, bankConsentId, method, path, query, status, traceparent, requestId}]` (`status` is `null` for a held call; `traceparent` and `requestId` (`x-fapi-interaction-id` / `X-Request-ID`) as received, `null` when absent) |

mod api;
mod berlin_group;
mod control;
mod dataset;
mod generate;
mod prng;
mod settings;
mod state;

use std::sync::Arc;

use axum::Router;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::{MAX_LATENCY_MS, MAX_PAGE_SIZE, SimSettings, SimSettingsError};

use state::{Sim, Today};

/// Where a real bank serves the API (the OBIE `servers` URL); the simulator
/// also serves it at the root.
pub const API_PREFIX: &str = "/open-banking/v3.1/aisp";

/// Where the simulator serves the Berlin Group NextGenPSD2 1.3 dialect of the same
/// datasets (a provider of kind `berlin_group` has this as its base URL; the
/// connector adds `/v1/...`).
pub const BERLIN_GROUP_PREFIX: &str = "/berlin-group";

/// The simulator's routes, for tests (`tower::ServiceExt::oneshot`) or to be
/// served by the caller.
pub fn router(settings: SimSettings) -> Router {
    build(settings, CancellationToken::new(), Box::new(today))
}

/// Serves the simulator on `listener` until `shutdown` is cancelled, then
/// finishes in-flight calls (held and delayed calls are released with 503).
pub async fn serve(
    listener: TcpListener,
    settings: SimSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, page_size = settings.page_size, "bank simulator listening");
    let app = build(settings, shutdown.clone(), Box::new(today));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn today() -> chrono::NaiveDate {
    Utc::now().date_naive()
}

pub(crate) fn build(settings: SimSettings, shutdown: CancellationToken, today: Today) -> Router {
    let sim = Arc::new(Sim::new(settings, shutdown, today));
    let api = api::routes();
    Router::new()
        .nest(API_PREFIX, api.clone())
        .merge(api)
        .nest(BERLIN_GROUP_PREFIX, berlin_group::routes())
        .merge(control::routes())
        .with_state(sim)
        .merge(operations())
}

/// What every role serves operators (SPEC §7): alive, ready (the simulator depends on
/// nothing, so ready as soon as it serves), and its metrics (it keeps none: an empty
/// exposition).
fn operations() -> Router {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(|| async { axum::Json(serde_json::json!({"status": "ready", "checks": {}})) }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    "# EOF\n",
                )
            }),
        )
}

#[cfg(test)]
mod tests;
