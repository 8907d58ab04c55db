//! The ingress through the real services: SPEC §2 rules, §3 routes and codes with exact
//! bodies, §4 upstream requests and events.

use std::collections::BTreeSet;
use std::time::Duration;

use refresh_core::Job;
use refresh_tests::{
    Answer, Api, Proxy, TestApp, dev_token, ingress_with, spawn_app, spawn_app_with,
};
use reqwest::Method;
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

fn refresh_path(consent: impl std::fmt::Display) -> String {
    format!("/v1/consents/{consent}/refresh")
}

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
    assert!(
        answer.body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://tools.ietf.org/html/")),
        "{answer:?}"
    );
    assert!(answer.body["title"].is_string(), "{answer:?}");
}

async fn started(overrides: &[(&str, &str)]) -> (TestApp, Api) {
    let app = spawn_app_with(overrides).await;
    let api = app.start_ingress().await;
    (app, api)
}

/// Reads one job from the jobs queue.
async fn next_job(api: &Api, consumer: &mut refresh_amqp::Consumer) -> Job {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a job arrives")
        .expect("the consumer is open");
    let job = Job::parse(&delivery.body).expect("the job parses");
    assert_eq!(
        delivery.message_id.as_deref(),
        Some(job.refresh_id.to_string().as_str())
    );
    delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    let _ = api;
    job
}

#[tokio::test]
async fn an_admitted_refresh_is_202_with_location_record_job_history_and_event() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let events = api
        .services
        .broker
        .declare_probe_queue("refresh.#")
        .await
        .unwrap();
    let mut event_consumer = api.services.broker.consume(&events, 10);
    let mut jobs = api
        .services
        .broker
        .consume(&api.services.broker.names().jobs.clone(), 10);

    let answer = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let refresh_id = answer.body["refreshId"].as_str().unwrap().to_owned();
    assert_eq!(
        answer.header("location"),
        Some(format!("/v1/refreshes/{refresh_id}").as_str())
    );
    assert_eq!(answer.body["consentId"], consent.to_string());
    assert_eq!(answer.body["tenantId"], "acme");
    assert_eq!(answer.body["requestedBy"], "API");
    assert_eq!(answer.body["status"], "INITIALIZED");
    for field in ["dateRequested", "notBefore"] {
        assert!(answer.body[field].is_string(), "{field}");
    }
    for field in ["startedAt", "finishedAt", "error", "summary"] {
        assert!(answer.body[field].is_null(), "{field}");
    }
    let uuid: uuid::Uuid = refresh_id.parse().unwrap();
    assert_eq!(uuid.get_version_num(), 7, "refresh ids are UUID v7");

    let job = next_job(&api, &mut jobs).await;
    assert_eq!(job.refresh_id.to_string(), refresh_id);
    assert_eq!(job.consent_id, consent);
    assert!(!job.initial);

    let record = api
        .get(&format!("/v1/refreshes/{refresh_id}"), &token)
        .await;
    assert_eq!(record.status, 200);
    assert_eq!(record.body, answer.body);
    let history = api
        .get(&format!("/v1/consents/{consent}/refreshes"), &token)
        .await;
    assert_eq!(history.status, 200);
    assert_eq!(history.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(history.body["items"][0]["refreshId"], refresh_id.as_str());

    let delivery = tokio::time::timeout(Duration::from_secs(10), event_consumer.next())
        .await
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "io.refreshd.refresh.initialized");
    assert_eq!(event["source"], "refreshd");
    assert_eq!(event["subject"], consent.to_string());
    assert_eq!(event["data"]["refreshId"], refresh_id.as_str());
    assert_eq!(delivery.message_id.as_deref(), event["id"].as_str());

    let view = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.body["refreshing"], true);
    assert_eq!(view.body["status"], "ACTIVE");
    assert_eq!(view.body["quota"]["limit"], 4);
    assert_eq!(view.body["quota"]["used"], 1);
    assert_eq!(view.body["quota"]["window"], "rolling_24h");
    assert!(view.body.get("accessToken").is_none());
}

