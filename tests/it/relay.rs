//! Admissions written in batches, the job outbox and its relay (SPEC §2: an admission
//! is durable once its job is committed; a relay publishes it with a confirm). No
//! ingress runs here, so the only relay is the test's.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use refresh_admission::AdmissionMetrics;
use refresh_admission::relay::relay_jobs;
use refresh_core::{ConsentId, Outcome, ProviderId, TenantId};
use refresh_pg::{KeyAnswer, KeyReservation, NewConsent, Store, Written};
use refresh_tests::admission::AdmissionRows;
use refresh_tests::{TestApp, spawn_app};
use refreshd::services::Services;
use secrecy::SecretString;

/// A new app and the services a role of it connects (no role runs).
async fn app_and_services() -> (TestApp, Services) {
    let app = spawn_app().await;
    let services = Services::connect(&app.settings, &app.shutdown, &app.tracker)
        .await
        .unwrap();
    (app, services)
}

/// A consent of `acme` and the rows of one admission of it.
async fn admission_of_new_consent(store: &Store) -> AdmissionRows {
    let consent_id = ConsentId::from_uuid(uuid::Uuid::new_v4());
    let now = Utc::now();
    store
        .insert_consent(&NewConsent {
            consent_id,
            tenant_id: TenantId::parse("acme").unwrap(),
            provider_id: ProviderId::parse("sim").unwrap(),
            bank_consent_id: format!("bank-{consent_id}"),
            access_token: SecretString::from(format!("token-{consent_id}")),
            expires_at: now + TimeDelta::days(90),
            created_at: now,
        })
        .await
        .unwrap();
    AdmissionRows::now(consent_id)
}

#[tokio::test]
async fn a_job_leaves_the_outbox_only_once_committed_and_confirmed_and_comes_again_after_a_crash_before_its_delete()
 {
    let (app, services) = app_and_services().await;
    let (store, broker) = (&services.store, &services.broker);
    let metrics = AdmissionMetrics::default();
    let admitted = admission_of_new_consent(store).await;

    // Written but not committed: no relay sees it, so no worker can take its job.
    let mut open = app.pg.begin().await.unwrap();
    refresh_pg::write_admission(&mut *open, &admitted.admission(i64::MAX))
        .await
        .unwrap();
    assert_eq!(relay_jobs(store, broker, &metrics).await.unwrap(), 0);
    open.commit().await.unwrap();
    assert_eq!(store.pending_jobs().await.unwrap(), 1);

    // A relay that dies between the broker's confirm and its delete: the job stays.
    let died = store
        .publish_pending_jobs(10, |pending| {
            let (body, id) = (pending.body.clone(), pending.refresh_id.to_string());
            async move {
                broker.publish_job(&body, &id, None).await.unwrap();
                Err::<(), _>("the relay died after the confirm")
            }
        })
        .await
        .unwrap();
    assert_eq!(died, 0);
    assert_eq!(
        store.pending_jobs().await.unwrap(),
        1,
        "only a delete ends it"
    );

    // The next round publishes it again and deletes it; then there is nothing left.
    assert_eq!(relay_jobs(store, broker, &metrics).await.unwrap(), 1);
    assert_eq!(store.pending_jobs().await.unwrap(), 0);
    assert_eq!(relay_jobs(store, broker, &metrics).await.unwrap(), 0);

    // Two copies on `jobs`, each the job as committed, under the refresh's id (the
    // worker's fence on that id makes the second a no-op).
    let mut jobs = broker.consume(&broker.names().jobs.clone(), 10);
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), jobs.next())
            .await
            .expect("the job is on the queue")
            .unwrap();
        assert_eq!(delivery.body, admitted.job);
        assert_eq!(
            delivery.message_id.as_deref(),
            Some(admitted.record.refresh_id.to_string().as_str())
        );
        delivery.settle(Outcome::Ack).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), jobs.next())
            .await
            .is_err(),
        "no third copy"
    );
}

