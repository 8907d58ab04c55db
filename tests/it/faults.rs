//! Faults injected while requests stream, then every request accounted for (SPEC §2:
//! a 202 means the refresh happens, once, within the limits; a 503 consumes nothing).
//! Each test streams refresh requests over HTTP at a fixed rate to an ingress whose
//! worker runs beside it, both reaching PostgreSQL, Redis and RabbitMQ through the
//! harness's proxies; it injects one fault, waits for the work to settle, and checks
//! the promise from the records, the stored data and the events; it prints its
//! accounting table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use refresh_core::ConsentId;
use std::pin::Pin;

use refresh_tests::{
    Api, Bank, Proxy, TestApp, WorkerProcess, app_with_bank, dev_token, fast_worker_config,
    ingress_with, start_worker, test_settings,
};
use serde_json::Value;

/// Requests per second of the stream, and how long it lasts.
const RATE: u64 = 25;
const STREAM: Duration = Duration::from_secs(20);
const CONSENTS: usize = 40;

/// One answered request of the stream.
struct Sent {
    status: u16,
    refresh_id: Option<String>,
}

/// Something a test does to the services at a point of the stream.
type Action<'a> = (Duration, Pin<Box<dyn Future<Output = ()> + Send + 'a>>);

/// Streams `POST /v1/consents/{id}/refresh` at [`RATE`] over `consents` (in turn) for
/// [`STREAM`], running each action of `schedule` when its time comes; returns every
/// answer.
async fn stream(
    api: &Api,
    token: &str,
    consents: &[ConsentId],
    schedule: Vec<Action<'_>>,
) -> Vec<Sent> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    let mut pending = Vec::new();
    let mut schedule = schedule.into_iter().peekable();
    let mut n = 0usize;
    while started.elapsed() < STREAM {
        tick.tick().await;
        while let Some((at, _)) = schedule.peek()
            && started.elapsed() >= *at
        {
            let (_, action) = schedule.next().expect("peeked");
            action.await;
        }
        let consent = consents[n % consents.len()];
        n += 1;
        let request = api
            .client
            .post(format!("{}/v1/consents/{consent}/refresh", api.base))
            .bearer_auth(token);
        pending.push(tokio::spawn(async move {
            let answer = request.send().await.expect("the ingress answers");
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            Sent {
                status,
                refresh_id: body["refreshId"].as_str().map(str::to_owned),
            }
        }));
    }
    for (_, action) in schedule {
        action.await;
    }
    let mut sent = Vec::new();
    for task in pending {
        sent.push(task.await.expect("a request task"));
    }
    sent
}

/// An app with the simulator, and an ingress plus worker reaching the services
/// through proxies that a test takes down and brings back.
struct Rig {
    app: TestApp,
    /// The direct ingress of the app (its broker reads the events).
    direct: Api,
    /// The ingress under test; the worker runs on its services.
    proxied: Api,
    pg: Proxy,
    redis: Proxy,
    amqp: Proxy,
    bank: Bank,
}

async fn rig() -> Rig {
    rig_with(&[]).await
}

async fn rig_with(extra: &[(&str, &str)]) -> Rig {
    // A lease longer than an outage (the worker keeps its lock across one), short
    // enough that an attempt cut by one is taken up again within the test.
    let mut common = vec![("stagger.limit", "600"), ("lock.lease_secs", "15")];
    common.extend_from_slice(extra);
    let (app, direct, bank) = app_with_bank(&common).await;
    let pg = Proxy::start("127.0.0.1:5432").await;
    let redis = Proxy::start("127.0.0.1:6379").await;
    let amqp = Proxy::start("127.0.0.1:5672").await;
    let database_url = app
        .settings
        .database
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", pg.port));
    assert_ne!(
        database_url, app.settings.database.url,
        "the database goes through the proxy"
    );
    let redis_url = format!("redis://127.0.0.1:{}/0", redis.port);
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp.port);
    let sim = app.settings.providers["sim"].base_url.clone();
    let sim_bg = app.settings.providers["sim_bg"].base_url.clone();
    let mut overrides = common.clone();
    overrides.extend([
        ("database.url", database_url.as_str()),
        ("database.acquire_timeout_ms", "1000"),
        ("redis.url", redis_url.as_str()),
        ("redis.command_timeout_ms", "500"),
        ("amqp.url", amqp_url.as_str()),
        ("amqp.confirm_timeout_ms", "1000"),
        ("providers.sim.base_url", sim.as_str()),
        ("providers.sim_bg.base_url", sim_bg.as_str()),
    ]);
    let settings = test_settings(&app.namespace, &overrides);
    let proxied = ingress_with(&app, &settings)
        .await
        .expect("the proxied ingress starts");
    start_worker(&app, &proxied, fast_worker_config(&app));
    Rig {
        app,
        direct,
        proxied,
        pg,
        redis,
        amqp,
        bank,
    }
}

