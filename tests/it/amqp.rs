//! The RabbitMQ adapter through the real broker: confirmed publishing to each
//! destination, settling outcomes, and the supervisor recovering from a cut
//! connection (through a TCP proxy the test controls) without losing or duplicating
//! a confirmed publish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use refresh_amqp::{AmqpSettings, Broker, CancellationToken, Consumer, Delivery, TaskTracker};
use refresh_core::Outcome;
use refresh_tests::{TestApp, spawn_app, spawn_app_with};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A broker handle for a test, shut down (and its supervisor awaited) on `stop`.
struct Running {
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    async fn start(settings: &AmqpSettings, namespace: &str) -> Self {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let broker = Broker::start(settings, namespace, shutdown.clone(), &tracker)
            .await
            .expect("RabbitMQ must be up (run `make services`)");
        Self {
            broker,
            shutdown,
            tracker,
        }
    }

    async fn of(app: &TestApp) -> Self {
        Self::start(&app.settings.amqp, &app.namespace).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("the supervisor stops promptly once nothing is in flight");
    }
}

/// The next delivery within `within`, or `None`.
async fn next_within(consumer: &mut Consumer, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, consumer.next())
        .await
        .ok()
        .flatten()
}

async fn next(consumer: &mut Consumer) -> Delivery {
    next_within(consumer, Duration::from_secs(5))
        .await
        .expect("a delivery within 5 s")
}

/// Drains a queue through `consumer`, acking: message ids with how often each came.
async fn drain(consumer: &mut Consumer) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    while let Some(delivery) = next_within(consumer, Duration::from_millis(700)).await {
        *seen
            .entry(delivery.message_id.clone().unwrap_or_default())
            .or_insert(0) += 1;
        delivery
            .settle(Outcome::Ack)
            .await
            .expect("ack while draining");
    }
    seen
}

#[tokio::test]
async fn a_job_is_confirmed_onto_the_jobs_queue_persistent_with_its_message_id() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    assert!(broker.is_connected());
    assert_eq!(broker.names().jobs, format!("{}.jobs", app.namespace));

    broker
        .publish_job(br#"{"refreshId":"r1"}"#, "job-1", None)
        .await
        .unwrap();
    // A zero delay is no delay.
    broker
        .publish_job(b"{}", "job-2", Some(Duration::ZERO))
        .await
        .unwrap();

    let mut jobs = broker.consume(&broker.names().jobs, 10);
    let first = next(&mut jobs).await;
    assert_eq!(first.message_id.as_deref(), Some("job-1"));
    assert_eq!(first.body, br#"{"refreshId":"r1"}"#);
    assert!(first.persistent());
    assert_eq!(first.content_type(), Some("application/json"));
    assert_eq!(
        (first.redelivered, first.delivery_count, first.retries()),
        (false, 0, 0)
    );
    assert_eq!(first.queue(), broker.names().jobs);
    first.settle(Outcome::Ack).await.unwrap();
    let second = next(&mut jobs).await;
    assert_eq!(second.message_id.as_deref(), Some("job-2"));
    second.settle(Outcome::Ack).await.unwrap();
    assert!(
        next_within(&mut jobs, Duration::from_millis(300))
            .await
            .is_none(),
        "acked means gone"
    );

    // Input the protocol cannot carry is refused, not a panic.
    let error = broker
        .publish_job(b"{}", &"x".repeat(300), None)
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    running.stop().await;
}

#[tokio::test]
async fn a_delivery_dropped_unsettled_returns_to_its_queue() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    broker.publish_job(b"{}", "job-d", None).await.unwrap();
    let mut jobs = broker.consume(&broker.names().jobs, 10);
    drop(next(&mut jobs).await);
    let again = next(&mut jobs).await;
    assert_eq!(again.message_id.as_deref(), Some("job-d"));
    assert_eq!((again.redelivered, again.delivery_count), (true, 1));
    again.settle(Outcome::Ack).await.unwrap();
    running.stop().await;
}