#[tokio::test]
async fn a_rolled_back_admission_leaves_no_job() {
    let (app, services) = app_and_services().await;
    let (store, broker) = (&services.store, &services.broker);
    let admitted = admission_of_new_consent(store).await;
    let mut open = app.pg.begin().await.unwrap();
    refresh_pg::write_admission(&mut *open, &admitted.admission(i64::MAX))
        .await
        .unwrap();
    open.rollback().await.unwrap();
    assert_eq!(store.pending_jobs().await.unwrap(), 0);
    let metrics = AdmissionMetrics::default();
    assert_eq!(relay_jobs(store, broker, &metrics).await.unwrap(), 0);
    assert!(
        store
            .refresh(admitted.record.refresh_id)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_batch_of_admissions_writes_each_that_may_be_and_says_why_not_of_the_others() {
    let (app, services) = app_and_services().await;
    let store = &services.store;
    let first = admission_of_new_consent(store).await;
    // A second refresh of the same consent in the same batch, and one decided on a
    // gate state older than the latest rebuild.
    let second = AdmissionRows::now(first.record.consent_id);
    let stale = admission_of_new_consent(store).await;
    let stamp = store.begin_gate_rebuild(1_000).await.unwrap();
    let outcomes = store
        .admit_many(&[
            first.admission(stamp),
            second.admission(stamp),
            stale.admission(stamp - 1),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [Written::Admitted, Written::InFlight, Written::StaleGate]
    );
    assert!(
        store
            .refresh(first.record.refresh_id)
            .await
            .unwrap()
            .is_some()
    );
    for refused in [&second, &stale] {
        assert!(
            store
                .refresh(refused.record.refresh_id)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        store.pending_jobs().await.unwrap(),
        1,
        "one job, the admitted one's"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(events, 1, "one event, the admitted one's");
}

#[tokio::test]
async fn an_admission_answers_its_idempotency_key_in_its_own_commit_only_while_reserved() {
    let (app, services) = app_and_services().await;
    let store = &services.store;
    let tenant = TenantId::parse("acme").unwrap();
    let now = Utc::now();
    let reserve = |key: &'static str, at: chrono::DateTime<Utc>| {
        let tenant = tenant.clone();
        async move {
            match store
                .reserve_key(
                    &tenant,
                    key,
                    at,
                    at - TimeDelta::hours(24),
                    at - TimeDelta::seconds(90),
                )
                .await
                .unwrap()
            {
                KeyReservation::Reserved(fence) => fence,
                other => panic!("{other:?}"),
            }
        }
    };
    let answer = |fence, admitted: &AdmissionRows| {
        let mut admission = admitted.admission(i64::MAX);
        admission.key = Some(KeyAnswer {
            tenant: tenant.clone(),
            key: "k1".to_owned(),
            fence,
            http_status: 202,
            response: serde_json::json!({ "accepted": true, "refreshId": admitted.record.refresh_id }),
        });
        admission
    };

    // Reserved, then answered by the admission's own statement.
    let fence = reserve("k1", now).await;
    let admitted = admission_of_new_consent(store).await;
    store.admit(&answer(fence, &admitted)).await.unwrap();
    let later = now + TimeDelta::seconds(1);
    match store
        .reserve_key(
            &tenant,
            "k1",
            later,
            later - TimeDelta::hours(24),
            later - TimeDelta::seconds(90),
        )
        .await
        .unwrap()
    {
        KeyReservation::Done {
            http_status,
            response,
        } => {
            assert_eq!(http_status, 202);
            assert_eq!(
                response["refreshId"],
                admitted.record.refresh_id.to_string()
            );
        }
        other => panic!("the admission answered its key: {other:?}"),
    }

    // A reservation taken over after its lease: the first holder's admission (it still
    // commits) does not overwrite the new holder's pending reservation.
    let old = reserve("k2", now - TimeDelta::minutes(5)).await;
    let _new = reserve("k2", now).await;
    let late = admission_of_new_consent(store).await;
    let mut admission = answer(old, &late);
    admission.key.as_mut().unwrap().key = "k2".to_owned();
    store.admit(&admission).await.unwrap();
    let status: i32 =
        sqlx::query_scalar("SELECT http_status FROM idempotency_keys WHERE key = 'k2'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(status, 0, "still the new holder's reservation");
}

#[tokio::test]
async fn a_batch_of_reservations_answers_each_key_as_one_reservation_would() {
    let (_app, services) = app_and_services().await;
    let store = &services.store;
    let (acme, beta) = (
        TenantId::parse("acme").unwrap(),
        TenantId::parse("beta").unwrap(),
    );
    let now = Utc::now();
    let window =
        |at: chrono::DateTime<Utc>| (at - TimeDelta::hours(24), at - TimeDelta::seconds(90));
    let (since, pending_since) = window(now);
    // Answered earlier; reserved earlier and still within its lease; reserved long
    // ago (its holder died): taken over.
    let earlier = now - TimeDelta::seconds(10);
    let (s, p) = window(earlier);
    assert!(matches!(
        store
            .reserve_key(&acme, "held", earlier, s, p)
            .await
            .unwrap(),
        KeyReservation::Reserved(_)
    ));
    let KeyReservation::Reserved(fence) = store
        .reserve_key(&acme, "answered", earlier, s, p)
        .await
        .unwrap()
    else {
        panic!("a new key is reserved");
    };
    store
        .complete_key(
            &acme,
            "answered",
            fence,
            202,
            &serde_json::json!({"accepted": true}),
        )
        .await
        .unwrap();
    let long_ago = now - TimeDelta::seconds(600);
    let (s, p) = window(long_ago);
    store
        .reserve_key(&acme, "abandoned", long_ago, s, p)
        .await
        .unwrap();

    let keys: Vec<(TenantId, String)> = [
        (&acme, "new"),
        (&beta, "new"),
        (&acme, "new"),
        (&acme, "answered"),
        (&acme, "held"),
        (&acme, "abandoned"),
    ]
    .iter()
    .map(|(t, k)| ((*t).clone(), (*k).to_owned()))
    .collect();
    let answers = store
        .reserve_keys(&keys, now, since, pending_since)
        .await
        .unwrap();
    let shown: Vec<String> = answers
        .iter()
        .map(|answer| match answer {
            KeyReservation::Reserved(_) => "reserved".to_owned(),
            KeyReservation::Pending => "pending".to_owned(),
            KeyReservation::Done {
                http_status,
                response,
            } => format!("{http_status} {response}"),
        })
        .collect();
    assert_eq!(
        shown,
        [
            "reserved",
            "reserved",
            "pending",
            r#"202 {"accepted":true}"#,
            "pending",
            "reserved"
        ]
    );
    // A reservation of the batch is fenced like a lone one: its release frees it.
    let KeyReservation::Reserved(fence) = answers[0] else {
        unreachable!()
    };
    store.release_key(&acme, "new", fence).await.unwrap();
    let again = store
        .reserve_keys(&keys[..1], now, since, pending_since)
        .await
        .unwrap();
    assert!(matches!(again[0], KeyReservation::Reserved(_)), "{again:?}");
}
