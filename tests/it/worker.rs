//! The worker through the real services and the real bank simulator: SPEC §5 pipeline,
//! refresh rules (merge), bank outcomes, retries, and the events of each refresh.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use refresh_tests::fixtures::{dataset, day, tx};
use refresh_tests::{
    Api, Bank, TestApp, app_with_bank, dev_token, fast_worker_config, start_worker,
};
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

async fn started(max_attempts: u32) -> (TestApp, Api, Bank) {
    let (app, api, bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    let mut config = fast_worker_config(&app);
    config.max_attempts = max_attempts;
    start_worker(&app, &api, config);
    (app, api, bank)
}

/// Registers a consent with the simulator key `key` (its initial load starts);
/// returns (consentId, initial refreshId).
async fn register(api: &Api, token: &str, key: &str) -> (String, String) {
    let body = json!({ "providerId": "sim", "bankConsentId": key, "accessToken": key, "expiresAt": "2099-01-01T00:00:00Z" });
    let answer = api.post("/v1/consents", token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    (
        answer.body["consentId"].as_str().unwrap().to_owned(),
        answer.body["initialRefresh"]["refreshId"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

async fn count(app: &TestApp, sql: &str, consent: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(uuid::Uuid::parse_str(consent).unwrap())
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_refresh_reaches_updated_with_the_banks_data_and_both_events() {
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.#").await.unwrap();
    let mut events = broker.consume(&probe, 50);
    // The simulator's own data, kept inside the fetch window.
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    let mut data = bank.dataset(&key).await;
    let cutoff = day(80);
    data["transactions"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["BookingDateTime"].as_str().unwrap() > cutoff.as_str());
    bank.put_dataset(&key, &data).await;
    let expected_tx = data["transactions"].as_array().unwrap().len() as i64;
    let expected_accounts = data["accounts"].as_array().unwrap().len() as i64;
    let expected_balances = data["balances"].as_array().unwrap().len() as i64;

    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"]["accountsUpdated"], expected_accounts);
    assert_eq!(record["summary"]["balancesUpdated"], expected_balances);
    assert_eq!(record["summary"]["transactionsAdded"], expected_tx);
    assert!(record["startedAt"].is_string() && record["finishedAt"].is_string());
    let c = consent.as_str();
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM accounts WHERE consent_id = $1",
            c
        )
        .await,
        expected_accounts
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM account_parties WHERE consent_id = $1",
            c
        )
        .await,
        expected_accounts
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM accounts WHERE consent_id = $1 AND data ? 'Account'",
            c
        )
        .await,
        0,
        "party data is kept out of accounts"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM balances WHERE consent_id = $1",
            c
        )
        .await,
        expected_balances
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM transactions WHERE consent_id = $1",
            c
        )
        .await,
        expected_tx
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM stored_items WHERE consent_id = $1 AND kind = 'beneficiaries'",
            c
        )
        .await,
        data["beneficiaries"].as_array().unwrap().len() as i64
    );
    let consent_now = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(consent_now.body["refreshing"], false, "{consent_now:?}");
    assert!(
        consent_now.body["lastRefreshedAt"].is_string(),
        "{consent_now:?}"
    );

    // A plain refresh of unchanged data changes no transaction.
    let second = api.refresh(&token, &consent).await;
    let record = api.wait_terminal(&token, &second).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"]["transactionsAdded"], 0, "{record}");
    assert_eq!(record["summary"]["transactionsUpdated"], 0, "{record}");
    assert_eq!(record["summary"]["transactionsRemoved"], 0, "{record}");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM transactions WHERE consent_id = $1",
            c
        )
        .await,
        expected_tx
    );

    // Events: initialized then updated, for each refresh.
    let mut seen: Vec<(String, String)> = Vec::new();
    while seen.len() < 4 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event arrives")
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.body).unwrap();
        seen.push((
            event["type"].as_str().unwrap().to_owned(),
            event["data"]["refreshId"].as_str().unwrap().to_owned(),
        ));
        assert_eq!(event["subject"], consent.as_str());
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    for id in [&initial, &second] {
        let types: Vec<&str> = seen
            .iter()
            .filter(|(_, r)| r == id)
            .map(|(t, _)| t.as_str())
            .collect();
        assert_eq!(
            types,
            [
                "io.refreshd.refresh.initialized",
                "io.refreshd.refresh.updated"
            ],
            "{seen:?}"
        );
    }
}