/// Publishes a job delayed by `delay_ms` and returns how long it took to reach `jobs`.
async fn delayed_arrival(
    broker: &Broker,
    jobs: &mut Consumer,
    id: &str,
    delay_ms: u64,
) -> Duration {
    let published = Instant::now();
    broker
        .publish_job(b"{}", id, Some(Duration::from_millis(delay_ms)))
        .await
        .unwrap();
    let delivery = next(jobs).await;
    let elapsed = published.elapsed();
    assert_eq!(delivery.message_id.as_deref(), Some(id));
    assert!(delivery.persistent());
    delivery.settle(Outcome::Ack).await.unwrap();
    elapsed
}

#[tokio::test]
async fn a_delayed_job_reaches_the_jobs_queue_only_when_due() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    let mut jobs = broker.consume(&broker.names().jobs, 10);

    // Under the first tier: exactly its own delay (per-message TTL on jobs.wait).
    let short = delayed_arrival(broker, &mut jobs, "short", 600).await;
    assert!((600..1_000).contains(&short.as_millis()), "{short:?}");
    // From the first tier on: the longest tier not above the delay (here 1 s), so
    // never late; the consumer waits out the rest from the job's notBefore. (The
    // upper bound only tells the 1 s tier from the 5 s one: a loaded broker expires
    // messages a little late.)
    let tiered = delayed_arrival(broker, &mut jobs, "tiered", 1_200).await;
    assert!((1_000..2_500).contains(&tiered.as_millis()), "{tiered:?}");

    // A short wait is not held behind a long one: the tiers expire in arrival order.
    broker
        .publish_job(b"{}", "long", Some(Duration::from_secs(5)))
        .await
        .unwrap();
    let quick = delayed_arrival(broker, &mut jobs, "quick", 1_000).await;
    assert!(quick < Duration::from_millis(2_500), "{quick:?}");
    running.stop().await;
}

