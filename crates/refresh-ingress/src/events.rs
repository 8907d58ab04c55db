//! The live event fan-out: one exclusive queue per ingress process on the `events`
//! exchange (bound to `refresh.#` and `consent.#`) feeding an in-process broadcast
//! that every SSE stream subscribes to.
//!
//! The broadcast has a fixed capacity: a client that falls that far behind is not
//! waited for (that would slow every other client) and not buffered for (memory would
//! grow without bound); its stream is ended and it resumes with `Last-Event-ID`.

use std::sync::Arc;
use std::time::Duration;

use refresh_amqp::Broker;
use refresh_core::{Outcome, TenantId};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events kept for the slowest subscriber before it counts as lagging.
const CAPACITY: usize = 1024;
/// The bindings of the feed (SPEC §4: refresh status and consent lifecycle events).
const BINDINGS: [&str; 2] = ["refresh.#", "consent.#"];
/// How often the feed checks that its connection (and so its queue) is still there.
const LINK_CHECK: Duration = Duration::from_millis(500);
/// Pause before declaring the queue again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// One event as the SSE streams need it, parsed once for every subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveEvent {
    /// The CloudEvent `id` (the SSE `id`).
    pub id: String,
    /// The CloudEvent `type` (the SSE `event`).
    pub r#type: String,
    /// The consent (CloudEvent `subject`).
    pub subject: String,
    /// `data.tenantId`.
    pub tenant: Option<String>,
    /// The whole CloudEvent as JSON text (the SSE `data`).
    pub json: String,
}

impl LiveEvent {
    /// Reads a CloudEvent published on the `events` exchange; `None` when it is not one.
    pub fn parse(payload: &Value) -> Option<Self> {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        Some(Self {
            id: text(payload.get("id")?)?,
            r#type: text(payload.get("type")?)?,
            subject: payload.get("subject").and_then(text).unwrap_or_default(),
            tenant: payload
                .get("data")
                .and_then(|d| d.get("tenantId"))
                .and_then(text),
            json: payload.to_string(),
        })
    }

    /// Whether a caller limited to `tenant` (every tenant when `None`) and, when
    /// given, to the consent `subject` may see this event.
    pub fn visible_to(&self, tenant: Option<&TenantId>, subject: Option<&str>) -> bool {
        tenant.is_none_or(|t| self.tenant.as_deref() == Some(t.as_str()))
            && subject.is_none_or(|s| self.subject == s)
    }
}

/// What an SSE stream waits on next.
#[derive(Debug)]
pub enum Next {
    Event(Arc<LiveEvent>),
    /// The stream fell behind (or the feed restarted and may have missed events): end
    /// it, so the client resumes with `Last-Event-ID` from the outbox.
    Resume,
    /// Shutdown: end the stream so it does not hold up the graceful drain.
    Closed,
}

/// The in-process side of the fan-out; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventHub {
    sender: broadcast::Sender<Arc<LiveEvent>>,
    closed: CancellationToken,
}

impl EventHub {
    /// A hub whose streams all end when `closed` is cancelled.
    pub fn new(closed: CancellationToken) -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self { sender, closed }
    }

    /// A subscription: events published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
            closed: self.closed.clone(),
        }
    }

    /// Hands `event` to every subscriber (none listening is fine).
    pub fn publish(&self, event: LiveEvent) {
        let _ = self.sender.send(Arc::new(event));
    }

    /// Ends every current subscription's stream with [`Next::Resume`] (after the feed
    /// lost its queue and may have missed events).
    fn restart_all(&self) {
        let _ = self.sender.send(Arc::new(LiveEvent {
            id: String::new(),
            r#type: RESTART.to_owned(),
            subject: String::new(),
            tenant: None,
            json: String::new(),
        }));
    }

    /// How many streams follow the hub now.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// A marker the feed sends to end every stream after it re-declared its queue.
const RESTART: &str = "\u{0}restart";

