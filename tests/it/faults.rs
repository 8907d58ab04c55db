//! Faults injected while requests stream, then every request accounted for (SPEC §2:
//! a 202 or an accepted upstream decision means the refresh happens, once, within the
//! limits; a 503 consumes nothing). Each test streams refresh requests at a fixed
//! rate, three in four over HTTP and one in four as upstream AMQP requests, to
//! ingresses whose workers run beside them; it injects one fault, waits for the work
//! to settle, and checks the promise from the answers and decisions, the records, the
//! stored data, the events and the queues themselves; it prints its accounting table.
//!
//! The outages are the harness's TCP proxies refusing and cutting connections; the
//! restarts are private PostgreSQL and RabbitMQ servers stopped and started through
//! `pg_ctl` and `rabbitmqctl` (the shared services are never restarted, so these tests
//! run beside the others); the chaos loop `SIGKILL`s real `refreshd` processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use refresh_core::ConsentId;
use refresh_tests::{
    Api, Bank, PrivatePostgres, PrivateRabbit, Proxy, TestApp, WorkerProcess, app_with_bank,
    dev_token, fast_worker_config, free_port, ingress_with, restart_shared_service, start_worker,
    test_settings,
};
use serde_json::{Value, json};

/// Requests per second of a stream, and how long one lasts.
const RATE: u64 = 25;
const STREAM: Duration = Duration::from_secs(20);
const CONSENTS: usize = 40;
/// Every fourth request of a stream is an upstream AMQP request.
const UPSTREAM_EVERY: usize = 4;

/// Something a test does to the services at a point of the stream; it runs beside the
/// stream, which keeps its rate meanwhile.
type Action<'a> = (Duration, Pin<Box<dyn Future<Output = ()> + Send + 'a>>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Http,
    Upstream,
}

/// What became of one request of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// An HTTP answer, or an upstream decision (202 when accepted, else its
    /// problem's status).
    Answered {
        status: u16,
        refresh_id: Option<String>,
    },
    /// Never reached an ingress (the connection was refused): consumed nothing.
    NotConnected,
    /// Cut off without an answer (the connection dropped mid-request, or the broker
    /// never confirmed the publish): it may or may not have been admitted. Says what
    /// happened.
    Unknown(String),
    /// An upstream request the broker confirmed, its decision not yet read.
    Published(String),
}

struct Sent {
    via: Via,
    outcome: Outcome,
}

/// Where a stream goes.
struct Load<'a> {
    /// The HTTP ingresses, taken in turn.
    bases: Vec<String>,
    token: String,
    /// Publishes the upstream requests (as an upstream service would, on the broker).
    upstream: &'a refresh_amqp::Broker,
    probes: &'a Probes,
    duration: Duration,
}

/// Streams refresh requests at [`RATE`] over `consents` (in turn) for the load's
/// duration, running each action of `schedule` when its time comes; returns what
/// became of every request (upstream ones as published, to be decided).
async fn stream(load: &Load<'_>, consents: &[ConsentId], schedule: Vec<Action<'_>>) -> Vec<Sent> {
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client");
    let sending = async {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
        let mut pending = Vec::new();
        let mut n = 0usize;
        while started.elapsed() < load.duration {
            tick.tick().await;
            let consent = consents[n % consents.len()];
            n += 1;
            if n.is_multiple_of(UPSTREAM_EVERY) {
                let broker = load.upstream.clone();
                let replies = load.probes.replies.clone();
                pending.push(tokio::spawn(async move {
                    publish_upstream(&broker, &replies, consent).await
                }));
            } else {
                let base = &load.bases[n % load.bases.len()];
                let request = client
                    .post(format!("{base}/v1/consents/{consent}/refresh"))
                    .bearer_auth(&load.token);
                pending.push(tokio::spawn(async move { send_http(request).await }));
            }
        }
        let mut sent = Vec::new();
        for task in pending {
            sent.push(task.await.expect("a request task"));
        }
        sent
    };
    let acting = async {
        for (at, action) in schedule {
            tokio::time::sleep_until((started + at).into()).await;
            action.await;
        }
    };
    let (sent, ()) = tokio::join!(sending, acting);
    sent
}

async fn send_http(request: reqwest::RequestBuilder) -> Sent {
    let outcome = match request.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            Outcome::Answered {
                status,
                refresh_id: body["refreshId"].as_str().map(str::to_owned),
            }
        }
        Err(error) if error.is_connect() => Outcome::NotConnected,
        Err(error) => Outcome::Unknown(format!("HTTP: {error:#}")),
    };
    Sent {
        via: Via::Http,
        outcome,
    }
}

async fn publish_upstream(
    broker: &refresh_amqp::Broker,
    replies: &str,
    consent: ConsentId,
) -> Sent {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({"consentId": consent, "tenantId": "acme", "requestedBy": "APP"}).to_string();
    let published = tokio::time::timeout(
        Duration::from_secs(10),
        broker.publish_request(body.as_bytes(), Some(&id), Some(replies), Some(&id)),
    )
    .await;
    Sent {
        via: Via::Upstream,
        outcome: match published {
            Ok(Ok(())) => Outcome::Published(id),
            Ok(Err(error)) => Outcome::Unknown(format!("publish: {error}")),
            Err(_) => Outcome::Unknown("publish: no confirm within 10 s".to_owned()),
        },
    }
}

