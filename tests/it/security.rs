//! The security matrix over the API routes that exist: every route that needs a
//! token refuses each bad one with the exact 401/403 problem, and another tenant's
//! token never sees a tenant's consent, refresh, history, stored data or settings.

use base64::Engine as _;
use chrono::Utc;
use refresh_tests::{Answer, Api, TestApp, dev_token, spawn_app};
use reqwest::Method;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

/// Every route that needs a token, with a consent id, a refresh id and a tenant
/// filled in.
fn routes(consent: &str, refresh: &str, tenant: &str) -> Vec<(Method, String)> {
    let mut routes = vec![
        (Method::POST, "/v1/consents".to_owned()),
        (Method::GET, format!("/v1/consents/{consent}")),
        (Method::POST, format!("/v1/consents/{consent}/refresh")),
        (Method::GET, format!("/v1/consents/{consent}/refreshes")),
        (Method::POST, format!("/v1/consents/{consent}/revoke")),
        (Method::GET, format!("/v1/refreshes/{refresh}")),
        (Method::GET, format!("/v1/apps/{tenant}/settings")),
        (Method::PUT, format!("/v1/apps/{tenant}/settings")),
        (
            Method::POST,
            format!("/stored-data/v1/consents/{consent}/refresh"),
        ),
        (Method::POST, format!("/cfa/consent/{consent}/refresh")),
        (Method::GET, format!("/v1/events?consentId={consent}")),
    ];
    for kind in [
        "accounts",
        "balances",
        "transactions",
        "parties",
        "beneficiaries",
        "direct-debits",
        "standing-orders",
        "scheduled-payments",
        "statements",
        "products",
    ] {
        routes.push((Method::GET, format!("/v1/consents/{consent}/{kind}")));
    }
    routes
}