/// Streams requests at the rig's proxied ingress, runs `schedule`, waits until
/// every refresh ended, and accounts for every request.
async fn run(name: &str, rig: &Rig, schedule: Vec<Action<'_>>) {
    let consents = seed(rig).await;
    run_over(name, rig, &consents, schedule).await;
}

/// [`CONSENTS`] consents of tenant `acme`; the bank knows each by `token-{id}`.
async fn seed(rig: &Rig) -> Vec<ConsentId> {
    let mut consents = Vec::new();
    for _ in 0..CONSENTS {
        consents.push(rig.direct.seed_consent("acme", None, None).await);
    }
    consents
}

async fn run_over(name: &str, rig: &Rig, consents: &[ConsentId], schedule: Vec<Action<'_>>) {
    run_on(
        name,
        &rig.app,
        &rig.direct,
        &rig.proxied,
        consents,
        schedule,
    )
    .await;
}

/// Streams requests at `target`, runs `schedule`, waits until every refresh ended,
/// reads the terminal events through `direct`'s broker, and accounts for every
/// request.
async fn run_on(
    name: &str,
    app: &TestApp,
    direct: &Api,
    target: &Api,
    consents: &[ConsentId],
    schedule: Vec<Action<'_>>,
) {
    let token = dev_token(app, Some("acme"), "api:stored_data");
    let broker = &direct.services.broker;
    let probe = broker.declare_probe_queue("refresh.#").await.unwrap();
    let mut events = broker.consume(&probe, 200);
    let sent = stream(target, &token, consents, schedule).await;
    settled(app, Duration::from_secs(120)).await;
    // Terminal events, read until the queue is quiet.
    let mut terminal: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(3), events.next()).await
    {
        let event: Value = serde_json::from_slice(&delivery.body).unwrap();
        let kind = event["type"].as_str().unwrap_or_default();
        if kind.ends_with(".updated") || kind.ends_with(".error") {
            let id = event["data"]["refreshId"].as_str().unwrap().to_owned();
            *terminal.entry(id).or_default() += 1;
        }
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
    }
    account(name, app, &sent, &terminal).await;
    assert!(
        sent.iter().any(|s| s.status == 202),
        "{name}: the stream admitted nothing"
    );
}

/// A refresh record as the accounting reads it.
struct Row {
    refresh_id: String,
    consent: uuid::Uuid,
    status: String,
    requested_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// `refreshes` columns as read: id, consent, status, requested, finished.
type RowTuple = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

async fn records(app: &TestApp) -> Vec<Row> {
    let rows: Vec<RowTuple> = sqlx::query_as(
        "SELECT refresh_id, consent_id, status, date_requested, finished_at FROM refreshes",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, consent, status, requested_at, finished_at)| Row {
            refresh_id: id.to_string(),
            consent,
            status,
            requested_at,
            finished_at,
        })
        .collect()
}

