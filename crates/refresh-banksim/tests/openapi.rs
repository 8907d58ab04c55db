//! Every OBIE answer of the simulator validates against the response schemas
//! of the OBIE v3.1.11 `openapi.yaml` (shared/reference), for several consent
//! keys and across all pages.

// Test helpers may unwrap like the tests do (clippy.toml allows it only
// inside test functions): a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use jsonschema::Validator;
use refresh_banksim::{API_PREFIX, SimSettings, router};
use serde_json::{Value, json};
use tower::ServiceExt;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/obie-aisp-3.1.11/openapi.yaml"
);

/// The response schemas, each compiled with `components` embedded so that
/// `#/components/...` references resolve.
struct Schemas {
    components: Value,
    compiled: HashMap<&'static str, Validator>,
}

impl Schemas {
    fn load() -> Self {
        let path = PathBuf::from(REFERENCE);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the OBIE reference is missing: cannot read {}: {e}",
                path.display()
            )
        });
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let openapi: Value = serde_json::to_value(yaml).unwrap();
        Self {
            components: openapi["components"].clone(),
            compiled: HashMap::new(),
        }
    }

    fn validator(&mut self, schema: &'static str) -> &Validator {
        let components = &self.components;
        self.compiled.entry(schema).or_insert_with(|| {
            assert!(
                components["schemas"].get(schema).is_some(),
                "no schema {schema}"
            );
            let root = json!({
                "$ref": format!("#/components/schemas/{schema}"),
                "components": components,
            });
            jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .should_validate_formats(true)
                .build(&root)
                .unwrap()
        })
    }

    fn errors(&mut self, schema: &'static str, instance: &Value) -> Vec<String> {
        self.validator(schema)
            .iter_errors(instance)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect()
    }

    #[track_caller]
    fn assert_valid(&mut self, schema: &'static str, instance: &Value, what: &str) {
        let errors = self.errors(schema, instance);
        assert!(
            errors.is_empty(),
            "{what} is not a valid {schema}:\n{}",
            errors.join("\n")
        );
    }
}

async fn get(app: &Router, uri: &str, token: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .uri(uri)
        .header("host", "127.0.0.1:8090")
        .header("authorization", format!("Bearer {token}"))
        .header("x-fapi-financial-id", "0015800001041RHAAY")
        .body(Body::empty())
        .unwrap();
    send(app, req).await
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, body)
}

/// Reads every page of `uri`, validating each.
async fn check_pages(
    app: &Router,
    schemas: &mut Schemas,
    schema: &'static str,
    uri: &str,
    token: &str,
) -> usize {
    let mut uri = uri.to_owned();
    let mut pages = 0;
    loop {
        let (status, body) = get(app, &uri, token).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        schemas.assert_valid(schema, &body, &uri);
        pages += 1;
        match body["Links"]["Next"].as_str() {
            Some(next) => {
                uri = next
                    .strip_prefix("http://127.0.0.1:8090")
                    .unwrap()
                    .to_owned()
            }
            None => return pages,
        }
    }
}