/// The refusal a case expects: status, code, detail.
type Expected = (u16, &'static str, &'static str);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn signed(secret: &[u8], header: &jsonwebtoken::Header, claims: &Value) -> String {
    jsonwebtoken::encode(
        header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn assert_refused(answer: &Answer, status: u16, code: &str, detail: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(answer.body["code"], code, "{what}: {answer:?}");
    assert_eq!(answer.body["detail"], detail, "{what}: {answer:?}");
    if status == 401 {
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"), "{what}");
    }
}

async fn call(api: &Api, method: &Method, path: &str, authorization: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    // A valid body where a route reads one, so a refusal is about the caller.
    let body = if path.ends_with("/settings") {
        json!({"autosyncIntervalHours": null, "inactivationDays": 30})
    } else {
        json!({})
    };
    let body = (*method != Method::GET).then_some(&body);
    api.call(method.clone(), path, None, body, &headers).await
}

async fn seeded(app: &TestApp, api: &Api) -> (String, String) {
    let token = dev_token(app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await.to_string();
    let refresh = api.refresh(&token, &consent).await;
    (consent, refresh)
}

/// The bad `Authorization` values of the matrix and the problem each must get.
fn bad_tokens(app: &TestApp) -> Vec<(&'static str, Option<String>, Expected)> {
    let secret = app
        .settings
        .auth
        .jwt_hs256_secret
        .as_ref()
        .unwrap()
        .expose_secret()
        .as_bytes()
        .to_vec();
    let now = Utc::now().timestamp();
    let claims = |extra: Value| {
        let mut claims = json!({"scope": STORED, "tenant_id": "acme", "exp": now + 3600});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        claims
    };
    let hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let bearer = |t: String| format!("Bearer {t}");
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(json!({})).to_string().as_bytes())
    );
    // An HMAC signature under a header claiming RS256 (algorithm confusion).
    let confused = {
        let good = signed(&secret, &hs256, &claims(json!({})));
        let mut parts = good.split('.');
        let (_, payload, signature) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        format!(
            "{}.{payload}.{signature}",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#)
        )
    };
    let invalid = (401, "unauthorized", "The token is invalid");
    vec![
        (
            "no token",
            None,
            (401, "unauthorized", "A bearer token is required"),
        ),
        (
            "not bearer",
            Some("Basic YWRtaW46YWRtaW4=".to_owned()),
            (
                401,
                "unauthorized",
                "The Authorization header must be 'Bearer <token>'",
            ),
        ),
        ("malformed", Some(bearer("not.a.jwt".to_owned())), invalid),
        (
            "bad signature",
            Some(bearer(signed(
                b"another secret of at least 32 bytes!",
                &hs256,
                &claims(json!({})),
            ))),
            invalid,
        ),
        ("alg none", Some(bearer(alg_none)), invalid),
        (
            "RS256 header, HMAC signature",
            Some(bearer(confused)),
            invalid,
        ),
        (
            "expired",
            Some(bearer(signed(
                &secret,
                &hs256,
                &claims(json!({"exp": now - 3600})),
            ))),
            (401, "unauthorized", "The token has expired"),
        ),
        (
            "not yet valid",
            Some(bearer(signed(
                &secret,
                &hs256,
                &claims(json!({"nbf": now + 600})),
            ))),
            (401, "unauthorized", "The token is not valid yet"),
        ),
        (
            "no exp",
            Some(bearer(signed(
                &secret,
                &hs256,
                &json!({"scope": STORED, "tenant_id": "acme"}),
            ))),
            invalid,
        ),
        (
            "no tenant_id",
            Some(bearer(signed(
                &secret,
                &hs256,
                &json!({"scope": STORED, "exp": now + 3600}),
            ))),
            (401, "unauthorized", "The token has no tenant_id claim"),
        ),
        (
            "wrong scope",
            Some(bearer(signed(
                &secret,
                &hs256,
                &claims(json!({"scope": "openid profile"})),
            ))),
            (
                403,
                "insufficient_scope",
                "The token's scope does not allow this operation",
            ),
        ),
    ]
}

#[tokio::test]
async fn every_route_refuses_every_bad_token_with_the_exact_problem() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let (consent, refresh) = seeded(&app, &api).await;
    let cases = bad_tokens(&app);
    for (method, path) in routes(&consent, &refresh, "acme") {
        for (what, authorization, (status, code, detail)) in &cases {
            let answer = call(&api, &method, &path, authorization.as_deref()).await;
            assert_refused(
                &answer,
                *status,
                code,
                detail,
                &format!("{method} {path}, {what}"),
            );
        }
    }
    // Nothing was admitted or changed by any of them.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn another_tenants_token_never_sees_a_tenants_resources() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let (consent, refresh) = seeded(&app, &api).await;
    let other = dev_token(&app, Some("globex"), STORED);
    for (method, path) in routes(&consent, &refresh, "acme") {
        if path == "/v1/consents" {
            continue;
        }
        let answer = call(&api, &method, &path, Some(&format!("Bearer {other}"))).await;
        let what = format!("{method} {path}");
        assert!(
            answer.status == 404 || answer.status == 403,
            "{what}: {answer:?}"
        );
        if path.starts_with("/stored-data/") {
            // SPEC §3: this compatibility route answers in its own shape.
            assert_eq!(
                answer.body["statusCode"], answer.status,
                "{what}: {answer:?}"
            );
        } else {
            assert_eq!(
                answer.header("content-type"),
                Some("application/problem+json"),
                "{what}"
            );
        }
        let text = answer.body.to_string();
        assert!(!text.contains(&refresh), "{what} shows the refresh: {text}");
        if answer.status == 404 && path.contains(&consent) && path.starts_with("/v1/") {
            assert_eq!(
                answer.body["code"], "consent_not_found",
                "{what}: {answer:?}"
            );
        }
    }
    // The tenant's consent is untouched: still active, one refresh.
    let status: String = sqlx::query_scalar("SELECT status FROM consents")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(status, "ACTIVE");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// Sends raw bytes as the body with a content type.
async fn send_raw(
    api: &Api,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Answer {
    let mut headers = vec![("content-type", content_type.to_owned())];
    if let Some(token) = token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    let mut request = api
        .client
        .request(method, format!("{}{path}", api.base))
        .body(body);
    for (name, value) in &headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

fn assert_problem_shape(answer: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{what}: {answer:?}"
    );
    assert_eq!(answer.body["code"], code, "{what}: {answer:?}");
    assert_eq!(answer.body["status"], status, "{what}: {answer:?}");
    assert!(answer.body["type"].is_string(), "{what}: {answer:?}");
    assert!(answer.body["title"].is_string(), "{what}: {answer:?}");
    let detail = answer.body["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{what}: {answer:?}");
    // A person's words, never the parser's.
    for internal in ["Failed to", "serde", "UTF-8 in `", "Invalid URL", "`"] {
        assert!(!detail.contains(internal), "{what}: {detail}");
    }
}

#[tokio::test]
async fn what_the_router_rejects_is_answered_as_a_problem() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let bad_path = "the path is not valid: its percent-escapes must decode to UTF-8 text";
    let cases: Vec<(Method, String, u16, &str, Option<&str>)> = vec![
        (
            Method::GET,
            "/v1/consents/%00%ff".into(),
            400,
            "bad_request",
            Some(bad_path),
        ),
        (
            Method::POST,
            "/v1/consents/%ff%fe/refresh".into(),
            400,
            "bad_request",
            Some(bad_path),
        ),
        (
            Method::GET,
            "/v1/refreshes/%c3%28".into(),
            400,
            "bad_request",
            Some(bad_path),
        ),
        (
            Method::GET,
            "/v1/apps/%ff/settings".into(),
            400,
            "bad_request",
            Some(bad_path),
        ),
        (
            Method::GET,
            "/v1/consents/not-a-uuid".into(),
            400,
            "bad_request",
            Some("consentId \"not-a-uuid\" is not a UUID"),
        ),
        (
            Method::GET,
            "/v1/refreshes/42".into(),
            400,
            "bad_request",
            Some("refreshId \"42\" is not a UUID"),
        ),
        (
            Method::GET,
            "/v1/consents?limit=many".into(),
            400,
            "bad_request",
            Some("limit must be a whole number from 1 to 200"),
        ),
        (
            Method::GET,
            "/v1/consents?color=red".into(),
            400,
            "bad_request",
            None,
        ),
        (
            Method::GET,
            format!("/v1/consents/{consent}/transactions?from=yesterday"),
            400,
            "bad_request",
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/consents/{consent}"),
            405,
            "method_not_allowed",
            None,
        ),
        (
            Method::GET,
            "/dashboard/logout".into(),
            405,
            "method_not_allowed",
            None,
        ),
        (
            Method::PUT,
            "/dashboard/login".into(),
            405,
            "method_not_allowed",
            None,
        ),
        (
            Method::GET,
            "/v2/anything".into(),
            404,
            "not_found",
            Some("No such route"),
        ),
        (
            Method::GET,
            "/dashboard/nothing-here".into(),
            404,
            "not_found",
            Some("No such route"),
        ),
    ];
    for (method, path, status, code, detail) in cases {
        let answer = api
            .call(method.clone(), &path, Some(&token), None, &[])
            .await;
        let what = format!("{method} {path}");
        assert_problem_shape(&answer, status, code, &what);
        if let Some(detail) = detail {
            assert_eq!(answer.body["detail"], detail, "{what}");
        }
        if status == 405 {
            assert!(answer.header("allow").is_some(), "{what}: {answer:?}");
        }
    }

    // Bodies: broken JSON, not JSON, the wrong shape, too large; a portal form sent
    // as something else.
    let register = "/v1/consents";
    let bodies: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            register,
            "application/json",
            b"{".to_vec(),
            400,
            "bad_request",
        ),
        (
            register,
            "application/json",
            b"\xff\xfe".to_vec(),
            400,
            "bad_request",
        ),
        (register, "text/plain", b"{}".to_vec(), 400, "bad_request"),
        (
            register,
            "application/json",
            b"[1]".to_vec(),
            400,
            "bad_request",
        ),
        (
            register,
            "application/json",
            br#"{"providerId": 7}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            register,
            "application/json",
            vec![b' '; 70 * 1024],
            413,
            "payload_too_large",
        ),
        (
            "/v1/apps/acme/settings",
            "application/json",
            br#"{"inactivationDays": "ninety"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/dashboard/login",
            "application/json",
            br#"{"token": "x"}"#.to_vec(),
            400,
            "bad_request",
        ),
    ];
    for (path, content_type, body, status, code) in bodies {
        let method = if path.ends_with("/settings") {
            Method::PUT
        } else {
            Method::POST
        };
        let what = format!("{method} {path} as {content_type} ({} bytes)", body.len());
        let answer = send_raw(&api, method, path, Some(&token), content_type, body).await;
        assert_problem_shape(&answer, status, code, &what);
    }
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM consents")
            .fetch_one(&app.pg)
            .await
            .unwrap(),
        1,
        "nothing registered"
    );
}

