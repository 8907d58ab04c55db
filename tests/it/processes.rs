//! Real `refreshd worker` processes (the built binary) against the real services and
//! an in-process simulator and ingress: the stagger at the bank across two processes
//! (SPEC §2), a worker SIGKILLed mid-refresh (SPEC §5: no second refresh, no
//! duplicate data, the events still go out, the lock freed), and SIGTERM's drain.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use refresh_tests::fixtures::{dataset, tx};
use refresh_tests::{Api, Bank, TestApp, WorkerProcess, app_with_bank, dev_token};
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

/// One account (so a fetch is three bank calls), three transactions with an id and
/// three without (two on one day).
fn small_dataset() -> Value {
    let booked = |id, days_ago, amount| tx(id, "Booked", days_ago, amount);
    dataset(
        "Ms Holder",
        "Bills",
        "100.00",
        vec![
            booked(Some("t1"), 3, "1.00"),
            booked(Some("t2"), 2, "2.00"),
            booked(Some("t3"), 1, "3.00"),
            booked(None, 2, "10.00"),
            booked(None, 2, "20.00"),
            booked(None, 1, "30.00"),
        ],
    )
}

/// A seeded consent whose simulator key serves [`small_dataset`] with `latency_ms`.
async fn slow_consent(api: &Api, bank: &Bank, latency_ms: u64) -> (String, String) {
    let consent = api.seed_consent("acme", None, None).await.to_string();
    let key = format!("token-{consent}");
    bank.put_dataset(&key, &small_dataset()).await;
    bank.scenario(&key, &json!({"latencyMs": latency_ms})).await;
    (consent, key)
}

