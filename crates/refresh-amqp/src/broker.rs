//! The supervised broker handle: one connection kept alive by a supervisor task, a
//! confirmed publish channel shared by every publisher, and consumers that
//! re-subscribe after a reconnect (see [`crate::consumer`]).
//!
//! lapin's own auto-recovery is not used: the supervisor watches the connection
//! (connection events, a health tick, and pokes from failed operations), and when it
//! is gone opens a new one with capped exponential backoff, declares the topology
//! again and publishes the new [`Link`] on a watch channel that publishers and
//! consumers follow. Nothing is re-sent behind a caller's back.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use refresh_core::error_chain;
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::topology::{self, JOB_ROUTING_KEY, REQUEST_ROUTING_KEY};
use crate::{AmqpError, AmqpSettings, Names};

/// First pause between reconnect attempts; doubled per failure up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnect (and re-subscribe) attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest wait for one connection attempt (TCP, handshake, topology, channel).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor checks the connection even without an event.
const HEALTH_TICK: Duration = Duration::from_secs(1);
/// After shutdown, how long the supervisor keeps the connection open for
/// deliveries still being handled (their ack needs it). The process's own grace
/// timeout usually ends things first.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for a graceful connection close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// AMQP delivery mode of a message stored on disk.
pub(crate) const PERSISTENT: u8 = 2;
const JSON: &str = "application/json";
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

type EventStream = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// An exclusive queue of the `events` exchange and the connection it lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQueue {
    pub name: String,
    pub connection_id: u64,
}

/// One live connection with its confirmed publish channel.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) connection: Arc<Connection>,
    /// Grows with every new connection; consumers re-subscribe when it changes.
    pub(crate) connection_id: u64,
    publish: Channel,
    /// Serialises `basic.publish` on the shared channel: lapin numbers the publish
    /// for its confirm and queues its frames under two different locks, so two
    /// publishes racing on threads could have their confirms swapped.
    serial: Arc<AsyncMutex<()>>,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

pub(crate) struct Inner {
    pub(crate) settings: AmqpSettings,
    namespace: String,
    pub(crate) names: Names,
    /// The current link; `None` while reconnecting and after shutdown.
    pub(crate) link: watch::Sender<Option<Link>>,
    /// Pokes the supervisor to check the link now.
    heal: Notify,
    pub(crate) shutdown: CancellationToken,
    /// The caller's tracker, for the little work a dropped delivery leaves.
    pub(crate) tracker: TaskTracker,
    /// Counts handed-out, unsettled deliveries, so shutdown can wait for them.
    pub(crate) inflight: TaskTracker,
}

/// A supervised handle on the broker for one namespace; cheap to clone, safe to use
/// from many tasks at once.
///
/// Publishing: every publish is persistent and waits for the broker's publisher
/// confirm, bounded by `confirm_timeout_ms` for the whole call (waiting for a
/// connection included). `Ok` means the broker has the message (for a quorum
/// queue: replicated) exactly once: a publish is never repeated internally, so an
/// `Ok` publish is never duplicated by this crate. `Err` means it may or may not
/// have been stored (a connection lost after sending, before the confirm): the
/// caller treats it as not done (undoes the admission), and consumers are
/// idempotent anyway. A call made while the connection is down waits for the
/// supervisor's reconnect, at most until the same deadline, then fails with a
/// transient error (HTTP 503).
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("namespace", &self.inner.namespace)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Where a publish goes.
pub(crate) struct Target<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    /// Fail with [`AmqpError::Unroutable`] when no queue takes the message.
    pub(crate) mandatory: bool,
}