#[tokio::test]
async fn one_in_flight_then_quota_of_four_per_24h() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;

    let first = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(first.status, 202);
    let busy = api.post(&refresh_path(consent), &token, None).await;
    assert_problem(
        &busy,
        409,
        "refresh_in_progress",
        "A refresh is already in progress for this consent",
    );
    assert_eq!(busy.body["refreshId"], first.body["refreshId"]);
    api.complete(consent, first.body["refreshId"].as_str().unwrap())
        .await;

    for _ in 0..3 {
        let answer = api.post(&refresh_path(consent), &token, None).await;
        assert_eq!(answer.status, 202, "{answer:?}");
        api.complete(consent, answer.body["refreshId"].as_str().unwrap())
            .await;
    }
    let fifth = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(fifth.status, 429, "{fifth:?}");
    assert_eq!(fifth.body["code"], "daily_limit_reached");
    assert_eq!(fifth.body["title"], "Too Many Requests");
    let retry: u64 = fifth.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(fifth.body["retryAfterSeconds"], retry);
    assert!((86_390..=86_400).contains(&retry), "{retry}");
    let minutes = retry.div_ceil(60);
    let expected = format!(
        "Daily limit of 4 requests/consent reached. Try again in {}h{:02}.",
        minutes / 60,
        minutes % 60
    );
    assert_eq!(fifth.body["detail"], expected);
    assert!(expected.ends_with("Try again in 24h00.") || expected.ends_with("Try again in 23h59."));
    assert_eq!(fifth.body["limit"], 4);
    assert_eq!(fifth.body["used"], 4);
    assert_eq!(fifth.body["window"], "rolling_24h");
    assert!(fifth.body["nextRefreshPossibleAt"].is_string());

    // Refusals consumed nothing; the history holds the four admissions.
    let history = api
        .get(&format!("/v1/consents/{consent}/refreshes"), &token)
        .await;
    assert_eq!(history.body["items"].as_array().unwrap().len(), 4);
    // An operator is exempt from the quota and recorded as ADMIN.
    let admin = dev_token(&app, None, "api:admin");
    let by_admin = api.post(&refresh_path(consent), &admin, None).await;
    assert_eq!(by_admin.status, 202, "{by_admin:?}");
    assert_eq!(by_admin.body["requestedBy"], "ADMIN");
}

#[tokio::test]
async fn calendar_day_rule_resets_at_the_next_local_midnight() {
    let dir = std::env::temp_dir().join(format!("refreshd-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("calendar.toml");
    std::fs::write(
        &file,
        "[quota]\ntime_zone = \"America/New_York\"\nrules = [{ sources = [\"API\"], limit = 1, window = \"calendar_day\" }]\n",
    )
    .unwrap();
    let namespace = refresh_tests::fresh_namespace();
    let settings = refreshd::Settings::load(&refreshd::LoadOptions {
        env: Some("dev".into()),
        config_dir: Some(refresh_tests::repo_root().join("config")),
        config_file: Some(file),
        environment_variables: false,
        overrides: vec![("namespace".into(), namespace)],
    })
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let app = refresh_tests::spawn_app_from(settings).await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let first = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(first.status, 202);
    api.complete(consent, first.body["refreshId"].as_str().unwrap())
        .await;
    let second = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.body["window"], "calendar_day");
    let now = chrono::Utc::now();
    let midnight = refresh_core::next_midnight(now, chrono_tz::America::New_York);
    let expected = (midnight - now).num_seconds();
    let retry: i64 = second.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (retry - expected).abs() <= 3,
        "retry-after {retry} vs next New York midnight in {expected}"
    );
    let next: chrono::DateTime<chrono::Utc> = second.body["nextRefreshPossibleAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(next, midnight);
}

/// The consent's facts as the gate mirrors them in Redis (`None`: not mirrored).
async fn mirrored_facts(app: &TestApp, consent: impl std::fmt::Display) -> Option<String> {
    let mut redis = app.redis.clone();
    redis::cmd("GET")
        .arg(format!("{}:{{c:{consent}}}:facts", app.namespace))
        .query_async(&mut redis)
        .await
        .unwrap()
}

/// Revokes a consent in the database alone, as no refreshd path would: its mirrored
/// facts stay ACTIVE.
async fn revoke_in_the_database(app: &TestApp, consent: refresh_core::ConsentId) {
    sqlx::query("UPDATE consents SET status = 'REVOKED' WHERE consent_id = $1")
        .bind(consent.as_uuid())
        .execute(&app.pg)
        .await
        .unwrap();
}

async fn quota_used(api: &Api, consent: impl std::fmt::Display, token: &str) -> (Value, Value) {
    let view = api.get(&format!("/v1/consents/{consent}"), token).await;
    (
        view.body["refreshing"].clone(),
        view.body["quota"]["used"].clone(),
    )
}

/// SPEC §2 rules 1–2 on the consent's facts as mirrored in Redis: a tenant's
/// admission reads them there (stored by the first lookup, written through by a
/// revoke), and a mirror gone stale never changes an answer: the database decides
/// every refusal, and the admission statement refuses a consent the stale facts let
/// past the gate, which is then undone (nothing consumed).
#[tokio::test]
async fn the_gate_decides_on_mirrored_consent_facts_and_a_stale_mirror_never_changes_an_answer() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let revoked = "The consent or account access has been revoked";

    // Not mirrored yet: looked up, then mirrored by the admission.
    let consent = api.seed_consent("acme", None, None).await;
    assert_eq!(mirrored_facts(&app, consent).await, None);
    let done = api.complete_once_admitted(consent);
    assert_eq!(
        api.post(&refresh_path(consent), &token, None).await.status,
        202
    );
    done.await.unwrap();
    let facts = mirrored_facts(&app, consent).await.unwrap();
    assert!(
        facts.starts_with("ACTIVE ") && facts.ends_with(" acme sim"),
        "{facts}"
    );

    // Another tenant's token: 404, whatever the mirror holds.
    assert_problem(
        &api.post(
            &refresh_path(consent),
            &dev_token(&app, Some("other"), STORED),
            None,
        )
        .await,
        404,
        "consent_not_found",
        "Consent not found",
    );

    // Revoked behind the mirror's back: the stale facts let the request past the
    // gate, the admission statement refuses it, the gate is undone.
    revoke_in_the_database(&app, consent).await;
    assert_problem(
        &api.post(&refresh_path(consent), &token, None).await,
        403,
        "consent_revoked",
        revoked,
    );
    assert_eq!(
        quota_used(&api, consent, &token).await,
        (json!(false), json!(1))
    );
    let facts = mirrored_facts(&app, consent).await.unwrap();
    assert!(
        facts.starts_with("REVOKED "),
        "the refusal repaired the mirror: {facts}"
    );

    // Rules 1–2 come before rule 3: a consent revoked behind the mirror's back while
    // a refresh is in flight is refused 403, not 409.
    let busy = api.seed_consent("acme", None, None).await;
    assert_eq!(
        api.post(&refresh_path(busy), &token, None).await.status,
        202
    );
    revoke_in_the_database(&app, busy).await;
    assert_problem(
        &api.post(&refresh_path(busy), &token, None).await,
        403,
        "consent_revoked",
        revoked,
    );

    // A revoke through the API writes the facts through before it answers.
    let third = api.seed_consent("acme", None, None).await;
    let done = api.complete_once_admitted(third);
    assert_eq!(
        api.post(&refresh_path(third), &token, None).await.status,
        202
    );
    done.await.unwrap();
    assert_eq!(
        api.post(&format!("/v1/consents/{third}/revoke"), &token, None)
            .await
            .status,
        200
    );
    let facts = mirrored_facts(&app, third).await.unwrap();
    assert!(facts.starts_with("REVOKED "), "{facts}");
    assert_problem(
        &api.post(&refresh_path(third), &token, None).await,
        403,
        "consent_revoked",
        revoked,
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes WHERE consent_id = ANY($1)")
        .bind(vec![*consent.as_uuid(), *busy.as_uuid(), *third.as_uuid()])
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 3, "one refresh each, none admitted after the revokes");
}