#[tokio::test]
async fn merge_rules_on_crafted_data() {
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    bank.put_dataset(
        &key,
        &dataset(
            "Ms Original",
            "Bills",
            "100.00",
            vec![
                tx(Some("t1"), "Pending", 3, "5.00"),
                tx(None, "Booked", 2, "10.00"),
                tx(None, "Booked", 2, "20.00"),
                tx(None, "Booked", 1, "30.00"),
                tx(Some("t9"), "Pending", 1, "9.00"),
            ],
        ),
    )
    .await;
    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"]["transactionsAdded"], 5, "{record}");

    // The bank books t1, re-spells day 2's id-less ones, no longer lists day 1's,
    // rejects t9, adds t5, changes the holder's name, the nickname and the balance.
    bank.put_dataset(
        &key,
        &dataset(
            "Mr Changed",
            "Household",
            "55.50",
            vec![
                tx(Some("t1"), "Booked", 3, "5.00"),
                tx(None, "Booked", 2, "15.00"),
                tx(Some("t5"), "Booked", 2, "7.00"),
                tx(Some("t9"), "Rejected", 1, "9.00"),
            ],
        ),
    )
    .await;
    let second = api.refresh(&token, &consent).await;
    let record = api.wait_terminal(&token, &second).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(
        record["summary"],
        json!({"accountsUpdated": 1, "balancesUpdated": 1, "transactionsAdded": 2,
               "transactionsUpdated": 1, "transactionsRemoved": 3}),
        "{record}"
    );
    let uuid = uuid::Uuid::parse_str(&consent).unwrap();
    let rows: Vec<(Option<String>, String, String, chrono::NaiveDate)> = sqlx::query_as(
        "SELECT transaction_id, status, amount, booking_date FROM transactions WHERE consent_id = $1 \
         ORDER BY booking_date, transaction_id NULLS FIRST, amount",
    )
    .bind(uuid)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    let date = |d: i64| (Utc::now() - TimeDelta::days(d)).date_naive();
    assert_eq!(
        rows,
        vec![
            (Some("t1".into()), "BOOKED".into(), "5.00".into(), date(3)),
            (None, "BOOKED".into(), "15.00".into(), date(2)),
            (Some("t5".into()), "BOOKED".into(), "7.00".into(), date(2)),
            (None, "BOOKED".into(), "30.00".into(), date(1)),
        ]
    );
    let parties: Value =
        sqlx::query_scalar("SELECT data FROM account_parties WHERE consent_id = $1")
            .bind(uuid)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        parties["Account"][0]["Name"], "Ms Original",
        "parties are kept from the initial load"
    );
    let account: Value = sqlx::query_scalar("SELECT data FROM accounts WHERE consent_id = $1")
        .bind(uuid)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(account["Nickname"], "Household");
    assert!(account.get("Account").is_none());
    let balances: Vec<String> =
        sqlx::query_scalar("SELECT amount FROM balances WHERE consent_id = $1")
            .bind(uuid)
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert_eq!(balances, ["55.50"]);
}

