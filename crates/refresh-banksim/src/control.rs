//! The control API under `/sim`: read and replace a consent's dataset, change
//! its scenario, and read the log of data calls.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::dataset::{Dataset, DatasetWire};
use crate::settings::MAX_LATENCY_MS;
use crate::state::{ScenarioPatch, Sim};

/// Datasets of tens of thousands of transactions are fine.
const MAX_DATASET_BYTES: usize = 256 * 1024 * 1024;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route(
            "/sim/consents/{bank_consent_id}",
            get(get_dataset)
                .put(put_dataset)
                .layer(DefaultBodyLimit::max(MAX_DATASET_BYTES)),
        )
        .route(
            "/sim/consents/{bank_consent_id}/scenario",
            get(get_scenario).patch(patch_scenario),
        )
        .route("/sim/calls", get(calls))
}

fn bad_request(message: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": message.to_string()})),
    )
        .into_response()
}

/// A JSON object read as `T` (serde alone would also take an array).
fn from_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
    T::deserialize(serde_json::Value::Object(map))
}

/// The consent's dataset, generated on first sight like for a data call.
async fn get_dataset(State(sim): State<Arc<Sim>>, Path(key): Path<String>) -> Response {
    let dataset = sim.consent(&key).dataset();
    match serde_json::to_vec(&dataset.wire) {
        Ok(body) => ([(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn put_dataset(
    State(sim): State<Arc<Sim>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let wire = match from_object::<DatasetWire>(&body) {
        Ok(wire) => wire,
        Err(e) => return bad_request(format_args!("invalid dataset: {e}")),
    };
    match Dataset::new(wire) {
        Ok(dataset) => {
            sim.replace(&key, dataset);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(format_args!("invalid dataset: {e}")),
    }
}

async fn get_scenario(State(sim): State<Arc<Sim>>, Path(key): Path<String>) -> Response {
    Json(sim.consent(&key).scenario()).into_response()
}

async fn patch_scenario(
    State(sim): State<Arc<Sim>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let patch = match from_object::<ScenarioPatch>(&body) {
        Ok(patch) => patch,
        Err(e) => return bad_request(format_args!("invalid scenario: {e}")),
    };
    if let Some(fail) = patch.fail_next
        && !(400..=599).contains(&fail.status)
    {
        return bad_request(format_args!(
            "invalid scenario: failNext.status must be 400-599, not {}",
            fail.status
        ));
    }
    if patch.fail_percent.is_some_and(|p| p > 100) {
        return bad_request(format_args!("invalid scenario: failPercent must be 0-100"));
    }
    if patch.latency_ms.is_some_and(|l| l > MAX_LATENCY_MS) {
        return bad_request(format_args!(
            "invalid scenario: latencyMs must be at most {MAX_LATENCY_MS}"
        ));
    }
    Json(sim.consent(&key).patch(patch)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallsQuery {
    since: Option<String>,
    bank_consent_id: Option<String>,
}

async fn calls(State(sim): State<Arc<Sim>>, Query(q): Query<CallsQuery>) -> Response {
    let since = match q.since.as_deref() {
        None => None,
        // A `+` sent unencoded arrives as a space.
        Some(s) => match DateTime::parse_from_rfc3339(&s.trim().replace(' ', "+")) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => return bad_request(format_args!("since is not an RFC 3339 time: {e}")),
        },
    };
    Json(sim.calls(since, q.bank_consent_id.as_deref())).into_response()
}