#[tokio::test]
async fn consent_rules_404_and_403_in_order() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let unknown = uuid::Uuid::new_v4();
    assert_problem(
        &api.post(&refresh_path(unknown), &token, None).await,
        404,
        "consent_not_found",
        "Consent not found",
    );
    let others = api.seed_consent("other", None, None).await;
    assert_problem(
        &api.post(&refresh_path(others), &token, None).await,
        404,
        "consent_not_found",
        "Consent not found",
    );
    assert_problem(
        &api.get(&format!("/v1/consents/{others}"), &token).await,
        404,
        "consent_not_found",
        "Consent not found",
    );

    let revoked = api.seed_consent("acme", None, None).await;
    let answer = api
        .post(&format!("/v1/consents/{revoked}/revoke"), &token, None)
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "REVOKED");
    assert_problem(
        &api.post(&refresh_path(revoked), &token, None).await,
        403,
        "consent_revoked",
        "The consent or account access has been revoked",
    );
    let inactive = api.seed_consent("acme", Some("INACTIVE"), None).await;
    assert_problem(
        &api.post(&refresh_path(inactive), &token, None).await,
        403,
        "consent_inactive",
        "The consent is inactive",
    );
    let expired = api
        .seed_consent(
            "acme",
            None,
            Some(chrono::Utc::now() - chrono::TimeDelta::hours(1)),
        )
        .await;
    assert_problem(
        &api.post(&refresh_path(expired), &token, None).await,
        403,
        "consent_expired",
        "The consent has expired",
    );
    // Refusals for a known tenant are announced; nothing was admitted.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn authentication_scopes_and_bad_input() {
    let (app, api) = started(&[]).await;
    let consent = api.seed_consent("acme", None, None).await;
    let path = refresh_path(consent);
    let none = api.call(Method::POST, &path, None, None, &[]).await;
    assert_problem(&none, 401, "unauthorized", "A bearer token is required");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_problem(
        &api.post(&path, "not-a-jwt", None).await,
        401,
        "unauthorized",
        "The token is invalid",
    );
    let secret = secrecy::SecretString::from("another-secret");
    let forged = refresh_ingress::mint_hs256(
        &secret,
        Some(&"acme".parse().unwrap()),
        STORED,
        chrono::Utc::now() + chrono::TimeDelta::hours(1),
    )
    .unwrap();
    assert_problem(
        &api.post(&path, &forged, None).await,
        401,
        "unauthorized",
        "The token is invalid",
    );
    let dev_secret = app.settings.auth.jwt_hs256_secret.clone().unwrap();
    let expired = refresh_ingress::mint_hs256(
        &dev_secret,
        Some(&"acme".parse().unwrap()),
        STORED,
        chrono::Utc::now() - chrono::TimeDelta::hours(1),
    )
    .unwrap();
    assert_problem(
        &api.post(&path, &expired, None).await,
        401,
        "unauthorized",
        "The token has expired",
    );
    let wrong_scope = dev_token(&app, Some("acme"), "api:payments");
    assert_problem(
        &api.post(&path, &wrong_scope, None).await,
        403,
        "insufficient_scope",
        "The token's scope does not allow this operation",
    );

    let token = dev_token(&app, Some("acme"), STORED);
    assert_problem(
        &api.post("/v1/consents/not-a-uuid/refresh", &token, None)
            .await,
        400,
        "bad_request",
        "consentId \"not-a-uuid\" is not a UUID",
    );
    assert_problem(
        &api.get("/v1/refreshes/xyz", &token).await,
        400,
        "bad_request",
        "refreshId \"xyz\" is not a UUID",
    );
    let missing = api
        .get(&format!("/v1/refreshes/{}", uuid::Uuid::now_v7()), &token)
        .await;
    assert_problem(&missing, 404, "not_found", "Refresh not found");
    let bad_body = api
        .post("/v1/consents", &token, Some(&json!({"providerId": "sim"})))
        .await;
    assert_eq!(bad_body.status, 400, "{bad_body:?}");
    assert_eq!(bad_body.body["code"], "bad_request");
    let huge = json!({ "providerId": "sim", "bankConsentId": "x", "accessToken": "a".repeat(70 * 1024), "expiresAt": "2099-01-01T00:00:00Z" });
    assert_problem(
        &api.post("/v1/consents", &token, Some(&huge)).await,
        413,
        "payload_too_large",
        "The request body exceeds 64 KiB",
    );
    let unknown_provider = json!({ "providerId": "nobank", "bankConsentId": "x", "accessToken": "t", "expiresAt": "2099-01-01T00:00:00Z" });
    assert_problem(
        &api.post("/v1/consents", &token, Some(&unknown_provider))
            .await,
        400,
        "bad_request",
        "providerId \"nobank\" is not a configured provider",
    );
    assert_problem(
        &api.get("/v1/nowhere", &token).await,
        404,
        "not_found",
        "No such route",
    );
}

