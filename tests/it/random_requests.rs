//! Property-based requests against a running ingress: random methods, paths (the
//! routes with random segments, and random paths), query strings, headers and bodies.
//! Whatever comes in, the ingress answers (no panic drops a connection), never with a
//! 5xx, and every error is `application/problem+json` (the portal's HTML pages and
//! the synchronous compatibility route's own JSON shape aside). It stays up.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use refresh_tests::{dev_token, spawn_app_with};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};

/// Cases per run: enough to reach every route with several kinds of junk, and a few
/// seconds on a debug build.
const CASES: u32 = 300;

/// The routes, with `{}` where a path segment goes.
const TEMPLATES: &[&str] = &[
    "/v1/consents",
    "/v1/consents/{}",
    "/v1/consents/{}/refresh",
    "/v1/consents/{}/refreshes",
    "/v1/consents/{}/revoke",
    "/v1/consents/{}/accounts",
    "/v1/consents/{}/balances",
    "/v1/consents/{}/transactions",
    "/v1/consents/{}/parties",
    "/v1/consents/{}/standing-orders",
    "/v1/refreshes/{}",
    "/v1/refreshes/{}/changes",
    "/v1/apps/{}/settings",
    "/v1/events",
    "/stored-data/v1/consents/{}/refresh",
    "/cfa/consent/{}/refresh",
    "/dashboard",
    "/dashboard/login",
    "/dashboard/logout",
    "/dashboard/settings",
    "/dashboard/events",
    "/dashboard/consents/{}/refresh",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/{}",
    "/v1/{}/{}",
];

/// One random request.
#[derive(Debug, Clone)]
struct Case {
    method: Method,
    path: String,
    query: Option<String>,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

/// Bytes as a URL piece: unreserved characters as they are, the rest percent-encoded
/// (so any byte sequence, invalid UTF-8 included, reaches the server).
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn segment(consent: String) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(consent),
        Just(uuid::Uuid::new_v4().to_string()),
        Just("acme".to_owned()),
        "[a-z0-9-]{0,40}",
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| encode(&b)),
        Just("%00%ff".to_owned()),
        Just("..".to_owned()),
    ]
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    // What an HTTP header value may carry: visible ASCII, space, obs-text.
    prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff], 0..80)
}

fn case(consent: String, tokens: Vec<String>) -> impl Strategy<Value = Case> {
    let method = prop::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
    ]);
    let path = (
        prop::sample::select(TEMPLATES),
        segment(consent.clone()),
        segment(consent),
    )
        .prop_map(|(template, a, b)| template.replacen("{}", &a, 1).replacen("{}", &b, 1));
    let query = prop::option::of(prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| encode(&b)),
        "(limit|cursor|status|from|to|accountId|consentId|tenantId|tenant)=[a-zA-Z0-9%-]{0,30}",
        prop::collection::vec(any::<u8>(), 0..30).prop_map(|b| format!("limit={}", encode(&b))),
    ]);
    let mut authorization: Vec<Vec<u8>> = tokens
        .into_iter()
        .map(|t| format!("Bearer {t}").into_bytes())
        .collect();
    authorization.push(b"Bearer".to_vec());
    authorization.push(b"Basic Zm9vOmJhcg==".to_vec());
    let authorization = prop_oneof![
        prop::sample::select(authorization),
        header_bytes().prop_map(|mut b| {
            let mut v = b"Bearer ".to_vec();
            v.append(&mut b);
            v
        }),
    ];
    let content_type = prop_oneof![
        Just(b"application/json".to_vec()),
        Just(b"application/x-www-form-urlencoded".to_vec()),
        Just(b"text/plain".to_vec()),
        Just(b"application/problem+json; charset=utf-8".to_vec()),
        header_bytes(),
    ];
    let headers = (
        prop::option::of(authorization),
        prop::option::of(content_type),
        prop::option::of(header_bytes()),
        prop::option::of((0u8..3).prop_map(|n| format!("wait={n}").into_bytes())),
        prop::option::of(header_bytes()),
        prop::option::of(header_bytes()),
        prop::option::of(header_bytes()),
    )
        .prop_map(|(auth, ct, key, prefer, trace, last, cookie)| {
            let mut headers = Vec::new();
            for (name, value) in [
                ("authorization", auth),
                ("content-type", ct),
                ("idempotency-key", key),
                ("prefer", prefer),
                ("traceparent", trace),
                ("last-event-id", last),
                ("cookie", cookie),
            ] {
                if let Some(value) = value {
                    headers.push((name, value));
                }
            }
            headers
        });
    let body = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..200),
        Just(br#"{"providerId":"sim","bankConsentId":"b","accessToken":"t","expiresAt":"2030-01-01T00:00:00Z"}"#.to_vec()),
        Just(br#"{"autosyncIntervalHours":6,"inactivationDays":30}"#.to_vec()),
        "\\{\"[a-zA-Z]{1,12}\": ?(null|true|-?[0-9]{1,30}|\"[^\"]{0,20}\"|\\[\\]|\\{\\})\\}"
            .prop_map(String::into_bytes),
        Just(b"token=x&csrf=y".to_vec()),
    ];
    (method, path, query, headers, body).prop_map(|(method, path, query, headers, body)| Case {
        method,
        path,
        query,
        headers,
        body,
    })
}