#[tokio::test]
async fn simulator_answers_validate_against_openapi() {
    let mut schemas = Schemas::load();
    let app = router(SimSettings {
        page_size: 40,
        ..SimSettings::default()
    });
    let mut transaction_pages = 0;
    let mut accounts_seen = 0;
    for n in 0..6 {
        let token = format!("schema-check-{n}");
        let accounts = check_pages(&app, &mut schemas, "OBReadAccount6", "/accounts", &token).await;
        assert_eq!(accounts, 1);
        let (_, listing) = get(&app, "/accounts", &token).await;
        for account in listing["Data"]["Account"].as_array().unwrap() {
            accounts_seen += 1;
            let id = account["AccountId"].as_str().unwrap();
            let base = format!("{API_PREFIX}/accounts/{id}");
            for (segment, schema) in [
                ("", "OBReadAccount6"),
                ("/balances", "OBReadBalance1"),
                ("/parties", "OBReadParty3"),
                ("/party", "OBReadParty2"),
                ("/beneficiaries", "OBReadBeneficiary5"),
                ("/direct-debits", "OBReadDirectDebit2"),
                ("/standing-orders", "OBReadStandingOrder6"),
                ("/scheduled-payments", "OBReadScheduledPayment3"),
                ("/statements", "OBReadStatement2"),
                ("/product", "OBReadProduct2"),
            ] {
                check_pages(
                    &app,
                    &mut schemas,
                    schema,
                    &format!("{base}{segment}"),
                    &token,
                )
                .await;
            }
            transaction_pages += check_pages(
                &app,
                &mut schemas,
                "OBReadTransaction6",
                &format!("{base}/transactions"),
                &token,
            )
            .await;
            transaction_pages += check_pages(
                &app,
                &mut schemas,
                "OBReadTransaction6",
                &format!("{base}/transactions?fromBookingDateTime=2000-01-01T00:00:00"),
                &token,
            )
            .await;
        }
    }
    assert!(accounts_seen >= 6);
    // Several pages per account at 40 a page: paging was exercised.
    assert!(transaction_pages >= 6 * 2 * 3, "{transaction_pages}");
}

#[tokio::test]
async fn simulator_errors_validate_against_openapi() {
    let mut schemas = Schemas::load();
    let app = router(SimSettings::default());
    let patch = |scenario: Value| {
        Request::builder()
            .method("PATCH")
            .uri("/sim/consents/errors/scenario")
            .header("content-type", "application/json")
            .body(Body::from(scenario.to_string()))
            .unwrap()
    };
    for (scenario, status, code) in [
        (
            json!({"revoked": true}),
            403,
            "UK.OBIE.Resource.InvalidConsentStatus",
        ),
        (
            json!({"revoked": false, "mfaRequired": true}),
            403,
            "UK.OBIE.Reauthenticate",
        ),
        (
            json!({"mfaRequired": false, "failNext": {"count": 1, "status": 500}}),
            500,
            "UK.OBIE.UnexpectedError",
        ),
    ] {
        assert_eq!(send(&app, patch(scenario)).await.0, StatusCode::OK);
        let (got, body) = get(&app, "/accounts", "errors").await;
        assert_eq!(got.as_u16(), status);
        schemas.assert_valid("OBErrorResponse1", &body, code);
        assert_eq!(body["Errors"][0]["ErrorCode"], code);
    }
}

#[test]
fn the_schemas_do_catch_bad_payloads() {
    // The check above is only worth something if the validator refuses what
    // the connector refuses.
    let mut schemas = Schemas::load();
    let balance = |amount: Value| {
        json!({
            "Data": {"Balance": [{
                "AccountId": "1", "CreditDebitIndicator": "Credit", "Type": "InterimBooked",
                "DateTime": "2025-01-01T00:00:00+00:00",
                "Amount": {"Amount": amount, "Currency": "GBP"}
            }]},
            "Links": {"Self": "http://127.0.0.1/accounts/1/balances"}
        })
    };
    assert!(
        schemas
            .errors("OBReadBalance1", &balance(json!("1.00")))
            .is_empty()
    );
    assert!(
        !schemas
            .errors("OBReadBalance1", &balance(json!(1.0)))
            .is_empty()
    );
    assert!(
        !schemas
            .errors("OBReadBalance1", &balance(json!("1.000001")))
            .is_empty()
    );
    let mut one = balance(json!("1.00"));
    one["Data"]["Balance"] = one["Data"]["Balance"][0].clone();
    assert!(!schemas.errors("OBReadBalance1", &one).is_empty());
    let mut stray = balance(json!("1.00"));
    stray["Data"]["Links"] = json!({"Self": "http://x/"});
    stray["Extra"] = json!(1);
    assert!(!schemas.errors("OBReadBalance1", &stray).is_empty());
    let party = json!({"Data": {"Party": [{"PartyId": "p", "AccountId": "1"}]}, "Links": {"Self": "http://x/"}});
    assert!(!schemas.errors("OBReadParty3", &party).is_empty());
}
