//! The OBIE v3.1 Account Information endpoints, served from a consent's
//! dataset with the consent's scenario applied.
//!
//! Conventions (the same as `refresh-bank`'s connector):
//! - no `Authorization: Bearer` → 401; no `x-fapi-financial-id` → 400;
//! - revoked → 403 with `UK.OBIE.Resource.InvalidConsentStatus`;
//! - SCA/MFA needed → 403 with `UK.OBIE.Reauthenticate`;
//! - injected failures answer their status (`Retry-After: 1` with 429/503);
//! - listings are paged (`page=N`, `Links.Next`), absolute links built from
//!   the request's `Host`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::{Value, json};

use crate::dataset::{Dataset, Kind, Served};
use crate::state::{Action, CallRecord, Sim, header_text};

/// The error code that asks for strong customer authentication (the
/// connector's convention).
pub(crate) const SCA_ERROR_CODE: &str = "UK.OBIE.Reauthenticate";
/// The error code of a revoked consent.
pub(crate) const REVOKED_ERROR_CODE: &str = "UK.OBIE.Resource.InvalidConsentStatus";

/// How long a `hangNext` call is held: longer than any client waits. Shutdown
/// releases it.
const HANG: Duration = Duration::from_secs(3600);

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/accounts", get(accounts))
        .route("/accounts/{account_id}", get(account))
        .route("/accounts/{account_id}/{resource}", get(account_resource))
}

/// What was asked for.
#[derive(Debug)]
enum Endpoint {
    Accounts,
    Account(String),
    Listing(String, Listing),
    Party(String),
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Listing {
    kind: Kind,
    /// The key under `Data`.
    key: &'static str,
}

struct Request {
    uri: Uri,
    headers: HeaderMap,
    query: HashMap<String, String>,
}

async fn accounts(
    State(sim): State<Arc<Sim>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let req = Request {
        uri,
        headers,
        query,
    };
    call(sim, Endpoint::Accounts, req).await
}

async fn account(
    State(sim): State<Arc<Sim>>,
    Path(account_id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let req = Request {
        uri,
        headers,
        query,
    };
    call(sim, Endpoint::Account(account_id), req).await
}

async fn account_resource(
    State(sim): State<Arc<Sim>>,
    Path((account_id, resource)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let listing = |kind, key| Endpoint::Listing(account_id.clone(), Listing { kind, key });
    let endpoint = match resource.as_str() {
        "balances" => listing(Kind::Balances, "Balance"),
        "transactions" => listing(Kind::Transactions, "Transaction"),
        "parties" => listing(Kind::Parties, "Party"),
        "party" => Endpoint::Party(account_id.clone()),
        "beneficiaries" => listing(Kind::Beneficiaries, "Beneficiary"),
        "direct-debits" => listing(Kind::DirectDebits, "DirectDebit"),
        "standing-orders" => listing(Kind::StandingOrders, "StandingOrder"),
        "scheduled-payments" => listing(Kind::ScheduledPayments, "ScheduledPayment"),
        "statements" => listing(Kind::Statements, "Statement"),
        "product" => listing(Kind::Products, "Product"),
        _ => Endpoint::Unknown,
    };
    let req = Request {
        uri,
        headers,
        query,
    };
    call(sim, endpoint, req).await
}

/// An answer decided on arrival.
enum Prepared {
    Ready(Response),
    Hang,
}

/// One data call: decided and logged on arrival (no await before), then
/// delayed, then answered. Dropping the future (client gone) is harmless.
async fn call(sim: Arc<Sim>, endpoint: Endpoint, req: Request) -> Response {
    let at = Utc::now();
    let interaction_id = req
        .headers
        .get("x-fapi-interaction-id")
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::try_from(uuid::Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("none"))
        });
    let token = bearer(&req.headers);
    let (prepared, latency) = match token {
        None => (Prepared::Ready(StatusCode::UNAUTHORIZED.into_response()), 0),
        Some(token) => decide(&sim, token, &endpoint, &req),
    };
    sim.log(CallRecord {
        at,
        bank_consent_id: token.map(str::to_owned),
        method: "GET".to_owned(),
        path: req.uri.path().to_owned(),
        query: req.uri.query().map(str::to_owned),
        status: match &prepared {
            Prepared::Ready(r) => Some(r.status().as_u16()),
            Prepared::Hang => None,
        },
        traceparent: header_text(&req.headers, "traceparent"),
        request_id: header_text(&req.headers, "x-fapi-interaction-id"),
    });
    let latency = sim.settings.latency_ms.saturating_add(latency);
    if latency > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(latency)) => {}
            () = sim.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    let mut response = match prepared {
        Prepared::Ready(response) => response,
        Prepared::Hang => {
            tokio::select! {
                () = tokio::time::sleep(HANG) => {}
                () = sim.shutdown.cancelled() => {}
            }
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    };
    response
        .headers_mut()
        .insert("x-fapi-interaction-id", interaction_id);
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn decide(sim: &Sim, token: &str, endpoint: &Endpoint, req: &Request) -> (Prepared, u64) {
    let financial_id = req
        .headers
        .get("x-fapi-financial-id")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().is_empty());
    if !financial_id {
        let r = ob_error(
            StatusCode::BAD_REQUEST,
            "UK.OBIE.Header.Missing",
            "the x-fapi-financial-id header is required",
        );
        return (Prepared::Ready(r), 0);
    }
    let consent = sim.consent(token);
    let (action, latency) = consent.next_action();
    let prepared = match action {
        Action::Hang => Prepared::Hang,
        Action::Fail(status) => Prepared::Ready(injected(status)),
        Action::Revoked => Prepared::Ready(ob_error(
            StatusCode::FORBIDDEN,
            REVOKED_ERROR_CODE,
            "The consent has been revoked",
        )),
        Action::MfaRequired => Prepared::Ready(ob_error(
            StatusCode::FORBIDDEN,
            SCA_ERROR_CODE,
            "Strong customer authentication required: the customer must re-authenticate the consent",
        )),
        Action::Serve => Prepared::Ready(serve(sim, &consent.dataset(), endpoint, req)),
    };
    (prepared, latency)
}

/// An `OBErrorResponse1`.
fn ob_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut head = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    head.truncate(40);
    let body = json!({
        "Code": head,
        "Id": uuid::Uuid::new_v4().to_string(),
        "Message": message,
        "Errors": [{"ErrorCode": code, "Message": message}]
    });
    (status, Json(body)).into_response()
}

