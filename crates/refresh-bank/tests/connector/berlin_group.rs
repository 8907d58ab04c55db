//! The Berlin Group NextGenPSD2 1.3 connector over HTTP: against payloads built
//! from the published 1.3.6 `openapi.yaml` (each checked against its schema
//! first), served by a small bank that also records the headers it got, and
//! against the simulator's Berlin Group dialect.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use refresh_bank::{
    BankError, Connector, ConsentAccess, CreditDebit, ProviderKind, TransactionStatus,
    build_connector,
};
use refresh_banksim::BERLIN_GROUP_PREFIX;
use serde_json::{Value, json};

use crate::support::{long_ago, quick, start_sim};

/// The NextGenPSD2 definition, in the first ancestor of this crate holding
/// `shared/reference`.
fn openapi() -> Value {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = manifest
        .ancestors()
        .map(|dir| dir.join("shared/reference/berlin-group-1.3.6/openapi.yaml"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Berlin Group reference is missing: no shared/reference/berlin-group-1.3.6/openapi.yaml above {}",
                manifest.display()
            )
        });
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap()).unwrap()
}

#[track_caller]
fn assert_valid(openapi: &Value, schema: &str, instance: &Value) {
    let components = &openapi["components"];
    assert!(
        components["schemas"].get(schema).is_some(),
        "no schema {schema}"
    );
    let root = json!({"$ref": format!("#/components/schemas/{schema}"), "components": components});
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&root)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not a valid {schema}:\n{}",
        errors.join("\n")
    );
}

/// `(path?query or path, status, headers, body)`.
type Answers = Vec<(String, u16, Vec<(&'static str, &'static str)>, Value)>;

/// A fake bank: its answers, and the requests seen.
#[derive(Default)]
struct Bank {
    answers: Answers,
    seen: Mutex<Vec<(String, HeaderMap)>>,
}