#[tokio::test]
async fn an_event_reaches_a_queue_bound_to_the_events_exchange() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    let probe = broker.declare_probe_queue("refresh.#").await.unwrap();
    let mut events = broker.consume(&probe, 10);

    // An event nobody listens for is still confirmed.
    broker
        .publish_event("other.updated.acme", b"{}", "ev-0")
        .await
        .unwrap();
    broker
        .publish_event("refresh.updated.acme", br#"{"specversion":"1.0"}"#, "ev-1")
        .await
        .unwrap();

    let event = next(&mut events).await;
    assert_eq!(event.message_id.as_deref(), Some("ev-1"));
    assert_eq!(event.content_type(), Some("application/cloudevents+json"));
    assert_eq!(event.body, br#"{"specversion":"1.0"}"#);
    assert!(event.persistent());
    event.settle(Outcome::Ack).await.unwrap();
    assert!(
        next_within(&mut events, Duration::from_millis(300))
            .await
            .is_none()
    );
    running.stop().await;
}

#[tokio::test]
async fn a_reply_reaches_the_reply_queue_with_its_correlation_id() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    let reply_to = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_to, 10);

    broker
        .reply(&reply_to, Some("corr-7"), br#"{"accepted":true}"#)
        .await
        .unwrap();
    let reply = next(&mut replies).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(reply.body, br#"{"accepted":true}"#);
    reply.settle(Outcome::Ack).await.unwrap();

    // A reply queue that is gone: the mandatory publish comes back, a permanent error.
    let error = broker
        .reply("no-such-reply-queue", None, b"{}")
        .await
        .unwrap_err();
    assert!(
        matches!(error, refresh_amqp::AmqpError::Unroutable { .. }) && !error.is_transient(),
        "{error:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn dead_letter_moves_a_request_to_requests_dead_with_its_reason() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    broker
        .publish_request(b"not json", Some("req-1"), Some("replies"), Some("c-1"))
        .await
        .unwrap();

    let mut requests = broker.consume(&broker.names().requests, 10);
    let request = next(&mut requests).await;
    assert_eq!(request.message_id.as_deref(), Some("req-1"));
    assert_eq!(request.reply_to.as_deref(), Some("replies"));
    assert_eq!(request.correlation_id.as_deref(), Some("c-1"));
    request
        .settle(Outcome::dead_letter("body is not JSON"))
        .await
        .unwrap();
    assert!(
        next_within(&mut requests, Duration::from_millis(300))
            .await
            .is_none()
    );

    let mut dead = broker.consume(&broker.names().requests_dead, 10);
    let corpse = next(&mut dead).await;
    assert_eq!(corpse.message_id.as_deref(), Some("req-1"));
    assert_eq!(corpse.body, b"not json");
    assert_eq!(
        corpse.dead_letter_reason().as_deref(),
        Some("body is not JSON")
    );
    assert_eq!(corpse.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(corpse.delivery_count, 0, "a fresh count in the dead queue");
    corpse.settle(Outcome::Ack).await.unwrap();
    running.stop().await;
}

#[tokio::test]
async fn a_retried_request_comes_back_as_a_fresh_copy_and_never_reaches_the_delivery_limit() {
    let app = spawn_app_with(&[("amqp.delivery_limit", "2")]).await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    broker
        .publish_request(b"{}", Some("req-loop"), Some("replies-here"), Some("c-1"))
        .await
        .unwrap();

    // A request held back (a dependency down) is republished as a copy carrying its
    // retry count, then acked: past the limit of 2 it still comes back, always as a
    // first delivery, with its properties.
    let mut requests = broker.consume(&broker.names().requests, 10);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let request = next(&mut requests).await;
        seen.push((
            request.delivery_count,
            request.redelivered,
            request.retries(),
        ));
        assert_eq!(request.message_id.as_deref(), Some("req-loop"));
        assert_eq!(request.reply_to.as_deref(), Some("replies-here"));
        assert_eq!(request.correlation_id.as_deref(), Some("c-1"));
        request
            .settle(Outcome::retry(Duration::from_millis(50)))
            .await
            .unwrap();
    }
    assert_eq!(
        seen,
        [
            (0, false, 0),
            (0, false, 1),
            (0, false, 2),
            (0, false, 3),
            (0, false, 4)
        ]
    );
    let last = next(&mut requests).await;
    assert_eq!(last.retries(), 5);
    last.settle(Outcome::Ack).await.unwrap();
    let mut dead = broker.consume(&broker.names().requests_dead, 10);
    assert!(
        next_within(&mut dead, Duration::from_millis(500))
            .await
            .is_none(),
        "a retried request never lands in requests.dead"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_request_returned_unsettled_past_the_delivery_limit_ends_in_requests_dead() {
    let app = spawn_app_with(&[("amqp.delivery_limit", "2")]).await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    broker
        .publish_request(b"{}", Some("req-crash"), None, None)
        .await
        .unwrap();

    // A delivery dropped unsettled (as when its consumer dies) returns to the queue
    // and is counted: deliveries 0, 1 and 2, then the broker dead-letters it.
    let mut requests = broker.consume(&broker.names().requests, 10);
    let mut counts = Vec::new();
    while let Some(request) = next_within(&mut requests, Duration::from_millis(1000)).await {
        counts.push(request.delivery_count);
        drop(request);
    }
    assert_eq!(counts, [0, 1, 2]);
    let mut dead = broker.consume(&broker.names().requests_dead, 10);
    let corpse = next(&mut dead).await;
    assert_eq!(corpse.message_id.as_deref(), Some("req-crash"));
    corpse.settle(Outcome::Ack).await.unwrap();
    running.stop().await;
}

#[tokio::test]
async fn a_retried_job_comes_back_after_its_backoff_every_time() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    broker
        .publish_job(b"{\"n\":1}", "job-r", None)
        .await
        .unwrap();
    let mut jobs = broker.consume(&broker.names().jobs, 10);

    // Twice through jobs.wait: the copy must not carry the x-death history that
    // makes RabbitMQ drop a message expiring from the same queue again.
    let mut job = next(&mut jobs).await;
    for round in 0..2_u32 {
        assert_eq!(job.message_id.as_deref(), Some("job-r"));
        assert_eq!(job.retries(), round);
        assert_eq!(job.delivery_count, 0, "each retry is a fresh message");
        assert_eq!(job.body, b"{\"n\":1}");
        let settled = Instant::now();
        job.settle(Outcome::retry(Duration::from_millis(400)))
            .await
            .unwrap();
        assert!(
            next_within(&mut jobs, Duration::from_millis(200))
                .await
                .is_none(),
            "not back before the backoff"
        );
        job = next(&mut jobs).await;
        assert!(
            settled.elapsed() >= Duration::from_millis(400),
            "{:?}",
            settled.elapsed()
        );
    }
    assert_eq!(
        (job.message_id.as_deref(), job.retries()),
        (Some("job-r"), 2)
    );
    job.settle(Outcome::Ack).await.unwrap();
    assert!(
        next_within(&mut jobs, Duration::from_millis(300))
            .await
            .is_none(),
        "no duplicates"
    );
    running.stop().await;
}

#[tokio::test]
async fn shutdown_ends_the_consumer_but_keeps_the_connection_for_deliveries_in_hand() {
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = running.broker.clone();
    broker.publish_job(b"{}", "job-s", None).await.unwrap();
    let mut jobs = broker.consume(&broker.names().jobs, 10);
    let job = next(&mut jobs).await;

    running.shutdown.cancel();
    assert!(
        next_within(&mut jobs, Duration::from_secs(1))
            .await
            .is_none(),
        "the stream ends"
    );
    // The connection stays up for the delivery in hand; settling it lets the
    // supervisor close.
    assert!(broker.is_connected());
    job.settle(Outcome::retry(Duration::ZERO)).await.unwrap();
    running.stop().await;
    assert!(!broker.is_connected());
    let error = broker
        .publish_job(b"{}", "too-late", None)
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");

    // The retried job is on the queue for the next process.
    let next_process = Running::of(&app).await;
    let mut jobs = next_process.broker.consume(&broker.names().jobs, 10);
    let job = next(&mut jobs).await;
    assert_eq!(
        (job.message_id.as_deref(), job.retries()),
        (Some("job-s"), 1)
    );
    job.settle(Outcome::Ack).await.unwrap();
    next_process.stop().await;
}

/// A TCP proxy in front of RabbitMQ that can cut every connection and refuse new
/// ones, to break the broker handle's connection on purpose.
struct Proxy {
    port: u16,
    accepting: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy: bind a free port");
        let port = listener.local_addr().expect("proxy: bound address").port();
        let accepting = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0_u64);
        let task = tokio::spawn({
            let accepting = Arc::clone(&accepting);
            let cuts = cuts.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !accepting.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    cut.mark_unchanged();
                    tokio::spawn(async move {
                        let Ok(mut upstream) = TcpStream::connect("127.0.0.1:5672").await else {
                            return;
                        };
                        // Biased: once cut, not one more byte is forwarded, so a
                        // publish sent after the cut cannot reach the broker.
                        tokio::select! {
                            biased;
                            _ = cut.changed() => {} // both sockets close on drop
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        }
                    });
                }
            }
        });
        Self {
            port,
            accepting,
            cuts,
            task,
        }
    }

    fn settings(&self, app: &TestApp) -> AmqpSettings {
        AmqpSettings {
            url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            ..app.settings.amqp.clone()
        }
    }

    /// Kills every proxied connection.
    fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    fn accept(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Polls `check` every 50 ms for up to `within`.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Semantics proven here: a publish that returned `Ok` is on the queue exactly once,
/// whatever happened to the connection; a publish during the outage either fails
/// (and then, cut between publishes, is not on the queue) or waits for the
/// reconnect and succeeds. Nothing is re-sent behind the caller's back.
#[tokio::test]
async fn after_a_cut_connection_every_confirmed_publish_is_there_exactly_once() {
    let app = spawn_app().await;
    let proxy = Proxy::start().await;
    let running = Running::start(&proxy.settings(&app), &app.namespace).await;
    let broker = &running.broker;

    // A consumer started before the cut, proven subscribed by one request.
    let mut requests = broker.consume(&broker.names().requests, 10);
    broker
        .publish_request(b"{}", Some("before"), None, None)
        .await
        .unwrap();
    let before = next(&mut requests).await;
    assert_eq!(before.message_id.as_deref(), Some("before"));
    before.settle(Outcome::Ack).await.unwrap();

    let mut confirmed = Vec::new();
    let mut failed = Vec::new();
    for i in 0..10 {
        let id = format!("job-{i}");
        broker.publish_job(b"{}", &id, None).await.unwrap();
        confirmed.push(id);
    }

    proxy.cut();
    for i in 10..30 {
        let id = format!("job-{i}");
        let started = Instant::now();
        match broker.publish_job(b"{}", &id, None).await {
            Ok(()) => confirmed.push(id),
            Err(error) => {
                assert!(error.is_transient(), "{error}");
                failed.push(id);
            }
        }
        assert!(
            started.elapsed() <= Duration::from_millis(app.settings.amqp.confirm_timeout_ms + 500)
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || broker.is_connected()).await,
        "the supervisor reconnects"
    );
    assert!(
        confirmed.len() >= 20,
        "most calls succeed after the reconnect: failed {failed:?}"
    );

    // The consumer from before the cut receives what is published after it.
    broker
        .publish_request(b"{}", Some("after"), None, None)
        .await
        .unwrap();
    let after = next(&mut requests).await;
    assert_eq!(after.message_id.as_deref(), Some("after"));
    after.settle(Outcome::Ack).await.unwrap();

    // Exactly the confirmed jobs, each once (read through a direct connection).
    let observer = Running::of(&app).await;
    let mut jobs = observer.broker.consume(&observer.broker.names().jobs, 50);
    let seen = drain(&mut jobs).await;
    let expected: BTreeMap<String, usize> = confirmed.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(seen, expected, "failed publishes: {failed:?}");

    observer.stop().await;
    running.stop().await;
}

#[tokio::test]
async fn while_the_broker_is_unreachable_publishing_fails_within_the_confirm_timeout() {
    let app = spawn_app_with(&[("amqp.confirm_timeout_ms", "800")]).await;
    let proxy = Proxy::start().await;
    let settings = proxy.settings(&app);

    // The first connection must succeed.
    proxy.accept(false);
    let refused = Broker::start(
        &settings,
        &app.namespace,
        CancellationToken::new(),
        &TaskTracker::new(),
    )
    .await;
    assert!(refused.is_err_and(|error| error.is_transient()));

    proxy.accept(true);
    let running = Running::start(&settings, &app.namespace).await;
    let broker = &running.broker;
    broker.publish_job(b"{}", "up", None).await.unwrap();

    proxy.accept(false);
    proxy.cut();
    assert!(eventually(Duration::from_secs(2), || !broker.is_connected()).await);
    for id in ["down-1", "down-2"] {
        let started = Instant::now();
        let error = broker.publish_job(b"{}", id, None).await.unwrap_err();
        assert!(error.is_transient(), "the 503 path: {error}");
        assert!(
            started.elapsed() < Duration::from_millis(800 + 300),
            "{:?}",
            started.elapsed()
        );
    }

    proxy.accept(true);
    assert!(
        eventually(Duration::from_secs(8), || broker.is_connected()).await,
        "reconnects once the broker is back"
    );
    broker.publish_job(b"{}", "back", None).await.unwrap();

    let mut jobs = broker.consume(&broker.names().jobs, 10);
    let seen = drain(&mut jobs).await;
    let expected: BTreeMap<String, usize> = [("back".to_owned(), 1), ("up".to_owned(), 1)].into();
    assert_eq!(seen, expected);
    running.stop().await;
}

/// The arguments earlier versions declared the wait queues with: classic queues,
/// whose dead-lettering is at most once.
fn classic_wait_arguments(names: &refresh_amqp::Names, ttl: Option<Duration>) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.jobs.as_str().into()),
    );
    table.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(refresh_amqp::topology::JOB_ROUTING_KEY.into()),
    );
    if let Some(ttl) = ttl {
        table.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(ttl.as_millis() as i64),
        );
    }
    table
}