#[tokio::test]
async fn registering_a_consent_starts_its_initial_load_outside_the_quota() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let mut jobs = api
        .services
        .broker
        .consume(&api.services.broker.names().jobs.clone(), 10);
    let body = json!({ "providerId": "sim", "bankConsentId": "sim-key-1", "accessToken": "sim-key-1", "expiresAt": "2099-01-01T00:00:00Z" });
    let answer = api.post("/v1/consents", &token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let consent = answer.body["consentId"].as_str().unwrap().to_owned();
    assert_eq!(
        answer.header("location"),
        Some(format!("/v1/consents/{consent}").as_str())
    );
    assert_eq!(answer.body["tenantId"], "acme");
    assert_eq!(answer.body["status"], "ACTIVE");
    assert!(answer.body.get("accessToken").is_none(), "never the token");
    assert_eq!(answer.body["refreshing"], true);
    assert_eq!(answer.body["initialRefresh"]["requestedBy"], "APP");
    assert_eq!(
        answer.body["quota"]["used"], 0,
        "the initial load counts against no quota"
    );
    let job = next_job(&api, &mut jobs).await;
    assert!(job.initial);
    assert_eq!(job.consent_id.to_string(), consent);
    // The token is encrypted at rest.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT access_token_enc FROM consents")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert!(!stored.windows(9).any(|w| w == b"sim-key-1"));
    // Same id again, or the same bank consent again: 409 naming the consent.
    let detail = format!("This consent is registered already as {consent}");
    let again = api.post("/v1/consents", &token, Some(&json!({ "consentId": consent, "providerId": "sim", "bankConsentId": "b", "accessToken": "t", "expiresAt": "2099-01-01T00:00:00Z" }))).await;
    assert_problem(&again, 409, "consent_exists", &detail);
    assert_eq!(again.body["consentId"], consent.as_str());
    let same_bank = api.post("/v1/consents", &token, Some(&body)).await;
    assert_problem(&same_bank, 409, "consent_exists", &detail);
    assert_eq!(same_bank.body["consentId"], consent.as_str());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM consents")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(count, 1, "no second copy");
    // Another tenant may register the same bank consent for itself.
    let other = dev_token(&app, Some("other"), STORED);
    assert_eq!(
        api.post("/v1/consents", &other, Some(&body)).await.status,
        201
    );
}