/// A `failNext` answer.
fn injected(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = match status.as_u16() {
        // The OBIE 401 and 429 answers have no body.
        401 | 429 => status.into_response(),
        _ => ob_error(status, "UK.OBIE.UnexpectedError", "Injected failure"),
    };
    if matches!(status.as_u16(), 429 | 503) {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

fn serve(sim: &Sim, data: &Dataset, endpoint: &Endpoint, req: &Request) -> Response {
    let page = match req.query.get("page").map(|p| p.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            return ob_error(
                StatusCode::BAD_REQUEST,
                "UK.OBIE.Field.Invalid",
                "page must be a positive integer",
            );
        }
    };
    let pager = Pager {
        base: format!("http://{}{}", host(&req.headers), req.uri.path()),
        query: req.uri.query().unwrap_or_default(),
        page,
        size: sim.settings.page_size.max(1),
    };
    match endpoint {
        Endpoint::Accounts => pager.respond("Account", &data.accounts()),
        Endpoint::Account(id) => match data.account(id) {
            Some(account) => pager.respond("Account", &[account]),
            None => not_found(),
        },
        Endpoint::Listing(id, listing) => {
            if data.account(id).is_none() {
                return not_found();
            }
            let items = match listing.kind {
                Kind::Transactions => {
                    let mut window = [None, None];
                    for (slot, name) in window
                        .iter_mut()
                        .zip(["fromBookingDateTime", "toBookingDateTime"])
                    {
                        if let Some(value) = req.query.get(name) {
                            match booking_param(value) {
                                Some(t) => *slot = Some(t),
                                None => {
                                    return ob_error(
                                        StatusCode::BAD_REQUEST,
                                        "UK.OBIE.Field.InvalidDate",
                                        &format!("{name} is not an ISO 8601 date-time"),
                                    );
                                }
                            }
                        }
                    }
                    data.transactions(id, window[0], window[1])
                }
                kind => data.of_account(kind, id),
            };
            pager.respond(listing.key, &items)
        }
        Endpoint::Party(id) => {
            if data.account(id).is_none() {
                return not_found();
            }
            let parties = data.of_account(Kind::Parties, id);
            let owner = parties
                .iter()
                .find(|p| {
                    p.item.get("AccountRole").and_then(Value::as_str) == Some("UK.OBIE.Principal")
                })
                .or(parties.first());
            let data = match owner {
                Some(owner) => format!(r#"{{"Party":{}}}"#, owner.json),
                None => "{}".to_owned(),
            };
            pager.body(&data, 1)
        }
        Endpoint::Unknown => not_found(),
    }
}

fn host(headers: &HeaderMap) -> &str {
    headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', ' ', '?', '#', '@']))
        .unwrap_or("localhost")
}

/// `fromBookingDateTime`/`toBookingDateTime`: an ISO 8601 date-time or date.
/// Per the OBIE spec the timezone, if any, is ignored.
fn booking_param(value: &str) -> Option<NaiveDateTime> {
    // A `+` sent unencoded arrives as a space.
    let value = value.trim().replace(' ', "+");
    if let Ok(t) = DateTime::parse_from_rfc3339(&value) {
        return Some(t.naive_local());
    }
    NaiveDateTime::parse_from_str(&value, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(&value, "%Y-%m-%d")
                .ok()
                .map(|d| d.and_time(NaiveTime::MIN))
        })
}

/// Pages a listing.
struct Pager<'a> {
    /// `http://host/path`.
    base: String,
    /// The request's query string.
    query: &'a str,
    page: usize,
    size: usize,
}

