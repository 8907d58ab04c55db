//! The scheduler (SPEC §6) through the real services: auto-sync once per due consent
//! across replicas, spread due times, backoff of refusals, expiry, inactivation with
//! data removal, stalled refreshes, dead-lettered jobs, retention. Time is the test's:
//! ticks run at instants it chooses, and rows are back-dated.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use redis::AsyncCommands as _;
use refresh_core::{ConsentId, RequestedBy, TenantId, autosync_due_at, autosync_jitter_bp};
use refresh_pg::TenantSettingsRow;
use refresh_scheduler::{Scheduler, TickReport};
use refresh_tests::{Api, TestApp, app_with_bank, dev_token, fast_worker_config, start_worker};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const STORED: &str = "api:stored_data";

/// A scheduler replica of `api`'s namespace (its metrics served with the API's).
fn replica(app: &TestApp, api: &Api) -> Scheduler {
    refreshd::scheduler::build(
        &app.settings,
        &api.services,
        &api.metrics,
        refresh_admission::AdmissionMetrics::default(),
        Arc::new(Notify::new()),
        &tokio_util::task::TaskTracker::new(),
    )
}

async fn tick(scheduler: &Scheduler, at: DateTime<Utc>) -> TickReport {
    scheduler.tick(at, &CancellationToken::new()).await.unwrap()
}

async fn set_interval(api: &Api, tenant: &str, hours: Option<i32>, inactivation_days: i32) {
    api.services
        .store
        .put_tenant_settings(
            &TenantId::parse(tenant).unwrap(),
            TenantSettingsRow {
                autosync_interval_hours: hours,
                inactivation_days,
            },
            Utc::now(),
        )
        .await
        .unwrap();
}

/// Moves the consent's registration (and last success, if any) `age` into the past.
async fn age_consent(app: &TestApp, consent: ConsentId, age: TimeDelta) {
    sqlx::query(
        "UPDATE consents SET created_at = created_at - $2, \
         last_refreshed_at = last_refreshed_at - $2 WHERE consent_id = $1",
    )
    .bind(consent.as_uuid())
    .bind(age)
    .execute(&app.pg)
    .await
    .unwrap();
}