/// One stream's place in the hub.
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<Arc<LiveEvent>>,
    closed: CancellationToken,
}

impl Subscription {
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            biased;
            () = self.closed.cancelled() => Next::Closed,
            received = self.receiver.recv() => match received {
                Ok(event) if event.r#type == RESTART => Next::Resume,
                Ok(event) => Next::Event(event),
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Resume,
                Err(broadcast::error::RecvError::Closed) => Next::Closed,
            },
        }
    }
}

/// Feeds `hub` from the `events` exchange until `shutdown`. When the broker
/// connection is replaced (a new connection id, not a moment in which the old one
/// looks unusable), the exclusive queue is gone with the old connection: the feed
/// declares a new one and ends the current streams so they resume.
pub async fn run(broker: Broker, hub: EventHub, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let queue = tokio::select! {
            () = shutdown.cancelled() => return,
            declared = broker.declare_event_queue(&BINDINGS) => declared,
        };
        let queue = match queue {
            Ok(queue) => queue,
            Err(error) => {
                tracing::warn!(error = %refresh_core::error_chain(&error), "cannot declare the live event queue; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        let mut consumer = broker.consume(&queue.name, 256);
        let mut check = tokio::time::interval(LINK_CHECK);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = check.tick() => {
                    if broker.connection_id() != Some(queue.connection_id) {
                        break;
                    }
                }
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else { return };
                    match serde_json::from_slice::<Value>(&delivery.body)
                        .ok()
                        .as_ref()
                        .and_then(LiveEvent::parse)
                    {
                        Some(event) => hub.publish(event),
                        None => tracing::warn!("an event on the events exchange is not a CloudEvent; not forwarded"),
                    }
                    // An exclusive queue of this process only: nothing to redeliver to.
                    if let Err(error) = delivery.settle(Outcome::Ack).await {
                        tracing::debug!(error = %error, "cannot ack a live event");
                    }
                }
            }
        }
        tracing::info!("the broker connection was replaced; declaring a new live event queue");
        // Wait for the new connection before declaring, then let streams resume.
        while broker
            .connection_id()
            .is_none_or(|id| id == queue.connection_id)
        {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LINK_CHECK) => {}
            }
        }
        hub.restart_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_cloud_event_and_filters_by_tenant_and_consent() {
        let payload = json!({"id": "e1", "type": "io.refreshd.refresh.updated", "subject": "c1", "data": {"tenantId": "acme"}});
        let event = LiveEvent::parse(&payload).unwrap();
        assert_eq!(
            (
                event.id.as_str(),
                event.r#type.as_str(),
                event.tenant.as_deref()
            ),
            ("e1", "io.refreshd.refresh.updated", Some("acme"))
        );
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("other").unwrap();
        assert!(event.visible_to(Some(&acme), None));
        assert!(event.visible_to(None, Some("c1")));
        assert!(!event.visible_to(Some(&other), None));
        assert!(!event.visible_to(Some(&acme), Some("c2")));
        assert_eq!(LiveEvent::parse(&json!({"type": "x"})), None);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_to_resume_and_others_are_not_slowed() {
        let hub = EventHub::new(CancellationToken::new());
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        let event = |i: usize| LiveEvent {
            id: i.to_string(),
            r#type: "t".to_owned(),
            subject: String::new(),
            tenant: None,
            json: String::new(),
        };
        for i in 0..CAPACITY + 1 {
            hub.publish(event(i));
            match fast.next().await {
                Next::Event(e) => assert_eq!(e.id, i.to_string()),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(slow.next().await, Next::Resume));
    }

    #[tokio::test]
    async fn streams_end_on_close_and_on_restart() {
        let closed = CancellationToken::new();
        let hub = EventHub::new(closed.clone());
        let mut sub = hub.subscribe();
        hub.restart_all();
        assert!(matches!(sub.next().await, Next::Resume));
        closed.cancel();
        assert!(matches!(sub.next().await, Next::Closed));
    }
}