const DEPLOYMENT_PRIVATE: &str = include_str!("../fixtures/jwt/deployment.private.pem");
const DEPLOYMENT_PUBLIC: &str = include_str!("../fixtures/jwt/deployment.public.pem");
const OTHER_PRIVATE: &str = include_str!("../fixtures/jwt/other.private.pem");

fn rs256(private_pem: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn an_rs256_deployment_takes_only_tokens_signed_by_its_key() {
    let app =
        refresh_tests::spawn_app_with(&[("auth.jwt_rs256_public_key_pem", DEPLOYMENT_PUBLIC)])
            .await;
    let api = app.start_ingress().await;
    let consent = api.seed_consent("acme", None, None).await.to_string();
    let claims =
        json!({"scope": STORED, "tenant_id": "acme", "exp": Utc::now().timestamp() + 3600});
    let hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);

    let good = rs256(DEPLOYMENT_PRIVATE, &claims);
    let answer = api.get(&format!("/v1/consents/{consent}"), &good).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["consentId"], consent.as_str());
    let refresh = api.refresh(&good, &consent).await;

    let invalid = (401, "unauthorized", "The token is invalid");
    let cases: Vec<(&str, String)> = vec![
        // The classic confusion: the public key, which is no secret, as an HMAC key.
        (
            "HS256 signed with the public key's PEM",
            signed(DEPLOYMENT_PUBLIC.as_bytes(), &hs256, &claims),
        ),
        (
            "HS256 signed with the dev secret",
            signed(
                app.settings
                    .auth
                    .jwt_hs256_secret
                    .as_ref()
                    .unwrap()
                    .expose_secret()
                    .as_bytes(),
                &hs256,
                &claims,
            ),
        ),
        ("RS256 of another key", rs256(OTHER_PRIVATE, &claims)),
    ];
    for (method, path) in routes(&consent, &refresh, "acme") {
        for (what, token) in &cases {
            let answer = call(&api, &method, &path, Some(&format!("Bearer {token}"))).await;
            let (status, code, detail) = invalid;
            assert_refused(
                &answer,
                status,
                code,
                detail,
                &format!("{method} {path}, {what}"),
            );
        }
    }
    // The portal signs in with the same verifier.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (token, expected) in [(&cases[0].1, 401), (&good, 303)] {
        let (cookie, csrf) = login_form(&client, &api.base).await;
        let response = client
            .post(format!("{}/dashboard/login", api.base))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", token.as_str()), ("csrf", csrf.as_str())]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected);
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the RS256 token's refresh");
}