async fn created_at(app: &TestApp, consent: ConsentId) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT created_at FROM consents WHERE consent_id = $1")
        .bind(consent.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

/// The AUTOSYNC refreshes of the namespace: (consent, count).
async fn autosyncs(app: &TestApp) -> Vec<(uuid::Uuid, i64)> {
    sqlx::query_as(
        "SELECT consent_id, count(*) FROM refreshes WHERE requested_by = 'AUTOSYNC' \
         GROUP BY consent_id ORDER BY consent_id",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
}

async fn consent_status(app: &TestApp, consent: ConsentId) -> String {
    sqlx::query_scalar("SELECT status FROM consents WHERE consent_id = $1")
        .bind(consent.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

/// The payloads of the outbox events with `routing_key`.
async fn outbox_events(app: &TestApp, routing_key: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT payload FROM outbox WHERE routing_key = $1 ORDER BY id")
        .bind(routing_key)
        .fetch_all(&app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_replicas_request_each_due_consent_exactly_once_per_tick() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    set_interval(&api, "acme", Some(6), 90).await;
    let mut due = BTreeSet::new();
    for i in 0..24 {
        let consent = api.seed_consent("acme", None, None).await;
        if i % 3 != 0 {
            // Older than the interval whatever its jitter.
            age_consent(&app, consent, TimeDelta::hours(7)).await;
            due.insert(*consent.as_uuid());
        }
    }
    // Another tenant without auto-sync, and an expired consent of this one: never due.
    let other = api.seed_consent("globex", None, None).await;
    age_consent(&app, other, TimeDelta::hours(7)).await;
    let expired = api
        .seed_consent("acme", None, Some(Utc::now() - TimeDelta::minutes(1)))
        .await;
    age_consent(&app, expired, TimeDelta::hours(7)).await;

    let (a, b) = (replica(&app, &api), replica(&app, &api));
    let now = Utc::now();
    let (ra, rb) = tokio::join!(tick(&a, now), tick(&b, now));
    assert_eq!(ra.requested + rb.requested, 16, "{ra:?} {rb:?}");
    assert!(
        ra.refused.is_empty() && rb.refused.is_empty(),
        "{ra:?} {rb:?}"
    );
    let requested = autosyncs(&app).await;
    assert_eq!(
        requested.iter().map(|(c, _)| *c).collect::<BTreeSet<_>>(),
        due
    );
    assert!(requested.iter().all(|(_, n)| *n == 1), "{requested:?}");
    // Nothing is asked twice: the requested consents are refreshing now.
    let later = now + TimeDelta::seconds(30);
    let (ra, rb) = tokio::join!(tick(&a, later), tick(&b, later));
    assert_eq!((ra.requested, rb.requested), (0, 0), "{ra:?} {rb:?}");
    assert_eq!(autosyncs(&app).await.len(), 16);
    // Auto-sync counts against no quota under the default rules.
    let consent = ConsentId::from_uuid(*due.iter().next().unwrap());
    let quota = api
        .services
        .gate
        .quota(consent, RequestedBy::Api)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(quota.used, 0);
}

#[tokio::test]
async fn consents_registered_together_get_spread_due_times() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    set_interval(&api, "acme", Some(6), 90).await;
    let mut consents = Vec::new();
    for _ in 0..40 {
        let consent = api.seed_consent("acme", None, None).await;
        // 5 h 42 min old: due only with a jitter of more than 18 of the 36 minutes.
        age_consent(&app, consent, TimeDelta::minutes(342)).await;
        consents.push(consent);
    }
    let now = Utc::now();
    let mut expected = BTreeSet::new();
    for consent in &consents {
        let due = autosync_due_at(
            created_at(&app, *consent).await,
            6,
            autosync_jitter_bp(*consent),
        );
        let anchor = created_at(&app, *consent).await;
        assert!(due > anchor + TimeDelta::minutes(324) - TimeDelta::seconds(1));
        assert!(due <= anchor + TimeDelta::hours(6));
        if due <= now {
            expected.insert(*consent.as_uuid());
        }
    }
    assert!(
        !expected.is_empty() && expected.len() < consents.len(),
        "the jitter spreads them: {} of {} due",
        expected.len(),
        consents.len()
    );
    let report = tick(&replica(&app, &api), now).await;
    assert_eq!(report.requested as usize, expected.len(), "{report:?}");
    assert_eq!(report.due as usize, expected.len());
    let requested: BTreeSet<_> = autosyncs(&app).await.into_iter().map(|(c, _)| c).collect();
    assert_eq!(requested, expected);
}

#[tokio::test]
async fn a_backlog_full_refusal_is_asked_again_after_its_backoff_and_then_admitted() {
    let app = refresh_tests::spawn_app_with(&[
        ("stagger.limit", "1"),
        ("stagger.period_secs", "60"),
        ("stagger.max_delay_secs", "30"),
    ])
    .await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    set_interval(&api, "acme", Some(6), 90).await;
    // An on-demand refresh takes the only slot of the minute.
    let busy = api.seed_consent("acme", None, None).await;
    api.refresh(&token, &busy.to_string()).await;
    let consent = api.seed_consent("acme", None, None).await;
    age_consent(&app, consent, TimeDelta::hours(7)).await;
    let scheduler = replica(&app, &api);

    let t0 = Utc::now();
    let first = tick(&scheduler, t0).await;
    assert_eq!(first.requested, 0, "{first:?}");
    assert_eq!(first.refused.get("backlog_full"), Some(&1), "{first:?}");
    // Within the backoff (a minute after the first refusal) nobody asks again.
    let waiting = tick(&scheduler, t0 + TimeDelta::seconds(30)).await;
    assert_eq!(
        (waiting.requested, waiting.refused.len()),
        (0, 0),
        "{waiting:?}"
    );
    assert_eq!(waiting.due, 1, "still due, backing off");

    // The backlog drains (its slots are past); after the backoff it is admitted.
    let mut redis = app.redis.clone();
    let _: () = redis
        .del(&[
            format!("{}:{{stagger:global}}", app.namespace),
            format!("{}:{{stagger:global}}:slots", app.namespace),
        ])
        .await
        .unwrap();
    let after = tick(&scheduler, t0 + TimeDelta::seconds(61)).await;
    assert_eq!(after.requested, 1, "{after:?}");
    assert!(after.refused.is_empty(), "{after:?}");
    assert_eq!(autosyncs(&app).await, vec![(*consent.as_uuid(), 1)]);
    let attempts: i32 =
        sqlx::query_scalar("SELECT autosync_attempts FROM consents WHERE consent_id = $1")
            .bind(consent.as_uuid())
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(attempts, 2, "the second request since the last success");
    let metrics = api
        .call(reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains("refreshd_scheduler_autosync_refused_total{code=\"backlog_full\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("refreshd_scheduler_autosync_requested_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_consent_past_its_expiry_is_refused_before_and_after_the_scheduler_marks_it() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("consent.#").await.unwrap();
    let mut events = broker.consume(&probe, 10);
    let consent = api
        .seed_consent("acme", None, Some(Utc::now() - TimeDelta::seconds(5)))
        .await;
    let live = api.seed_consent("acme", None, None).await;
    let path = format!("/v1/consents/{consent}/refresh");
    let before = api.post(&path, &token, None).await;
    assert_eq!(before.status, 403, "{before:?}");
    assert_eq!(before.body["code"], "consent_expired");
    assert_eq!(consent_status(&app, consent).await, "ACTIVE");

    let report = tick(&replica(&app, &api), Utc::now()).await;
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(consent_status(&app, consent).await, "EXPIRED");
    assert_eq!(consent_status(&app, live).await, "ACTIVE");
    let after = api.post(&path, &token, None).await;
    assert_eq!(after.status, 403, "{after:?}");
    assert_eq!(after.body["code"], "consent_expired");

    let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the consent.expired event is published")
        .unwrap();
    let event: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(event["type"], "io.refreshd.consent.expired");
    assert_eq!(event["subject"], consent.to_string());
    assert_eq!(event["data"]["consentId"], consent.to_string());
    assert_eq!(event["data"]["status"], "EXPIRED");
    assert_eq!(event["data"]["tenantId"], "acme");
    assert_eq!(event["data"]["refreshing"], false);
    // Once: a second tick (or replica) finds nothing to expire.
    let again = tick(&replica(&app, &api), Utc::now()).await;
    assert_eq!(again.expired, 0);
    assert_eq!(outbox_events(&app, "consent.expired.acme").await.len(), 1);
}

#[tokio::test]
async fn a_revoke_through_the_api_is_announced() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let answer = api
        .post(&format!("/v1/consents/{consent}/revoke"), &token, None)
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let again = api
        .post(&format!("/v1/consents/{consent}/revoke"), &token, None)
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    let events = outbox_events(&app, "consent.revoked.acme").await;
    assert_eq!(events.len(), 1, "announced once: {events:?}");
    assert_eq!(events[0]["type"], "io.refreshd.consent.revoked");
    assert_eq!(events[0]["data"]["status"], "REVOKED");
    assert_eq!(events[0]["data"]["consentId"], consent.to_string());
}

#[tokio::test]
async fn an_inactivated_consent_has_no_stored_data_left_and_keeps_its_record_and_history() {
    let (app, api, _bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), STORED);
    // A simulator key whose dataset has every data kind.
    let body = json!({ "providerId": "sim", "bankConsentId": "data-test-2", "accessToken": "data-test-2", "expiresAt": "2099-01-01T00:00:00Z" });
    let answer = api.post("/v1/consents", &token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let consent: ConsentId = answer.body["consentId"].as_str().unwrap().parse().unwrap();
    let initial = answer.body["initialRefresh"]["refreshId"].as_str().unwrap();
    assert_eq!(
        api.wait_terminal(&token, initial).await["status"],
        "UPDATED"
    );
    let kinds = [
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
    ];
    let mut stored = 0;
    for kind in kinds {
        let page = api
            .get(&format!("/v1/consents/{consent}/{kind}"), &token)
            .await;
        assert_eq!(page.status, 200, "{kind}: {page:?}");
        stored += page.body["items"].as_array().unwrap().len();
    }
    assert!(stored > 10, "the dataset has data to remove");
    // A recent consent of the same tenant stays as it is.
    let recent = api.seed_consent("acme", None, None).await;

    // 90 days (the default inactivationDays) without a successful refresh.
    age_consent(&app, consent, TimeDelta::days(91)).await;
    let report = tick(&replica(&app, &api), Utc::now()).await;
    assert_eq!(report.inactivated, 1, "{report:?}");
    assert!(report.removed.total() >= stored as u64, "{report:?}");
    assert_eq!(consent_status(&app, consent).await, "INACTIVE");
    assert_eq!(consent_status(&app, recent).await, "ACTIVE");
    for kind in kinds {
        let page = api
            .get(&format!("/v1/consents/{consent}/{kind}"), &token)
            .await;
        assert_eq!(page.status, 200, "{kind}: {page:?}");
        assert_eq!(page.body["items"], json!([]), "{kind} is empty");
    }
    for table in [
        "accounts",
        "account_parties",
        "balances",
        "transactions",
        "stored_items",
    ] {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE consent_id = $1"
        )))
        .bind(consent.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert_eq!(left, 0, "{table}");
    }
    let record = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(record.status, 200);
    assert_eq!(record.body["status"], "INACTIVE");
    let history = api
        .get(&format!("/v1/consents/{consent}/refreshes"), &token)
        .await;
    assert_eq!(
        history.body["items"].as_array().unwrap().len(),
        1,
        "{history:?}"
    );
    let refused = api
        .post(&format!("/v1/consents/{consent}/refresh"), &token, None)
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.body["code"], "consent_inactive");
    let events = outbox_events(&app, "consent.inactivated.acme").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "io.refreshd.consent.inactivated");
    assert_eq!(events[0]["data"]["status"], "INACTIVE");
}

#[tokio::test]
async fn a_tenants_inactivation_days_decide_when_its_consents_go_inactive() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    set_interval(&api, "acme", None, 3).await;
    let old = api.seed_consent("acme", None, None).await;
    age_consent(&app, old, TimeDelta::days(3) + TimeDelta::minutes(1)).await;
    let young = api.seed_consent("acme", None, None).await;
    age_consent(&app, young, TimeDelta::days(2)).await;
    // Another tenant's consent of the same age keeps the 90-day default.
    let other = api.seed_consent("globex", None, None).await;
    age_consent(&app, other, TimeDelta::days(4)).await;
    let report = tick(&replica(&app, &api), Utc::now()).await;
    assert_eq!(report.inactivated, 1, "{report:?}");
    assert_eq!(consent_status(&app, old).await, "INACTIVE");
    assert_eq!(consent_status(&app, young).await, "ACTIVE");
    assert_eq!(consent_status(&app, other).await, "ACTIVE");
}

