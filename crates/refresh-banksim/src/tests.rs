//! The simulator through its router, with a fixed "today": determinism,
//! paging, filters, the scenario faults and the control API.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use chrono::NaiveDate;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;

fn app_with(page_size: usize, shutdown: CancellationToken) -> Router {
    let settings = SimSettings {
        page_size,
        ..SimSettings::default()
    };
    build(
        settings,
        shutdown,
        Box::new(|| NaiveDate::from_ymd_opt(2025, 3, 15).unwrap_or_default()),
    )
}

fn app(page_size: usize) -> Router {
    app_with(page_size, CancellationToken::new())
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "sim.test")
        .header("x-fapi-financial-id", "SIM");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str, token: &str) -> Answer {
    send(app, Method::GET, uri, Some(token), None).await
}

async fn dataset(app: &Router, key: &str) -> Value {
    let a = send(
        app,
        Method::GET,
        &format!("/sim/consents/{key}"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    a.body
}

/// Every transaction of an account, following `Links.Next`.
async fn all_transactions(
    app: &Router,
    key: &str,
    account: &str,
    query: &str,
) -> (Vec<Value>, usize) {
    let mut uri = format!("/accounts/{account}/transactions{query}");
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let a = get(app, &uri, key).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.body);
        pages += 1;
        out.extend(
            a.body["Data"]["Transaction"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
        match a.body["Links"]["Next"].as_str() {
            Some(next) => uri = next.strip_prefix("http://sim.test").unwrap().to_owned(),
            None => return (out, pages),
        }
    }
}

#[tokio::test]
async fn same_key_same_data_whatever_the_order() {
    let one = app(100);
    let two = app(100);
    // One simulator sees the key first through the control API, the other
    // through a data call; other keys come and go in between.
    let first = dataset(&one, "key-a").await;
    get(&two, "/accounts", "key-b").await;
    let accounts = get(&two, "/accounts", "key-a").await;
    dataset(&two, "key-c").await;
    let second = dataset(&two, "key-a").await;
    assert_eq!(first, second);
    assert_eq!(accounts.body["Data"]["Account"], first["accounts"]);
    assert_ne!(first, dataset(&one, "key-b").await);
    // And again later: kept in memory.
    assert_eq!(first, dataset(&one, "key-a").await);
}

#[tokio::test]
async fn paging_follows_next_to_every_transaction() {
    let app = app(7);
    let data = dataset(&app, "pager").await;
    let account = data["accounts"][0]["AccountId"]
        .as_str()
        .unwrap()
        .to_owned();
    let expected: Vec<&Value> = data["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["AccountId"] == account.as_str())
        .collect();
    let (got, pages) = all_transactions(&app, "pager", &account, "").await;
    assert_eq!(got.iter().collect::<Vec<_>>(), expected);
    assert_eq!(pages, expected.len().div_ceil(7));

    let first = get(&app, &format!("/accounts/{account}/transactions"), "pager").await;
    let links = &first.body["Links"];
    assert_eq!(
        links["Self"],
        format!("http://sim.test/accounts/{account}/transactions")
    );
    assert_eq!(
        links["Next"],
        format!("http://sim.test/accounts/{account}/transactions?page=2")
    );
    assert_eq!(first.body["Meta"]["TotalPages"], pages);
    assert!(links.get("Prev").is_none());

    let past = get(
        &app,
        &format!("/accounts/{account}/transactions?page={}", pages + 1),
        "pager",
    )
    .await;
    assert_eq!(past.status, StatusCode::BAD_REQUEST);
    let zero = get(
        &app,
        &format!("/accounts/{account}/transactions?page=0"),
        "pager",
    )
    .await;
    assert_eq!(zero.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn transactions_are_filtered_by_booking_time() {
    let app = app(1000);
    let data = dataset(&app, "window").await;
    let account = data["accounts"][0]["AccountId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (all, _) = all_transactions(&app, "window", &account, "").await;
    let (recent, _) = all_transactions(
        &app,
        "window",
        &account,
        "?fromBookingDateTime=2025-03-01T00:00:00",
    )
    .await;
    let expected: Vec<&Value> = all
        .iter()
        .filter(|t| t["BookingDateTime"].as_str().unwrap() >= "2025-03-01")
        .collect();
    assert!(!expected.is_empty() && expected.len() < all.len());
    assert_eq!(recent.iter().collect::<Vec<_>>(), expected);
    // The Next link keeps the filter.
    let small = app_paged_next(&account).await;
    assert!(
        small.contains("fromBookingDateTime=2025-03-01T00%3A00%3A00"),
        "{small}"
    );

    let bad = get(
        &app,
        &format!("/accounts/{account}/transactions?fromBookingDateTime=yesterday"),
        "window",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.body["Errors"][0]["ErrorCode"],
        "UK.OBIE.Field.InvalidDate"
    );
}

async fn app_paged_next(account: &str) -> String {
    let app = app(2);
    dataset(&app, "window").await;
    let a = get(
        &app,
        &format!("/accounts/{account}/transactions?fromBookingDateTime=2025-03-01T00%3A00%3A00"),
        "window",
    )
    .await;
    a.body["Links"]["Next"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_endpoint_answers_for_every_account() {
    let app = app(100);
    let data = dataset(&app, "all-kinds").await;
    for account in data["accounts"].as_array().unwrap() {
        let id = account["AccountId"].as_str().unwrap();
        for (segment, key, list) in [
            ("balances", "Balance", "balances"),
            ("parties", "Party", "parties"),
            ("beneficiaries", "Beneficiary", "beneficiaries"),
            ("direct-debits", "DirectDebit", "directDebits"),
            ("standing-orders", "StandingOrder", "standingOrders"),
            (
                "scheduled-payments",
                "ScheduledPayment",
                "scheduledPayments",
            ),
            ("statements", "Statement", "statements"),
            ("product", "Product", "products"),
        ] {
            for prefix in ["", API_PREFIX] {
                let a = get(
                    &app,
                    &format!("{prefix}/accounts/{id}/{segment}"),
                    "all-kinds",
                )
                .await;
                assert_eq!(a.status, StatusCode::OK, "{segment}");
                let served = a.body["Data"][key].as_array().unwrap();
                let stored: Vec<&Value> = data[list]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["AccountId"] == id)
                    .collect();
                assert_eq!(served.len(), stored.len(), "{segment}");
                if segment == "parties" {
                    assert!(served.iter().all(|p| p.get("AccountId").is_none()));
                } else {
                    assert_eq!(served.iter().collect::<Vec<_>>(), stored, "{segment}");
                }
            }
        }
        let party = get(&app, &format!("/accounts/{id}/party"), "all-kinds").await;
        assert_eq!(
            party.body["Data"]["Party"]["AccountRole"],
            "UK.OBIE.Principal"
        );
        let one = get(&app, &format!("/accounts/{id}"), "all-kinds").await;
        assert_eq!(one.body["Data"]["Account"][0], *account);
    }
    let unknown = get(&app, "/accounts/nope/balances", "all-kinds").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let offers = get(
        &app,
        &format!(
            "/accounts/{}/offers",
            data["accounts"][0]["AccountId"].as_str().unwrap()
        ),
        "all-kinds",
    )
    .await;
    assert_eq!(offers.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn headers_are_required() {
    let app = app(100);
    let a = send(&app, Method::GET, "/accounts", None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let req = Request::builder()
        .uri("/accounts")
        .header("authorization", "Bearer k")
        .header("x-fapi-interaction-id", "abc-123")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["x-fapi-interaction-id"], "abc-123");
}

async fn patch(app: &Router, key: &str, scenario: Value) -> Answer {
    send(
        app,
        Method::PATCH,
        &format!("/sim/consents/{key}/scenario"),
        None,
        Some(scenario),
    )
    .await
}

#[tokio::test]
async fn scenario_faults() {
    let app = app(100);
    let a = patch(&app, "f", json!({"failNext": {"count": 2, "status": 429}})).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["failNext"], json!({"count": 2, "status": 429}));
    for _ in 0..2 {
        let a = get(&app, "/accounts", "f").await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.headers["retry-after"], "1");
    }
    assert_eq!(get(&app, "/accounts", "f").await.status, StatusCode::OK);

    patch(&app, "f", json!({"failNext": {"count": 1, "status": 503}})).await;
    let a = get(&app, "/accounts", "f").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.body["Errors"][0]["ErrorCode"], "UK.OBIE.UnexpectedError");

    patch(&app, "f", json!({"revoked": true})).await;
    let a = get(&app, "/accounts", "f").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.body["Errors"][0]["ErrorCode"],
        "UK.OBIE.Resource.InvalidConsentStatus"
    );

    patch(&app, "f", json!({"revoked": false, "mfaRequired": true})).await;
    let a = get(&app, "/accounts", "f").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body["Errors"][0]["ErrorCode"], "UK.OBIE.Reauthenticate");

    let a = patch(&app, "f", json!({"mfaRequired": false, "latencyMs": 30})).await;
    assert_eq!(a.body["revoked"], false);
    let started = std::time::Instant::now();
    assert_eq!(get(&app, "/accounts", "f").await.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(30));

    // Other consents are not affected.
    assert_eq!(patch(&app, "g", json!({})).await.body["latencyMs"], 0);

    for bad in [
        json!({"failNext": {"count": 1, "status": 200}}),
        json!({"failNext": {"count": 1}}),
        json!({"hangNext": "1"}),
        json!({"revokd": true}),
        json!({"latencyMs": 600_001}),
        json!([]),
    ] {
        let a = patch(&app, "f", bad.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            a.body["error"]
                .as_str()
                .unwrap()
                .starts_with("invalid scenario"),
            "{}",
            a.body
        );
    }
}

#[tokio::test]
async fn held_calls_are_released_by_shutdown() {
    let shutdown = CancellationToken::new();
    let app = app_with(100, shutdown.clone());
    patch(&app, "h", json!({"hangNext": 1})).await;
    let held = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/accounts", "h").await.status }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!held.is_finished());
    // The next call is not held.
    assert_eq!(get(&app, "/accounts", "h").await.status, StatusCode::OK);
    shutdown.cancel();
    let status = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn put_replaces_the_dataset() {
    let app = app(100);
    let data = json!({
        "accounts": [{"AccountId": "A1", "Currency": "GBP"}],
        "balances": [],
        "transactions": [{"AccountId": "A1", "TransactionId": "t1", "Amount": {"Amount": 1.5, "Currency": "GBP"},
                          "BookingDateTime": "2025-01-01T00:00:00+00:00"}]
    });
    let a = send(
        &app,
        Method::PUT,
        "/sim/consents/p",
        None,
        Some(data.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let stored = dataset(&app, "p").await;
    assert_eq!(stored["accounts"], data["accounts"]);
    assert_eq!(stored["transactions"], data["transactions"]);
    assert_eq!(stored["parties"], json!([]));
    // Served as stored, float and all: the simulator can play a bad bank.
    let t = get(&app, "/accounts/A1/transactions", "p").await;
    assert_eq!(t.body["Data"]["Transaction"], data["transactions"]);

    for (bad, why) in [
        (
            json!({"accounts": [{"Currency": "GBP"}]}),
            "accounts[0]: AccountId must be a string",
        ),
        (
            json!({"accounts": [], "extra": []}),
            "unknown field `extra`",
        ),
        (json!([]), "invalid type"),
    ] {
        let a = send(
            &app,
            Method::PUT,
            "/sim/consents/p",
            None,
            Some(bad.clone()),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            a.body["error"].as_str().unwrap().contains(why),
            "{}",
            a.body
        );
    }
    // Unchanged by the refused ones.
    assert_eq!(dataset(&app, "p").await, stored);
}

#[tokio::test]
async fn calls_are_logged_in_order() {
    let app = app(100);
    let before = Utc::now();
    get(&app, "/accounts", "log-1").await;
    patch(
        &app,
        "log-2",
        json!({"failNext": {"count": 1, "status": 500}, "hangNext": 0}),
    )
    .await;
    get(&app, "/accounts", "log-2").await;
    get(&app, "/accounts/x/balances", "log-1").await;
    send(&app, Method::GET, "/accounts", None, None).await;

    let all = send(&app, Method::GET, "/sim/calls", None, None).await.body;
    let summary: Vec<(Value, Value, Value)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["bankConsentId"].clone(),
                c["path"].clone(),
                c["status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (json!("log-1"), json!("/accounts"), json!(200)),
            (json!("log-2"), json!("/accounts"), json!(500)),
            (json!("log-1"), json!("/accounts/x/balances"), json!(404)),
            (Value::Null, json!("/accounts"), json!(401)),
        ]
    );
    assert!(all.as_array().unwrap().iter().all(|c| c["method"] == "GET"));
    let ats: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["at"].as_str().unwrap())
        .collect();
    assert!(ats.windows(2).all(|w| w[0] <= w[1]), "{ats:?}");

    let since = ats[2];
    let later = send(
        &app,
        Method::GET,
        &format!("/sim/calls?since={}", since.replace('+', "%2B")),
        None,
        None,
    )
    .await;
    assert_eq!(later.body.as_array().unwrap().len(), 2);
    let one = send(
        &app,
        Method::GET,
        "/sim/calls?bankConsentId=log-2",
        None,
        None,
    )
    .await;
    assert_eq!(one.body.as_array().unwrap().len(), 1);
    let since_before = send(
        &app,
        Method::GET,
        &format!(
            "/sim/calls?since={}",
            before.to_rfc3339().replace('+', "%2B")
        ),
        None,
        None,
    )
    .await;
    assert_eq!(since_before.body.as_array().unwrap().len(), 4);
    let bad = send(&app, Method::GET, "/sim/calls?since=yesterday", None, None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn serves_the_probes_of_every_role() {
    let app = app(10);
    let health = send(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (health.status, health.body),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let ready = send(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (ready.status, ready.body),
        (StatusCode::OK, json!({"status": "ready", "checks": {}}))
    );
    let metrics = send(&app, Method::GET, "/metrics", None, None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_eq!(
        metrics.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_eq!(metrics.body, json!("# EOF\n"));
}