impl Broker {
    /// Connects (the first connection must succeed, else `Err`) and declares the
    /// namespace's topology; afterwards a supervisor task (on `tracker`, stopped by
    /// `shutdown`) notices a lost connection and reconnects with capped exponential
    /// backoff (100 ms doubling to 5 s, jittered), re-declaring the topology and
    /// re-opening channels. lapin's own auto-recovery is not used.
    ///
    /// After `shutdown` is cancelled the connection stays open until every
    /// delivery handed out has been settled or dropped (at most a minute), so work
    /// in flight can still ack and publish; then it is closed.
    pub async fn start(
        settings: &AmqpSettings,
        namespace: &str,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Broker, AmqpError> {
        let names = Names::new(namespace);
        let (link, events) = establish(settings, namespace, &names, 1).await?;
        let (sender, _) = watch::channel(Some(link.clone()));
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            namespace: namespace.to_owned(),
            names,
            link: sender,
            heal: Notify::new(),
            shutdown,
            tracker: tracker.clone(),
            inflight: TaskTracker::new(),
        });
        tracker.spawn(supervise(Arc::clone(&inner), link, events));
        info!(namespace, "connected to rabbitmq");
        Ok(Broker { inner })
    }

    /// The namespace's exchange and queue names.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// Is the connection up right now (for `/readyz`)?
    pub fn is_connected(&self) -> bool {
        self.inner.link.borrow().as_ref().is_some_and(Link::usable)
    }

    /// Publishes an admitted job: persistent, `message_id`, content type
    /// `application/json`, to the `jobs` exchange (routing key
    /// [`JOB_ROUTING_KEY`]), or, when `delay` is `Some` and > 0, through the wait
    /// queue [`Names::wait_queue`] picks, which dead-letters it into `jobs`: under 1 s
    /// `jobs.wait` with a per-message expiration of `delay`, else the longest
    /// fixed-TTL tier not longer than `delay` — so a delayed job can come back
    /// early, and its consumer must wait out the rest from the job's `notBefore`.
    /// `Ok` only on the broker's confirm; a nack, the confirm timeout, or no
    /// connection is an `Err` (the caller undoes the admission).
    pub async fn publish_job(
        &self,
        body: &[u8],
        message_id: &str,
        delay: Option<Duration>,
    ) -> Result<(), AmqpError> {
        let properties = message(JSON).with_message_id(short("message_id", message_id)?);
        self.publish_job_with(body, properties, delay).await
    }

    /// A CloudEvent to the `events` topic exchange with `routing_key` (content type
    /// `application/cloudevents+json`, `message_id` = the event id, persistent),
    /// confirmed. Not mandatory: an event nobody has bound a queue for is dropped
    /// by the broker, and that is still `Ok`.
    pub async fn publish_event(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
    ) -> Result<(), AmqpError> {
        let properties =
            message(CLOUDEVENTS_JSON).with_message_id(short("message_id", message_id)?);
        let target = Target {
            exchange: &self.inner.names.events,
            routing_key,
            mandatory: false,
        };
        self.publish(target, body, properties).await
    }

    /// A decision reply to the queue `reply_to` via the default exchange, with
    /// `correlation_id`, confirmed. A reply queue that no longer exists is
    /// [`AmqpError::Unroutable`].
    pub async fn reply(
        &self,
        reply_to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> Result<(), AmqpError> {
        let mut properties = message(JSON);
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(short("correlation_id", id)?);
        }
        let target = Target {
            exchange: "",
            routing_key: reply_to,
            mandatory: true,
        };
        self.publish(target, body, properties).await
    }

    /// An upstream refresh request to the `requests` exchange (routing key
    /// [`REQUEST_ROUTING_KEY`]), persistent, confirmed; used by refreshctl and tests.
    pub async fn publish_request(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<(), AmqpError> {
        self.publish_request_with(body, message_id, reply_to, correlation_id, &[])
            .await
    }

    /// [`Broker::publish_request`] with text headers, e.g. a W3C `traceparent`.
    pub async fn publish_request_with(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(), AmqpError> {
        let mut properties = message(JSON);
        if !headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                table.insert(
                    short("header name", name)?,
                    lapin::types::AMQPValue::LongString((*value).into()),
                );
            }
            properties = properties.with_headers(table);
        }
        if let Some(id) = message_id {
            properties = properties.with_message_id(short("message_id", id)?);
        }
        if let Some(queue) = reply_to {
            properties = properties.with_reply_to(short("reply_to", queue)?);
        }
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(short("correlation_id", id)?);
        }
        let target = Target {
            exchange: &self.inner.names.requests,
            routing_key: REQUEST_ROUTING_KEY,
            mandatory: true,
        };
        self.publish(target, body, properties).await
    }

    /// Declares an exclusive, server-named queue for decision replies (give its
    /// name as `reply_to`; consume it with [`Broker::consume`]). It belongs to the
    /// current connection: the broker deletes it when the connection ends (also on
    /// a reconnect), so it never outlives its user. For refreshctl and tests.
    pub async fn declare_reply_queue(&self) -> Result<String, AmqpError> {
        self.declare_exclusive(None).await
    }

    /// Declares an exclusive, server-named queue bound to the `events` exchange with
    /// `binding` (e.g. `refresh.#`), to watch events. Lives as long as the current
    /// connection, like [`Broker::declare_reply_queue`]. For refreshctl and tests.
    pub async fn declare_probe_queue(&self, binding: &str) -> Result<String, AmqpError> {
        self.declare_exclusive(Some(binding)).await
    }

    /// Declares an exclusive, server-named queue bound to the `events` exchange with
    /// every key of `bindings`: an ingress's feed of live events for its SSE clients.
    /// Like [`Broker::declare_probe_queue`] it ends with the connection it was declared
    /// on; once [`Broker::connection_id`] no longer is [`EventQueue::connection_id`],
    /// the caller declares a new one. A connection that merely looks unusable for a
    /// moment keeps its queue.
    pub async fn declare_event_queue(&self, bindings: &[&str]) -> Result<EventQueue, AmqpError> {
        let keys = bindings
            .iter()
            .map(|key| short("binding", key))
            .collect::<Result<Vec<_>, _>>()?;
        let (name, connection_id) = self.declare_bound(keys).await?;
        Ok(EventQueue {
            name,
            connection_id,
        })
    }

    /// The id of the current connection (it grows with every reconnect), `None` while
    /// reconnecting.
    pub fn connection_id(&self) -> Option<u64> {
        self.inner
            .link
            .borrow()
            .as_ref()
            .map(|link| link.connection_id)
    }

    async fn declare_exclusive(&self, binding: Option<&str>) -> Result<String, AmqpError> {
        let keys = binding.map(|key| short("binding", key)).transpose()?;
        Ok(self.declare_bound(keys.into_iter().collect()).await?.0)
    }

    /// Declares the queue and binds it; returns its name and the connection it lives on.
    async fn declare_bound(&self, bindings: Vec<ShortString>) -> Result<(String, u64), AmqpError> {
        let work = async {
            let link = self.wait_for_link().await?;
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(AmqpError::from_lapin)?;
            let options = QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            };
            let queue = channel
                .queue_declare(ShortString::default(), options, FieldTable::default())
                .await
                .map_err(AmqpError::from_lapin)?;
            for key in bindings {
                channel
                    .queue_bind(
                        queue.name().clone(),
                        self.inner.names.events.as_str().into(),
                        key,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(AmqpError::from_lapin)?;
            }
            let _ = channel.close(200, "declared".into()).await;
            Ok((queue.name().to_string(), link.connection_id))
        };
        timeout(self.confirm_timeout(), work)
            .await
            .map_err(|_| AmqpError::NotConnected)?
    }

    /// A job (new or a retry copy) to `jobs`, or through `jobs.wait` when delayed.
    pub(crate) async fn publish_job_with(
        &self,
        body: &[u8],
        properties: BasicProperties,
        delay: Option<Duration>,
    ) -> Result<(), AmqpError> {
        let names = &self.inner.names;
        match delay.filter(|delay| !delay.is_zero()) {
            None => {
                let target = Target {
                    exchange: &names.jobs,
                    routing_key: JOB_ROUTING_KEY,
                    mandatory: true,
                };
                self.publish(target, body, properties).await
            }
            Some(delay) => {
                let (queue, per_message) = names.wait_queue(delay);
                let target = Target {
                    exchange: "",
                    routing_key: queue,
                    mandatory: true,
                };
                let properties = match per_message {
                    Some(ttl) => properties.with_expiration(ttl.as_millis().to_string().into()),
                    None => properties,
                };
                self.publish(target, body, properties).await
            }
        }
    }

    /// Publishes and waits for the confirm, all within `confirm_timeout_ms`.
    pub(crate) async fn publish(
        &self,
        target: Target<'_>,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let exchange = short("exchange", target.exchange)?;
        let routing_key = short("routing_key", target.routing_key)?;
        let limit = self.confirm_timeout();
        let deadline = Instant::now() + limit;

        let link = timeout_at(deadline, self.wait_for_link())
            .await
            .map_err(|_| AmqpError::NotConnected)??;
        if link.connection.status().blocked() {
            return Err(AmqpError::Blocked);
        }
        let options = BasicPublishOptions {
            mandatory: target.mandatory,
            ..BasicPublishOptions::default()
        };
        let sent = timeout_at(deadline, async {
            let _serial = link.serial.lock().await;
            link.publish
                .basic_publish(exchange, routing_key, options, body, properties)
                .await
        })
        .await;
        let confirm = match sent {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(error)) => {
                self.poke();
                return Err(AmqpError::from_lapin(error));
            }
            Err(_) => return Err(AmqpError::ConfirmTimeout(limit)),
        };
        match timeout_at(deadline, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(AmqpError::Unroutable {
                exchange: target.exchange.to_owned(),
                routing_key: target.routing_key.to_owned(),
            }),
            // `NotRequested` cannot happen (the channel is in confirm mode); if it did,
            // the message is not known to be stored.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(AmqpError::Nacked),
            Ok(Err(error)) => {
                self.poke();
                Err(AmqpError::from_lapin(error))
            }
            Err(_) => {
                self.poke();
                Err(AmqpError::ConfirmTimeout(limit))
            }
        }
    }

    /// The current usable link, waiting for the supervisor while there is none.
    /// `Err` only once shutdown has begun and no usable link is left. Callers bound
    /// it with their own deadline.
    pub(crate) async fn wait_for_link(&self) -> Result<Link, AmqpError> {
        let mut link = self.inner.link.subscribe();
        loop {
            let current = link.borrow_and_update().clone();
            match current {
                Some(current) if current.usable() => return Ok(current),
                // Broken but not yet replaced: make the supervisor look now.
                Some(_) => self.poke(),
                None => {}
            }
            if self.inner.shutdown.is_cancelled() {
                return Err(AmqpError::NotConnected);
            }
            tokio::select! {
                changed = link.changed() => {
                    if changed.is_err() {
                        return Err(AmqpError::NotConnected);
                    }
                }
                () = self.inner.shutdown.cancelled() => {}
            }
        }
    }

    /// Asks the supervisor to check the link now.
    pub(crate) fn poke(&self) {
        self.inner.heal.notify_one();
    }

    pub(crate) fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.settings.confirm_timeout_ms)
    }
}