#[tokio::test]
async fn retention_removes_exactly_what_is_past_its_age() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    let consent = api.seed_consent("acme", None, None).await;
    let now = Utc::now();
    let history = [
        ("old", TimeDelta::days(7) + TimeDelta::minutes(1)),
        ("kept", TimeDelta::days(7) - TimeDelta::minutes(1)),
    ];
    let mut ids = Vec::new();
    for (_, age) in history {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO refreshes (refresh_id, consent_id, tenant_id, requested_by, status, \
             date_requested, not_before, finished_at) VALUES ($1, $2, 'acme', 'API', 'UPDATED', $3, $3, $3)",
        )
        .bind(id)
        .bind(consent.as_uuid())
        .bind(now - age)
        .execute(&app.pg)
        .await
        .unwrap();
        ids.push(id);
    }
    for (age, published) in [
        (TimeDelta::days(8), true),
        (TimeDelta::days(6), true),
        (TimeDelta::days(8), false),
    ] {
        sqlx::query(
            "INSERT INTO outbox (event_id, routing_key, payload, created_at, published_at) \
             VALUES ($1, 'refresh.updated.acme', '{}', $2, $3)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(now - age)
        .bind(published.then(|| now - age))
        .execute(&app.pg)
        .await
        .unwrap();
    }
    for (key, age) in [
        ("old", TimeDelta::hours(24) + TimeDelta::minutes(1)),
        ("kept", TimeDelta::hours(23)),
    ] {
        sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, created_at, http_status, response) \
             VALUES ('acme', $1, $2, 202, '{}')",
        )
        .bind(key)
        .bind(now - age)
        .execute(&app.pg)
        .await
        .unwrap();
    }
    // The ingress's relay would publish the unpublished event before the tick: held
    // here (its relay skips locked rows), it stays unpublished throughout.
    let mut held = app.pg.begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();
    let report = tick(&replica(&app, &api), now).await;
    assert_eq!(
        (
            report.retained.history,
            report.retained.outbox,
            report.retained.idempotency_keys
        ),
        (1, 1, 1),
        "{report:?}"
    );
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT refresh_id FROM refreshes")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    assert_eq!(left, vec![ids[1]]);
    let outbox: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT created_at, published_at FROM outbox ORDER BY id")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    assert!(outbox[0].1.is_some_and(|p| p > now - TimeDelta::days(7)));
    assert!(
        outbox[1].1.is_none(),
        "an unpublished event is never removed"
    );
    held.commit().await.unwrap();
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    assert_eq!(keys, vec!["kept".to_owned()]);
    // The record of the consent stays.
    assert_eq!(consent_status(&app, consent).await, "ACTIVE");
}