/// Waits until the simulator logged a call of `key` (the fetch began).
async fn wait_first_call(bank: &Bank, key: &str, worker: &mut WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bank.calls(key).await.is_empty() {
        worker.assert_running();
        assert!(
            Instant::now() < deadline,
            "the worker never called the bank; its log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(app: &TestApp, refresh_id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM refreshes WHERE refresh_id = $1")
        .bind(uuid::Uuid::parse_str(refresh_id).unwrap())
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

fn at(call: &Value) -> DateTime<Utc> {
    call["at"].as_str().unwrap().parse().unwrap()
}

/// The most starts in any half-open window `[s, s + window)`.
fn max_in_window(starts: &[DateTime<Utc>], window: Duration) -> usize {
    let window = TimeDelta::from_std(window).unwrap();
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s - starts[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[allow(
    clippy::print_stderr,
    reason = "the measured numbers are reported in the test's output"
)]
fn report(line: &str) {
    eprintln!("{line}");
}

#[tokio::test]
async fn two_worker_processes_keep_the_stagger_at_the_bank() {
    const LIMIT: usize = 3;
    const PERIOD: Duration = Duration::from_secs(6);
    const N: usize = 15;
    let stagger = [("stagger.limit", "3"), ("stagger.period_secs", "6")];
    let (app, api, bank) = app_with_bank(&stagger).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let mut workers = [
        WorkerProcess::spawn(&app, &stagger),
        WorkerProcess::spawn(&app, &stagger),
    ];
    // Seeded consents: no initial load, so each refresh is one plain fetch.
    let mut consents = Vec::with_capacity(N);
    for _ in 0..N {
        consents.push(api.seed_consent("acme", None, None).await.to_string());
    }
    let keys: BTreeSet<String> = consents.iter().map(|c| format!("token-{c}")).collect();
    let ids: Vec<String> =
        futures_util::future::join_all(consents.iter().map(|c| api.refresh(&token, c))).await;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();

    let begun = Instant::now();
    loop {
        let (updated, other): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'UPDATED'), \
             count(*) FILTER (WHERE status NOT IN ('UPDATED', 'INITIALIZED')) \
             FROM refreshes WHERE refresh_id = ANY($1)",
        )
        .bind(&uuids)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert_eq!(other, 0, "a refresh failed");
        if updated == N as i64 {
            break;
        }
        for worker in &mut workers {
            worker.assert_running();
        }
        assert!(
            begun.elapsed() < Duration::from_secs(60),
            "{updated}/{N} UPDATED after 60 s; worker logs:\n{}\n{}",
            workers[0].log(),
            workers[1].log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_done = begun.elapsed();

    // Every bank attempt begins with `GET /accounts`.
    let mut starts: Vec<DateTime<Utc>> = Vec::new();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for call in bank.all_calls(None).await {
        let key = call["bankConsentId"].as_str().unwrap_or_default();
        if keys.contains(key) && call["path"].as_str().unwrap().ends_with("/accounts") {
            starts.push(at(&call));
            *per_key.entry(key.to_owned()).or_default() += 1;
        }
    }
    starts.sort();
    assert_eq!(per_key.len(), N, "every consent was fetched: {per_key:?}");
    assert!(
        per_key.values().all(|n| *n == 1),
        "one attempt each: {per_key:?}"
    );
    let strict = max_in_window(&starts, PERIOD);
    let tightest = starts
        .windows(LIMIT + 1)
        .map(|w| w[LIMIT] - w[0])
        .min()
        .unwrap();
    let span = starts[N - 1] - starts[0];
    report(&format!(
        "stagger: {N} refreshes UPDATED in {all_done:?}; starts span {span}; max starts per \
         6-s window {strict}; tightest span of {} consecutive starts {tightest}",
        LIMIT + 1
    ));
    // The invariant as the bank sees it, with no slack: at most LIMIT starts in any
    // window of PERIOD.
    assert!(
        strict <= LIMIT,
        "{strict} starts within {PERIOD:?} at the bank: {starts:?}"
    );
    // 15 starts at 3 per 6 s need at least four full periods.
    assert!(span >= TimeDelta::from_std(PERIOD * 4).unwrap(), "{span}");
}

#[tokio::test]
async fn a_worker_killed_mid_refresh_is_recovered_by_another_process() {
    let settings = [("lock.lease_secs", "5"), ("stagger.limit", "600")];
    let (app, api, bank) = app_with_bank(&settings).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.#").await.unwrap();
    let mut events = broker.consume(&probe, 50);
    let (consent, key) = slow_consent(&api, &bank, 3000).await;

    let mut first = WorkerProcess::spawn(&app, &settings);
    let id = api.refresh(&token, &consent).await;
    wait_first_call(&bank, &key, &mut first).await;
    first.kill();
    let killed = Instant::now();
    assert_eq!(status_of(&app, &id).await, "INITIALIZED");
    // Nobody renews the dead worker's lock: it lapses within the lease.
    let consent_id: refresh_core::ConsentId = consent.parse().unwrap();
    while api
        .services
        .gate
        .in_flight(consent_id)
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "the lock outlived its 5-s lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lapsed = killed.elapsed();
    // The refresh is still INITIALIZED (queued again): still one in flight.
    let busy = api
        .post(&format!("/v1/consents/{consent}/refresh"), &token, None)
        .await;
    assert_eq!(busy.status, 409, "{busy:?}");
    assert_eq!(busy.body["code"], "refresh_in_progress");
    assert_eq!(busy.body["refreshId"], id.as_str());
    bank.scenario(&key, &json!({"latencyMs": 0})).await;

    let restarted = Instant::now();
    let mut second = WorkerProcess::spawn(&app, &settings);
    let record = api.wait_terminal(&token, &id).await;
    let recovered = restarted.elapsed();
    second.assert_running();
    assert_eq!(
        record["status"],
        "UPDATED",
        "{record}; log:\n{}",
        second.log()
    );
    assert_eq!(record["summary"]["transactionsAdded"], 6, "{record}");
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM refreshes WHERE refresh_id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let fetches = bank
        .calls(&key)
        .await
        .iter()
        .filter(|c| c["path"].as_str().unwrap().ends_with("/accounts"))
        .count();
    assert_eq!(
        (attempts, fetches),
        (2, 2),
        "the killed attempt and one more"
    );

    // No duplicate data: the simulator's six transactions, three of them id-less.
    let consent_uuid = uuid::Uuid::parse_str(&consent).unwrap();
    let (all, with_id, distinct_ids, without_id): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(transaction_id), count(DISTINCT (account_id, transaction_id)) FILTER (WHERE transaction_id IS NOT NULL), \
         count(*) FILTER (WHERE transaction_id IS NULL) FROM transactions WHERE consent_id = $1",
    )
    .bind(consent_uuid)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((all, with_id, distinct_ids, without_id), (6, 3, 3, 3));
    let (accounts, balances): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM accounts WHERE consent_id = $1), \
         (SELECT count(*) FROM balances WHERE consent_id = $1)",
    )
    .bind(consent_uuid)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((accounts, balances), (1, 1));
    let updated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM refreshes WHERE consent_id = $1 AND status = 'UPDATED'",
    )
    .bind(consent_uuid)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(updated, 1);

    // The lock is free: a new refresh is admitted.
    let next = api.refresh(&token, &consent).await;
    assert_ne!(next, id);

    // Events, deduplicated on the CloudEvents id: one of each for the refresh.
    let mut by_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut quiet_after: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while quiet_after.is_none_or(|t| Instant::now() < t) {
        assert!(Instant::now() < deadline, "events so far: {by_type:?}");
        let Ok(delivery) = tokio::time::timeout(Duration::from_millis(500), events.next()).await
        else {
            continue;
        };
        let delivery = delivery.expect("the probe queue is consumed");
        let event: Value = serde_json::from_slice(&delivery.body).unwrap();
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
        if event["data"]["refreshId"] != id.as_str() {
            continue;
        }
        let kind = event["type"].as_str().unwrap().to_owned();
        if kind == "io.refreshd.refresh.updated" && quiet_after.is_none() {
            // Keep listening a little: a duplicate would come now.
            quiet_after = Some(Instant::now() + Duration::from_secs(2));
        }
        by_type
            .entry(kind)
            .or_default()
            .insert(event["id"].as_str().unwrap().to_owned());
    }
    let counts: BTreeMap<&str, usize> =
        by_type.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("io.refreshd.refresh.initialized", 1),
            ("io.refreshd.refresh.updated", 1)
        ])
    );
    report(&format!(
        "crash: lock lapsed {lapsed:?} after the SIGKILL (lease 5 s); refresh UPDATED \
         {recovered:?} after the second process was spawned"
    ));
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_refresh_and_exits_0() {
    let settings = [("shutdown.grace_secs", "10"), ("stagger.limit", "600")];
    let (app, api, bank) = app_with_bank(&settings).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let (consent, key) = slow_consent(&api, &bank, 2000).await;

    let mut worker = WorkerProcess::spawn(&app, &settings);
    let id = api.refresh(&token, &consent).await;
    wait_first_call(&bank, &key, &mut worker).await;
    let signalled = Instant::now();
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    let stopped = signalled.elapsed();
    let status = status
        .unwrap_or_else(|| panic!("no exit within shutdown.grace_secs; log:\n{}", worker.log()));
    assert!(status.success(), "{status}; log:\n{}", worker.log());

    // Finished while draining, or handed back and finished by the next process.
    let finished_by_first = status_of(&app, &id).await != "INITIALIZED";
    let _second = (!finished_by_first).then(|| WorkerProcess::spawn(&app, &settings));
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"]["transactionsAdded"], 6, "{record}");
    report(&format!(
        "sigterm: exit 0 {stopped:?} after SIGTERM; refresh finished by the {} process",
        if finished_by_first {
            "draining"
        } else {
            "second"
        }
    ));
}

