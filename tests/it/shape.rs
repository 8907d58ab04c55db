//! One API shape (SPEC §3): 405 problems with `Allow`, 400 details a person reads,
//! required fields, millisecond timestamps, and `GET /v1/consents` keyset pages.

use refresh_tests::{Answer, dev_token, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

fn assert_problem(answer: &Answer, status: u16, code: &str, detail: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{answer:?}"
    );
    assert_eq!(answer.body["code"], code, "{answer:?}");
    assert_eq!(answer.body["status"], status, "{answer:?}");
    assert_eq!(answer.body["detail"], detail, "{answer:?}");
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem_with_allow() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let cases = [
        (Method::DELETE, "/v1/consents", "GET,HEAD,POST"),
        (Method::GET, "/v1/consents/x/refresh", "POST"),
        (Method::POST, "/v1/apps/acme/settings", "GET,HEAD,PUT"),
        (Method::PUT, "/healthz", "GET,HEAD"),
    ];
    for (method, path, allow) in cases {
        let answer = api
            .call(method.clone(), path, Some(&token), None, &[])
            .await;
        assert_problem(
            &answer,
            405,
            "method_not_allowed",
            "This route does not take this method; the Allow header lists those it takes",
        );
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
    }
}

#[tokio::test]
async fn bad_bodies_get_details_a_person_understands() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let put = |body: Value| {
        let api = &api;
        let token = &token;
        async move {
            api.call(
                Method::PUT,
                "/v1/apps/acme/settings",
                Some(token),
                Some(&body),
                &[],
            )
            .await
        }
    };
    let cases = [
        (
            json!({ "inactivationDays": 30 }),
            "autosyncIntervalHours is required",
        ),
        (
            json!({ "autosyncIntervalHours": null }),
            "inactivationDays is required",
        ),
        (
            json!({ "autosyncIntervalHours": "six", "inactivationDays": 30 }),
            "autosyncIntervalHours must be a whole number",
        ),
        (
            json!({ "autosyncIntervalHours": 6, "inactivationDays": 30, "x": 1 }),
            "x is not a known field; expected autosyncIntervalHours or inactivationDays",
        ),
        (json!([1, 2]), "the body must be a JSON object"),
    ];
    for (body, detail) in cases {
        assert_problem(&put(body).await, 400, "bad_request", detail);
    }
    // Not JSON at all, or cut short.
    let raw = |body: &'static str| {
        let api = &api;
        let token = &token;
        async move {
            let response = api
                .client
                .post(format!("{}/v1/consents", api.base))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.json::<Value>().await.unwrap();
            Answer {
                status,
                headers,
                body,
            }
        }
    };
    assert_problem(
        &raw("{\"providerId\": ").await,
        400,
        "bad_request",
        "the body is not valid JSON: it ends before the value is complete",
    );
    assert_problem(
        &raw("{\"providerId\" 1}").await,
        400,
        "bad_request",
        "the body is not valid JSON (line 1, column 15)",
    );
    let register = |body: Value| {
        let api = &api;
        let token = &token;
        async move { api.post("/v1/consents", token, Some(&body)).await }
    };
    assert_problem(
        &register(json!({ "providerId": "sim", "bankConsentId": "b", "accessToken": "t" })).await,
        400,
        "bad_request",
        "expiresAt is required",
    );
    assert_problem(
        &register(json!({ "providerId": "sim", "bankConsentId": "b", "accessToken": "t", "expiresAt": "2099-01" })).await,
        400,
        "bad_request",
        "expiresAt must be an RFC 3339 timestamp, e.g. 2027-01-31T00:00:00Z",
    );
}

/// `2026-12-01T10:00:00.123Z`: exactly three fractional digits.
fn is_millis(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() == 24
            && s.ends_with('Z')
            && s.as_bytes()[19] == b'.'
            && s[20..23].bytes().all(|b| b.is_ascii_digit())
            && chrono::DateTime::parse_from_rfc3339(s).is_ok()
    })
}

#[tokio::test]
async fn timestamps_have_milliseconds_everywhere() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let refresh = api
        .post(&format!("/v1/consents/{consent}/refresh"), &token, None)
        .await;
    for field in ["dateRequested", "notBefore"] {
        assert!(is_millis(&refresh.body[field]), "{field}: {refresh:?}");
    }
    let view = api.get(&format!("/v1/consents/{consent}"), &token).await;
    for field in ["expiresAt", "createdAt"] {
        assert!(is_millis(&view.body[field]), "{field}: {view:?}");
    }
    let record = api
        .get(
            &format!(
                "/v1/refreshes/{}",
                refresh.body["refreshId"].as_str().unwrap()
            ),
            &token,
        )
        .await;
    assert!(is_millis(&record.body["dateRequested"]), "{record:?}");
}

