//! Upstream refresh requests over AMQP (SPEC §4): the same gate as HTTP, a decision
//! reply on `reply_to`, `message_id` as the idempotency key, and unparseable messages
//! dead-lettered without stopping the consumer. Only the sources of
//! `amqp.requested_by` are accepted; another `requestedBy` is a rejected decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use refresh_amqp::{Broker, Delivery};
use refresh_core::{ConsentId, Outcome, Problem, RequestedBy, TenantId};
use refresh_pg::{KeyReservation, Store};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::error_chain;
use crate::idempotency::{KEY_LEASE, KEY_TTL, release_key, remembered};
use refresh_admission::{Admitter, Decision, RefreshRequest};

/// The request message (wire type).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestMessage {
    consent_id: ConsentId,
    tenant_id: TenantId,
    #[serde(default = "default_source")]
    requested_by: RequestedBy,
}

fn default_source() -> RequestedBy {
    RequestedBy::App
}

/// How long at most to hold a request back when a dependency is down: doubling from
/// 2 s with each retry, at most 15 s. The retry is a fresh copy of the message, so an
/// outage of any length never dead-letters it (SPEC §4: only what cannot be parsed
/// goes to `requests.dead`).
fn unavailable_backoff(retries: u32) -> Duration {
    Duration::from_secs(2u64 << retries.min(3)).min(Duration::from_secs(15))
}

/// The requests this consumer holds back for an outage, and the signal that ends
/// their wait: the first request decided again (its own backoff ran out first) wakes
/// every held one at once, so after a long outage the backlog is decided within
/// moments of the dependency's return, not one backoff at a time while the held
/// deliveries fill the prefetch window.
#[derive(Default)]
struct Outage {
    held: AtomicUsize,
    recovered: Notify,
}

impl Outage {
    /// Waits `backoff`, or until a decision succeeds, or shutdown.
    async fn hold(&self, backoff: Duration, shutdown: &CancellationToken) {
        let recovered = self.recovered.notified();
        self.held.fetch_add(1, Ordering::AcqRel);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = recovered => {}
            () = shutdown.cancelled() => {}
        }
        self.held.fetch_sub(1, Ordering::AcqRel);
    }

    /// A request was decided: the dependencies answer again.
    fn decided(&self) {
        if self.held.load(Ordering::Acquire) > 0 {
            self.recovered.notify_waiters();
        }
    }
}