/// Waits until no refresh is `INITIALIZED` any more (at most `limit`).
async fn settled(app: &TestApp, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM refreshes WHERE status = 'INITIALIZED'")
                .fetch_one(&app.pg)
                .await
                .unwrap();
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{open} refreshes never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every promise over what was sent and what the services hold, and prints
/// the accounting table.
async fn account(
    name: &str,
    app: &TestApp,
    sent: &[Sent],
    terminal_events: &HashMap<String, usize>,
) {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for s in sent {
        *by_status.entry(s.status).or_default() += 1;
    }
    for status in by_status.keys() {
        assert!(
            [202, 409, 429, 503].contains(status),
            "{name}: unexpected answer {status}"
        );
    }
    let accepted: HashSet<&str> = sent
        .iter()
        .filter(|s| s.status == 202)
        .map(|s| s.refresh_id.as_deref().expect("a 202 names its refresh"))
        .collect();
    assert_eq!(
        accepted.len(),
        by_status.get(&202).copied().unwrap_or(0),
        "{name}: two 202s named one refresh"
    );
    let rows = records(app).await;
    let recorded: HashSet<&str> = rows.iter().map(|r| r.refresh_id.as_str()).collect();
    // Every 202 has its record, and nothing else was recorded: the refusals and the
    // 503s consumed nothing.
    let missing: Vec<&&str> = accepted.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{name}: accepted but never recorded: {missing:?}"
    );
    let extra: Vec<&&str> = recorded.difference(&accepted).collect();
    assert!(
        extra.is_empty(),
        "{name}: recorded without a 202: {extra:?}"
    );
    // Exactly one terminal status each (the record has one status; it is terminal).
    let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        *ends.entry(row.status.as_str()).or_default() += 1;
        assert!(
            row.finished_at.is_some(),
            "{name}: {} never ended",
            row.refresh_id
        );
    }
    // One refresh in flight per consent: each one's admission comes after the
    // previous one's end.
    let mut per_consent: HashMap<uuid::Uuid, Vec<&Row>> = HashMap::new();
    for row in &rows {
        per_consent.entry(row.consent).or_default().push(row);
    }
    let mut most = 0;
    for (consent, list) in &mut per_consent {
        list.sort_by_key(|r| r.requested_at);
        for pair in list.windows(2) {
            assert!(
                pair[0].finished_at.unwrap() <= pair[1].requested_at,
                "{name}: consent {consent} had {} and {} in flight together",
                pair[0].refresh_id,
                pair[1].refresh_id
            );
        }
        // The quota: 4 on-demand refreshes per rolling 24 h (the test lasts seconds).
        assert!(
            list.len() <= 4,
            "{name}: consent {consent} got {} refreshes",
            list.len()
        );
        most = most.max(list.len());
    }
    // No transaction stored twice.
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT consent_id, transaction_id FROM transactions \
         WHERE transaction_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "{name}: transactions stored twice");
    // Each terminal status announced (at least once; consumers dedupe on the id).
    let unannounced: Vec<&&str> = accepted
        .iter()
        .filter(|id| !terminal_events.contains_key(**id))
        .collect();
    assert!(
        unannounced.is_empty(),
        "{name}: no terminal event for {unannounced:?}"
    );
    let repeated = terminal_events.values().filter(|n| **n > 1).count();

    let mut lines = vec![("requests sent".to_owned(), sent.len())];
    lines.extend(
        by_status
            .iter()
            .map(|(status, n)| (format!("answered {status}"), *n)),
    );
    lines.push(("records (all from a 202)".to_owned(), rows.len()));
    lines.extend(
        ends.iter()
            .map(|(status, n)| (format!("ended {status}"), *n)),
    );
    lines.push((
        "terminal events (distinct)".to_owned(),
        terminal_events.len(),
    ));
    lines.push(("terminal events published twice".to_owned(), repeated));
    lines.push(("most refreshes of one consent".to_owned(), most));
    lines.push((
        "transactions stored twice".to_owned(),
        usize::try_from(doubled).unwrap_or(usize::MAX),
    ));
    let mut table = format!("\n{name}: accounting");
    for (label, n) in lines {
        table.push_str(&format!("\n  {label:<34} {n:>6}"));
    }
    report(&table);
}

/// Down at a third of the stream, back 10 s later.
const DOWN_AT: Duration = Duration::from_secs(6);
const OUTAGE: Duration = Duration::from_secs(10);