async fn send(client: &reqwest::Client, base: &str, case: &Case) -> Result<(), TestCaseError> {
    let mut url = format!("{base}{}", case.path);
    if let Some(query) = &case.query {
        url.push('?');
        url.push_str(query);
    }
    let mut request = client.request(case.method.clone(), &url);
    for (name, value) in &case.headers {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            request = request.header(HeaderName::from_static(name), value);
        }
    }
    if !case.body.is_empty() {
        request = request.body(case.body.clone());
    }
    let response = request
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer (the ingress dropped it): {e}")))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    prop_assert!(status < 500, "a {status} for {case:?}");
    if content_type == "text/event-stream" {
        // A stream that was let in: it stays open; its headers are the answer.
        return Ok(());
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| TestCaseError::fail(format!("the body broke off: {e}")))?;
    if status >= 400 && case.method != Method::HEAD {
        let path = case.path.as_str();
        let own_shape = (path.starts_with("/dashboard") && content_type.starts_with("text/html"))
            || (path.starts_with("/stored-data/") && content_type == "application/json");
        if !own_shape {
            prop_assert_eq!(
                content_type.as_str(),
                "application/problem+json",
                "{} for {:?}",
                status,
                case
            );
            let problem: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("not JSON ({e}) for {case:?}")))?;
            prop_assert_eq!(&problem["status"], &serde_json::json!(status));
            prop_assert!(problem["code"].is_string() && problem["detail"].is_string());
        }
    }
    Ok(())
}

#[test]
fn random_requests_never_get_a_5xx_and_every_error_is_a_problem() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(spawn_app_with(&[("http.sync_wait_secs", "1")]));
    let api = runtime.block_on(app.start_ingress());
    let consent = runtime
        .block_on(api.seed_consent("acme", None, None))
        .to_string();
    let tokens = vec![
        dev_token(&app, Some("acme"), "api:stored_data"),
        dev_token(&app, Some("globex"), "api:stored_data"),
        dev_token(&app, None, "api:admin"),
        dev_token(&app, Some("acme"), "openid"),
    ];
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&case(consent, tokens), |case| {
        runtime.block_on(send(&client, &api.base, &case))
    });
    if let Err(error) = outcome {
        panic!("{error}");
    }
    // Still up and serving.
    let health = runtime.block_on(async {
        client
            .get(format!("{}/healthz", api.base))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(health.ok(), Some(200));
    drop(api);
    drop(app);
}