#[tokio::test]
async fn an_idempotency_key_repeat_returns_the_first_answer_and_admits_nothing() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let path = refresh_path(consent);
    let first = api
        .call(
            Method::POST,
            &path,
            Some(&token),
            None,
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(first.status, 202);
    api.complete(consent, first.body["refreshId"].as_str().unwrap())
        .await;
    let repeat = api
        .call(
            Method::POST,
            &path,
            Some(&token),
            None,
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(repeat.status, 202);
    assert_eq!(repeat.body["refreshId"], first.body["refreshId"]);
    assert_eq!(repeat.header("location"), first.header("location"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the repeat admitted nothing");
    let other_key = api
        .call(
            Method::POST,
            &path,
            Some(&token),
            None,
            &[("idempotency-key", "k-2")],
        )
        .await;
    assert_eq!(other_key.status, 202);
    assert_ne!(other_key.body["refreshId"], first.body["refreshId"]);
}

#[tokio::test]
async fn compatibility_routes() {
    let (app, api) = started(&[("http.sync_wait_secs", "1")]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let cfa = api
        .post(&format!("/cfa/consent/{consent}/refresh"), &token, None)
        .await;
    assert_eq!(cfa.status, 202);
    assert_eq!(cfa.body, Value::Null, "an empty body");
    let busy = api
        .post(
            &format!("/stored-data/v1/consents/{consent}/refresh"),
            &token,
            None,
        )
        .await;
    assert_eq!(busy.status, 409);
    assert_eq!(
        busy.body,
        json!({ "statusCode": 409, "message": "A refresh is already in progress for this consent" })
    );
    let cfa_busy = api
        .post(&format!("/cfa/consent/{consent}/refresh"), &token, None)
        .await;
    assert_problem(
        &cfa_busy,
        409,
        "refresh_in_progress",
        "A refresh is already in progress for this consent",
    );
    assert_eq!(
        cfa_busy.body["type"],
        "https://tools.ietf.org/html/rfc9110#section-15.5.10"
    );

    // Waiting while no worker finishes it: still in progress after sync_wait_secs.
    let other = api.seed_consent("acme", None, None).await;
    let waiting = api
        .post(
            &format!("/stored-data/v1/consents/{other}/refresh"),
            &token,
            None,
        )
        .await;
    assert_eq!(waiting.status, 202);
    assert_eq!(
        waiting.body,
        json!({ "statusCode": 202, "message": "Data refresh is still in progress" })
    );

    // Completed while waiting → the reference platform's success answer.
    let third = api.seed_consent("acme", None, None).await;
    let finisher = api.complete_once_admitted(third);
    let done = api
        .post(
            &format!("/stored-data/v1/consents/{third}/refresh"),
            &token,
            None,
        )
        .await;
    finisher.await.unwrap();
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(
        done.body,
        json!({ "statusCode": 200, "message": "Successfully completed data refresh" })
    );
}

#[tokio::test]
async fn prefer_wait_returns_the_terminal_answer() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let pool = app.pg.clone();
    let finisher = tokio::spawn(async move {
        for _ in 0..100 {
            let done = sqlx::query("UPDATE refreshes SET status = 'ERROR', error_code = 'mfa_required', error_message = 'Strong customer authentication is required', finished_at = now() WHERE consent_id = $1 AND status = 'INITIALIZED'")
                .bind(consent.as_uuid())
                .execute(&pool)
                .await
                .unwrap();
            if done.rows_affected() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let answer = api
        .call(
            Method::POST,
            &refresh_path(consent),
            Some(&token),
            None,
            &[("prefer", "wait=5")],
        )
        .await;
    finisher.await.unwrap();
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.body["code"], "mfa_required");
    assert_eq!(
        answer.body["detail"],
        "Strong customer authentication is required"
    );
}

#[tokio::test]
async fn upstream_requests_are_answered_dead_lettered_and_announced() {
    let (app, api) = started(&[]).await;
    let consent = api.seed_consent("acme", None, None).await;
    let broker = &api.services.broker;
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 10);
    let rejected = broker
        .declare_probe_queue("refresh.rejected.*")
        .await
        .unwrap();
    let mut rejected_events = broker.consume(&rejected, 10);
    let mut dead = broker.consume(&broker.names().requests_dead.clone(), 10);

    broker
        .publish_request(b"{not json", Some("m-0"), Some(&reply_queue), Some("c-0"))
        .await
        .unwrap();
    let body =
        json!({ "consentId": consent, "tenantId": "acme", "requestedBy": "APP" }).to_string();
    broker
        .publish_request(
            body.as_bytes(),
            Some("m-1"),
            Some(&reply_queue),
            Some("c-1"),
        )
        .await
        .unwrap();

    let mut got = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .unwrap()
            .unwrap();
        got.push((
            delivery.correlation_id.clone(),
            serde_json::from_slice::<Value>(&delivery.body).unwrap(),
        ));
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got[0].0.as_deref(), Some("c-0"));
    assert_eq!(got[0].1["accepted"], false);
    assert_eq!(got[0].1["problem"]["code"], "bad_request");
    assert_eq!(got[1].0.as_deref(), Some("c-1"));
    assert_eq!(got[1].1["accepted"], true, "{:?}", got[1]);
    assert!(got[1].1["refreshId"].is_string());
    assert!(got[1].1["notBefore"].is_string());
    let dead_one = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead_one.body, b"{not json");

    // The same message id again: the first answer, nothing new admitted.
    broker
        .publish_request(
            body.as_bytes(),
            Some("m-1"),
            Some(&reply_queue),
            Some("c-2"),
        )
        .await
        .unwrap();
    let repeat = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let repeat_body: Value = serde_json::from_slice(&repeat.body).unwrap();
    assert_eq!(repeat_body["refreshId"], got[1].1["refreshId"]);
    // A new message for the busy consent: refused, and announced as rejected.
    broker
        .publish_request(
            body.as_bytes(),
            Some("m-2"),
            Some(&reply_queue),
            Some("c-3"),
        )
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let refused_body: Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(refused_body["accepted"], false);
    assert_eq!(refused_body["problem"]["code"], "refresh_in_progress");
    let event = tokio::time::timeout(Duration::from_secs(10), rejected_events.next())
        .await
        .unwrap()
        .unwrap();
    let event_body: Value = serde_json::from_slice(&event.body).unwrap();
    assert_eq!(event_body["type"], "io.refreshd.refresh.rejected");
    assert_eq!(event_body["data"]["problem"]["code"], "refresh_in_progress");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn two_hundred_simultaneous_requests_for_one_consent_admit_exactly_one() {
    let (app, api) = started(&[("database.max_connections", "20")]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let path = refresh_path(consent);
    let answers =
        futures_util::future::join_all((0..200).map(|_| api.post(&path, &token, None))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        199,
        "{statuses:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn five_hundred_consents_get_start_slots_spaced_by_the_stagger() {
    let (app, api) = started(&[("database.max_connections", "20")]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let mut consents = Vec::new();
    for _ in 0..500 {
        consents.push(api.seed_consent("acme", None, None).await);
    }
    // 100 connections at a time: 500 client plus 500 server sockets in one process
    // would exceed the usual limit of 1024 open files.
    use futures_util::StreamExt as _;
    let paths: Vec<String> = consents.iter().map(refresh_path).collect();
    let answers: Vec<Answer> =
        futures_util::stream::iter(paths.iter().map(|p| api.post(p, &token, None)))
            .buffer_unordered(100)
            .collect()
            .await;
    let mut slots: Vec<chrono::DateTime<chrono::Utc>> = answers
        .iter()
        .filter(|a| a.status == 202)
        .map(|a| a.body["notBefore"].as_str().unwrap().parse().unwrap())
        .collect();
    let statuses: BTreeSet<u16> = answers.iter().map(|a| a.status).collect();
    // 30 per 60 s with 3600 s of backlog: the first 500 fit (500 × 2 s < 3600 s).
    assert_eq!(slots.len(), 500, "{statuses:?}");
    slots.sort();
    let spacing = chrono::TimeDelta::seconds(2);
    for pair in slots.windows(2) {
        assert!(pair[1] - pair[0] >= spacing, "{} then {}", pair[0], pair[1]);
    }
}

#[tokio::test]
async fn a_full_backlog_is_refused_and_consumes_nothing() {
    let (app, api) = started(&[
        ("stagger.limit", "1"),
        ("stagger.period_secs", "60"),
        ("stagger.max_delay_secs", "60"),
    ])
    .await;
    let token = dev_token(&app, Some("acme"), STORED);
    let a = api.seed_consent("acme", None, None).await;
    let b = api.seed_consent("acme", None, None).await;
    let c = api.seed_consent("acme", None, None).await;
    assert_eq!(api.post(&refresh_path(a), &token, None).await.status, 202);
    assert_eq!(api.post(&refresh_path(b), &token, None).await.status, 202);
    let full = api.post(&refresh_path(c), &token, None).await;
    assert_eq!(full.status, 429, "{full:?}");
    assert_eq!(full.body["code"], "backlog_full");
    assert!(full.header("retry-after").is_some());
    let view = api.get(&format!("/v1/consents/{c}"), &token).await;
    assert_eq!(view.body["refreshing"], false);
    assert_eq!(view.body["quota"]["used"], 0);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let health = api.call(Method::GET, "/healthz", None, None, &[]).await;
    assert_eq!(health.status, 200);
    let ready = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(
        ready.body["checks"],
        json!({ "redis": true, "rabbitmq": true, "postgresql": true })
    );
    let consent = api.seed_consent("acme", None, None).await;
    api.post(&refresh_path(consent), &token, None).await;
    api.post(&refresh_path(consent), &token, None).await;
    let metrics = api.call(Method::GET, "/metrics", None, None, &[]).await;
    let text = metrics.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("refreshd_admissions_total{source=\"API\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("refreshd_refusals_total{code=\"refresh_in_progress\",source=\"API\"} 1"),
        "{text}"
    );
    assert!(text.contains("refreshd_gate_seconds_bucket"), "{text}");
    // Both decisions, the admission and the refusal, are timed.
    assert!(
        text.contains("refreshd_admission_seconds_count 2"),
        "{text}"
    );
    assert!(text.contains("refreshd_publish_seconds_bucket"), "{text}");
    let openapi = api
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(openapi.status, 200);
    assert!(
        openapi.body["paths"]["/v1/consents/{consentId}/refresh"]["post"].is_object(),
        "{openapi:?}"
    );
    // Every route that requests a refresh documents the optional `traceparent` header.
    for path in [
        "/v1/consents/{consentId}/refresh",
        "/v1/consents",
        "/cfa/consent/{consentId}/refresh",
        "/stored-data/v1/consents/{consentId}/refresh",
    ] {
        let params = openapi.body["paths"][path]["post"]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let trace = params
            .iter()
            .find(|p| p["name"] == "traceparent")
            .unwrap_or_else(|| panic!("{path}: {params:?}"));
        assert_eq!(trace["in"], "header", "{path}");
        assert_eq!(trace["required"], false, "{path}");
    }
}

#[tokio::test]
async fn redis_or_rabbitmq_down_is_503_and_nothing_is_consumed() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    // A second ingress of the same namespace reaching Redis and RabbitMQ through proxies.
    let redis_proxy = Proxy::start("127.0.0.1:6379").await;
    let amqp_proxy = Proxy::start("127.0.0.1:5672").await;
    let redis_url = format!("redis://127.0.0.1:{}/0", redis_proxy.port);
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp_proxy.port);
    let settings = refresh_tests::test_settings(
        &app.namespace,
        &[
            ("redis.url", &redis_url),
            ("redis.command_timeout_ms", "500"),
            ("amqp.url", &amqp_url),
            ("amqp.confirm_timeout_ms", "1000"),
        ],
    );
    let proxied = ingress_with(&app, &settings).await.unwrap();
    let unavailable = "A required service is unavailable; nothing was admitted";

    redis_proxy.down();
    assert_problem(
        &proxied.post(&refresh_path(consent), &token, None).await,
        503,
        "unavailable",
        unavailable,
    );
    redis_proxy.up();

    // The job is durable in the outbox once committed, so what rule 6 promises is a
    // 503 once the ingress knows the broker is gone: a request in the moment between
    // the cut and the connection noticing it is admitted, and relayed on its return.
    amqp_proxy.down();
    let noticed = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = proxied.call(Method::GET, "/readyz", None, None, &[]).await;
        if ready.status == 503 {
            assert_eq!(ready.body["checks"]["rabbitmq"], false, "{ready:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < noticed,
            "the ingress never noticed the broker was gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_problem(
        &proxied.post(&refresh_path(consent), &token, None).await,
        503,
        "unavailable",
        unavailable,
    );

    // Nothing half-done: no record, no lock, no quota used; the direct ingress admits.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let view = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(
        (
            view.body["refreshing"].clone(),
            view.body["quota"]["used"].clone()
        ),
        (json!(false), json!(0))
    );
    assert_eq!(
        api.post(&refresh_path(consent), &token, None).await.status,
        202
    );
}

#[tokio::test]
async fn upstream_requests_held_by_an_outage_are_decided_as_soon_as_it_ends() {
    // The only ingress of the namespace reaches Redis through a proxy.
    let app = spawn_app().await;
    let redis_proxy = Proxy::start("127.0.0.1:6379").await;
    let redis_url = format!("redis://127.0.0.1:{}/0", redis_proxy.port);
    let settings = refresh_tests::test_settings(
        &app.namespace,
        &[
            ("redis.url", &redis_url),
            ("redis.command_timeout_ms", "500"),
        ],
    );
    let api = ingress_with(&app, &settings).await.unwrap();
    let mut consents = Vec::new();
    for _ in 0..5 {
        consents.push(api.seed_consent("acme", None, None).await);
    }
    let broker = &api.services.broker;
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 10);
    let publish = |n: usize| {
        let body = json!({ "consentId": consents[n], "tenantId": "acme" }).to_string();
        let (id, reply_queue) = (format!("held-{n}"), reply_queue.clone());
        async move {
            broker
                .publish_request(body.as_bytes(), Some(&id), Some(&reply_queue), Some(&id))
                .await
                .unwrap();
        }
    };

    // Five requests held back through 20 s of outage: by then each waits up to 15 s
    // more on its own backoff.
    redis_proxy.down();
    for n in 0..5 {
        publish(n).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), replies.next())
            .await
            .is_err(),
        "nothing is decided while Redis is down"
    );
    redis_proxy.up();
    let back = std::time::Instant::now();
    // No new request comes to show that Redis is back: the consumer's probe finds it.
    let mut decided = BTreeSet::new();
    while decided.len() < 5 {
        let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("every request is decided")
            .unwrap();
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["accepted"], true, "{body}");
        decided.insert(reply.correlation_id.clone().unwrap());
        reply.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    let waited = back.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "held requests were decided {waited:?} after the outage ended"
    );
}