/// Persistent properties with a content type.
fn message(content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(content_type.into())
}

/// A protocol short string (at most 255 bytes), refusing longer input instead of
/// panicking like lapin's `From`.
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(value)
        .map_err(|error| AmqpError::InvalidArgument(format!("{what}: {error}")))
}

/// Opens a connection, declares the topology and opens the publish channel.
async fn establish(
    settings: &AmqpSettings,
    namespace: &str,
    names: &Names,
    connection_id: u64,
) -> Result<(Link, EventStream), AmqpError> {
    let attempt = async {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("refreshd {namespace}").into());
        let connection = Connection::connect(&settings.url, properties)
            .await
            .map_err(AmqpError::Unavailable)?;
        let events: EventStream = Box::pin(connection.events_listener());
        topology::declare(&connection, names, settings.delivery_limit).await?;
        let publish = open_publish_channel(&connection).await?;
        let link = Link {
            connection: Arc::new(connection),
            connection_id,
            publish,
            serial: Arc::new(AsyncMutex::new(())),
        };
        Ok((link, events))
    };
    timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| AmqpError::NotConnected)?
}

async fn open_publish_channel(connection: &Connection) -> Result<Channel, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::from_lapin)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(AmqpError::from_lapin)?;
    Ok(channel)
}

enum Health {
    Shutdown,
    ConnectionLost,
    PublishChannelLost,
}