#[tokio::test]
async fn an_hs256_deployment_refuses_rs256_tokens() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let (consent, refresh) = seeded(&app, &api).await;
    let claims =
        json!({"scope": STORED, "tenant_id": "acme", "exp": Utc::now().timestamp() + 3600});
    let token = rs256(DEPLOYMENT_PRIVATE, &claims);
    for (method, path) in routes(&consent, &refresh, "acme") {
        let answer = call(&api, &method, &path, Some(&format!("Bearer {token}"))).await;
        assert_refused(
            &answer,
            401,
            "unauthorized",
            "The token is invalid",
            &format!("{method} {path}, RS256 against HS256"),
        );
    }
}

/// The sign-in form's cookie and CSRF token.
async fn login_form(client: &reqwest::Client, base: &str) -> (String, String) {
    let response = client
        .get(format!("{base}/dashboard/login"))
        .send()
        .await
        .unwrap();
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_owned();
    let html = response.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    (cookie, csrf)
}

/// An `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Posts the sign-in form with `token`: the answer.
async fn post_login(client: &reqwest::Client, base: &str, token: &str) -> reqwest::Response {
    let (cookie, csrf) = login_form(client, base).await;
    client
        .post(format!("{base}/dashboard/login"))
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", token), ("csrf", &csrf)]))
        .send()
        .await
        .unwrap()
}

