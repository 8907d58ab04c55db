//! `Idempotency-Key` (SPEC §3) and the upstream `message_id`: an admission and a
//! refusal that cannot change are remembered and replayed; a refusal that may change
//! (409, 429) is not, so a retry with the same key is decided afresh; a reservation
//! left by a process that died before answering heals within its lease.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use refresh_tests::{Answer, Api, TestApp, dev_token, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

async fn keyed(api: &Api, token: &str, consent: &str, key: &str) -> Answer {
    api.call(
        Method::POST,
        &format!("/v1/consents/{consent}/refresh"),
        Some(token),
        None,
        &[("idempotency-key", key)],
    )
    .await
}

fn assert_fresh(answer: &Answer, status: u16, code: Option<&str>) {
    assert_eq!(answer.status, status, "{answer:?}");
    if let Some(code) = code {
        assert_eq!(answer.body["code"], code, "{answer:?}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json")
        );
    }
    assert_eq!(
        answer.header("idempotent-replayed"),
        None,
        "decided afresh, not replayed: {answer:?}"
    );
}

fn assert_replay(answer: &Answer, first: &Answer) {
    assert_eq!(answer.status, first.status, "{answer:?}");
    assert_eq!(answer.body, first.body, "the same body");
    assert_eq!(answer.header("idempotent-replayed"), Some("true"));
    assert_eq!(answer.header("location"), first.header("location"));
    assert_eq!(answer.header("content-type"), first.header("content-type"));
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pg).await.unwrap()
}

async fn stored_keys(app: &TestApp) -> i64 {
    count(app, "SELECT count(*) FROM idempotency_keys").await
}

#[tokio::test]
async fn a_409_is_not_remembered_and_the_later_admission_replays_exactly() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let consent_text = consent.to_string();
    let running = api.refresh(&token, &consent_text).await;

    let busy = keyed(&api, &token, &consent_text, "k-409").await;
    assert_fresh(&busy, 409, Some("refresh_in_progress"));
    assert_eq!(busy.body["refreshId"], running.as_str());
    assert_eq!(stored_keys(&app).await, 0, "a 409 leaves no key behind");
    // Still in flight: the same key is refused again, decided again.
    assert_fresh(
        &keyed(&api, &token, &consent_text, "k-409").await,
        409,
        Some("refresh_in_progress"),
    );

    api.complete(consent, &running).await;
    let admitted = keyed(&api, &token, &consent_text, "k-409").await;
    assert_fresh(&admitted, 202, None);
    let second = admitted.body["refreshId"].as_str().unwrap().to_owned();
    assert_ne!(second, running, "a new refresh, not the 409's");
    assert_eq!(
        admitted.header("location"),
        Some(format!("/v1/refreshes/{second}").as_str())
    );

    // The admission is remembered: replayed exactly, also once it finished.
    let replay = keyed(&api, &token, &consent_text, "k-409").await;
    assert_replay(&replay, &admitted);
    api.complete(consent, &second).await;
    let replay = keyed(&api, &token, &consent_text, "k-409").await;
    assert_replay(&replay, &admitted);
    assert_eq!(count(&app, "SELECT count(*) FROM refreshes").await, 2);
    let status: i32 = sqlx::query_scalar("SELECT http_status FROM idempotency_keys")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(status, 202);
}

#[tokio::test]
async fn a_429_is_not_remembered_and_the_key_is_admitted_once_the_quota_allows() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let consent_text = consent.to_string();
    for _ in 0..4 {
        let id = api.refresh(&token, &consent_text).await;
        api.complete(consent, &id).await;
    }
    let limited = keyed(&api, &token, &consent_text, "k-429").await;
    assert_fresh(&limited, 429, Some("daily_limit_reached"));
    assert!(limited.header("retry-after").is_some());
    assert_eq!(stored_keys(&app).await, 0, "a 429 leaves no key behind");

    // The window moves on (its admissions leave the quota set, as they do 24 h later):
    // the same key is decided afresh, and admitted.
    let mut redis = app.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:{{c:{consent}}}:q:0", app.namespace))
        .query_async(&mut redis)
        .await
        .unwrap();
    let admitted = keyed(&api, &token, &consent_text, "k-429").await;
    assert_fresh(&admitted, 202, None);
    assert_replay(
        &keyed(&api, &token, &consent_text, "k-429").await,
        &admitted,
    );
    assert_eq!(count(&app, "SELECT count(*) FROM refreshes").await, 5);
}

#[tokio::test]
async fn refusals_that_cannot_change_are_remembered_and_replayed() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let revoked = api.seed_consent("acme", Some("REVOKED"), None).await;
    let first = keyed(&api, &token, &revoked.to_string(), "k-403").await;
    assert_fresh(&first, 403, Some("consent_revoked"));
    assert_eq!(
        first.body["detail"],
        "The consent or account access has been revoked"
    );
    assert_replay(
        &keyed(&api, &token, &revoked.to_string(), "k-403").await,
        &first,
    );

    let expired = api.seed_consent("acme", Some("EXPIRED"), None).await;
    let first = keyed(&api, &token, &expired.to_string(), "k-403").await;
    assert_fresh(&first, 403, Some("consent_expired"));
    assert_replay(
        &keyed(&api, &token, &expired.to_string(), "k-403").await,
        &first,
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    let first = keyed(&api, &token, &unknown, "k-404").await;
    assert_fresh(&first, 404, Some("consent_not_found"));
    assert_replay(&keyed(&api, &token, &unknown, "k-404").await, &first);
    assert_eq!(stored_keys(&app).await, 3);
    assert_eq!(count(&app, "SELECT count(*) FROM refreshes").await, 0);
}