/// Waits until the link breaks or shutdown begins.
async fn watch_link(inner: &Inner, link: &Link, events: &mut EventStream) -> Health {
    let mut tick = tokio::time::interval(HEALTH_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events_open = true;
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return Health::Shutdown,
            event = events.next(), if events_open => match event {
                Some(Event::Error(error)) => debug!(error = %error, "rabbitmq connection reported an error"),
                Some(Event::ConnectionBlocked(reason)) => warn!(%reason, "rabbitmq blocked publishing"),
                Some(Event::ConnectionUnblocked) => info!("rabbitmq unblocked publishing"),
                Some(_) => {}
                None => events_open = false,
            },
            () = inner.heal.notified() => {}
            _ = tick.tick() => {}
        }
        if !link.connection.status().connected() {
            return Health::ConnectionLost;
        }
        if !link.publish.status().connected() {
            return Health::PublishChannelLost;
        }
    }
}

/// "Equal jitter": half the backoff, plus up to the other half at random, so
/// replicas that lost the broker together do not return in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// The supervisor: keeps a usable link published until shutdown, then drains and
/// closes.
async fn supervise(inner: Arc<Inner>, mut link: Link, mut events: EventStream) {
    let namespace = inner.namespace.as_str();
    let mut connection_id = link.connection_id;
    'run: loop {
        match watch_link(&inner, &link, &mut events).await {
            Health::Shutdown => break 'run,
            Health::PublishChannelLost => {
                match timeout(CONNECT_TIMEOUT, open_publish_channel(&link.connection)).await {
                    Ok(Ok(publish)) => {
                        link = Link {
                            publish,
                            serial: Arc::new(AsyncMutex::new(())),
                            ..link.clone()
                        };
                        inner.link.send_replace(Some(link.clone()));
                        info!(namespace, "rabbitmq publish channel re-opened");
                        continue 'run;
                    }
                    Ok(Err(error)) => {
                        warn!(
                            namespace,
                            error = error_chain(&error),
                            "cannot re-open the publish channel; reconnecting"
                        );
                    }
                    Err(_) => warn!(
                        namespace,
                        "re-opening the publish channel timed out; reconnecting"
                    ),
                }
            }
            Health::ConnectionLost => warn!(namespace, "rabbitmq connection lost; reconnecting"),
        }
        inner.link.send_replace(None);
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0_u32;
        loop {
            connection_id += 1;
            let attempt = tokio::select! {
                () = inner.shutdown.cancelled() => break 'run,
                attempt = establish(&inner.settings, namespace, &inner.names, connection_id) => attempt,
            };
            match attempt {
                Ok((new_link, new_events)) => {
                    link = new_link;
                    events = new_events;
                    inner.link.send_replace(Some(link.clone()));
                    info!(
                        namespace,
                        failures, "reconnected to rabbitmq; topology declared"
                    );
                    break;
                }
                Err(error) => {
                    failures += 1;
                    warn!(
                        namespace,
                        failures,
                        error = error_chain(&error),
                        "reconnecting to rabbitmq failed"
                    );
                }
            }
            tokio::select! {
                () = inner.shutdown.cancelled() => break 'run,
                () = tokio::time::sleep(jittered(backoff)) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    // Shutdown: deliveries still being handled need the connection to settle.
    inner.inflight.close();
    if timeout(DRAIN_LIMIT, inner.inflight.wait()).await.is_err() {
        warn!(
            namespace,
            "deliveries still unsettled at shutdown; the broker will redeliver them"
        );
    }
    inner.link.send_replace(None);
    if link.connection.status().connected() {
        let _ = timeout(CLOSE_TIMEOUT, link.connection.close(200, "shutdown".into())).await;
    }
    info!(namespace, "rabbitmq connection closed");
}