#[tokio::test]
async fn tenant_settings_round_trip_with_warnings() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let defaults = api.get("/v1/apps/acme/settings", &token).await;
    assert_eq!(defaults.status, 200);
    assert_eq!(
        defaults.body,
        json!({ "autosyncIntervalHours": null, "inactivationDays": 90, "warnings": [
            "Auto-sync is off: a consent that nobody refreshes for 90 days becomes inactive and its stored data is removed."
        ] })
    );
    let risky = json!({ "autosyncIntervalHours": 48, "inactivationDays": 4 });
    let saved = api
        .call(
            Method::PUT,
            "/v1/apps/acme/settings",
            Some(&token),
            Some(&risky),
            &[],
        )
        .await;
    assert_eq!(saved.status, 200);
    assert_eq!(saved.body["autosyncIntervalHours"], 48);
    assert_eq!(
        saved.body["warnings"],
        json!([
            "With auto-sync every 48 h, a consent gets fewer than two refreshes in the 4 days before it becomes inactive and its stored data is removed."
        ]),
        "{saved:?}"
    );
    let read = api.get("/v1/apps/acme/settings", &token).await;
    assert_eq!(read.body, saved.body);
    let bad = api
        .call(
            Method::PUT,
            "/v1/apps/acme/settings",
            Some(&token),
            Some(&json!({ "autosyncIntervalHours": 2, "inactivationDays": 4 })),
            &[],
        )
        .await;
    assert_problem(
        &bad,
        400,
        "bad_request",
        "autosyncIntervalHours must be null or 6 to 720",
    );
    let other = api.get("/v1/apps/other/settings", &token).await;
    assert_problem(&other, 404, "not_found", "Tenant not found");
}