#[tokio::test]
async fn a_stalled_refresh_is_ended_and_its_consent_freed() {
    let app = refresh_tests::spawn_app().await;
    let api = app.start_ingress().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let lost = api.seed_consent("acme", None, None).await;
    let held = api.seed_consent("acme", None, None).await;
    let lost_refresh = api.refresh(&token, &lost.to_string()).await;
    let held_refresh = api.refresh(&token, &held.to_string()).await;
    // Both are long past their start slot; only `held` still has a worker's lease.
    sqlx::query("UPDATE refreshes SET not_before = not_before - interval '1 hour'")
        .execute(&app.pg)
        .await
        .unwrap();
    let mut redis = app.redis.clone();
    let _: () = redis
        .del(format!("{}:{{c:{lost}}}:lock", app.namespace))
        .await
        .unwrap();
    let blocked = api
        .post(&format!("/v1/consents/{lost}/refresh"), &token, None)
        .await;
    assert_eq!(
        blocked.status, 409,
        "the database still says in flight: {blocked:?}"
    );

    let lost_trace: String =
        sqlx::query_scalar("SELECT traceparent FROM refreshes WHERE refresh_id = $1")
            .bind(uuid::Uuid::parse_str(&lost_refresh).unwrap())
            .fetch_one(&app.pg)
            .await
            .unwrap();
    let report = tick(&replica(&app, &api), Utc::now()).await;
    assert_eq!(report.stalled, 1, "{report:?}");
    let record = api
        .get(&format!("/v1/refreshes/{lost_refresh}"), &token)
        .await;
    assert_eq!(record.body["status"], "ERROR", "{record:?}");
    assert_eq!(record.body["error"]["code"], "internal_error");
    assert_eq!(
        record.body["error"]["message"],
        "The refresh could not be run: its job was lost or dead-lettered, and no worker held it"
    );
    // The ERROR event carries the refresh's trace, like its INITIALIZED one.
    assert_eq!(
        event_traces(&app, &lost_refresh).await,
        vec![
            (
                "refresh.initialized.acme".to_owned(),
                Some(lost_trace.clone())
            ),
            ("refresh.error.acme".to_owned(), Some(lost_trace)),
        ]
    );
    let other = api
        .get(&format!("/v1/refreshes/{held_refresh}"), &token)
        .await;
    assert_eq!(other.body["status"], "INITIALIZED");
    // The consent is free again.
    api.refresh(&token, &lost.to_string()).await;
    let metrics = api
        .call(reqwest::Method::GET, "/metrics", None, None, &[])
        .await;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("refreshd_scheduler_stalled_refreshes_total 1"),
        "{metrics:?}"
    );
}