/// Two durable queues of the test on the broker: the events it reads (bound to
/// `refresh.#`) and the upstream decisions. Durable and persistent, so they outlive a
/// broker restart; removed by the test, and by the broker once unused for 10 minutes
/// should the test fail first.
struct Probes {
    events: String,
    replies: String,
}

impl Probes {
    async fn declare(app: &TestApp) -> Self {
        let probes = Self {
            events: format!("{}.test.events", app.namespace),
            replies: format!("{}.test.replies", app.namespace),
        };
        let channel = app.amqp.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
        for queue in [&probes.events, &probes.replies] {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments.clone(),
                )
                .await
                .unwrap();
        }
        let names = refresh_amqp::Names::new(&app.namespace);
        channel
            .queue_bind(
                probes.events.as_str().into(),
                names.events.as_str().into(),
                "refresh.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        probes
    }

    async fn delete(&self, app: &TestApp) {
        let connection = refresh_amqp::connect(&app.settings.amqp).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        for queue in [&self.events, &self.replies] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        let _ = connection.close(200, "done".into()).await;
    }
}

/// Takes every message now in `queue`, on a connection of its own (the test's may
/// have died with a broker restart).
/// What the database and the broker say of upstream requests never decided: their
/// idempotency keys, the requests queue's depth, and the database's sessions with their
/// advisory locks.
async fn why_undecided(app: &TestApp, undecided: &[String]) -> String {
    let keys: Vec<(String, String, Option<i32>)> = sqlx::query_as(
        "SELECT key, created_at::text, http_status FROM idempotency_keys \
         WHERE split_part(key, ' ', 3) = ANY($1)",
    )
    .bind(undecided)
    .fetch_all(&app.pg)
    .await
    .unwrap_or_default();
    let requests = refresh_amqp::queue_depth(
        &app.amqp,
        &refresh_amqp::Names::new(&app.namespace).requests,
    )
    .await
    .ok()
    .flatten();
    let sessions: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT coalesce(a.state, ''), coalesce(l.mode, ''), \
         (now() - a.xact_start)::text, left(a.query, 80) \
         FROM pg_stat_activity a LEFT JOIN pg_locks l \
         ON l.pid = a.pid AND l.locktype = 'advisory' \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap_or_default();
    format!(
        "{undecided:?}; their idempotency keys (key, created, status): {keys:#?}; \
         messages ready in the requests queue: {requests:?}; \
         database sessions (state, advisory lock, transaction age, query): {sessions:#?} \
         (REFRESHD_TEST_LOG=1 with --nocapture shows the roles' logs)"
    )
}

async fn take_all(app: &TestApp, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let connection = refresh_amqp::connect(&app.settings.amqp).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        taken.push(message);
    }
    let _ = connection.close(200, "done".into()).await;
    taken
}

