//! The Berlin Group NextGenPSD2 1.3 dialect of the same datasets, under
//! [`crate::BERLIN_GROUP_PREFIX`]: `GET /v1/accounts`, `/v1/accounts/{id}/balances`,
//! `/v1/accounts/{id}/transactions?bookingStatus=both&dateFrom=`.
//!
//! The consent is the `Consent-ID` header (the simulator's consent key); its
//! scenario applies as in the OBIE dialect and its calls are logged the same way.
//! Each OBIE item of the dataset is served in its NextGenPSD2 shape (signed
//! amounts, lowerCamel balance types, `bookingDate` for booked items only); a
//! transaction with a `BerlinGroup` object is served as that object instead, so a
//! test can send exactly what an odd bank would. Conventions:
//! - no `Consent-ID` → 400 `FORMAT_ERROR`; revoked → 401 `CONSENT_INVALID`;
//!   MFA needed → 401 `SCA_INVALID` with an `scaRedirect` link;
//! - injected failures answer their status with `tppMessages` (429:
//!   `ACCESS_EXCEEDED`; 429 and 503 with `Retry-After: 1`);
//! - transactions are paged (`page=N`, a relative `_links.next.href`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde_json::{Map, Value, json};

use crate::dataset::{Dataset, Item, Kind};
use crate::state::{Action, CallRecord, Sim, header_text};

/// How long a `hangNext` call is held: longer than any client waits.
const HANG: Duration = Duration::from_secs(3600);

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/v1/accounts", get(accounts)).route(
        "/v1/accounts/{account_id}/{resource}",
        get(account_resource),
    )
}

enum Endpoint {
    Accounts,
    Balances(String),
    Transactions(String),
    Unknown,
}

async fn accounts(
    State(sim): State<Arc<Sim>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    call(&sim, Endpoint::Accounts, &uri, &headers, &query).await
}

