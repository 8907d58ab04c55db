//! Small servers that answer what the simulator never does: the connector must
//! send the OBIE headers, never follow a link off the bank's origin, stop on
//! looping links, not follow redirects, honour an HTTP-date `Retry-After`, and
//! skip initial-load listings outside the consent's permissions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use refresh_bank::{BankError, Connector, ConsentAccess};
use serde_json::{Value, json};

use crate::support::{connector, long_ago, quick};

/// What a fake bank answers to a path (or `path?query`).
#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn ok(body: Value) -> Canned {
    Canned {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
    }
}

fn status(status: u16, headers: Vec<(&'static str, String)>, body: Value) -> Canned {
    Canned {
        status,
        headers,
        body: if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    }
}

#[derive(Default)]
struct Bank {
    answers: HashMap<String, Canned>,
    seen: Mutex<Vec<(String, HeaderMap)>>,
}

async fn answer(State(bank): State<Arc<Bank>>, uri: Uri, headers: HeaderMap) -> Response {
    let target = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    bank.seen.lock().unwrap().push((target.clone(), headers));
    let canned = bank
        .answers
        .get(&target)
        .or_else(|| bank.answers.get(uri.path()))
        .cloned();
    match canned {
        Some(c) => {
            let mut response = (StatusCode::from_u16(c.status).unwrap(), c.body).into_response();
            for (name, value) in c.headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves `answers` on a free port; returns the origin and the bank.
async fn serve(answers: Vec<(String, Canned)>) -> (String, Arc<Bank>) {
    let bank = Arc::new(Bank {
        answers: answers.into_iter().collect(),
        ..Bank::default()
    });
    let app = Router::new().fallback(answer).with_state(bank.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (origin, bank)
}

fn access(origin: &str) -> ConsentAccess {
    ConsentAccess {
        base_url: format!("{origin}/aisp/"),
        access_token: "tok-123".into(),
        financial_id: "fin-9".into(),
        trace: None,
        bank_consent_id: "bank-consent".into(),
    }
}

fn one_account() -> Vec<(String, Canned)> {
    vec![
        (
            "/aisp/accounts".into(),
            ok(json!({"Data": {"Account": [{"AccountId": "1"}]}, "Links": {"Self": "x"}})),
        ),
        (
            "/aisp/accounts/1/balances".into(),
            ok(
                json!({"Data": {"Balance": [{"AccountId": "1", "Amount": {"Amount": "1.00", "Currency": "GBP"},
                "CreditDebitIndicator": "Credit", "Type": "InterimBooked", "DateTime": "2025-01-01T00:00:00Z"}]},
                "Links": {"Self": "x"}}),
            ),
        ),
        (
            "/aisp/accounts/1/transactions".into(),
            ok(json!({"Data": {"Transaction": []}, "Links": {"Self": "x"}})),
        ),
    ]
}

fn with(mut answers: Vec<(String, Canned)>, path: &str, canned: Canned) -> Vec<(String, Canned)> {
    answers.retain(|(p, _)| p != path);
    answers.push((path.to_owned(), canned));
    answers
}

#[tokio::test]
async fn requests_carry_the_obie_headers() {
    let (origin, bank) = serve(one_account()).await;
    let from: DateTime<Utc> = "2025-01-02T13:00:00Z".parse().unwrap();
    let data = connector(quick())
        .fetch_refresh(&access(&origin), from)
        .await
        .unwrap();
    assert_eq!(data.requests, 3);
    let seen = bank.seen.lock().unwrap();
    let targets: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/aisp/accounts",
            "/aisp/accounts/1/balances",
            "/aisp/accounts/1/transactions?fromBookingDateTime=2025-01-02T00%3A00%3A00",
        ]
    );
    let mut interaction_ids = HashSet::new();
    for (_, headers) in seen.iter() {
        assert_eq!(headers["authorization"], "Bearer tok-123");
        assert_eq!(headers["x-fapi-financial-id"], "fin-9");
        assert_eq!(headers["accept"], "application/json");
        let id = headers["x-fapi-interaction-id"].to_str().unwrap();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.as_bytes()[14], b'4', "a v4 UUID: {id}");
        interaction_ids.insert(id.to_owned());
    }
    assert_eq!(interaction_ids.len(), 3, "one fresh id per request");
}

#[tokio::test]
async fn links_never_leave_the_banks_origin() {
    let (elsewhere, thief) = serve(one_account()).await;
    let next = format!("{elsewhere}/aisp/accounts/1/transactions?page=2");
    let answers = with(
        one_account(),
        "/aisp/accounts/1/transactions",
        ok(json!({"Data": {"Transaction": []}, "Links": {"Self": "x", "Next": next}})),
    );
    let (origin, _) = serve(answers).await;
    let err = connector(quick())
        .fetch_refresh(&access(&origin), long_ago())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BankError::Malformed("transactions: Links.Next leaves the bank's origin".into())
    );
    assert!(thief.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn looping_links_stop() {
    let tx =
        |next: &str| ok(json!({"Data": {"Transaction": []}, "Links": {"Self": "x", "Next": next}}));
    // Relative links, resolved against the page they are on.
    let answers = with(
        one_account(),
        "/aisp/accounts/1/transactions",
        tx("transactions?page=2"),
    );
    let answers = with(
        answers,
        "/aisp/accounts/1/transactions?page=2",
        tx("transactions?page=3"),
    );
    let answers = with(
        answers,
        "/aisp/accounts/1/transactions?page=3",
        tx("transactions?page=2"),
    );
    let (origin, bank) = serve(answers).await;
    let err = connector(quick())
        .fetch_refresh(&access(&origin), long_ago())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BankError::Malformed("transactions: Links.Next loops back to a page already read".into())
    );
    assert_eq!(bank.seen.lock().unwrap().len(), 5);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (elsewhere, thief) = serve(one_account()).await;
    let answers = with(
        one_account(),
        "/aisp/accounts",
        status(
            302,
            vec![("location", format!("{elsewhere}/aisp/accounts"))],
            Value::Null,
        ),
    );
    let (origin, _) = serve(answers).await;
    let err = connector(quick())
        .fetch_refresh(&access(&origin), long_ago())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BankError::Malformed("accounts /aisp/accounts: unexpected http status 302".into())
    );
    assert!(thief.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn retry_after_as_an_http_date() {
    let at = (Utc::now() + chrono::Duration::seconds(30))
        .to_rfc2822()
        .replace("+0000", "GMT");
    let answers = with(
        one_account(),
        "/aisp/accounts/1/balances",
        status(503, vec![("retry-after", at)], Value::Null),
    );
    let (origin, _) = serve(answers).await;
    let err = connector(quick())
        .fetch_refresh(&access(&origin), long_ago())
        .await
        .unwrap_err();
    match err {
        BankError::Transient {
            retry_after: Some(d),
            ..
        } => assert!(
            (Duration::from_secs(25)..=Duration::from_secs(30)).contains(&d),
            "{d:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn initial_listings_outside_the_consent_are_skipped() {
    let forbidden = status(
        403,
        vec![("content-type", "application/json".into())],
        json!({"Code": "403", "Message": "no", "Errors": [{"ErrorCode": "UK.OBIE.Resource.ConsentMismatch", "Message": "no"}]}),
    );
    let empty = |key: &str| ok(json!({"Data": {key: []}, "Links": {"Self": "x"}}));
    let mut answers = one_account();
    answers.push(("/aisp/accounts/1/parties".into(), empty("Party")));
    answers.push((
        "/aisp/accounts/1/party".into(),
        ok(json!({"Data": {}, "Links": {"Self": "x"}})),
    ));
    answers.push(("/aisp/accounts/1/beneficiaries".into(), forbidden.clone()));
    answers.push((
        "/aisp/accounts/1/direct-debits".into(),
        empty("DirectDebit"),
    ));
    answers.push((
        "/aisp/accounts/1/standing-orders".into(),
        empty("StandingOrder"),
    ));
    answers.push((
        "/aisp/accounts/1/scheduled-payments".into(),
        status(405, vec![], Value::Null),
    ));
    answers.push(("/aisp/accounts/1/statements".into(), empty("Statement")));
    // No /product at all: 404.
    let (origin, _) = serve(answers.clone()).await;
    let data = connector(quick())
        .fetch_initial(&access(&origin), long_ago())
        .await
        .unwrap();
    assert_eq!(
        data.deviations.get("optional_resource_unavailable"),
        Some(&3)
    );
    assert!(data.initial.is_some());

    // The same 403 on a listing every refresh needs means the consent is gone.
    let (origin, _) = serve(with(answers, "/aisp/accounts/1/transactions", forbidden)).await;
    let err = connector(quick())
        .fetch_initial(&access(&origin), long_ago())
        .await
        .unwrap_err();
    assert_eq!(err, BankError::Revoked);
}

#[tokio::test]
async fn a_bad_base_url_is_refused() {
    for base in [
        "not a url",
        "ftp://bank.example/aisp",
        "mailto:bank@example.com",
    ] {
        let access = ConsentAccess {
            base_url: base.into(),
            access_token: "t".into(),
            financial_id: "f".into(),
            trace: None,
            bank_consent_id: "c".into(),
        };
        let err = connector(quick())
            .fetch_refresh(&access, long_ago())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BankError::Malformed(ref m) if m.contains("not an http(s) url")),
            "{base}: {err:?}"
        );
    }
}