fn wait_queues(names: &refresh_amqp::Names) -> Vec<(String, Option<Duration>)> {
    let mut queues = vec![(names.jobs_wait.clone(), None)];
    queues.extend(
        names
            .wait_tiers
            .iter()
            .map(|(ttl, q)| (q.clone(), Some(*ttl))),
    );
    queues
}

/// Declares `queue` with `arguments` on a channel of its own: `Ok` only if the queue
/// exists with exactly these arguments (or did not exist).
async fn redeclare(app: &TestApp, queue: &str, arguments: FieldTable) -> Result<(), lapin::Error> {
    let channel = app.amqp.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn the_wait_queues_are_quorum_and_dead_letter_at_least_once() {
    let app = spawn_app().await;
    let names = refresh_amqp::Names::new(&app.namespace);
    for (queue, ttl) in wait_queues(&names) {
        // The broker accepts a second declaration only with equal arguments.
        let jobs = names.jobs.as_str();
        redeclare(
            &app,
            &queue,
            refresh_amqp::topology::wait_queue_arguments(jobs, ttl),
        )
        .await
        .unwrap_or_else(|e| panic!("{queue}: {e}"));
        let arguments = refresh_amqp::topology::wait_queue_arguments(jobs, ttl);
        assert_eq!(
            arguments.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            arguments.inner().get("x-dead-letter-strategy"),
            Some(&AMQPValue::LongString("at-least-once".into()))
        );
        assert_eq!(
            arguments.inner().get("x-overflow"),
            Some(&AMQPValue::LongString("reject-publish".into()))
        );
        assert!(
            redeclare(&app, &queue, classic_wait_arguments(&names, ttl))
                .await
                .is_err(),
            "{queue} is not classic"
        );
    }
}

#[tokio::test]
async fn a_namespace_whose_wait_queues_are_classic_still_starts_and_delays_jobs() {
    let app = spawn_app().await;
    let legacy = refresh_tests::fresh_namespace();
    let names = refresh_amqp::Names::new(&legacy);
    for (queue, ttl) in wait_queues(&names) {
        redeclare(&app, &queue, classic_wait_arguments(&names, ttl))
            .await
            .unwrap();
    }
    let running = Running::start(&app.settings.amqp, &legacy).await;
    let broker = &running.broker;
    let mut jobs = broker.consume(&names.jobs, 10);
    let started = Instant::now();
    broker
        .publish_job(b"{}", "legacy-job", Some(Duration::from_millis(1000)))
        .await
        .unwrap();
    let job = tokio::time::timeout(Duration::from_secs(10), jobs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.message_id.as_deref(), Some("legacy-job"));
    // Through the classic 1 s tier.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    job.settle(Outcome::Ack).await.unwrap();
    // The classic queues were kept, not replaced.
    for (queue, ttl) in wait_queues(&names) {
        redeclare(&app, &queue, classic_wait_arguments(&names, ttl))
            .await
            .unwrap_or_else(|e| panic!("{queue}: {e}"));
    }
    running.stop().await;
    refresh_amqp::delete_namespace(&app.amqp, &legacy)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_consumer_whose_first_calls_are_dropped_mid_subscribe_still_gets_every_message() {
    // A caller that stops waiting for `next` (a timeout, a `select!`) while it is
    // subscribing must not leave a half-made consumer on the queue: it would take
    // its share of the messages and never settle them.
    let app = spawn_app().await;
    let running = Running::of(&app).await;
    let broker = &running.broker;
    for micros in (0..3000).step_by(150) {
        let queue = broker.declare_reply_queue().await.unwrap();
        let mut consumer = broker.consume(&queue, 10);
        for _ in 0..5 {
            let cut = Duration::from_micros(micros);
            assert!(next_within(&mut consumer, cut).await.is_none());
        }
        for n in 0..20 {
            broker
                .reply(&queue, Some(&n.to_string()), b"{}")
                .await
                .unwrap();
        }
        for n in 0..20 {
            let delivery = next_within(&mut consumer, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("calls dropped after {micros} µs: got {n} of 20"));
            delivery.settle(Outcome::Ack).await.unwrap();
        }
    }
    running.stop().await;
}