#[tokio::test]
async fn consents_are_listed_newest_first_in_keyset_pages_per_tenant() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let acme = dev_token(&app, Some("acme"), STORED);
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(api.seed_consent("acme", None, None).await.to_string());
    }
    let revoked = api.seed_consent("acme", Some("REVOKED"), None).await;
    let theirs = api.seed_consent("other", None, None).await;
    mine.push(revoked.to_string());
    mine.reverse();

    let mut seen = Vec::new();
    let mut path = "/v1/consents?limit=2".to_owned();
    loop {
        let page = api.get(&path, &acme).await;
        assert_eq!(page.status, 200, "{page:?}");
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        for item in items {
            assert_eq!(item["tenantId"], "acme");
            assert!(
                item["quota"].is_object(),
                "shown as GET /v1/consents/{{id}}"
            );
            seen.push(item["consentId"].as_str().unwrap().to_owned());
        }
        match page.body["nextCursor"].as_str() {
            Some(cursor) => path = format!("/v1/consents?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, mine, "newest first, every consent once");
    assert!(!seen.contains(&theirs.to_string()));

    let only_revoked = api.get("/v1/consents?status=REVOKED", &acme).await;
    assert_eq!(
        only_revoked.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["consentId"].clone())
            .collect::<Vec<_>>(),
        [json!(revoked.to_string())]
    );
    assert_eq!(only_revoked.body["nextCursor"], Value::Null);
    assert_problem(
        &api.get("/v1/consents?tenantId=other", &acme).await,
        403,
        "insufficient_scope",
        "Only an api:admin token may name another tenant",
    );
    assert_problem(
        &api.get("/v1/consents?status=GONE", &acme).await,
        400,
        "bad_request",
        "status must be ACTIVE, REVOKED, EXPIRED or INACTIVE",
    );
    assert_problem(
        &api.get("/v1/consents?limit=0", &acme).await,
        400,
        "bad_request",
        "limit must be a whole number from 1 to 200",
    );
    assert_problem(
        &api.get("/v1/consents?cursor=zz", &acme).await,
        400,
        "bad_request",
        "cursor is not one this API gave out",
    );
    let admin = dev_token(&app, None, "api:admin");
    let other = api.get("/v1/consents?tenantId=other", &admin).await;
    assert_eq!(
        other.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["consentId"].clone())
            .collect::<Vec<_>>(),
        [json!(theirs.to_string())]
    );
    let everyone = api.get("/v1/consents", &admin).await;
    assert_eq!(everyone.body["items"].as_array().unwrap().len(), 7);
}

/// What an external API tester does with `/openapi.json`: every operation, called
/// without a token, with a token of the wrong scope, with malformed and unknown ids,
/// with a malformed query and an empty body, answers only statuses it declares.
#[tokio::test]
async fn every_operation_answers_only_statuses_the_document_declares() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let no_scope = dev_token(&app, Some("acme"), "openid");
    let doc = api.get("/openapi.json", &token).await.body;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let declared: Vec<&String> =
                operation["responses"].as_object().unwrap().keys().collect();
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let with = |id: &str| {
                path.replace("{consentId}", id)
                    .replace("{refreshId}", id)
                    .replace(
                        "{tenantId}",
                        if id == "not-a-uuid" {
                            "bad tenant"
                        } else {
                            "acme"
                        },
                    )
            };
            let unknown = uuid::Uuid::now_v7().to_string();
            let body = operation.get("requestBody").map(|_| json!({}));
            let mut cases: Vec<(String, Option<&str>, Option<Value>)> = vec![
                (with(&unknown), None, None),
                (with(&unknown), Some(no_scope.as_str()), None),
                (with("not-a-uuid"), Some(token.as_str()), body.clone()),
                (with(&unknown), Some(token.as_str()), body.clone()),
            ];
            if operation["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["in"] == "query"))
            {
                cases.push((
                    format!("{}?limit=x&zz=1", with(&unknown)),
                    Some(token.as_str()),
                    None,
                ));
            }
            for (target, auth, body) in cases {
                if path == "/v1/events" && auth == Some(token.as_str()) && !target.contains('?') {
                    continue; // a valid request streams until closed
                }
                let answer = api
                    .call(method.clone(), &target, auth, body.as_ref(), &[])
                    .await;
                let status = answer.status.to_string();
                assert!(
                    declared.contains(&&status),
                    "{method} {target} answered {status}, the document declares {declared:?}: {answer:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked}");
}