async fn answer(State(bank): State<Arc<Bank>>, uri: Uri, headers: HeaderMap) -> Response {
    let target = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    bank.seen.lock().unwrap().push((target.clone(), headers));
    let found = bank
        .answers
        .iter()
        .find(|(t, ..)| *t == target)
        .or_else(|| bank.answers.iter().find(|(t, ..)| t == uri.path()));
    match found {
        Some((_, status, headers, body)) => {
            let mut r = (StatusCode::from_u16(*status).unwrap(), body.to_string()).into_response();
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            for (name, value) in headers {
                r.headers_mut().insert(*name, value.parse().unwrap());
            }
            r
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve(answers: Answers) -> (String, Arc<Bank>) {
    serve_with(|_| answers).await
}

/// Serves the answers `make` builds knowing the bank's origin.
async fn serve_with(make: impl FnOnce(&str) -> Answers) -> (String, Arc<Bank>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let bank = Arc::new(Bank {
        answers: make(&origin),
        ..Bank::default()
    });
    let app = Router::new().fallback(answer).with_state(bank.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (origin, bank)
}

fn access(base_url: String, token: &str) -> ConsentAccess {
    ConsentAccess {
        base_url,
        access_token: token.to_owned(),
        financial_id: "unused".to_owned(),
        trace: None,
        bank_consent_id: "consent-77".to_owned(),
    }
}

fn accounts() -> Value {
    json!({"accounts": [{
        "resourceId": "3dc3d5b3", "iban": "DE02120300000000202051", "currency": "EUR",
        "name": "Main Account", "product": "Girokonto", "cashAccountType": "CACC", "status": "enabled",
        "_links": {"balances": {"href": "/v1/accounts/3dc3d5b3/balances"},
                   "transactions": {"href": "/v1/accounts/3dc3d5b3/transactions"}}
    }]})
}

fn balances() -> Value {
    json!({
        "account": {"iban": "DE02120300000000202051"},
        "balances": [
            {"balanceType": "closingBooked", "balanceAmount": {"currency": "EUR", "amount": "500.00"},
             "referenceDate": "2026-11-30"},
            {"balanceType": "expected", "balanceAmount": {"currency": "EUR", "amount": "900.00"},
             "lastChangeDateTime": "2026-12-01T10:05:00Z"},
            {"balanceType": "interimAvailable", "balanceAmount": {"currency": "EUR", "amount": "-12.50"}}
        ]
    })
}

fn page_one(next: Value) -> Value {
    json!({
        "account": {"iban": "DE02120300000000202051"},
        "transactions": {
            "booked": [
                {"transactionId": "1234567", "creditorName": "John Miles",
                 "creditorAccount": {"iban": "DE67100100101306118605"},
                 "transactionAmount": {"currency": "EUR", "amount": "-256.67"},
                 "bookingDate": "2026-11-25", "valueDate": "2026-11-26",
                 "remittanceInformationUnstructured": "Example 1"},
                {"entryReference": "E-99", "debtorName": "Paul Simpson",
                 "transactionAmount": {"currency": "EUR", "amount": "343.01"},
                 "bookingDate": "2026-11-26", "valueDate": "2026-11-26",
                 "remittanceInformationUnstructured": "Example 2"}
            ],
            "pending": [
                {"transactionAmount": {"currency": "EUR", "amount": "-20.00"}, "valueDate": "2026-12-01",
                 "remittanceInformationUnstructured": "Card payment"}
            ],
            "_links": {"account": {"href": "/v1/accounts/3dc3d5b3"}, "next": next}
        }
    })
}

fn page_two() -> Value {
    json!({
        "account": {"iban": "DE02120300000000202051"},
        "transactions": {
            "booked": [
                {"transactionAmount": {"currency": "EUR", "amount": "-5.00"}, "bookingDate": "2026-11-27",
                 "remittanceInformationUnstructured": "Coffee"}
            ],
            "pending": [],
            "_links": {"account": {"href": "/v1/accounts/3dc3d5b3"}}
        }
    })
}

const TX_PATH: &str = "/psd2/v1/accounts/3dc3d5b3/transactions";

fn bank_answers(next: Value) -> Answers {
    vec![
        ("/psd2/v1/accounts".into(), 200, vec![], accounts()),
        (
            "/psd2/v1/accounts/3dc3d5b3/balances".into(),
            200,
            vec![],
            balances(),
        ),
        (
            format!("{TX_PATH}?bookingStatus=both&dateFrom=2000-01-01"),
            200,
            vec![],
            page_one(next),
        ),
        (format!("{TX_PATH}?page=2"), 200, vec![], page_two()),
    ]
}

#[tokio::test]
async fn published_shapes_are_read_with_both_lists_and_each_link_form() {
    let openapi = openapi();
    assert_valid(&openapi, "accountList", &accounts());
    assert_valid(&openapi, "readAccountBalanceResponse-200", &balances());
    assert_valid(
        &openapi,
        "transactionsResponse-200_json",
        &page_one(json!({"href": "x"})),
    );
    assert_valid(&openapi, "transactionsResponse-200_json", &page_two());

    let connector = build_connector(ProviderKind::BerlinGroup, quick()).unwrap();
    assert_eq!(connector.provider_kind(), ProviderKind::BerlinGroup);
    // The next page by an absolute href, a relative one, and a bare string (read, counted).
    for (next, deviations) in [
        (
            json!({"href": "ORIGIN/psd2/v1/accounts/3dc3d5b3/transactions?page=2"}),
            vec![],
        ),
        (
            json!({"href": "/psd2/v1/accounts/3dc3d5b3/transactions?page=2"}),
            vec![],
        ),
        (json!({"href": "transactions?page=2"}), vec![]),
        (
            json!("/psd2/v1/accounts/3dc3d5b3/transactions?page=2"),
            vec![("link_not_object", 1)],
        ),
    ] {
        let (origin, bank) = serve_with(|origin| {
            bank_answers(serde_json::from_str(&next.to_string().replace("ORIGIN", origin)).unwrap())
        })
        .await;
        let data = connector
            .fetch_refresh(&access(format!("{origin}/psd2"), "tok"), long_ago())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let deviations: Vec<(&str, u64)> = deviations;
        assert_eq!(
            data.deviations
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect::<Vec<_>>(),
            deviations
        );
        assert_eq!(data.accounts.len(), 1);
        assert_eq!(data.accounts[0].account_id, "3dc3d5b3");
        let balances: Vec<(String, String, CreditDebit)> = data
            .balances
            .iter()
            .map(|b| (b.balance_type.clone(), b.amount.to_string(), b.credit_debit))
            .collect();
        assert_eq!(
            balances,
            [
                ("ClosingBooked".into(), "500.00".into(), CreditDebit::Credit),
                ("Expected".into(), "900.00".into(), CreditDebit::Credit),
                (
                    "InterimAvailable".into(),
                    "12.50".into(),
                    CreditDebit::Debit
                ),
            ]
        );
        let txs: Vec<(
            Option<String>,
            TransactionStatus,
            String,
            String,
            CreditDebit,
        )> = data
            .transactions
            .iter()
            .map(|t| {
                (
                    t.transaction_id.clone(),
                    t.status,
                    t.booking_date.to_string(),
                    t.amount.to_string(),
                    t.credit_debit,
                )
            })
            .collect();
        assert_eq!(
            txs,
            [
                (
                    None,
                    TransactionStatus::Pending,
                    "2026-12-01".into(),
                    "20.00".into(),
                    CreditDebit::Debit
                ),
                (
                    Some("1234567".into()),
                    TransactionStatus::Booked,
                    "2026-11-25".into(),
                    "256.67".into(),
                    CreditDebit::Debit
                ),
                (
                    Some("E-99".into()),
                    TransactionStatus::Booked,
                    "2026-11-26".into(),
                    "343.01".into(),
                    CreditDebit::Credit
                ),
                (
                    None,
                    TransactionStatus::Booked,
                    "2026-11-27".into(),
                    "5.00".into(),
                    CreditDebit::Debit
                ),
            ]
        );
        assert_eq!(data.requests, 4);
        // The headers of every call.
        let seen = bank.seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        let mut request_ids = std::collections::HashSet::new();
        for (target, headers) in seen.iter() {
            assert_eq!(headers["consent-id"], "consent-77", "{target}");
            assert_eq!(headers["authorization"], "Bearer tok", "{target}");
            assert!(headers.get("psu-ip-address").is_none(), "{target}");
            let id = headers["x-request-id"].to_str().unwrap().to_owned();
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{target}: {id}");
            request_ids.insert(id);
        }
        assert_eq!(request_ids.len(), 4, "a fresh X-Request-ID per call");
    }
}

#[tokio::test]
async fn each_error_is_mapped() {
    let tpp =
        |code: &str| json!({"tppMessages": [{"category": "ERROR", "code": code, "text": "no"}]});
    type Case = (u16, Vec<(&'static str, &'static str)>, Value, BankError);
    let cases: Vec<Case> = vec![
        (401, vec![], tpp("CONSENT_INVALID"), BankError::Revoked),
        (401, vec![], tpp("CONSENT_EXPIRED"), BankError::Expired),
        (403, vec![], tpp("CONSENT_UNKNOWN"), BankError::Revoked),
        (401, vec![], tpp("SCA_INVALID"), BankError::MfaRequired),
        (
            429,
            vec![("retry-after", "7")],
            tpp("ACCESS_EXCEEDED"),
            BankError::Transient {
                retry_after: Some(Duration::from_secs(7)),
                reason: "http status 429 ACCESS_EXCEEDED".into(),
            },
        ),
        (
            503,
            vec![],
            json!({}),
            BankError::Transient {
                retry_after: None,
                reason: "http status 503".into(),
            },
        ),
        (
            400,
            vec![],
            tpp("FORMAT_ERROR"),
            BankError::Malformed(
                "accounts /psd2/v1/accounts: unexpected http status 400 FORMAT_ERROR".into(),
            ),
        ),
    ];
    let connector = build_connector(ProviderKind::BerlinGroup, quick()).unwrap();
    for (status, headers, body, expected) in cases {
        let openapi_checked = body.clone();
        let (origin, _bank) =
            serve(vec![("/psd2/v1/accounts".into(), status, headers, body)]).await;
        let got = connector
            .fetch_refresh(&access(format!("{origin}/psd2"), "tok"), long_ago())
            .await
            .unwrap_err();
        assert_eq!(got, expected, "{status} {openapi_checked}");
    }
    // Data that would be stored wrong is refused.
    let mut bad = page_two();
    bad["transactions"]["booked"][0]["transactionAmount"]["amount"] = json!(-5.0);
    let (origin, _bank) = serve(vec![
        ("/psd2/v1/accounts".into(), 200, vec![], accounts()),
        (
            "/psd2/v1/accounts/3dc3d5b3/balances".into(),
            200,
            vec![],
            balances(),
        ),
        (TX_PATH.into(), 200, vec![], bad),
    ])
    .await;
    let got = connector
        .fetch_refresh(&access(format!("{origin}/psd2"), "tok"), long_ago())
        .await
        .unwrap_err();
    assert!(
        matches!(got, BankError::Malformed(ref m) if m.contains("JSON number")),
        "{got:?}"
    );
}

#[tokio::test]
async fn the_simulators_berlin_group_dialect_serves_the_same_dataset() {
    let sim = start_sim(2).await;
    let key = "bg-dialect-1";
    let dataset = sim.dataset(key).await;
    let connector = build_connector(ProviderKind::BerlinGroup, quick()).unwrap();
    let bg = ConsentAccess {
        base_url: format!("{}{BERLIN_GROUP_PREFIX}", sim.origin),
        access_token: String::new(),
        financial_id: String::new(),
        trace: None,
        bank_consent_id: key.to_owned(),
    };
    let from_bg = connector.fetch_refresh(&bg, long_ago()).await.unwrap();
    let obie = crate::support::connector(quick())
        .fetch_refresh(&sim.access(key), long_ago())
        .await
        .unwrap();
    let ids = |d: &refresh_bank::BankData| {
        d.accounts
            .iter()
            .map(|a| a.account_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&from_bg), ids(&obie));
    assert_eq!(from_bg.balances.len(), obie.balances.len());
    // Same transactions (BG has no rejected ones), same amounts and directions.
    let key_of = |t: &refresh_bank::Transaction| {
        (
            t.account_id.clone(),
            t.transaction_id.clone(),
            t.amount.to_string(),
            t.credit_debit.as_str(),
            t.status.as_str(),
        )
    };
    let mut want: Vec<_> = obie
        .transactions
        .iter()
        .filter(|t| t.status != TransactionStatus::Rejected)
        .map(key_of)
        .collect();
    let mut got: Vec<_> = from_bg.transactions.iter().map(key_of).collect();
    want.sort();
    got.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);
    assert_eq!(
        dataset["accounts"].as_array().unwrap().len(),
        from_bg.accounts.len()
    );
    // Pages followed, each call logged under the dialect's prefix with its query.
    let calls = sim.calls(key).await;
    let bg_calls: Vec<&Value> = calls
        .iter()
        .filter(|c| c["path"].as_str().unwrap().starts_with(BERLIN_GROUP_PREFIX))
        .collect();
    assert!(
        bg_calls
            .iter()
            .any(|c| c["query"].as_str().unwrap_or_default().contains("page=2"))
    );
    assert!(bg_calls.iter().all(|c| c["status"] == 200));

    // Each answer of the dialect is valid NextGenPSD2 1.3.6.
    let openapi = openapi();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let request = http
            .get(format!("{}{BERLIN_GROUP_PREFIX}{path}", sim.origin))
            .header("Consent-ID", key)
            .header("X-Request-ID", uuid::Uuid::new_v4().to_string());
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    assert_valid(&openapi, "accountList", &get("/v1/accounts".into()).await);
    for account in &from_bg.accounts {
        let id = &account.account_id;
        let balances = get(format!("/v1/accounts/{id}/balances")).await;
        assert_valid(&openapi, "readAccountBalanceResponse-200", &balances);
        let mut path =
            format!("/v1/accounts/{id}/transactions?bookingStatus=both&dateFrom=2000-01-01");
        loop {
            let page = get(path.clone()).await;
            assert_valid(&openapi, "transactionsResponse-200_json", &page);
            match page["transactions"]["_links"]["next"]["href"].as_str() {
                Some(next) => path = next.trim_start_matches(BERLIN_GROUP_PREFIX).to_owned(),
                None => break,
            }
        }
    }

    // The scenario applies to the dialect too.
    sim.scenario(key, json!({"revoked": true})).await;
    assert_eq!(
        connector.fetch_refresh(&bg, long_ago()).await.unwrap_err(),
        BankError::Revoked
    );
    sim.scenario(key, json!({"revoked": false, "mfaRequired": true}))
        .await;
    assert_eq!(
        connector.fetch_refresh(&bg, long_ago()).await.unwrap_err(),
        BankError::MfaRequired
    );
    sim.scenario(
        key,
        json!({"mfaRequired": false, "failNext": {"count": 1, "status": 429}}),
    )
    .await;
    assert_eq!(
        connector.fetch_refresh(&bg, long_ago()).await.unwrap_err(),
        BankError::Transient {
            retry_after: Some(Duration::from_secs(1)),
            reason: "http status 429 ACCESS_EXCEEDED".into()
        }
    );
}