async fn account_resource(
    State(sim): State<Arc<Sim>>,
    Path((account_id, resource)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let endpoint = match resource.as_str() {
        "balances" => Endpoint::Balances(account_id),
        "transactions" => Endpoint::Transactions(account_id),
        _ => Endpoint::Unknown,
    };
    call(&sim, endpoint, &uri, &headers, &query).await
}

fn tpp_error(status: StatusCode, code: &str, text: &str) -> Response {
    let body = json!({"tppMessages": [{"category": "ERROR", "code": code, "text": text}]});
    (status, Json(body)).into_response()
}

async fn call(
    sim: &Sim,
    endpoint: Endpoint,
    uri: &Uri,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response {
    let at = Utc::now();
    let consent_id = headers
        .get("consent-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let (action, latency) = match consent_id {
        Some(key) => sim.consent(key).next_action(),
        None => (Action::Serve, 0),
    };
    let response = match (consent_id, action) {
        (None, _) => Some(tpp_error(
            StatusCode::BAD_REQUEST,
            "FORMAT_ERROR",
            "the Consent-ID header is required",
        )),
        (Some(_), Action::Hang) => None,
        (Some(_), Action::Fail(status)) => Some(injected(status)),
        (Some(_), Action::Revoked) => Some(tpp_error(
            StatusCode::UNAUTHORIZED,
            "CONSENT_INVALID",
            "The consent has been revoked",
        )),
        (Some(_), Action::MfaRequired) => {
            let body = json!({
                "tppMessages": [{"category": "ERROR", "code": "SCA_INVALID",
                                 "text": "Strong customer authentication required"}],
                "_links": {"scaRedirect": {"href": "https://bank.example/sca"}}
            });
            Some((StatusCode::UNAUTHORIZED, Json(body)).into_response())
        }
        (Some(key), Action::Serve) => Some(serve(
            sim,
            &sim.consent(key).dataset(),
            &endpoint,
            uri,
            query,
        )),
    };
    sim.log(CallRecord {
        at,
        bank_consent_id: consent_id.map(str::to_owned),
        method: "GET".to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        status: response.as_ref().map(|r| r.status().as_u16()),
        traceparent: header_text(headers, "traceparent"),
        request_id: header_text(headers, "x-request-id"),
    });
    let latency = sim.settings.latency_ms.saturating_add(latency);
    if latency > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(latency)) => {}
            () = sim.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    let mut response = match response {
        Some(response) => response,
        None => {
            tokio::select! {
                () = tokio::time::sleep(HANG) => {}
                () = sim.shutdown.cancelled() => {}
            }
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    };
    if let Some(id) = headers.get("x-request-id") {
        response.headers_mut().insert("x-request-id", id.clone());
    }
    response
}

fn injected(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let code = match status.as_u16() {
        429 => "ACCESS_EXCEEDED",
        401 => "CONSENT_INVALID",
        _ => "INTERNAL_SERVER_ERROR",
    };
    let mut response = tpp_error(status, code, "Injected failure");
    if matches!(status.as_u16(), 429 | 503) {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn not_found() -> Response {
    tpp_error(StatusCode::NOT_FOUND, "RESOURCE_UNKNOWN", "no such account")
}

fn serve(
    sim: &Sim,
    data: &Dataset,
    endpoint: &Endpoint,
    uri: &Uri,
    query: &HashMap<String, String>,
) -> Response {
    match endpoint {
        Endpoint::Accounts => {
            let accounts: Vec<Value> = data.accounts().iter().map(|a| account(a.item)).collect();
            Json(json!({ "accounts": accounts })).into_response()
        }
        Endpoint::Balances(id) => {
            let Some(acc) = data.account(id) else {
                return not_found();
            };
            let balances: Vec<Value> = data
                .of_account(Kind::Balances, id)
                .iter()
                .map(|b| balance(b.item))
                .collect();
            Json(json!({"account": reference(acc.item), "balances": balances})).into_response()
        }
        Endpoint::Transactions(id) => {
            let Some(acc) = data.account(id) else {
                return not_found();
            };
            if !matches!(
                query.get("bookingStatus").map(String::as_str),
                Some("both" | "booked" | "pending")
            ) {
                return tpp_error(
                    StatusCode::BAD_REQUEST,
                    "FORMAT_ERROR",
                    "bookingStatus must be booked, pending or both",
                );
            }
            let from = match query.get("dateFrom").map(|d| d.parse::<NaiveDate>()) {
                None => None,
                Some(Ok(d)) => Some(d.and_time(NaiveTime::MIN)),
                Some(Err(_)) => {
                    return tpp_error(
                        StatusCode::BAD_REQUEST,
                        "FORMAT_ERROR",
                        "dateFrom must be an ISO date",
                    );
                }
            };
            let page = match query.get("page").map(|p| p.parse::<usize>()) {
                None => 1,
                Some(Ok(n)) if n >= 1 => n,
                Some(_) => {
                    return tpp_error(
                        StatusCode::BAD_REQUEST,
                        "FORMAT_ERROR",
                        "page must be a positive integer",
                    );
                }
            };
            let status = query.get("bookingStatus").map_or("both", String::as_str);
            let items: Vec<&Item> = data
                .transactions(id, from, None)
                .into_iter()
                .map(|t| t.item)
                .filter(|t| {
                    let pending = is_pending(t);
                    !is_rejected(t)
                        && match status {
                            "booked" => !pending,
                            "pending" => pending,
                            _ => true,
                        }
                })
                .collect();
            let size = sim.settings.page_size.max(1);
            let total = items.len().div_ceil(size).max(1);
            if page > total {
                return tpp_error(
                    StatusCode::BAD_REQUEST,
                    "FORMAT_ERROR",
                    &format!("page {page} is past the last page, {total}"),
                );
            }
            let start = (page - 1) * size;
            let end = (start + size).min(items.len());
            let (mut booked, mut pending) = (Vec::new(), Vec::new());
            for t in &items[start..end] {
                let served = transaction(t);
                if is_pending(t) {
                    pending.push(served);
                } else {
                    booked.push(served);
                }
            }
            let mut links = Map::new();
            links.insert(
                "account".into(),
                json!({"href": format!("/v1/accounts/{id}")}),
            );
            if page < total {
                let mut pairs: Vec<String> = uri
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter(|p| !p.is_empty() && !p.starts_with("page="))
                    .map(str::to_owned)
                    .collect();
                pairs.push(format!("page={}", page + 1));
                // Relative to the request, as many banks write it.
                let next = format!("{}?{}", uri.path(), pairs.join("&"));
                links.insert("next".into(), json!({ "href": next }));
            }
            let mut report = Map::new();
            if status != "pending" {
                report.insert("booked".into(), Value::Array(booked));
            }
            if status != "booked" {
                report.insert("pending".into(), Value::Array(pending));
            }
            report.insert("_links".into(), Value::Object(links));
            Json(json!({"account": reference(acc.item), "transactions": report})).into_response()
        }
        Endpoint::Unknown => not_found(),
    }
}

fn str_of<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key).and_then(Value::as_str)
}

fn is_pending(t: &Item) -> bool {
    str_of(t, "Status") == Some("Pending")
}

fn is_rejected(t: &Item) -> bool {
    str_of(t, "Status") == Some("Rejected") && !t.contains_key("BerlinGroup")
}

/// An OBIE `{Amount, Currency}` and `CreditDebitIndicator` as a signed NextGenPSD2 amount.
fn amount(item: &Item, key: &str) -> Value {
    let money = item.get(key).and_then(Value::as_object);
    let value = money
        .and_then(|m| m.get("Amount"))
        .cloned()
        .unwrap_or(Value::Null);
    let currency = money
        .and_then(|m| m.get("Currency"))
        .cloned()
        .unwrap_or(Value::Null);
    let value = match (value, str_of(item, "CreditDebitIndicator")) {
        (Value::String(s), Some("Debit")) => Value::String(format!("-{s}")),
        (other, _) => other,
    };
    json!({"currency": currency, "amount": value})
}

/// The UTC date of an OBIE date-time field.
fn date(item: &Item, key: &str) -> Option<String> {
    let t = DateTime::parse_from_rfc3339(str_of(item, key)?).ok()?;
    Some(t.with_timezone(&Utc).date_naive().to_string())
}

fn iban(a: &Item) -> Option<&str> {
    a.get("Account")?
        .as_array()?
        .iter()
        .find(|id| id.get("SchemeName").and_then(Value::as_str) == Some("UK.OBIE.IBAN"))?
        .get("Identification")?
        .as_str()
}

fn reference(a: &Item) -> Value {
    match iban(a) {
        Some(iban) => json!({"iban": iban}),
        None => json!({"other": {"identification": str_of(a, "AccountId")}}),
    }
}

fn account(a: &Item) -> Value {
    let id = str_of(a, "AccountId").unwrap_or_default();
    let mut out = json!({
        "resourceId": id,
        "currency": a.get("Currency").cloned().unwrap_or(Value::Null),
        "cashAccountType": "CACC",
        "status": str_of(a, "Status").map(str::to_lowercase),
        "usage": match str_of(a, "AccountType") { Some("Business") => "ORGA", _ => "PRIV" },
        "_links": {"balances": {"href": format!("/v1/accounts/{id}/balances")},
                   "transactions": {"href": format!("/v1/accounts/{id}/transactions")}}
    });
    if let Some(name) = str_of(a, "Nickname") {
        out["name"] = json!(name);
    }
    if let Some(product) = str_of(a, "AccountSubType") {
        out["product"] = json!(product);
    }
    if let Some(iban) = iban(a) {
        out["iban"] = json!(iban);
    }
    out
}

fn balance(b: &Item) -> Value {
    let kind = str_of(b, "Type").unwrap_or_default();
    let mut chars = kind.chars();
    let kind: String = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    };
    let mut out = json!({"balanceType": kind, "balanceAmount": amount(b, "Amount")});
    if let Some(t) = b.get("DateTime") {
        out["lastChangeDateTime"] = t.clone();
    }
    out
}

fn transaction(t: &Item) -> Value {
    if let Some(verbatim) = t.get("BerlinGroup") {
        return verbatim.clone();
    }
    let mut out = json!({"transactionAmount": amount(t, "Amount")});
    if let Some(id) = str_of(t, "TransactionId") {
        out["transactionId"] = json!(id);
    }
    if !is_pending(t)
        && let Some(d) = date(t, "BookingDateTime")
    {
        out["bookingDate"] = json!(d);
    }
    if let Some(d) = date(t, "ValueDateTime").or_else(|| date(t, "BookingDateTime")) {
        out["valueDate"] = json!(d);
    }
    if let Some(info) = str_of(t, "TransactionInformation") {
        out["remittanceInformationUnstructured"] = json!(info);
    }
    if let Some(reference) = str_of(t, "TransactionReference") {
        out["endToEndId"] = json!(reference);
    }
    out
}