/// Reads the upstream decisions until every published request has one (at most
/// `limit`: a request confirmed by the broker must be decided). A request decided
/// more than once (redelivered) is accepted if any decision accepted it, and all its
/// acceptances name one refresh.
async fn decide(app: &TestApp, probes: &Probes, sent: &mut [Sent], limit: Duration) {
    let mut decisions: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = Instant::now() + limit;
    loop {
        for message in take_all(app, &probes.replies).await {
            let id = message
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.to_string())
                .expect("a decision names its request");
            let body: Value = serde_json::from_slice(&message.data).unwrap();
            decisions.entry(id).or_default().push(body);
        }
        let waiting = sent
            .iter()
            .filter(|s| matches!(&s.outcome, Outcome::Published(id) if !decisions.contains_key(id)))
            .count();
        if waiting == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let undecided: Vec<String> = sent
                .iter()
                .filter_map(|s| match &s.outcome {
                    Outcome::Published(id) if !decisions.contains_key(id) => Some(id.clone()),
                    _ => None,
                })
                .collect();
            panic!(
                "{waiting} upstream requests confirmed by the broker were never decided: {}",
                why_undecided(app, &undecided).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for s in sent.iter_mut() {
        let Outcome::Published(id) = &s.outcome else {
            continue;
        };
        let all = &decisions[id];
        let accepted: HashSet<&str> = all
            .iter()
            .filter(|d| d["accepted"] == true)
            .map(|d| {
                d["refreshId"]
                    .as_str()
                    .expect("an acceptance names its refresh")
            })
            .collect();
        assert!(accepted.len() <= 1, "request {id} accepted as {accepted:?}");
        s.outcome = match accepted.into_iter().next() {
            Some(refresh_id) => Outcome::Answered {
                status: 202,
                refresh_id: Some(refresh_id.to_owned()),
            },
            None => Outcome::Answered {
                status: all[0]["problem"]["status"]
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .expect("a refusal carries its problem's status"),
                refresh_id: None,
            },
        };
    }
}

/// An app with the simulator, and an ingress plus worker reaching the services
/// through proxies that a test takes down and brings back.
struct Rig {
    app: TestApp,
    /// The direct ingress of the app (and the upstream publisher).
    direct: Api,
    /// The ingress under test; the worker runs on its services.
    proxied: Api,
    pg: Proxy,
    redis: Proxy,
    amqp: Proxy,
    bank: Bank,
}

/// Settings of every rig: a lease longer than an outage (the worker keeps its lock
/// across one), short enough that an attempt cut by one is taken up again within the
/// test.
const COMMON: [(&str, &str); 2] = [("stagger.limit", "600"), ("lock.lease_secs", "15")];

async fn rig() -> Rig {
    rig_with(&[]).await
}

async fn rig_with(extra: &[(&str, &str)]) -> Rig {
    let mut common = COMMON.to_vec();
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

/// [`CONSENTS`] consents of tenant `acme`; the bank knows each by `token-{id}`.
async fn seed(api: &Api, n: usize) -> Vec<ConsentId> {
    let mut consents = Vec::new();
    for _ in 0..n {
        consents.push(api.seed_consent("acme", None, None).await);
    }
    consents
}

/// One fault scenario: where the stream goes and how the roles under test stop.
struct Scenario<'a> {
    name: &'a str,
    app: &'a TestApp,
    /// Publishes the upstream requests and seeds the consents.
    direct: &'a Api,
    /// The HTTP ingresses the stream goes to.
    bases: Vec<String>,
    consents: Vec<ConsentId>,
    duration: Duration,
    /// Role processes of the test, killed before the queues are looked at (the
    /// in-process roles are stopped with the app's shutdown).
    processes: Option<&'a Mutex<Vec<WorkerProcess>>>,
    /// Whether requests may be cut off without an answer (an ingress killed, a broker
    /// restarted under a publish).
    cut_offs: bool,
    /// How long after the stream every upstream request must be decided: its backoff
    /// after an outage (2 s doubling), or the lease of an idempotency reservation left
    /// by a killed ingress (90 s) plus a backoff.
    decided_within: Duration,
}

impl<'a> Scenario<'a> {
    fn new(
        name: &'a str,
        app: &'a TestApp,
        direct: &'a Api,
        target: &Api,
        consents: Vec<ConsentId>,
    ) -> Self {
        Self {
            name,
            app,
            direct,
            bases: vec![target.base.clone()],
            consents,
            duration: STREAM,
            processes: None,
            cut_offs: false,
            decided_within: Duration::from_secs(120),
        }
    }

    /// Streams requests, runs `schedule`, waits until every request is decided and
    /// every refresh ended, then accounts for every request, the events and the
    /// queues.
    async fn run(self, schedule: Vec<Action<'_>>) {
        let app = self.app;
        let probes = Probes::declare(app).await;
        let load = Load {
            bases: self.bases.clone(),
            token: dev_token(app, Some("acme"), "api:stored_data"),
            upstream: &self.direct.services.broker,
            probes: &probes,
            duration: self.duration,
        };
        let started = Instant::now();
        let mut sent = stream(&load, &self.consents, schedule).await;
        decide(app, &probes, &mut sent, self.decided_within).await;
        let decided = started.elapsed();
        settled(app, Duration::from_secs(120)).await;
        let ended = started.elapsed();
        let terminal = terminal_events(app, &probes).await;
        let queues = self.quiet_queues().await;
        report(&format!(
            "{}: every request decided {:.1} s after the stream began, every refresh ended at {:.1} s, queues quiet at {:.1} s",
            self.name,
            decided.as_secs_f64(),
            ended.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ));
        probes.delete(app).await;
        account(&self, &sent, &terminal, &queues).await;
    }

    /// Waits until the work queues stayed empty for [`QUIET`] with the roles running
    /// (a job of an admission that never committed cycles through them until the
    /// worker drops it, a minute past its `notBefore`), stops the roles, and reads the
    /// queues again: a message a role held unacknowledged would be back. Returns every
    /// queue's depth, what was left, and the dead-lettered jobs' reasons.
    async fn quiet_queues(&self) -> Queues {
        let app = self.app;
        let names = refresh_amqp::Names::new(&app.namespace);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut quiet_since: Option<Instant> = None;
        loop {
            let depths = depths(app, &names).await;
            if work_left(&names, &depths) > 0 {
                quiet_since = None;
            } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the queues never stayed empty: {depths:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        app.shutdown.cancel();
        app.tracker.close();
        app.tracker.wait().await;
        if let Some(processes) = self.processes {
            for process in processes.lock().expect("processes").iter_mut() {
                process.kill();
            }
        }
        let depths = depths(app, &names).await;
        let mut left = Vec::new();
        for (queue, n) in &depths {
            if *n > 0 && *queue != names.jobs_dead && *queue != names.requests_dead {
                for message in take_all(app, queue).await {
                    left.push(format!(
                        "{queue}: {} {:?}",
                        String::from_utf8_lossy(&message.data),
                        message.properties.headers()
                    ));
                }
            }
        }
        let dead_reasons = take_all(app, &names.jobs_dead)
            .await
            .iter()
            .map(dead_reason)
            .collect();
        Queues {
            work_left: work_left(&names, &depths),
            requests_dead: depths[&names.requests_dead],
            left,
            dead_reasons,
        }
    }
}

/// How long the work queues must stay empty before the roles are stopped: longer
/// than a retried job's round through a wait queue.
const QUIET: Duration = Duration::from_secs(5);

/// What the queues held once the work was done and the roles stopped.
struct Queues {
    /// The messages left in the work queues.
    left: Vec<String>,
    /// Messages in `requests`, `jobs` and the wait queues.
    work_left: u32,
    /// Why each job in `jobs.dead` died.
    dead_reasons: Vec<String>,
    /// Messages in `requests.dead`.
    requests_dead: u32,
}

/// Every queue's message count (a passive declare each).
async fn depths(app: &TestApp, names: &refresh_amqp::Names) -> BTreeMap<String, u32> {
    let connection = refresh_amqp::connect(&app.settings.amqp).await.unwrap();
    let mut depths = BTreeMap::new();
    for queue in names.queues() {
        let depth = refresh_amqp::queue_depth(&connection, queue)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("queue {queue} is missing"));
        depths.insert(queue.to_owned(), depth);
    }
    let _ = connection.close(200, "done".into()).await;
    depths
}

fn work_left(names: &refresh_amqp::Names, depths: &BTreeMap<String, u32>) -> u32 {
    depths
        .iter()
        .filter(|(queue, _)| **queue != names.jobs_dead && **queue != names.requests_dead)
        .map(|(_, n)| n)
        .sum()
}

/// The reason a dead job carries: the worker's header, else the broker's `x-death`.
fn dead_reason(message: &lapin::message::BasicGetMessage) -> String {
    let headers = message.properties.headers().clone().unwrap_or_default();
    let headers = headers.inner();
    match headers.get(refresh_amqp::DEAD_REASON_HEADER) {
        Some(AMQPValue::LongString(reason)) => reason.to_string(),
        _ if headers.contains_key("x-death") => "x-death".to_owned(),
        _ => String::new(),
    }
}

/// The terminal events on the probe, counted by refresh id, read until the queue
/// stayed empty for 3 s.
async fn terminal_events(app: &TestApp, probes: &Probes) -> HashMap<String, usize> {
    let mut terminal: HashMap<String, usize> = HashMap::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        let taken = take_all(app, &probes.events).await;
        if !taken.is_empty() {
            quiet_since = Instant::now();
        }
        for message in taken {
            let event: Value = serde_json::from_slice(&message.data).unwrap();
            let kind = event["type"].as_str().unwrap_or_default();
            if kind.ends_with(".updated") || kind.ends_with(".error") {
                let id = event["data"]["refreshId"].as_str().unwrap().to_owned();
                *terminal.entry(id).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    terminal
}

/// A refresh record as the accounting reads it.
#[derive(sqlx::FromRow)]
struct Row {
    refresh_id: uuid::Uuid,
    consent_id: uuid::Uuid,
    /// `UPDATED`, or `ERROR {code}`.
    ended: String,
    requested_by: String,
    date_requested: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

async fn records(app: &TestApp) -> Vec<Row> {
    sqlx::query_as(
        "SELECT refresh_id, consent_id, concat_ws(' ', status, error_code) AS ended, \
         requested_by, date_requested, finished_at FROM refreshes",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
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
    scenario: &Scenario<'_>,
    sent: &[Sent],
    terminal_events: &HashMap<String, usize>,
    queues: &Queues,
) {
    let (name, app) = (scenario.name, scenario.app);
    let mut by_answer: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    let mut not_connected = 0;
    let mut cut_off: Vec<&str> = Vec::new();
    let mut accepted: HashSet<&str> = HashSet::new();
    let mut accepted_count = 0;
    for s in sent {
        match &s.outcome {
            Outcome::Answered { status, refresh_id } => {
                let via = if s.via == Via::Http {
                    "HTTP"
                } else {
                    "upstream"
                };
                *by_answer.entry((via, *status)).or_default() += 1;
                assert!(
                    [202, 409, 429, 503].contains(status),
                    "{name}: unexpected answer {status} ({via})"
                );
                if *status == 202 {
                    accepted_count += 1;
                    accepted.insert(refresh_id.as_deref().expect("a 202 names its refresh"));
                }
            }
            Outcome::NotConnected => not_connected += 1,
            Outcome::Unknown(what) => cut_off.push(what),
            Outcome::Published(id) => panic!("{name}: request {id} left undecided"),
        }
    }
    assert!(accepted_count > 0, "{name}: the stream admitted nothing");
    assert_eq!(
        accepted.len(),
        accepted_count,
        "{name}: two acceptances named one refresh"
    );
    let unknown = cut_off.len();
    if !scenario.cut_offs {
        assert!(
            cut_off.is_empty() && not_connected == 0,
            "{name}: requests went unanswered ({not_connected} never connected): {cut_off:?}"
        );
    }
    let rows = records(app).await;
    let ids: Vec<String> = rows.iter().map(|r| r.refresh_id.to_string()).collect();
    let recorded: HashSet<&str> = ids.iter().map(String::as_str).collect();
    // Every acceptance has its record; the only other records are of requests cut off
    // before their answer: the refusals and the 503s consumed nothing.
    let missing: Vec<&&str> = accepted.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{name}: accepted but never recorded: {missing:?}"
    );
    let extra: Vec<&&str> = recorded.difference(&accepted).collect();
    assert!(
        extra.len() <= unknown,
        "{name}: {} records without an acceptance, only {unknown} requests cut off: {extra:?}",
        extra.len()
    );
    // Exactly one terminal status each (the record has one status; it is terminal).
    let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        *ends.entry(row.ended.as_str()).or_default() += 1;
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
        per_consent.entry(row.consent_id).or_default().push(row);
    }
    let mut most = 0;
    for (consent, list) in &mut per_consent {
        list.sort_by_key(|r| r.date_requested);
        for pair in list.windows(2) {
            assert!(
                pair[0].finished_at.unwrap() <= pair[1].date_requested,
                "{name}: consent {consent} had {} and {} in flight together",
                pair[0].refresh_id,
                pair[1].refresh_id
            );
        }
        // The quota: 4 on-demand refreshes per rolling 24 h (the test lasts seconds).
        assert!(
            list.len() <= 4,
            "{name}: consent {consent} got {} refreshes: {:#?}",
            list.len(),
            list.iter()
                .map(|r| (&r.requested_by, r.date_requested, r.finished_at))
                .collect::<Vec<_>>()
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
    let unannounced: Vec<&&str> = recorded
        .iter()
        .filter(|id| !terminal_events.contains_key(**id))
        .collect();
    assert!(
        unannounced.is_empty(),
        "{name}: no terminal event for {unannounced:?}"
    );
    let repeated = terminal_events.values().filter(|n| **n > 1).count();
    // The queues: nothing left to do, nothing unacknowledged, every dead job with
    // its reason.
    assert_eq!(
        queues.work_left, 0,
        "{name}: messages left once the roles stopped: {:#?}",
        queues.left
    );
    assert!(
        queues.dead_reasons.iter().all(|reason| !reason.is_empty()),
        "{name}: a dead job without a reason: {:?}",
        queues.dead_reasons
    );
    assert_eq!(
        queues.requests_dead, 0,
        "{name}: a well-formed request was dead-lettered"
    );

    let mut lines = vec![("requests sent".to_owned(), sent.len())];
    lines.extend(
        by_answer
            .iter()
            .map(|((via, status), n)| (format!("{via} answered {status}"), *n)),
    );
    lines.push(("never connected (ingress down)".to_owned(), not_connected));
    lines.push(("cut off without an answer".to_owned(), unknown));
    lines.push(("records".to_owned(), rows.len()));
    lines.push(("  of which from a cut-off request".to_owned(), extra.len()));
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
    lines.push((
        "messages left in work queues".to_owned(),
        queues.work_left as usize,
    ));
    lines.push(("jobs dead-lettered".to_owned(), queues.dead_reasons.len()));
    let mut table = format!("\n{name}: accounting");
    for (label, n) in lines {
        table.push_str(&format!("\n  {label:<34} {n:>6}"));
    }
    for reason in &queues.dead_reasons {
        table.push_str(&format!("\n  dead job: {reason}"));
    }
    report(&table);
}

/// Down at a third of the stream, back 10 s later.
const DOWN_AT: Duration = Duration::from_secs(6);
const OUTAGE: Duration = Duration::from_secs(10);

impl Rig {
    fn scenario<'a>(&'a self, name: &'a str, consents: Vec<ConsentId>) -> Scenario<'a> {
        Scenario::new(name, &self.app, &self.direct, &self.proxied, consents)
    }

    async fn run(&self, name: &str, schedule: Vec<Action<'_>>) {
        let consents = seed(&self.direct, CONSENTS).await;
        self.scenario(name, consents).run(schedule).await;
    }
}

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
    rig.run("redis keys deleted", vec![lose]).await;
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
    rig.run("postgresql unreachable 10 s", outage(&rig.pg))
        .await;
}

#[tokio::test]
async fn redis_unreachable_for_10_s_loses_and_doubles_nothing() {
    let rig = rig().await;
    rig.run("redis unreachable 10 s", outage(&rig.redis)).await;
}

#[tokio::test]
async fn rabbitmq_unreachable_for_10_s_loses_and_doubles_nothing() {
    let rig = rig().await;
    rig.run("rabbitmq unreachable 10 s", outage(&rig.amqp))
        .await;
}

/// The statement writing an admission reaches PostgreSQL and commits, but its answer
/// is lost with its connection: the ingress asks the database whether it was written
/// and answers 202 with its record, its lock and quota entry kept (not 503 with its
/// gate undone while the refresh exists).
#[tokio::test]
async fn an_admission_whose_answer_is_lost_after_its_commit_is_answered_as_admitted() {
    let (app, direct, proxied, pg) = behind_a_database_proxy().await;
    let consent = direct.seed_consent("acme", None, None).await;
    let token = dev_token(&app, Some("acme"), "api:stored_data");

    pg.lose_answer_after(b"admit_refreshes(");
    let path = format!("/v1/consents/{consent}/refresh");
    let answer = proxied.post(&path, &token, None).await;
    assert!(pg.answer_lost(), "the admission's answer was not lost");
    assert_eq!(answer.status, 202, "{answer:?}");
    let refresh_id = answer.body["refreshId"].as_str().expect("a refreshId");
    let record = direct
        .get(&format!("/v1/refreshes/{refresh_id}"), &token)
        .await;
    assert_eq!(record.status, 200, "{record:?}");
    assert_eq!(record.body["status"], "INITIALIZED");

    // Its lock is held and its quota entry counted.
    let again = proxied.post(&path, &token, None).await;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(again.body["code"], "refresh_in_progress");
    assert_eq!(again.body["refreshId"], refresh_id);
    let seen = direct.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(seen.body["quota"]["used"], 1, "{seen:?}");
}

/// The statement writing an admission loses its connection before it ran (its
/// preparation's answer is lost): asked, the database says it was not written, so the
/// ingress answers 503 and gives the gate back; the next request is admitted.
#[tokio::test]
async fn an_admission_whose_statement_never_ran_is_answered_503_and_consumes_nothing() {
    let (app, direct, proxied, pg) = behind_a_database_proxy().await;
    let consent = direct.seed_consent("acme", None, None).await;
    let token = dev_token(&app, Some("acme"), "api:stored_data");

    pg.lose_answer_to(b"admit_refreshes(");
    let path = format!("/v1/consents/{consent}/refresh");
    let answer = proxied.post(&path, &token, None).await;
    assert!(pg.answer_lost(), "the statement's answer was not lost");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body["code"], "unavailable");
    let seen = direct.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(seen.body["quota"]["used"], 0, "{seen:?}");
    assert_eq!(seen.body["refreshing"], false, "{seen:?}");

    let again = proxied.post(&path, &token, None).await;
    assert_eq!(again.status, 202, "{again:?}");
}

/// An admitted request's `Idempotency-Key` is answered by the admission's own
/// statement: the database lost right after the admission (every later statement on
/// the key cut off) neither turns the 202 into a 503 nor leaves the key unanswered,
/// so a repeat replays the 202 instead of admitting again.
#[tokio::test]
async fn an_admitted_requests_key_is_answered_with_the_admission_itself() {
    let (app, direct, proxied, pg) = behind_a_database_proxy().await;
    let consent = direct.seed_consent("acme", None, None).await;
    let token = dev_token(&app, Some("acme"), "api:stored_data");
    let path = format!("/v1/consents/{consent}/refresh");
    let key = [("idempotency-key", "once")];

    // A statement writing the key's answer after the admission would never run.
    pg.lose_answer_to(b"UPDATE idempotency_keys");
    let first = proxied
        .call(reqwest::Method::POST, &path, Some(&token), None, &key)
        .await;
    assert_eq!(first.status, 202, "{first:?}");
    let answered: Option<i32> =
        sqlx::query_scalar("SELECT http_status FROM idempotency_keys WHERE key = $1")
            .bind(format!("POST /v1/consents/{consent}/refresh once"))
            .fetch_optional(&app.pg)
            .await
            .expect("the key's row");
    assert_eq!(answered, Some(202));

    let repeat = direct
        .call(reqwest::Method::POST, &path, Some(&token), None, &key)
        .await;
    assert_eq!(repeat.status, 202, "{repeat:?}");
    assert_eq!(repeat.header("idempotent-replayed"), Some("true"));
    assert_eq!(repeat.body, first.body);
}

/// An app with its own ingress (`direct`) and a second one whose PostgreSQL
/// connections go through the returned proxy.
async fn behind_a_database_proxy() -> (TestApp, Api, Api, Proxy) {
    let app = refresh_tests::spawn_app_with(&COMMON).await;
    let direct = app.start_ingress().await;
    let pg = Proxy::start("127.0.0.1:5432").await;
    let database_url = app
        .settings
        .database
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", pg.port));
    let mut overrides = COMMON.to_vec();
    overrides.push(("database.url", database_url.as_str()));
    let settings = test_settings(&app.namespace, &overrides);
    let proxied = ingress_with(&app, &settings)
        .await
        .expect("the proxied ingress starts");
    (app, direct, proxied, pg)
}

/// The bank failing 30 % of its calls, half with 503 and half by never answering
/// (the connector's timeout, 1 s here): attempts are retried and counted, and every
/// accepted refresh still ends exactly once (`UPDATED`, or `ERROR bank_unavailable`
/// once its attempts are used up), its transactions stored once.
#[tokio::test]
async fn a_bank_failing_30_percent_of_calls_loses_and_doubles_nothing() {
    let rig = rig_with(&[("providers.sim.timeout_secs", "1")]).await;
    let consents = seed(&rig.direct, CONSENTS).await;
    for consent in &consents {
        rig.bank
            .scenario(
                &format!("token-{consent}"),
                &serde_json::json!({"failPercent": 30}),
            )
            .await;
    }
    rig.scenario("bank failing 30 % of calls", consents)
        .run(Vec::new())
        .await;
}

#[allow(
    clippy::print_stderr,
    reason = "the accounting table is the test's report"
)]
fn report(table: &str) {
    eprintln!("{table}");
}

/// An app with the simulator, its ingress and a worker, with the rigs' settings plus
/// `extra` (e.g. a private server's URL).
async fn app_with_worker(extra: &[(&str, &str)]) -> (TestApp, Api) {
    let mut settings = COMMON.to_vec();
    settings.push(("database.acquire_timeout_ms", "1000"));
    settings.extend_from_slice(extra);
    let (app, api, _bank) = app_with_bank(&settings).await;
    start_worker(&app, &api, fast_worker_config(&app));
    (app, api)
}

/// PostgreSQL restarted (`pg_ctl stop -m fast`, 2 s, `pg_ctl start`) a third into
/// the stream: every session is ended under the ingress and the worker; admissions
/// meanwhile get 503 or wait for a connection, none is lost, and every refresh cut by
/// the restart is taken up again.
#[tokio::test]
async fn postgresql_restarted_mid_stream_loses_and_doubles_nothing() {
    let pg = PrivatePostgres::start().await;
    let url = pg.url();
    let (app, api) = app_with_worker(&[("database.url", &url)]).await;
    let consents = seed(&api, CONSENTS).await;
    let restart: Action<'_> = (
        DOWN_AT,
        Box::pin(async {
            pg.stop().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg.start_again().await;
        }),
    );
    let mut scenario = Scenario::new("postgresql restarted", &app, &api, &api, consents);
    // A request whose idempotency reservation could not be released while the
    // database was down is decided soon after it is back, not after the 90 s lease.
    scenario.decided_within = Duration::from_secs(60);
    scenario.run(vec![restart]).await;
}

/// RabbitMQ restarted (`rabbitmqctl stop`, then `rabbitmq-server` on the same data,
/// about 15 s down) a third into the stream: unconfirmed publishes fail and their
/// admissions are undone (503), upstream requests published meanwhile fail at the
/// publisher (counted as cut off), the quorum queues keep every job and request, and
/// the roles reconnect.
#[tokio::test]
async fn rabbitmq_restarted_mid_stream_loses_and_doubles_nothing() {
    let rabbit = PrivateRabbit::start().await;
    let url = rabbit.url();
    let (app, api) = app_with_worker(&[("amqp.url", &url)]).await;
    let consents = seed(&api, CONSENTS).await;
    let restart: Action<'_> = (
        DOWN_AT,
        Box::pin(async {
            rabbit.stop().await;
            rabbit.start_again().await;
        }),
    );
    let mut scenario = Scenario::new("rabbitmq restarted", &app, &api, &api, consents);
    scenario.cut_offs = true;
    scenario.run(vec![restart]).await;
}