/// Signs in; the session cookie (`name=value`) and the page's CSRF token.
async fn portal_session(client: &reqwest::Client, base: &str, token: &str) -> (String, String) {
    let signed = post_login(client, base, token).await;
    assert_eq!(signed.status(), 303);
    let session = signed
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("refreshd_session="))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    let html = client
        .get(format!("{base}/dashboard"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    (session, csrf)
}

/// A portal answer as an [`Answer`] (JSON or problem bodies parsed, pages as text).
async fn portal_answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

/// The portal's calls that need a session, sent with `cookie` (and a CSRF token).
async fn portal_calls(
    client: &reqwest::Client,
    api: &Api,
    cookie: &str,
    csrf: &str,
    consent: &str,
) -> Vec<(String, Answer)> {
    let base = &api.base;
    let mut answers = Vec::new();
    let get = |path: &str| client.get(format!("{base}{path}")).header("cookie", cookie);
    for path in ["/dashboard", "/dashboard/events"] {
        answers.push((
            format!("GET {path}"),
            portal_answer(get(path).send().await.unwrap()).await,
        ));
    }
    let post = |path: &str| {
        client
            .post(format!("{base}{path}"))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-csrf-token", csrf)
    };
    for (path, body) in [
        ("/dashboard/logout".to_owned(), form(&[("csrf", csrf)])),
        (
            "/dashboard/settings".to_owned(),
            form(&[
                ("csrf", csrf),
                ("tenant", "acme"),
                ("autosyncIntervalHours", "6"),
                ("inactivationDays", "30"),
            ]),
        ),
        (
            format!("/dashboard/consents/{consent}/refresh"),
            String::new(),
        ),
    ] {
        let response = post(&path).body(body).send().await.unwrap();
        answers.push((format!("POST {path}"), portal_answer(response).await));
    }
    answers
}

/// What a call without a valid session gets: the pages send to the sign-in page, the
/// script's calls get 401.
fn assert_signed_out(call: &str, what: &str, answer: &Answer) {
    if call.starts_with("POST /dashboard/consents/") || call == "GET /dashboard/events" {
        assert_refused(
            answer,
            401,
            "unauthorized",
            "The session has ended; sign in again",
            what,
        );
    } else {
        assert_eq!(answer.status, 303, "{what}: {answer:?}");
        assert_eq!(
            answer.header("location"),
            Some("/dashboard/login"),
            "{what}"
        );
    }
}

#[tokio::test]
async fn the_portal_refuses_every_bad_token_and_session_and_shows_a_tenant_only_its_own() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let (consent, refresh) = seeded(&app, &api).await;
    let client = no_redirects();

    // Sign-in with each bad token: the form again with the problem's status and
    // detail, and no session.
    for (what, authorization, (status, _, detail)) in bad_tokens(&app) {
        let Some(token) = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
        else {
            continue;
        };
        let response = post_login(&client, &api.base, token).await;
        assert_eq!(response.status().as_u16(), status, "sign-in, {what}");
        let cookies: Vec<String> = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        assert!(
            !cookies.iter().any(|c| c.starts_with("refreshd_session=")),
            "sign-in, {what}: {cookies:?}"
        );
        let html = response.text().await.unwrap();
        let escaped = detail.replace('\'', "&#x27;");
        assert!(
            html.contains(detail)
                || html.contains(&escaped)
                || html.contains(&detail.replace('\'', "&#39;")),
            "sign-in, {what}: the page says {detail:?}"
        );
    }
    for token in ["", "not.a.jwt"] {
        let response = post_login(&client, &api.base, token).await;
        assert_eq!(response.status().as_u16(), 401, "sign-in with {token:?}");
    }

    // No session, a made-up one, a malformed cookie: nothing but the sign-in page.
    let forged = format!("refreshd_session={}", "ab".repeat(32));
    for cookie in [
        "",
        forged.as_str(),
        "refreshd_session=%00%ff",
        "refreshd_session",
    ] {
        for (what, answer) in portal_calls(&client, &api, cookie, &"cd".repeat(32), &consent).await
        {
            assert_signed_out(&what, &format!("{what} with {cookie:?}"), &answer);
        }
    }

    // Another tenant's session: acme's consent is not found, its settings are not
    // touched, its events never reach the stream.
    let globex = dev_token(&app, Some("globex"), STORED);
    let (session, csrf) = portal_session(&client, &api.base, &globex).await;
    let page = client
        .get(format!("{}/dashboard?tenant=acme", api.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains(&consent) && !page.contains(&refresh),
        "acme's consent on globex's page"
    );
    let refused = portal_answer(
        client
            .post(format!("{}/dashboard/consents/{consent}/refresh", api.base))
            .header("cookie", &session)
            .header("x-csrf-token", &csrf)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_refused(
        &refused,
        404,
        "consent_not_found",
        &refresh_core::Problem::consent_not_found().detail,
        "globex refreshes acme's consent",
    );
    let saved = client
        .post(format!("{}/dashboard/settings", api.base))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("csrf", &csrf),
            ("tenant", "acme"),
            ("autosyncIntervalHours", "6"),
            ("inactivationDays", "30"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 303);
    let tenants: Vec<String> = sqlx::query_scalar("SELECT tenant_id FROM tenant_settings")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    assert_eq!(
        tenants,
        ["globex"],
        "the tenant field names no other tenant"
    );

    let acme = dev_token(&app, Some("acme"), STORED);
    let (acme_session, _) = portal_session(&client, &api.base, &acme).await;
    let mut theirs = client
        .get(format!("{}/dashboard/events?tenant=acme", api.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 200);
    let mut mine = client
        .get(format!("{}/dashboard/events", api.base))
        .header("cookie", &acme_session)
        .send()
        .await
        .unwrap();
    let mut v1_theirs = api
        .client
        .get(format!("{}/v1/events", api.base))
        .bearer_auth(&globex)
        .send()
        .await
        .unwrap();
    assert_eq!(v1_theirs.status(), 200);
    api.complete(consent.parse().unwrap(), &refresh).await;
    let second = api.refresh(&acme, &consent).await;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.contains(&second) {
        let chunk = tokio::time::timeout_at(deadline, mine.chunk())
            .await
            .expect("acme's stream shows acme's refresh")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    for (what, stream) in [
        ("/dashboard/events", &mut theirs),
        ("/v1/events", &mut v1_theirs),
    ] {
        let mut text = String::new();
        let quiet = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(quiet, stream.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(
            !text.contains(&consent) && !text.contains(&second),
            "globex's {what} shows acme's events: {text}"
        );
    }
}

/// Every answer of a flow, as text: status, headers and body.
struct Recorder {
    client: reqwest::Client,
    base: String,
    token: String,
    seen: String,
}

impl Recorder {
    async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("prefer", "wait=20");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        self.seen
            .push_str(&format!("{method} {path} -> {status}\n"));
        for (name, value) in response.headers() {
            self.seen.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let bytes = response.bytes().await.unwrap();
        self.seen.push_str(&String::from_utf8_lossy(&bytes));
        self.seen.push('\n');
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }
}

/// The namespace's tables whose rows, as text, contain `needle`.
async fn tables_containing(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = $1")
            .bind(&app.namespace)
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert!(tables.len() > 5, "the namespace's tables: {tables:?}");
    let mut found = Vec::new();
    for table in tables {
        // The table names come from the catalogue, not from input.
        let hits: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{table}\" t WHERE strpos(t::text, $1) > 0"
        )))
        .bind(needle)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        if hits > 0 {
            found.push(table);
        }
    }
    found
}

#[tokio::test]
async fn bank_tokens_never_appear_in_a_response_a_log_line_or_the_database() {
    let (app, _api, _bank) = refresh_tests::app_with_bank(&[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    // Both roles that handle the token, as the binary runs them, logging everything.
    let mut ingress = refresh_tests::WorkerProcess::spawn_logged(
        &app,
        "ingress",
        &[("http.bind", &bind)],
        "trace",
    );
    let mut worker = refresh_tests::WorkerProcess::spawn_logged(&app, "worker", &[], "trace");
    let token = dev_token(&app, Some("acme"), STORED);
    let mut flow = Recorder {
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: format!("http://{bind}"),
        token: token.clone(),
        seen: String::new(),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while flow
        .client
        .get(format!("{}/readyz", flow.base))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        ingress.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ingress never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // The simulator knows a consent by this access token (SPEC §5).
    let bank_token = format!("banktoken{}", uuid::Uuid::new_v4().simple());
    let mut events = flow
        .client
        .get(format!("{}/v1/events", flow.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let expires = (Utc::now() + chrono::TimeDelta::days(30)).to_rfc3339();
    let registration = json!({"providerId": "sim", "bankConsentId": "bank-consent-1", "accessToken": bank_token, "expiresAt": expires});
    let registered = flow
        .call(Method::POST, "/v1/consents", Some(&registration))
        .await;
    let consent = registered["consentId"].as_str().unwrap().to_owned();
    // The initial load, through the worker and the bank.
    let mut initial = Value::Null;
    while initial["status"] != "UPDATED" {
        worker.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no initial load: {initial}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let history = flow
            .call(
                Method::GET,
                &format!("/v1/consents/{consent}/refreshes"),
                None,
            )
            .await;
        initial = history["items"][0].clone();
        assert_ne!(initial["status"], "ERROR", "{history}");
    }
    let accounts = flow
        .call(
            Method::GET,
            &format!("/v1/consents/{consent}/accounts"),
            None,
        )
        .await;
    assert!(
        accounts["items"].as_array().is_some_and(|a| !a.is_empty()),
        "the bank was reached with the token: {accounts}"
    );
    // A refresh held until it is terminal, then everything the API shows.
    let refreshed = flow
        .call(
            Method::POST,
            &format!("/v1/consents/{consent}/refresh"),
            None,
        )
        .await;
    assert_eq!(refreshed["status"], "UPDATED", "{refreshed}");
    let refresh = refreshed["refreshId"].as_str().unwrap().to_owned();
    let mut paths = vec![
        "/v1/consents".to_owned(),
        format!("/v1/consents/{consent}"),
        format!("/v1/refreshes/{refresh}"),
        format!("/v1/refreshes/{refresh}/changes"),
        format!(
            "/v1/refreshes/{}/changes",
            initial["refreshId"].as_str().unwrap()
        ),
        "/v1/apps/acme/settings".to_owned(),
        "/openapi.json".to_owned(),
        "/metrics".to_owned(),
        "/readyz".to_owned(),
    ];
    for kind in [
        "balances",
        "transactions",
        "parties",
        "beneficiaries",
        "direct-debits",
        "standing-orders",
        "scheduled-payments",
        "statements",
        "products",
    ] {
        paths.push(format!("/v1/consents/{consent}/{kind}"));
    }
    for path in &paths {
        flow.call(Method::GET, path, None).await;
    }
    // The same registration again (409 names the existing consent), the compatibility
    // routes, a revoke and the consent after it.
    flow.call(Method::POST, "/v1/consents", Some(&registration))
        .await;
    flow.call(
        Method::POST,
        &format!("/stored-data/v1/consents/{consent}/refresh"),
        None,
    )
    .await;
    flow.call(
        Method::POST,
        &format!("/cfa/consent/{consent}/refresh"),
        None,
    )
    .await;
    flow.call(
        Method::POST,
        &format!("/v1/consents/{consent}/revoke"),
        None,
    )
    .await;
    flow.call(Method::GET, &format!("/v1/consents/{consent}"), None)
        .await;
    // The portal's page of the tenant.
    let client = no_redirects();
    let (session, _) = portal_session(&client, &flow.base, &token).await;
    let page = client
        .get(format!("{}/dashboard", flow.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&consent));
    flow.seen.push_str(&page);
    // The event stream of the whole flow.
    let quiet = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut stream = String::new();
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(quiet, events.chunk()).await {
        stream.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        stream.contains(&refresh),
        "the stream carried the flow: {stream}"
    );
    flow.seen.push_str(&stream);

    assert!(flow.seen.contains(&consent));
    assert!(
        !flow.seen.contains(&bank_token),
        "a response shows the bank token"
    );

    // The logs at trace, of both processes.
    worker.assert_running();
    ingress.assert_running();
    // Each log covers the flow: the ingress stored the registration, the worker ran
    // the refreshes.
    for (role, process, mark) in [
        ("ingress", &ingress, "INSERT INTO consents"),
        ("worker", &worker, refresh.as_str()),
    ] {
        let log = process.log();
        assert!(
            log.contains(mark),
            "the {role}'s trace log covers the flow ({} bytes)",
            log.len()
        );
        assert!(log.contains("TRACE"), "the {role} logged at trace");
        if let Some(line) = log.lines().find(|l| l.contains(&bank_token)) {
            panic!("the {role} logged the bank token: {line}");
        }
    }

    // At rest: no table holds the token as text, hex or base64.
    use base64::Engine as _;
    let hex: String = bank_token.bytes().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bank_token);
    for needle in [bank_token.as_str(), hex.as_str(), b64.trim_end_matches('=')] {
        let found = tables_containing(&app, needle).await;
        assert!(found.is_empty(), "{needle:?} is stored in {found:?}");
    }
    // The search itself finds what is there.
    let found = tables_containing(&app, "bank-consent-1").await;
    assert!(found.contains(&"consents".to_owned()), "{found:?}");
}
