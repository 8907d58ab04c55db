//! Consuming: a [`Consumer`] that re-subscribes across reconnects, and the
//! [`Delivery`] it hands out, the only place an [`Outcome`] becomes ack or nack.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel};
use refresh_core::Outcome;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio::time::timeout;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

use crate::broker::{BACKOFF_MAX, BACKOFF_MIN, Link, PERSISTENT, Target, short};
use crate::topology::REQUEST_ROUTING_KEY;
use crate::{AmqpError, Broker};
use refresh_core::error_chain;

/// Header the quorum queue sets on a redelivery: deliveries before this one.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";
/// Header on a dead-lettered copy: the reason given to [`Outcome::DeadLetter`].
pub const DEAD_REASON_HEADER: &str = "x-refreshd-dead-reason";
/// Header on a dead-lettered copy: the queue the message was consumed from.
pub(crate) const DEAD_QUEUE_HEADER: &str = "x-refreshd-dead-queue";
/// Header on a dead-lettered copy: the original's `x-delivery-count`.
pub(crate) const DEAD_DELIVERY_COUNT_HEADER: &str = "x-refreshd-delivery-count";
/// Header on a dead-lettered copy: when it was dead-lettered (AMQP timestamp, seconds).
pub(crate) const DEAD_AT_HEADER: &str = "x-refreshd-dead-at";
/// Header on a retry copy: how many times the message was retried so far.
pub const RETRIES_HEADER: &str = "x-refreshd-retries";
/// Longest wait to open a consumer channel and subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One subscription on one channel of one connection.
struct Subscription {
    connection_id: u64,
    channel: Channel,
    consumer: lapin::Consumer,
}

/// A consumer of one queue that survives reconnects: after the supervisor
/// reconnects, the next [`Consumer::next`] subscribes again on a new channel. Each
/// subscription has its own channel (never the publish channel) and `prefetch`
/// unacknowledged deliveries at most (0 means unlimited).
///
/// Subscribing is lazy: it happens in the first `next()`. Deliveries that were
/// handed out but not settled when the connection broke can no longer be settled
/// (their `settle` fails); the broker delivers those messages again.
pub struct Consumer {
    broker: Broker,
    queue: String,
    prefetch: u16,
    link: watch::Receiver<Option<Link>>,
    subscription: Option<Subscription>,
    /// A subscription being opened, in a task of its own so that a caller that stops
    /// waiting for [`Consumer::next`] (a `select!`, a timeout) never leaves a
    /// half-made one behind: an orphan consumer on an open channel would take its
    /// share of the queue's messages and never settle them.
    opening: Option<JoinHandle<Opened>>,
    /// No new subscription before this, after a failed one.
    resume_at: Option<Instant>,
    retry_delay: Duration,
}

/// How opening a subscription ended.
#[allow(
    clippy::large_enum_variant,
    reason = "one value per subscription, moved once out of its task"
)]
enum Opened {
    Subscribed(Subscription),
    Failed(String),
    Shutdown,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("subscribed", &self.subscription.is_some())
            .finish_non_exhaustive()
    }
}

#[allow(
    clippy::large_enum_variant,
    reason = "one value per loop turn, moved once; boxing would allocate per message"
)]
enum Step {
    Shutdown,
    Resubscribe,
    Item(Option<lapin::Result<lapin::message::Delivery>>),
}

impl Broker {
    /// Consumes `queue` with `prefetch`, surviving reconnects (re-subscribes after
    /// the supervisor reconnects). Each delivery is handed out as a [`Delivery`]; the
    /// stream ends only when `shutdown` is cancelled.
    pub fn consume(&self, queue: &str, prefetch: u16) -> Consumer {
        Consumer {
            broker: self.clone(),
            queue: queue.to_owned(),
            prefetch,
            link: self.inner.link.subscribe(),
            subscription: None,
            opening: None,
            resume_at: None,
            retry_delay: BACKOFF_MIN,
        }
    }
}