/// SPEC §2 under a Redis loss: the namespace's keys deleted mid-stream (as a restart
/// without persistence does). Requests meeting the lost state get 503 until a replica
/// rebuilt it; no 202 is lost or doubled, no consent gets two refreshes in flight or
/// more than its quota.
#[tokio::test]
async fn redis_losing_its_keys_mid_stream_loses_and_doubles_nothing() {
    let rig = rig().await;
    let (redis, namespace) = (rig.app.redis.clone(), rig.app.namespace.clone());
    let lose: Action<'_> = (
        DOWN_AT,
        Box::pin(async move {
            refresh_redis::delete_namespace(&redis, &namespace)
                .await
                .expect("delete the namespace's keys");
        }),
    );
    run("redis keys deleted", &rig, vec![lose]).await;
}

/// An outage of one service for [`OUTAGE`] in the middle of the stream.
fn outage(proxy: &Proxy) -> Vec<Action<'_>> {
    vec![
        (DOWN_AT, Box::pin(async move { proxy.down() })),
        (DOWN_AT + OUTAGE, Box::pin(async move { proxy.up() })),
    ]
}

#[tokio::test]
async fn postgresql_unreachable_for_10_s_loses_and_doubles_nothing() {
    let rig = rig().await;
    run("postgresql unreachable 10 s", &rig, outage(&rig.pg)).await;
}

#[tokio::test]
async fn redis_unreachable_for_10_s_loses_and_doubles_nothing() {
    let rig = rig().await;
    run("redis unreachable 10 s", &rig, outage(&rig.redis)).await;
}

#[tokio::test]
async fn rabbitmq_unreachable_for_10_s_loses_and_doubles_nothing() {
    let rig = rig().await;
    run("rabbitmq unreachable 10 s", &rig, outage(&rig.amqp)).await;
}

/// The bank failing 30 % of its calls, half with 503 and half by never answering
/// (the connector's timeout, 1 s here): attempts are retried and counted, and every
/// accepted refresh still ends exactly once (`UPDATED`, or `ERROR bank_unavailable`
/// once its attempts are used up), its transactions stored once.
#[tokio::test]
async fn a_bank_failing_30_percent_of_calls_loses_and_doubles_nothing() {
    let rig = rig_with(&[("providers.sim.timeout_secs", "1")]).await;
    let consents = seed(&rig).await;
    for consent in &consents {
        rig.bank
            .scenario(
                &format!("token-{consent}"),
                &serde_json::json!({"failPercent": 30}),
            )
            .await;
    }
    run_over("bank failing 30 % of calls", &rig, &consents, Vec::new()).await;
}

#[allow(
    clippy::print_stderr,
    reason = "the accounting table is the test's report"
)]
fn report(table: &str) {
    eprintln!("{table}");
}

/// A chaos loop: two `refreshd worker` processes, one of them `SIGKILL`ed every 3 s
/// and started again, while requests stream. A refresh cut off mid-attempt is taken
/// up by the next delivery once its attempt's lease ran out; none is lost or run
/// twice at once.
#[tokio::test]
async fn workers_killed_every_3_s_lose_and_double_nothing() {
    let settings = [("stagger.limit", "600"), ("lock.lease_secs", "5")];
    let (app, api, _bank) = app_with_bank(&settings).await;
    let mut consents = Vec::new();
    for _ in 0..CONSENTS {
        consents.push(api.seed_consent("acme", None, None).await);
    }
    let workers = std::sync::Mutex::new(vec![
        WorkerProcess::spawn(&app, &settings),
        WorkerProcess::spawn(&app, &settings),
    ]);
    let mut kills: Vec<Action<'_>> = Vec::new();
    for round in 0..6u32 {
        let (app, workers) = (&app, &workers);
        kills.push((
            Duration::from_secs(2 + 3 * u64::from(round)),
            Box::pin(async move {
                let mut workers = workers.lock().expect("workers");
                let victim = usize::try_from(round).expect("small") % workers.len();
                workers[victim].kill();
                workers[victim] = WorkerProcess::spawn(app, &settings);
            }),
        ));
    }
    run_on(
        "workers SIGKILLed every 3 s",
        &app,
        &api,
        &api,
        &consents,
        kills,
    )
    .await;
    for worker in workers.lock().expect("workers").iter_mut() {
        worker.assert_running();
    }
}