/// A reservation as a process leaves it when it dies between reserving the key and
/// answering: pending (status 0), made `age` ago.
async fn leave_pending(app: &TestApp, consent: &str, key: &str, age: TimeDelta) {
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, key, created_at, http_status, response) \
         VALUES ('acme', $1, $2, 0, 'null')",
    )
    .bind(format!("POST /v1/consents/{consent}/refresh {key}"))
    .bind(Utc::now() - age)
    .execute(&app.pg)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reservation_left_by_a_crashed_process_heals_within_its_lease() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await.to_string();

    // Reserved two minutes ago and never answered: past its 90 s lease, taken over.
    leave_pending(&app, &consent, "k-crash", TimeDelta::minutes(2)).await;
    let started = Instant::now();
    let admitted = keyed(&api, &token, &consent, "k-crash").await;
    assert_fresh(&admitted, 202, None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "decided at once, not after a wait: {:?}",
        started.elapsed()
    );
    assert_replay(&keyed(&api, &token, &consent, "k-crash").await, &admitted);

    // Reserved a moment ago: another request may still be answering it, so a repeat
    // waits for that answer (10 s), then says it is still being processed.
    let other = api.seed_consent("acme", None, None).await.to_string();
    leave_pending(&app, &other, "k-busy", TimeDelta::seconds(5)).await;
    let waiting = keyed(&api, &token, &other, "k-busy").await;
    assert_fresh(&waiting, 409, Some("refresh_in_progress"));
    assert_eq!(
        waiting.body["detail"],
        "A request with this Idempotency-Key is still being processed"
    );
    assert_eq!(count(&app, "SELECT count(*) FROM refreshes").await, 1);
}

/// Publishes a request with `message_id` and returns its decision reply.
async fn upstream(
    api: &Api,
    replies: &mut refresh_amqp::Consumer,
    reply_queue: &str,
    consent: &str,
    message_id: &str,
) -> Value {
    let body = json!({ "consentId": consent, "tenantId": "acme" }).to_string();
    api.services
        .broker
        .publish_request(body.as_bytes(), Some(message_id), Some(reply_queue), None)
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply_body: Value = serde_json::from_slice(&reply.body).unwrap();
    reply.settle(refresh_core::Outcome::Ack).await.unwrap();
    reply_body
}

#[tokio::test]
async fn an_upstream_message_id_remembers_admissions_but_not_a_409() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let consent_text = consent.to_string();
    let broker = &api.services.broker;
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 10);

    let running = api.refresh(&token, &consent_text).await;
    let busy = upstream(&api, &mut replies, &reply_queue, &consent_text, "m-1").await;
    assert_eq!(busy["accepted"], false, "{busy}");
    assert_eq!(busy["problem"]["code"], "refresh_in_progress");
    assert_eq!(stored_keys(&app).await, 0);

    api.complete(consent, &running).await;
    let admitted = upstream(&api, &mut replies, &reply_queue, &consent_text, "m-1").await;
    assert_eq!(admitted["accepted"], true, "decided afresh: {admitted}");
    assert_ne!(admitted["refreshId"], running.as_str());
    let again = upstream(&api, &mut replies, &reply_queue, &consent_text, "m-1").await;
    assert_eq!(again, admitted, "the admission is replayed");
    assert_eq!(count(&app, "SELECT count(*) FROM refreshes").await, 2);
}

/// With `Prefer: wait`, the answer the key keeps is the one the request gave after
/// its wait (200 once the refresh ended), replacing the 202 its admission recorded.
#[tokio::test]
async fn a_waited_answer_replaces_the_admissions_202_for_its_key() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let finisher = api.complete_once_admitted(consent);
    let path = format!("/v1/consents/{consent}/refresh");
    let headers = [("idempotency-key", "waited"), ("prefer", "wait=5")];
    let first = api
        .call(Method::POST, &path, Some(&token), None, &headers)
        .await;
    finisher.await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["status"], "UPDATED");
    let repeat = api
        .call(Method::POST, &path, Some(&token), None, &headers)
        .await;
    assert_replay(&repeat, &first);
}

/// A wait that ends with the refresh still running answers 202 with the record as it
/// then was (here started); that answer, not the admission's, is what a repeat
/// replays.
#[tokio::test]
async fn a_wait_that_ends_before_the_refresh_replays_its_own_202() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    // A worker starting the refresh during the wait.
    let pool = app.pg.clone();
    let starter = tokio::spawn(async move {
        for _ in 0..100 {
            let started = sqlx::query(
                "UPDATE refreshes SET started_at = now() \
                 WHERE consent_id = $1 AND status = 'INITIALIZED' AND started_at IS NULL",
            )
            .bind(consent.as_uuid())
            .execute(&pool)
            .await
            .unwrap();
            if started.rows_affected() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let path = format!("/v1/consents/{consent}/refresh");
    let headers = [("idempotency-key", "still-running"), ("prefer", "wait=1")];
    let first = api
        .call(Method::POST, &path, Some(&token), None, &headers)
        .await;
    starter.await.unwrap();
    assert_eq!(first.status, 202, "{first:?}");
    assert!(first.body["startedAt"].is_string(), "{first:?}");
    let repeat = api
        .call(Method::POST, &path, Some(&token), None, &headers)
        .await;
    assert_replay(&repeat, &first);
}