#[tokio::test]
async fn revoked_and_mfa_end_in_error() {
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let revoked = api.seed_consent("acme", None, None).await;
    bank.scenario(&format!("token-{revoked}"), &json!({"revoked": true}))
        .await;
    let mfa = api.seed_consent("acme", None, None).await;
    bank.scenario(&format!("token-{mfa}"), &json!({"mfaRequired": true}))
        .await;

    let id = api.refresh(&token, &revoked.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "consent_revoked");
    assert_eq!(
        record["error"]["message"],
        "The consent or account access has been revoked"
    );
    let consent = api.get(&format!("/v1/consents/{revoked}"), &token).await;
    assert_eq!(consent.body["status"], "REVOKED", "{consent:?}");

    let id = api.refresh(&token, &mfa.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "mfa_required");
    assert_eq!(
        bank.calls(&format!("token-{mfa}")).await.len(),
        1,
        "no retry"
    );
    let consent = api.get(&format!("/v1/consents/{mfa}"), &token).await;
    assert_eq!(consent.body["status"], "ACTIVE", "{consent:?}");
    assert_eq!(consent.body["refreshing"], false, "the lock is freed");
}

#[tokio::test]
async fn transient_failures_are_retried_then_exhausted() {
    let (app, api, bank) = started(3).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let flaky = api.seed_consent("acme", None, None).await;
    let key = format!("token-{flaky}");
    bank.scenario(&key, &json!({"failNext": {"count": 2, "status": 503}}))
        .await;
    let id = api.refresh(&token, &flaky.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    let statuses: Vec<Value> = bank
        .calls(&key)
        .await
        .iter()
        .map(|c| c["status"].clone())
        .collect();
    assert_eq!(
        &statuses[..3],
        [json!(503), json!(503), json!(200)],
        "{statuses:?}"
    );
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM refreshes WHERE refresh_id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(attempts, 3);

    let down = api.seed_consent("acme", None, None).await;
    let key = format!("token-{down}");
    bank.scenario(&key, &json!({"failNext": {"count": 100, "status": 503}}))
        .await;
    let id = api.refresh(&token, &down.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "bank_unavailable");
    assert_eq!(
        record["error"]["message"],
        "The bank was unavailable after 3 attempts"
    );
    assert_eq!(bank.calls(&key).await.len(), 3);

    // The worker's metrics are served with the API's. The in-flight gauge
    // drops just after the terminal status is committed, so poll briefly.
    let expected = [
        "refreshd_refreshes_total{outcome=\"UPDATED\",code=\"\"} 1",
        "refreshd_refreshes_total{outcome=\"ERROR\",code=\"bank_unavailable\"} 1",
        // 2 retries for the flaky bank, 2 for the down one before giving up.
        "refreshd_refresh_retries_total 4",
        "refreshd_bank_errors_total{provider=\"sim\",kind=\"transient\"} 5",
        "refreshd_bank_fetch_seconds_count{provider=\"sim\"} 6",
        "refreshd_refreshes_in_flight 0",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = api
            .call(reqwest::Method::GET, "/metrics", None, None, &[])
            .await;
        let text = metrics.body.as_str().unwrap().to_owned();
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|line| !text.contains(line))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing:?} not in {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_malformed_bank_payload_ends_in_bank_error_and_stores_nothing() {
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let key = format!("token-{consent}");
    // An amount as a float: the bank's data would be stored wrong, so it is refused.
    let mut bad = dataset(
        "Ann",
        "main",
        "10.00",
        vec![tx(Some("T1"), "Booked", 1, "1.00")],
    );
    bad["transactions"][0]["Amount"]["Amount"] = json!(12.5);
    bank.put_dataset(&key, &bad).await;
    let id = api.refresh(&token, &consent.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "bank_error");
    assert!(record["summary"].is_null());
    let consent = consent.to_string();
    for table in ["accounts", "balances", "transactions"] {
        let rows = count(
            &app,
            &format!("SELECT count(*) FROM {table} WHERE consent_id = $1"),
            &consent,
        )
        .await;
        assert_eq!(rows, 0, "{table}: nothing stored");
    }
    assert_eq!(
        bank.calls(&key).await.len(),
        3,
        "no retry after a malformed answer"
    );
}

#[tokio::test]
async fn an_upstream_amqp_request_reaches_updated_with_both_events() {
    let (app, api, _bank) = started(5).await;
    let consent = api.seed_consent("acme", None, None).await;
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.*.acme").await.unwrap();
    let mut events = broker.consume(&probe, 10);
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 1);
    let body =
        json!({ "consentId": consent, "tenantId": "acme", "requestedBy": "APP" }).to_string();
    broker
        .publish_request(
            body.as_bytes(),
            Some("upstream-1"),
            Some(&reply_queue),
            Some("c-1"),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(reply["accepted"], true, "{reply}");
    let refresh_id = reply["refreshId"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.body).unwrap();
        if event["data"]["refreshId"] == refresh_id.as_str() {
            seen.push((
                event["type"].as_str().unwrap().to_owned(),
                event["data"]["requestedBy"].clone(),
            ));
        }
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    assert_eq!(
        seen,
        [
            ("io.refreshd.refresh.initialized".to_owned(), json!("APP")),
            ("io.refreshd.refresh.updated".to_owned(), json!("APP")),
        ]
    );
    let rows = count(
        &app,
        "SELECT count(*) FROM transactions WHERE consent_id = $1",
        &consent.to_string(),
    )
    .await;
    assert!(rows > 0, "the bank's transactions are stored");
}

#[tokio::test]
async fn a_poison_job_is_dead_lettered_and_the_worker_keeps_going() {
    let (app, api, _bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    broker
        .publish_job(b"{\"not\": \"a job\"}", "poison-1", None)
        .await
        .unwrap();
    let mut dead = broker.consume(&broker.names().jobs_dead.clone(), 10);
    let delivery = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message_id.as_deref(), Some("poison-1"));
    assert!(
        delivery
            .dead_letter_reason()
            .is_some_and(|r| r.contains("malformed job")),
        "{:?}",
        delivery.dead_letter_reason()
    );
    delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    // The next job is handled as usual.
    let consent = api.seed_consent("acme", None, None).await;
    let id = api.refresh(&token, &consent.to_string()).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
}

#[tokio::test]
async fn a_job_taken_before_its_admission_commits_is_refreshed_once() {
    let (app, api, _bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let rows = refresh_tests::admission::AdmissionRows::now(consent);
    // The admission's rows written in a transaction still open, and a copy of its job
    // published meanwhile (as a job of an earlier version, which published before its
    // commit, or a copy sent twice): the worker takes it before the record exists.
    // Once committed, the relay publishes the outbox's copy too; the two copies still
    // make one bank call.
    let mut pending = app.pg.begin().await.unwrap();
    refresh_pg::write_admission(&mut *pending, &rows.admission(i64::MAX))
        .await
        .unwrap();
    let id = rows.record.refresh_id.to_string();
    api.services
        .broker
        .publish_job(&rows.job, &id, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pending.commit().await.unwrap();

    let done = api.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "UPDATED", "{done}");
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM refreshes WHERE refresh_id = $1")
        .bind(rows.record.refresh_id.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(attempts, 1, "refreshed exactly once");
}

/// SPEC §3: a revoke while a refresh is in flight: the refresh stores nothing more
/// and ends `ERROR consent_revoked` (checked in the fenced finishing transaction).
#[tokio::test]
async fn a_revoke_while_the_bank_is_called_stores_nothing_and_ends_consent_revoked() {
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await.to_string();
    let key = format!("token-{consent}");
    let data = dataset(
        "Ada",
        "Main",
        "10.00",
        vec![tx(Some("t1"), "Booked", 1, "5.00")],
    );
    bank.put_dataset(&key, &data).await;
    bank.scenario(&key, &json!({"latencyMs": 1500})).await;

    let refresh = api.refresh(&token, &consent).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bank.calls(&key).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the bank was never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let revoked = api
        .post(&format!("/v1/consents/{consent}/revoke"), &token, None)
        .await;
    assert_eq!(revoked.status, 200, "{revoked:?}");

    let record = api.wait_terminal(&token, &refresh).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "consent_revoked");
    assert_eq!(
        record["error"]["message"],
        "The consent or account access has been revoked"
    );
    for table in ["accounts", "balances", "transactions"] {
        let rows = count(
            &app,
            &format!("SELECT count(*) FROM {table} WHERE consent_id = $1"),
            &consent,
        )
        .await;
        assert_eq!(rows, 0, "{table}");
    }
    let last: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT last_refresh_id FROM consents WHERE consent_id = $1")
            .bind(uuid::Uuid::parse_str(&consent).unwrap())
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(last, None);
}

/// The consent's lock outlives a bank retry's wait: a job waiting out its backoff
/// (here longer than the lease) still holds it, so no other refresh of the consent
/// is admitted meanwhile; the retry then refreshes.
#[tokio::test]
async fn a_job_waiting_out_a_bank_retry_longer_than_its_lease_keeps_its_lock() {
    let (app, api, bank) =
        app_with_bank(&[("stagger.limit", "600"), ("lock.lease_secs", "5")]).await;
    let mut config = fast_worker_config(&app);
    // Equal jitter: every wait is between 6 and 12 s, above the 5 s lease.
    config.backoff_base = Duration::from_secs(12);
    config.backoff_max = Duration::from_secs(12);
    start_worker(&app, &api, config);
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let key = format!("token-{consent}");
    bank.scenario(&key, &json!({"failNext": {"count": 1, "status": 503}}))
        .await;

    let refresh = api.refresh(&token, &consent.to_string()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bank.calls(&key).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the bank was never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past a whole lease after the failed attempt, the job is still waiting.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let holder = api.services.gate.in_flight(consent).await.unwrap();
    assert_eq!(holder.map(|id| id.to_string()), Some(refresh.clone()));
    let second = api
        .post(&format!("/v1/consents/{consent}/refresh"), &token, None)
        .await;
    assert_eq!(second.status, 409, "{second:?}");
    assert_eq!(second.body["code"], "refresh_in_progress");

    let record = api.wait_terminal(&token, &refresh).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(
        count(
            &app,
            "SELECT max(attempts)::bigint FROM refreshes WHERE consent_id = $1",
            &consent.to_string()
        )
        .await,
        2
    );
}

/// A job delivered again while its first delivery is still calling the bank (as the
/// broker does when a channel closes under a worker that keeps running) is deferred:
/// the bank is called once, the refresh has one attempt and ends once.
#[tokio::test]
async fn a_second_delivery_of_a_running_refresh_never_calls_the_bank() {
    use refresh_core::{Job, ProviderId, RefreshId, RequestedBy, TenantId};
    let (app, api, bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let key = format!("token-{consent}");
    bank.scenario(&key, &json!({"latencyMs": 400})).await;

    let refresh = api.refresh(&token, &consent.to_string()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bank.calls(&key).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the bank was never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same job again, while the first delivery waits for the bank.
    let job = Job {
        refresh_id: RefreshId::from_uuid(uuid::Uuid::parse_str(&refresh).unwrap()),
        consent_id: consent,
        tenant_id: TenantId::parse("acme").unwrap(),
        provider_id: ProviderId::parse("sim").unwrap(),
        requested_by: RequestedBy::Api,
        initial: false,
        not_before: Utc::now(),
        traceparent: None,
    };
    api.services
        .broker
        .publish_job(&job.to_bytes(), &refresh, None)
        .await
        .unwrap();

    let record = api.wait_terminal(&token, &refresh).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    // The duplicate was deferred while the first ran (it comes back later, finds the
    // refresh ended, and is acked without a call); had it not been, it would have
    // called the bank by now.
    let metrics = api
        .call(reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = metrics.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("refreshd_duplicate_deliveries_deferred_total 1"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first_pages = bank
        .calls(&key)
        .await
        .iter()
        .filter(|call| {
            call["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/accounts"))
        })
        .count();
    assert_eq!(first_pages, 1, "{:?}", bank.calls(&key).await);
    assert_eq!(
        count(
            &app,
            "SELECT max(attempts)::bigint FROM refreshes WHERE consent_id = $1",
            &consent.to_string()
        )
        .await,
        1
    );
}

/// An admission that failed after the gate and whose undo never ran (Redis down as
/// well, or the process killed in between) leaves a quota entry with no record: it
/// counts for at most a lease, then the next refusal forgets it and admits; entries
/// of admissions that committed are kept.
#[tokio::test]
async fn a_failed_undo_frees_the_quota_within_a_lease() {
    use refresh_core::{ProviderId, RefreshId, RequestedBy, TenantId};
    use refresh_redis::{GateDecision, GateRequest};
    let (app, api, _bank) =
        app_with_bank(&[("stagger.limit", "600"), ("lock.lease_secs", "10")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let gate = &api.services.gate;
    // Three admissions the gate counted that never committed, their undo lost;
    // their locks lapsed.
    for _ in 0..3 {
        let phantom = GateRequest {
            consent_id: consent,
            tenant_id: TenantId::parse("acme").unwrap(),
            facts: Some(refresh_redis::ConsentFacts {
                tenant_id: TenantId::parse("acme").unwrap(),
                provider_id: ProviderId::parse("sim").unwrap(),
                status: refresh_core::ConsentStatus::Active,
                expires_at: Utc::now() + TimeDelta::days(90),
            }),
            requested_by: RequestedBy::Api,
            refresh_id: RefreshId::from_uuid(uuid::Uuid::now_v7()),
            count_quota: true,
        };
        let decision = gate.admit(&phantom).await.unwrap();
        assert!(
            matches!(decision, GateDecision::Admitted(_)),
            "{decision:?}"
        );
        assert!(
            gate.release_lock(consent, phantom.refresh_id)
                .await
                .unwrap()
        );
    }
    let phantoms_at = std::time::Instant::now();
    // One real refresh: the fourth of the limit.
    let real = api.refresh(&token, &consent.to_string()).await;
    assert_eq!(api.wait_terminal(&token, &real).await["status"], "UPDATED");

    // Within a lease the phantoms may still be admissions about to commit: refused.
    let path = format!("/v1/consents/{consent}/refresh");
    let refused = api.post(&path, &token, None).await;
    assert!(
        phantoms_at.elapsed() < Duration::from_secs(10),
        "the setup took a lease"
    );
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body["code"], "daily_limit_reached");

    // A lease later they are known to have failed: forgotten, and the request admitted.
    tokio::time::sleep(
        Duration::from_secs(10).saturating_sub(phantoms_at.elapsed()) + Duration::from_millis(500),
    )
    .await;
    let admitted = api.post(&path, &token, None).await;
    assert_eq!(admitted.status, 202, "{admitted:?}");
    let quota = gate
        .quota(consent, RequestedBy::Api)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(quota.used, 2, "the two real refreshes still count");
    let metrics = api
        .call(reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = metrics.body.as_str().unwrap().to_owned();
    assert!(
        text.contains("refreshd_quota_entries_healed_total 3"),
        "{text}"
    );
}

/// A plain refresh that ran as the consent's initial load (none had succeeded yet)
/// was counted against the quota at admission, so a gate rebuilt from the records
/// still counts it.
#[tokio::test]
async fn a_plain_refresh_run_as_the_initial_load_still_counts_after_a_gate_rebuild() {
    let (app, api, _bank) = started(5).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let refresh = api.refresh(&token, &consent.to_string()).await;
    assert_eq!(
        api.wait_terminal(&token, &refresh).await["status"],
        "UPDATED"
    );
    let loaded = count(
        &app,
        "SELECT count(*) FROM consents WHERE consent_id = $1 AND initial_loaded_at IS NOT NULL",
        &consent.to_string(),
    )
    .await;
    assert_eq!(loaded, 1, "the refresh ran as the initial load");

    refresh_redis::delete_namespace(&app.redis, &app.namespace)
        .await
        .unwrap();
    let view = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(view.status, 200, "{view:?}");
    assert_eq!(view.body["quota"]["used"], 1, "{view:?}");
}