/// A free port on 127.0.0.1 (bound and let go; the process binds it a moment later).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn get_ok(client: &reqwest::Client, url: &str) -> Option<String> {
    let answer = client.get(url).send().await.ok()?;
    answer
        .status()
        .is_success()
        .then_some(answer.text().await.ok()?)
}

#[tokio::test]
async fn a_scheduler_process_auto_syncs_serves_its_probes_and_drains_on_sigterm() {
    let (app, api, _bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    api.services
        .store
        .put_tenant_settings(
            &refresh_core::TenantId::parse("acme").unwrap(),
            refresh_pg::TenantSettingsRow {
                autosync_interval_hours: Some(6),
                inactivation_days: 90,
            },
            Utc::now(),
        )
        .await
        .unwrap();
    let consent = api.seed_consent("acme", None, None).await;
    sqlx::query("UPDATE consents SET created_at = created_at - interval '7 hours'")
        .execute(&app.pg)
        .await
        .unwrap();
    let ops = free_addr();
    let settings = [
        ("shutdown.grace_secs", "5"),
        ("scheduler.tick_secs", "1"),
        ("scheduler.metrics_bind", ops.as_str()),
    ];
    let mut scheduler = WorkerProcess::spawn_role(&app, "scheduler", &settings);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let requested = loop {
        scheduler.assert_running();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM refreshes WHERE consent_id = $1 AND requested_by = 'AUTOSYNC'",
        )
        .bind(consent.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap();
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(requested, 1, "log:\n{}", scheduler.log());
    assert_eq!(
        get_ok(&client, &format!("http://{ops}/healthz"))
            .await
            .as_deref(),
        Some(r#"{"status":"ok"}"#)
    );
    let ready: Value = serde_json::from_str(
        &get_ok(&client, &format!("http://{ops}/readyz"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        ready,
        json!({"status": "ready", "checks": {"redis": true, "rabbitmq": true, "postgresql": true}})
    );
    let metrics = get_ok(&client, &format!("http://{ops}/metrics"))
        .await
        .unwrap();
    for name in [
        "refreshd_scheduler_tick_seconds_count",
        "refreshd_scheduler_autosync_requested_total 1",
        "refreshd_scheduler_last_tick_timestamp_seconds",
        "refreshd_admissions_total{source=\"AUTOSYNC\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }

    let signalled = Instant::now();
    scheduler.terminate();
    let status = scheduler
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no exit within shutdown.grace_secs; log:\n{}",
                scheduler.log()
            )
        });
    assert!(status.success(), "{status}; log:\n{}", scheduler.log());
    report(&format!(
        "scheduler: exit 0 {:?} after SIGTERM",
        signalled.elapsed()
    ));
}

#[tokio::test]
async fn a_worker_process_serves_its_probes() {
    let (app, _api, _bank) = app_with_bank(&[]).await;
    let ops = free_addr();
    let mut worker = WorkerProcess::spawn(&app, &[("worker.metrics_bind", ops.as_str())]);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        worker.assert_running();
        if let Some(body) = get_ok(&client, &format!("http://{ops}/healthz")).await {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz; log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health, r#"{"status":"ok"}"#);
    let ready = get_ok(&client, &format!("http://{ops}/readyz"))
        .await
        .unwrap();
    assert!(ready.contains(r#""status":"ready""#), "{ready}");
    let metrics = get_ok(&client, &format!("http://{ops}/metrics"))
        .await
        .unwrap();
    assert!(
        metrics.contains("refreshd_refreshes_in_flight"),
        "{metrics}"
    );
    worker.terminate();
    assert!(
        worker
            .wait_exit(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}