impl Consumer {
    /// The next delivery; `None` once shutdown has begun (never before). Waits
    /// through broker outages. On shutdown the subscription is cancelled; messages
    /// the broker had sent ahead (prefetch) but that were not handed out return to
    /// the queue when the channel closes.
    ///
    /// Cancel-safe: a call dropped before it returns (inside `select!` or a timeout)
    /// loses no delivery, and a subscription it was opening is finished and kept
    /// for the next call.
    pub async fn next(&mut self) -> Option<Delivery> {
        let shutdown = self.broker.inner.shutdown.clone();
        loop {
            if shutdown.is_cancelled() {
                // Dropping lapin's consumer cancels the subscription.
                self.subscription = None;
                return None;
            }
            let Some(subscription) = self.subscription.as_mut() else {
                self.subscribe().await;
                continue;
            };
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => Step::Shutdown,
                () = connection_replaced(&mut self.link, subscription.connection_id) => Step::Resubscribe,
                item = subscription.consumer.next() => Step::Item(item),
            };
            match step {
                Step::Shutdown => {}
                Step::Resubscribe => {
                    debug!(queue = %self.queue, "connection replaced; re-subscribing");
                    self.subscription = None;
                }
                Step::Item(Some(Ok(delivery))) => {
                    if let Some(subscription) = &self.subscription {
                        let channel = subscription.channel.clone();
                        return Some(Delivery::new(delivery, &self.broker, &self.queue, channel));
                    }
                }
                Step::Item(Some(Err(error))) => {
                    warn!(queue = %self.queue, error = %error, "consumer failed; re-subscribing");
                    self.subscription = None;
                    self.broker.poke();
                }
                Step::Item(None) => {
                    info!(queue = %self.queue, "consumer cancelled by the broker; re-subscribing");
                    self.subscription = None;
                    self.back_off();
                }
            }
        }
    }

    /// Subscribes on the current connection (waiting for one), or schedules the
    /// next try after a failure. Cancel-safe: the subscription is opened by a task
    /// that a dropped call leaves running, and the next call takes up its result.
    async fn subscribe(&mut self) {
        let shutdown = self.broker.inner.shutdown.clone();
        if let Some(at) = self.resume_at {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(at) => {}
            }
            self.resume_at = None;
        }
        let opening = self.opening.get_or_insert_with(|| {
            tokio::spawn(open(self.broker.clone(), self.queue.clone(), self.prefetch))
        });
        let opened = tokio::select! {
            () = shutdown.cancelled() => return,
            opened = opening => opened,
        };
        self.opening = None;
        match opened {
            Ok(Opened::Subscribed(subscription)) => {
                debug!(queue = %self.queue, "subscribed");
                self.subscription = Some(subscription);
                self.retry_delay = BACKOFF_MIN;
            }
            Ok(Opened::Failed(reason)) => {
                warn!(queue = %self.queue, error = reason, "cannot subscribe; retrying");
                self.back_off();
            }
            Ok(Opened::Shutdown) => {}
            Err(error) => {
                warn!(queue = %self.queue, error = %error, "subscribing stopped; retrying");
                self.back_off();
            }
        }
    }

    /// The next subscription waits the current retry delay, which then doubles.
    fn back_off(&mut self) {
        self.resume_at = Some(Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(BACKOFF_MAX);
    }
}

/// Opens a subscription to `queue` once the broker is connected.
async fn open(broker: Broker, queue: String, prefetch: u16) -> Opened {
    let Ok(link) = broker.wait_for_link().await else {
        return Opened::Shutdown;
    };
    match open_subscription(&link, &queue, prefetch).await {
        Ok(subscription) => Opened::Subscribed(subscription),
        Err(error) => Opened::Failed(error_chain(&error)),
    }
}

/// Resolves once the link no longer is connection `id` (the connection is gone).
async fn connection_replaced(link: &mut watch::Receiver<Option<Link>>, id: u64) {
    loop {
        if link
            .borrow_and_update()
            .as_ref()
            .map(|link| link.connection_id)
            != Some(id)
        {
            return;
        }
        if link.changed().await.is_err() {
            // The broker is gone; only shutdown ends this wait now.
            std::future::pending::<()>().await;
        }
    }
}

async fn open_subscription(
    link: &Link,
    queue: &str,
    prefetch: u16,
) -> Result<Subscription, AmqpError> {
    let queue = short("queue", queue)?;
    let channel = timeout(SUBSCRIBE_TIMEOUT, link.connection.create_channel())
        .await
        .map_err(|_| AmqpError::NotConnected)?
        .map_err(AmqpError::from_lapin)?;
    let subscribed = timeout(SUBSCRIBE_TIMEOUT, async {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                queue,
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    })
    .await;
    match subscribed {
        Ok(Ok(consumer)) => Ok(Subscription {
            connection_id: link.connection_id,
            channel,
            consumer,
        }),
        failed => {
            // A consume the broker may still confirm must not outlive this try: the
            // channel's close ends it.
            let _ = timeout(
                SUBSCRIBE_TIMEOUT,
                channel.close(200, "subscribing failed".into()),
            )
            .await;
            Err(match failed {
                Ok(Err(error)) => AmqpError::from_lapin(error),
                _ => AmqpError::NotConnected,
            })
        }
    }
}