#[tokio::test]
async fn a_dead_lettered_job_ends_its_refresh_at_once() {
    let (app, api, _bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let now = Utc::now();
    let trace: refresh_core::TraceContext =
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap();
    let mut rows = refresh_tests::admission::AdmissionRows::new(
        refresh_core::RefreshId::from_uuid(uuid::Uuid::now_v7()),
        consent,
        now,
        now,
        Some(trace),
    );
    // Its job, as the relay publishes it, is broken: the refresh id is readable, the
    // rest is not.
    rows.job = json!({ "refreshId": rows.record.refresh_id, "consentId": "not-a-uuid" })
        .to_string()
        .into_bytes();
    api.services
        .store
        .admit(&rows.admission(i64::MAX)) // no rebuild since
        .await
        .unwrap();
    let record = &rows.record;
    let id = record.refresh_id.to_string();
    let done = api.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "ERROR", "{done}");
    assert_eq!(done["error"]["code"], "internal_error");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message
            .starts_with("The refresh could not be run: its job was dead-lettered (malformed job"),
        "{message}"
    );
    // The worker's ERROR event carries the refresh's trace.
    assert_eq!(
        event_traces(&app, &id).await.last(),
        Some(&("refresh.error.acme".to_owned(), Some(trace.to_string())))
    );
    // The consent is free for the next refresh, which runs as usual.
    let next = api.refresh(&token, &consent.to_string()).await;
    assert_eq!(api.wait_terminal(&token, &next).await["status"], "UPDATED");
}

/// The routing key and `traceparent` of each event of `refresh_id` in the outbox,
/// oldest first.
async fn event_traces(app: &TestApp, refresh_id: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT routing_key, payload->>'traceparent' FROM outbox \
         WHERE payload->'data'->>'refreshId' = $1 ORDER BY id",
    )
    .bind(refresh_id)
    .fetch_all(&app.pg)
    .await
    .unwrap()
}