#[tokio::test]
async fn an_event_committed_before_a_crash_is_published_once_by_the_relay() {
    let app = spawn_app().await;
    // What a process leaves behind when it dies between its commit and its publish.
    let event_id = uuid::Uuid::now_v7();
    let payload = json!({ "specversion": "1.0", "id": event_id, "type": "io.refreshd.refresh.initialized", "source": "refreshd" });
    sqlx::query("INSERT INTO outbox (event_id, routing_key, payload) VALUES ($1, 'refresh.initialized.acme', $2)")
        .bind(event_id)
        .bind(&payload)
        .execute(&app.pg)
        .await
        .unwrap();
    // A subscriber bound before any relay runs.
    let subscriber = refresh_amqp::Broker::start(
        &app.settings.amqp,
        &app.namespace,
        app.shutdown.clone(),
        &app.tracker,
    )
    .await
    .unwrap();
    let probe = subscriber.declare_probe_queue("refresh.#").await.unwrap();
    let mut events = subscriber.consume(&probe, 10);
    let _api = app.start_ingress().await;

    let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        delivery.message_id.as_deref(),
        Some(event_id.to_string().as_str())
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&delivery.body).unwrap(),
        payload
    );
    delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    // The relay marks the row once the publish is confirmed (which may be just after
    // the subscriber got it).
    let mut published: Option<chrono::DateTime<chrono::Utc>> = None;
    for _ in 0..50 {
        published = sqlx::query_scalar("SELECT published_at FROM outbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&app.pg)
            .await
            .unwrap();
        if published.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published.is_some(), "marked published");
    // Nothing more arrives for it: published once.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), events.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_lock_outliving_its_finished_refresh_does_not_refuse_the_next_request() {
    let (app, api) = started(&[]).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let first = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(first.status, 202);
    // The worker's commit is in, its lock release not yet (or it died in between).
    sqlx::query(
        "UPDATE refreshes SET status = 'UPDATED', finished_at = now() WHERE refresh_id = $1",
    )
    .bind(uuid::Uuid::parse_str(first.body["refreshId"].as_str().unwrap()).unwrap())
    .execute(&app.pg)
    .await
    .unwrap();
    let next = api.post(&refresh_path(consent), &token, None).await;
    assert_eq!(next.status, 202, "{next:?}");
    assert_ne!(next.body["refreshId"], first.body["refreshId"]);
    // A lock whose refresh is still running is respected.
    let busy = api.post(&refresh_path(consent), &token, None).await;
    assert_problem(
        &busy,
        409,
        "refresh_in_progress",
        "A refresh is already in progress for this consent",
    );
    assert_eq!(busy.body["refreshId"], next.body["refreshId"]);
}