/// One consumed message. Settle it with [`Delivery::settle`] once its effect is
/// committed. A delivery dropped unsettled is returned to its queue (nack with
/// requeue), which counts as a delivery against the queue's limit.
pub struct Delivery {
    /// The message body.
    pub body: Vec<u8>,
    /// The `message_id` property (the idempotency key of requests and jobs).
    pub message_id: Option<String>,
    /// Where to send a decision reply, if the publisher wants one.
    pub reply_to: Option<String>,
    /// To be copied onto the reply.
    pub correlation_id: Option<String>,
    /// The broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// Earlier deliveries of this message, from the quorum queue's
    /// `x-delivery-count` header: 0 on the first.
    pub delivery_count: u32,
    properties: BasicProperties,
    acker: Acker,
    queue: String,
    broker: Broker,
    /// Keeps the delivery's channel open until it is settled: acks go on it.
    channel: Channel,
    settled: bool,
    _inflight: TaskTrackerToken,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("message_id", &self.message_id)
            .field("correlation_id", &self.correlation_id)
            .field("reply_to", &self.reply_to)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    fn new(
        delivery: lapin::message::Delivery,
        broker: &Broker,
        queue: &str,
        channel: Channel,
    ) -> Self {
        let properties = delivery.properties;
        let text = |value: &Option<ShortString>| value.as_ref().map(ToString::to_string);
        Self {
            message_id: text(properties.message_id()),
            reply_to: text(properties.reply_to()),
            correlation_id: text(properties.correlation_id()),
            redelivered: delivery.redelivered,
            delivery_count: count_header(&properties, DELIVERY_COUNT),
            body: delivery.data,
            properties,
            acker: delivery.acker,
            queue: queue.to_owned(),
            broker: broker.clone(),
            channel,
            settled: false,
            _inflight: broker.inner.inflight.token(),
        }
    }

