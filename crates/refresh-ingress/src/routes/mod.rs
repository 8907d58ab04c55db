//! The HTTP API of SPEC §3, one module per resource; `extract` holds what they share
//! and `crate::error` the problem mapping.

pub(crate) mod compat;
pub(crate) mod consents;
pub(crate) mod data;
pub(crate) mod events;
pub(crate) mod extract;
pub(crate) mod openapi;
pub(crate) mod operations;
pub(crate) mod refreshes;
pub(crate) mod settings;
pub(crate) mod views;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get, routing::post};
use refresh_core::Problem;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest accepted request body (SPEC §3).
pub const BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/consents",
            get(consents::list_consents).post(consents::register_consent),
        )
        .route("/v1/consents/{consent_id}", get(consents::get_consent))
        .route(
            "/v1/consents/{consent_id}/refresh",
            post(refreshes::request_refresh),
        )
        .route(
            "/v1/consents/{consent_id}/refreshes",
            get(refreshes::history),
        )
        .route("/v1/consents/{consent_id}/revoke", post(consents::revoke))
        .route("/v1/consents/{consent_id}/accounts", get(data::accounts))
        .route("/v1/consents/{consent_id}/balances", get(data::balances))
        .route(
            "/v1/consents/{consent_id}/transactions",
            get(data::transactions),
        )
        .route("/v1/consents/{consent_id}/parties", get(data::parties))
        .route(
            "/v1/consents/{consent_id}/beneficiaries",
            get(data::beneficiaries),
        )
        .route(
            "/v1/consents/{consent_id}/direct-debits",
            get(data::direct_debits),
        )
        .route(
            "/v1/consents/{consent_id}/standing-orders",
            get(data::standing_orders),
        )
        .route(
            "/v1/consents/{consent_id}/scheduled-payments",
            get(data::scheduled_payments),
        )
        .route(
            "/v1/consents/{consent_id}/statements",
            get(data::statements),
        )
        .route("/v1/consents/{consent_id}/products", get(data::products))
        .route("/v1/refreshes/{refresh_id}", get(refreshes::get_refresh))
        .route("/v1/refreshes/{refresh_id}/changes", get(data::changes))
        .route(
            "/v1/apps/{tenant_id}/settings",
            get(settings::get_settings).put(settings::put_settings),
        )
        .route(
            "/stored-data/v1/consents/{consent_id}/refresh",
            post(compat::sync_refresh),
        )
        .route(
            "/cfa/consent/{consent_id}/refresh",
            post(compat::async_refresh),
        )
        .route("/healthz", get(operations::healthz))
        .route("/readyz", get(operations::readyz))
        .route("/metrics", get(operations::metrics))
        .route("/v1/events", get(events::events))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn openapi() -> Response {
    let mut response = openapi::document().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::from(Problem::not_found("No such route"))
}