#[tokio::test]
async fn upstream_requests_may_claim_only_the_configured_sources() {
    let (app, api) = started(&[]).await;
    assert_eq!(
        app.settings.amqp.requested_by,
        [refresh_core::RequestedBy::App]
    );
    let consent = api.seed_consent("acme", None, None).await;
    let broker = &api.services.broker;
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 10);
    let rejected = broker
        .declare_probe_queue("refresh.rejected.*")
        .await
        .unwrap();
    let mut rejected_events = broker.consume(&rejected, 10);

    for (i, source) in ["ADMIN", "AUTOSYNC", "API"].iter().enumerate() {
        let body =
            json!({ "consentId": consent, "tenantId": "acme", "requestedBy": source }).to_string();
        let correlation = format!("c-{i}");
        broker
            .publish_request(
                body.as_bytes(),
                Some(&format!("m-{i}")),
                Some(&reply_queue),
                Some(&correlation),
            )
            .await
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.correlation_id.as_deref(), Some(correlation.as_str()));
        let reply_body: Value = serde_json::from_slice(&reply.body).unwrap();
        reply.settle(refresh_core::Outcome::Ack).await.unwrap();
        assert_eq!(reply_body["accepted"], false, "{reply_body}");
        assert_eq!(reply_body["problem"]["code"], "bad_request");
        assert_eq!(reply_body["problem"]["status"], 400);
        assert_eq!(
            reply_body["problem"]["detail"],
            format!("requestedBy {source} is not accepted on this channel (accepted: APP)")
        );
        let event = tokio::time::timeout(Duration::from_secs(10), rejected_events.next())
            .await
            .unwrap()
            .unwrap();
        let event_body: Value = serde_json::from_slice(&event.body).unwrap();
        assert_eq!(event_body["type"], "io.refreshd.refresh.rejected");
        assert_eq!(event_body["data"]["problem"]["code"], "bad_request");
        assert_eq!(event_body["data"]["requestedBy"], *source);
        event.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    // Nothing was admitted, nothing counted.
    let admitted: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(admitted, 0);
    // The configured source is admitted.
    let body =
        json!({ "consentId": consent, "tenantId": "acme", "requestedBy": "APP" }).to_string();
    broker
        .publish_request(
            body.as_bytes(),
            Some("m-app"),
            Some(&reply_queue),
            Some("c-app"),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply_body: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(reply_body["accepted"], true, "{reply_body}");
}