/// A stream through the machine's shared `service` (listening on `port`), restarted
/// by its service manager a third into the stream. `cut_offs`: the restart may cut
/// requests off without an answer (a publish the broker never confirmed).
async fn shared_service_restarted(service: &'static str, port: u16, cut_offs: bool) {
    let (app, api) = app_with_worker(&[]).await;
    let consents = seed(&api, CONSENTS).await;
    let restart: Action<'_> = (DOWN_AT, Box::pin(restart_shared_service(service, port)));
    let name = format!("shared {service} restarted by its service manager");
    let mut scenario = Scenario::new(&name, &app, &api, &api, consents);
    scenario.cut_offs = cut_offs;
    scenario.run(vec![restart]).await;
}

/// The machine's shared RabbitMQ restarted by its service manager (`service
/// rabbitmq-server restart`) a third into the stream. `make test` runs it alone after
/// the rest, since it cuts every test's connections.
#[tokio::test]
#[ignore = "restarts the shared RabbitMQ: `make test` runs it alone, after the rest"]
async fn the_shared_rabbitmq_restarted_by_its_service_manager_loses_and_doubles_nothing() {
    shared_service_restarted("rabbitmq-server", 5672, true).await;
}

/// The machine's shared PostgreSQL restarted by its service manager (`service
/// postgresql restart`) a third into the stream; run alone like the RabbitMQ one.
#[tokio::test]
#[ignore = "restarts the shared PostgreSQL: `make test` runs it alone, after the rest"]
async fn the_shared_postgresql_restarted_by_its_service_manager_loses_and_doubles_nothing() {
    shared_service_restarted("postgresql", 5432, false).await;
}