impl Pager<'_> {
    fn link(&self, page: usize) -> String {
        let mut pairs: Vec<&str> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("page="))
            .collect();
        let page = format!("page={page}");
        pairs.push(&page);
        format!("{}?{}", self.base, pairs.join("&"))
    }

    fn self_link(&self) -> String {
        if self.query.is_empty() {
            self.base.clone()
        } else {
            format!("{}?{}", self.base, self.query)
        }
    }

    /// One page of `items` under `Data.{key}`.
    fn respond(&self, key: &str, items: &[Served<'_>]) -> Response {
        let total = items.len().div_ceil(self.size).max(1);
        if self.page > total {
            return ob_error(
                StatusCode::BAD_REQUEST,
                "UK.OBIE.Field.Invalid",
                &format!("page {} is past the last page, {total}", self.page),
            );
        }
        let start = (self.page - 1) * self.size;
        let end = (start + self.size).min(items.len());
        let page = &items[start..end];
        let mut data =
            String::with_capacity(page.iter().map(|i| i.json.len() + 1).sum::<usize>() + 32);
        data.push_str("{\"");
        data.push_str(key);
        data.push_str("\":[");
        for (n, item) in page.iter().enumerate() {
            if n > 0 {
                data.push(',');
            }
            data.push_str(item.json);
        }
        data.push_str("]}");
        self.body(&data, total)
    }

    /// `{"Data": data, "Links": …, "Meta": …}`, `data` being JSON already.
    fn body(&self, data: &str, total: usize) -> Response {
        let mut links = json!({
            "Self": self.self_link(),
            "First": self.link(1),
            "Last": self.link(total),
        });
        if self.page > 1 {
            links["Prev"] = Value::String(self.link(self.page - 1));
        }
        if self.page < total {
            links["Next"] = Value::String(self.link(self.page + 1));
        }
        let body = format!(r#"{{"Data":{data},"Links":{links},"Meta":{{"TotalPages":{total}}}}}"#);
        ([(CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booking_params() {
        let check = |s: &str, want: Option<&str>| {
            assert_eq!(
                booking_param(s).map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string()),
                want.map(str::to_owned),
                "{s}"
            );
        };
        check("2025-01-02T03:04:05", Some("2025-01-02T03:04:05"));
        check("2025-01-02T03:04:05.5", Some("2025-01-02T03:04:05"));
        check("2025-01-02T03:04:05+02:00", Some("2025-01-02T03:04:05"));
        check("2025-01-02T03:04:05 02:00", Some("2025-01-02T03:04:05"));
        check("2025-01-02T03:04:05Z", Some("2025-01-02T03:04:05"));
        check("2025-01-02", Some("2025-01-02T00:00:00"));
        check("02/01/2025", None);
        check("", None);
    }

    #[test]
    fn links() {
        let pager = Pager {
            base: "http://h/accounts/1/transactions".into(),
            query: "fromBookingDateTime=2025-01-01T00%3A00%3A00&page=2",
            page: 2,
            size: 10,
        };
        assert_eq!(
            pager.link(3),
            "http://h/accounts/1/transactions?fromBookingDateTime=2025-01-01T00%3A00%3A00&page=3"
        );
        let pager = Pager {
            base: "http://h/accounts".into(),
            query: "",
            page: 1,
            size: 10,
        };
        assert_eq!(pager.link(2), "http://h/accounts?page=2");
        assert_eq!(pager.self_link(), "http://h/accounts");
    }

    #[test]
    fn bearer_tokens() {
        let check = |value: &str, want: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer(&h), want, "{value}");
        };
        check("Bearer abc", Some("abc"));
        check("bearer abc", Some("abc"));
        check("Bearer ", None);
        check("Basic abc", None);
        check("abc", None);
    }
}