    /// The queue this delivery came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Was the message published persistent (delivery mode 2)?
    pub fn persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(PERSISTENT)
    }

    /// The `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.properties
            .content_type()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// A text header (AMQP long or short string) by name, e.g. `traceparent`; `None`
    /// when absent, of another type or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        match header(&self.properties, name)? {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            AMQPValue::ShortString(text) => Some(text.as_str()),
            _ => None,
        }
    }

    /// On a message in a `.dead` queue: the reason it was dead-lettered with, when
    /// [`Delivery::settle`] could republish it (see there).
    pub fn dead_letter_reason(&self) -> Option<String> {
        match header(&self.properties, DEAD_REASON_HEADER)? {
            AMQPValue::LongString(text) => {
                Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(text) => Some(text.to_string()),
            _ => None,
        }
    }

    /// How many times this message went through [`Outcome::Retry`] already (0 on a
    /// fresh job): the redelivery count starts again on every retry copy.
    pub fn retries(&self) -> u32 {
        count_header(&self.properties, RETRIES_HEADER)
    }

    /// The only place an [`Outcome`] becomes ack/nack:
    ///
    /// - `Ack`: basic.ack.
    /// - `DeadLetter { reason }`: for the namespace's `requests` and `jobs` queues, a
    ///   copy carrying the reason (headers `x-refreshd-dead-reason`,
    ///   `x-refreshd-dead-queue`, `x-refreshd-delivery-count`) is published to the
    ///   matching `.dead` queue and confirmed, then the original is acked. basic.nack
    ///   cannot carry a reason, so nack (requeue = false, the queue's own
    ///   dead-lettering into `.dead`) is only the fallback when the copy cannot be
    ///   confirmed, and the path for other queues (where it drops the message unless
    ///   the queue has a dead-letter exchange).
    /// - `Retry { after }`: on the `jobs` queue, a copy (retry count + 1) is published
    ///   to `jobs.wait` with expiration `after` (straight to `jobs` when zero) and
    ///   confirmed, then the original is acked. On the `requests` queue the delivery
    ///   is held for `after` (less if shutdown begins), then a copy (retry count + 1)
    ///   is published to the `requests` exchange and confirmed, and the original
    ///   acked: a request held back by a dependency outage starts again at delivery
    ///   count 0 and never reaches the queue's delivery limit (only a message that
    ///   keeps coming back unsettled, e.g. one crashing its consumer, does). On any
    ///   other queue the delivery is held for `after` and then nacked with requeue,
    ///   which counts against the queue's delivery limit.
    ///
    /// Copy-then-ack is at-least-once: if the process dies between the confirm and
    /// the ack, the broker redelivers the original while the copy also exists, and
    /// the message is handled twice. That is safe because handlers are idempotent
    /// (a job is fenced by its refresh id and terminal status; a request by its
    /// message id), and it never loses the message. If the copy cannot be
    /// confirmed, the original is returned to its queue (nack with requeue) or, for
    /// `DeadLetter`, nacked into `.dead`, so the message is never lost either.
    ///
    /// An error settling (the channel is gone) is returned; the broker redelivers
    /// the message.
    pub async fn settle(mut self, outcome: Outcome) -> Result<(), AmqpError> {
        self.settled = true;
        match outcome {
            Outcome::Ack => self.ack().await,
            Outcome::DeadLetter { reason } => self.dead_letter(&reason).await,
            Outcome::Retry { after } => self.retry(after).await,
        }
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), AmqpError> {
        let names = self.broker.names();
        warn!(queue = %self.queue, message_id = ?self.message_id, reason, "dead-lettering a message");
        let dead = if self.queue == names.requests {
            Some(&names.requests_dead)
        } else if self.queue == names.jobs {
            Some(&names.jobs_dead)
        } else {
            None
        };
        if let Some(dead) = dead {
            let extra = [
                (DEAD_REASON_HEADER, AMQPValue::LongString(reason.into())),
                (
                    DEAD_QUEUE_HEADER,
                    AMQPValue::LongString(self.queue.as_str().into()),
                ),
                (
                    DEAD_DELIVERY_COUNT_HEADER,
                    AMQPValue::LongLongInt(self.delivery_count.into()),
                ),
                (DEAD_AT_HEADER, AMQPValue::Timestamp(unix_now())),
            ];
            let target = Target {
                exchange: "",
                routing_key: dead,
                mandatory: true,
            };
            match self
                .broker
                .publish(target, &self.body, self.copy_properties(&extra, false))
                .await
            {
                Ok(()) => return self.ack().await,
                Err(error) => warn!(
                    queue = %self.queue,
                    error = error_chain(&error),
                    "cannot publish the dead-letter copy; nacking instead (the reason is not kept)"
                ),
            }
        }
        self.nack(false).await
    }

    async fn retry(&self, after: Duration) -> Result<(), AmqpError> {
        if self.queue == self.broker.names().requests {
            tokio::select! {
                () = self.broker.inner.shutdown.cancelled() => return self.nack(true).await,
                () = tokio::time::sleep(after) => {}
            }
            let retries = self.retries().saturating_add(1);
            let extra = [(RETRIES_HEADER, AMQPValue::LongLongInt(retries.into()))];
            let target = Target {
                exchange: &self.broker.names().requests,
                routing_key: REQUEST_ROUTING_KEY,
                mandatory: true,
            };
            return match self
                .broker
                .publish(target, &self.body, self.copy_properties(&extra, true))
                .await
            {
                Ok(()) => self.ack().await,
                Err(error) => {
                    warn!(
                        queue = %self.queue,
                        error = error_chain(&error),
                        "cannot publish the retry copy; returning the request to its queue"
                    );
                    let _ = self.nack(true).await;
                    Err(error)
                }
            };
        }
        if self.queue != self.broker.names().jobs {
            tokio::select! {
                () = self.broker.inner.shutdown.cancelled() => {}
                () = tokio::time::sleep(after) => {}
            }
            return self.nack(true).await;
        }
        let retries = self.retries().saturating_add(1);
        let extra = [(RETRIES_HEADER, AMQPValue::LongLongInt(retries.into()))];
        let properties = self.copy_properties(&extra, true);
        match self
            .broker
            .publish_job_with(&self.body, properties, Some(after))
            .await
        {
            Ok(()) => self.ack().await,
            Err(error) => {
                warn!(
                    queue = %self.queue,
                    error = error_chain(&error),
                    "cannot publish the retry copy; returning the message to its queue"
                );
                let _ = self.nack(true).await;
                Err(error)
            }
        }
    }

    /// The original's properties for a republished copy: persistent, without the
    /// broker's per-delivery headers, plus `extra`. `for_wait` also drops the
    /// dead-letter history (`x-death`…): RabbitMQ drops, as a cycle, a message that
    /// expires from `jobs.wait` again while its `x-death` already names `jobs.wait`.
    fn copy_properties(&self, extra: &[(&str, AMQPValue)], for_wait: bool) -> BasicProperties {
        copy_properties(&self.properties, extra, |name| {
            let death = name == "x-death"
                || name.starts_with("x-first-death-")
                || name.starts_with("x-last-death-");
            name != DELIVERY_COUNT && !(for_wait && death)
        })
    }

    async fn ack(&self) -> Result<(), AmqpError> {
        self.finish(self.acker.ack(BasicAckOptions::default()))
            .await
    }

    async fn nack(&self, requeue: bool) -> Result<(), AmqpError> {
        let options = BasicNackOptions {
            requeue,
            ..BasicNackOptions::default()
        };
        self.finish(self.acker.nack(options)).await
    }

    async fn finish(
        &self,
        settle: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<(), AmqpError> {
        match timeout(self.broker.confirm_timeout(), settle).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(AmqpError::ChannelClosed),
            Ok(Err(error)) => Err(AmqpError::from_lapin(error)),
            Err(_) => Err(AmqpError::NotConnected),
        }
    }
}