/// A job delayed by the stagger waits in a quorum wait queue through a broker restart
/// and still starts at its `notBefore`: the wait queues dead-letter at least once and
/// keep their messages on disk (a classic queue's TTL dead-lettering could drop it).
#[tokio::test]
async fn a_job_waiting_for_its_slot_survives_a_broker_restart() {
    let rabbit = PrivateRabbit::start().await;
    let url = rabbit.url();
    let (app, api) = app_with_worker(&[
        ("amqp.url", &url),
        ("stagger.limit", "1"),
        ("stagger.period_secs", "40"),
    ])
    .await;
    let token = dev_token(&app, Some("acme"), "api:stored_data");
    let first = api.seed_consent("acme", None, None).await;
    let second = api.seed_consent("acme", None, None).await;
    api.refresh(&token, &first.to_string()).await;
    let delayed = api
        .post(&format!("/v1/consents/{second}/refresh"), &token, None)
        .await;
    assert_eq!(delayed.status, 202, "{:?}", delayed.body);
    let refresh_id = delayed.body["refreshId"].as_str().unwrap().to_owned();
    let not_before: DateTime<Utc> = delayed.body["notBefore"].as_str().unwrap().parse().unwrap();
    assert!(
        not_before > Utc::now() + chrono::TimeDelta::seconds(30),
        "the second refresh waits for the next period: {not_before}"
    );
    let names = refresh_amqp::Names::new(&app.namespace);
    let waiting = |depths: &BTreeMap<String, u32>| -> u32 {
        names
            .wait_tiers
            .iter()
            .map(|(_, queue)| queue)
            .chain([&names.jobs_wait])
            .map(|queue| depths[queue])
            .sum()
    };
    assert_eq!(waiting(&depths(&app, &names).await), 1, "the job waits");
    rabbit.stop().await;
    rabbit.start_again().await;
    assert_eq!(
        waiting(&depths(&app, &names).await),
        1,
        "the job still waits after the restart"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let (status, started): (String, Option<DateTime<Utc>>) = loop {
        let row: (String, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT status, last_started_at FROM refreshes WHERE refresh_id = $1")
                .bind(uuid::Uuid::parse_str(&refresh_id).unwrap())
                .fetch_one(&app.pg)
                .await
                .unwrap();
        if row.0 != "INITIALIZED" {
            break row;
        }
        assert!(Instant::now() < deadline, "the delayed refresh never ran");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(status, "UPDATED");
    let started = started.expect("the refresh started");
    assert!(
        started >= not_before,
        "started at {started}, not before {not_before}"
    );
}

/// A chaos loop for a minute: two `refreshd ingress` and two `refreshd worker`
/// processes, one of the four (at random, the seed is printed) `SIGKILL`ed every 3 s
/// and started again, while requests stream to both ingresses. A request cut off with
/// its ingress may or may not have been admitted; if it was, its refresh still ends
/// once. A refresh cut off mid-attempt is taken up by the next delivery once its
/// attempt's lease ran out; none is lost or run twice at once.
#[tokio::test]
async fn ingresses_and_workers_killed_at_random_for_a_minute_lose_and_double_nothing() {
    let settings = [("stagger.limit", "600"), ("lock.lease_secs", "5")];
    let (app, api, _bank) = app_with_bank(&settings).await;
    let consents = seed(&api, 3 * CONSENTS).await;
    let ports = [free_port(), free_port()];
    let binds = ports.map(|port| format!("127.0.0.1:{port}"));
    let spawn = |index: usize| -> WorkerProcess {
        if index < 2 {
            let mut with_bind = settings.to_vec();
            with_bind.push(("http.bind", binds[index].as_str()));
            WorkerProcess::spawn_role(&app, "ingress", &with_bind)
        } else {
            WorkerProcess::spawn(&app, &settings)
        }
    };
    let processes = Mutex::new((0..4).map(spawn).collect::<Vec<_>>());
    let bases: Vec<String> = binds.iter().map(|bind| format!("http://{bind}")).collect();
    for base in &bases {
        ready(base).await;
    }
    let seed = u64::try_from(Utc::now().timestamp_micros()).unwrap_or_default();
    let mut random = SplitMix(seed);
    let mut kills: Vec<Action<'_>> = Vec::new();
    let mut victims = Vec::new();
    for round in 0..20u64 {
        let victim = usize::try_from(random.next() % 4).expect("small");
        victims.push(victim);
        let (processes, spawn) = (&processes, &spawn);
        kills.push((
            Duration::from_secs(1 + 3 * round),
            Box::pin(async move {
                let mut processes = processes.lock().expect("processes");
                processes[victim].kill();
                processes[victim] = spawn(victim);
            }),
        ));
    }
    report(&format!(
        "chaos seed {seed}: victims {victims:?} (0 and 1 ingresses, 2 and 3 workers)"
    ));
    let mut scenario = Scenario::new(
        "ingresses and workers SIGKILLed",
        &app,
        &api,
        &api,
        consents,
    );
    scenario.bases = bases;
    scenario.duration = Duration::from_secs(60);
    scenario.processes = Some(&processes);
    scenario.cut_offs = true;
    scenario.decided_within = Duration::from_secs(180);
    scenario.run(kills).await;
}

/// Waits until an ingress at `base` answers `/readyz` with 200.
async fn ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        if let Ok(answer) = client.get(format!("{base}/readyz")).send().await
            && answer.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SplitMix64: the chaos loop's victims, from a printed seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