/// Consumes `{ns}.requests` until `shutdown`, deciding up to `prefetch` requests at
/// once (the broker never hands out more unsettled messages than that). On shutdown it
/// stops taking messages and waits for the decisions under way to be answered and
/// settled; what the broker had sent ahead returns to the queue.
pub async fn run(
    admitter: Admitter,
    store: Store,
    broker: Broker,
    prefetch: u16,
    sources: Vec<RequestedBy>,
    shutdown: CancellationToken,
) {
    let sources: Arc<[RequestedBy]> = sources.into();
    let outage = Arc::new(Outage::default());
    let mut consumer = broker.consume(&broker.names().requests.clone(), prefetch);
    let tracker = TaskTracker::new();
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else { break };
        let (admitter, store, broker) = (admitter.clone(), store.clone(), broker.clone());
        let (sources, outage, shutdown) = (sources.clone(), outage.clone(), shutdown.clone());
        tracker.spawn(async move {
            let context = Context {
                admitter: &admitter,
                store: &store,
                sources: &sources,
            };
            answer(context, &broker, &outage, &shutdown, delivery).await;
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// What deciding a request needs.
#[derive(Clone, Copy)]
struct Context<'a> {
    admitter: &'a Admitter,
    store: &'a Store,
    sources: &'a [RequestedBy],
}

/// Decides one request, replies on its `reply_to` and settles it; a request held
/// back by an outage waits here ([`Outage::hold`]) and is then retried at once.
async fn answer(
    context: Context<'_>,
    broker: &Broker,
    outage: &Outage,
    shutdown: &CancellationToken,
    delivery: Delivery,
) {
    let (mut outcome, reply) = handle(context, &delivery).await;
    match outcome {
        Outcome::Retry { after } => {
            outage.hold(after, shutdown).await;
            outcome = Outcome::retry(Duration::ZERO);
        }
        // Answered (a decision, a refusal, a remembered answer): the dependencies it
        // needed answer again. An unparseable message (dead-lettered) needed none.
        Outcome::Ack => outage.decided(),
        Outcome::DeadLetter { .. } => {}
    }
    if let (Some(reply), Some(reply_to)) = (reply, delivery.reply_to.clone()) {
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        if let Err(error) = broker
            .reply(&reply_to, delivery.correlation_id.as_deref(), &body)
            .await
        {
            tracing::warn!(error = %error_chain(&error), "cannot send the decision reply");
        }
    }
    if let Err(error) = delivery.settle(outcome).await {
        tracing::warn!(error = %error_chain(&error), "cannot settle a request; the broker redelivers it");
    }
}

/// The outcome for the message and the reply (if any) to send.
async fn handle(context: Context<'_>, delivery: &Delivery) -> (Outcome, Option<Value>) {
    let Context {
        admitter,
        store,
        sources,
    } = context;
    let message: RequestMessage = match serde_json::from_slice(&delivery.body) {
        Ok(message) => message,
        Err(error) => {
            let reason = format!("unparseable refresh request: {error}");
            let problem = Problem::bad_request(reason.clone());
            return (
                Outcome::dead_letter(reason),
                Some(json!({ "accepted": false, "problem": problem })),
            );
        }
    };
    let request = RefreshRequest {
        consent_id: message.consent_id,
        tenant: Some(message.tenant_id.clone()),
        requested_by: message.requested_by,
        initial: false,
        traceparent: refresh_admission::trace_or_new(delivery.header_str("traceparent")),
    };
    if !sources.contains(&message.requested_by) {
        // Permanent: the same message is refused the same way, so it is acked.
        let accepted: Vec<&str> = sources.iter().map(|s| s.as_str()).collect();
        let problem = Problem::bad_request(format!(
            "requestedBy {} is not accepted on this channel (accepted: {})",
            message.requested_by.as_str(),
            accepted.join(", ")
        ));
        let problem = admitter.refuse(&request, problem).await;
        return (
            Outcome::Ack,
            Some(json!({ "accepted": false, "problem": problem })),
        );
    }
    let key = delivery
        .message_id
        .as_deref()
        .filter(|k| !k.is_empty())
        .map(|k| format!("amqp {} {k}", message.consent_id));
    let mut fence = None;
    if let Some(key) = &key {
        let now = Utc::now();
        match store
            .reserve_key(&message.tenant_id, key, now, now - KEY_TTL, now - KEY_LEASE)
            .await
        {
            Ok(KeyReservation::Reserved(reserved)) => fence = Some((key, reserved)),
            Ok(KeyReservation::Done { response, .. }) => return (Outcome::Ack, Some(response)),
            Ok(KeyReservation::Pending) | Err(_) => {
                return (
                    Outcome::retry(unavailable_backoff(delivery.retries())),
                    None,
                );
            }
        }
    }
    let decision = match admitter.request(&request).await {
        Ok(decision) => decision,
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "upstream request held back: a dependency is unavailable");
            if let Some((key, fence)) = fence {
                release_key(store, &message.tenant_id, key, fence).await;
            }
            return (
                Outcome::retry(unavailable_backoff(delivery.retries())),
                None,
            );
        }
    };
    let remember = remembered(&decision);
    let (status, reply) = match decision {
        Decision::Admitted(record) => (
            202,
            json!({ "accepted": true, "refreshId": record.refresh_id, "notBefore": record.not_before }),
        ),
        Decision::Refused(problem) => (
            problem.status,
            json!({ "accepted": false, "problem": problem }),
        ),
    };
    if let Some((key, fence)) = fence {
        // A refusal that may change is not remembered: a redelivery or a retry with
        // the same message id is decided afresh (SPEC §3's rule, on this channel too).
        let recorded = if remember {
            store
                .complete_key(&message.tenant_id, key, fence, status, &reply)
                .await
                .map(|_| ())
        } else {
            release_key(store, &message.tenant_id, key, fence).await;
            Ok(())
        };
        if let Err(error) = recorded {
            tracing::warn!(error = %error_chain(&error), "cannot record the idempotent answer");
        }
    }
    (Outcome::Ack, Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_backs_off_doubling_up_to_fifteen_seconds() {
        let secs: Vec<u64> = (0..6).map(|r| unavailable_backoff(r).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 15, 15, 15]);
        assert_eq!(unavailable_backoff(u32::MAX), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_ends_every_hold_at_once() {
        let outage = Arc::new(Outage::default());
        let shutdown = CancellationToken::new();
        let held: Vec<_> = (0..3)
            .map(|_| {
                let (outage, shutdown) = (outage.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now();
                    outage.hold(Duration::from_secs(15), &shutdown).await;
                    start.elapsed()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(outage.held.load(Ordering::Acquire), 3);
        outage.decided();
        for hold in held {
            assert_eq!(hold.await.unwrap(), Duration::from_secs(1));
        }
        assert_eq!(outage.held.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_without_a_decision_lasts_its_backoff() {
        let outage = Outage::default();
        let start = tokio::time::Instant::now();
        outage
            .hold(Duration::from_secs(4), &CancellationToken::new())
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