impl Drop for Delivery {
    /// An unsettled delivery goes back to its queue now rather than sitting
    /// unacknowledged (holding a prefetch slot) until its channel closes.
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: the channel's close returns it instead
        };
        warn!(queue = %self.queue, message_id = ?self.message_id, "delivery dropped unsettled; returning it to the queue");
        let acker = self.acker.clone();
        let channel = self.channel.clone();
        let limit = self.broker.confirm_timeout();
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        self.broker.inner.tracker.spawn_on(
            async move {
                let _channel = channel;
                let _ = timeout(limit, acker.nack(options)).await;
            },
            &runtime,
        );
    }
}

/// `original`'s properties for a republished copy: persistent, the headers `keep`
/// accepts, plus `extra`.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    extra: &[(&str, AMQPValue)],
    keep: impl Fn(&str) -> bool,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = original.headers() {
        for (key, value) in old.inner() {
            if keep(key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    for (key, value) in extra {
        headers.insert((*key).into(), value.clone());
    }
    let mut copy = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(value) = original.content_type() {
        copy = copy.with_content_type(value.clone());
    }
    if let Some(value) = original.content_encoding() {
        copy = copy.with_content_encoding(value.clone());
    }
    if let Some(value) = original.priority() {
        copy = copy.with_priority(*value);
    }
    if let Some(value) = original.correlation_id() {
        copy = copy.with_correlation_id(value.clone());
    }
    if let Some(value) = original.reply_to() {
        copy = copy.with_reply_to(value.clone());
    }
    if let Some(value) = original.message_id() {
        copy = copy.with_message_id(value.clone());
    }
    if let Some(value) = original.timestamp() {
        copy = copy.with_timestamp(*value);
    }
    if let Some(value) = original.kind() {
        copy = copy.with_type(value.clone());
    }
    if let Some(value) = original.app_id() {
        copy = copy.with_app_id(value.clone());
    }
    // Not copied: `expiration` (a copy gets its own), `user_id` (the broker
    // checks it against the publishing user), `cluster_id` (deprecated).
    copy
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// An integer header as a `u32` (0 when missing, negative or not a number).
pub(crate) fn count_header(properties: &BasicProperties, name: &str) -> u32 {
    let value = match header(properties, name) {
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::LongLongInt(n)) => *n,
        _ => 0,
    };
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(name: &str, value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(name.into(), value);
        BasicProperties::default().with_headers(headers)
    }

    fn check(value: Option<AMQPValue>, expected: u32) {
        let properties = match value {
            Some(value) => with_header(DELIVERY_COUNT, value),
            None => BasicProperties::default(),
        };
        assert_eq!(count_header(&properties, DELIVERY_COUNT), expected);
    }

    #[test]
    fn delivery_count_reads_any_integer_header() {
        check(None, 0);
        check(Some(AMQPValue::LongLongInt(3)), 3);
        check(Some(AMQPValue::LongInt(2)), 2);
        check(Some(AMQPValue::ShortShortUInt(7)), 7);
        check(Some(AMQPValue::LongLongInt(-1)), 0);
        check(Some(AMQPValue::LongLongInt(i64::MAX)), u32::MAX);
        check(Some(AMQPValue::LongString("4".into())), 0);
    }
}
