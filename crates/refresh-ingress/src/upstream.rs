//! Upstream refresh requests over AMQP (SPEC §4): the same gate as HTTP, a decision
//! reply on `reply_to`, `message_id` as the idempotency key, and unparseable messages
//! dead-lettered without stopping the consumer. Only the sources of
//! `amqp.requested_by` are accepted; another `requestedBy` is a rejected decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use refresh_amqp::{Broker, Delivery};
use refresh_core::{ConsentId, Outcome, Problem, RefreshRecord, RequestedBy, TenantId};
use refresh_pg::{KeyReservation, Store};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::error_chain;
use crate::idempotency::{KeyReleases, KeyReserver, remembered};
use refresh_admission::{Admitter, Decision, RefreshRequest, Remember};

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

/// How often the dependencies are asked whether they answer again while a request
/// is held back.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The requests this consumer holds back for an outage, and the signal that ends
/// their wait: a request decided again, or the probe ([`probe`]) finding every
/// dependency answering, wakes every held one at once, so after a long outage the
/// backlog is decided within moments of the dependency's return, not one backoff at
/// a time while the held deliveries fill the prefetch window.
#[derive(Default)]
struct Outage {
    held: AtomicUsize,
    /// How often the dependencies were seen answering (a decision, or a probe): an
    /// attempt that failed after a later answer is tried again at once instead of
    /// waiting for a wake that has already passed.
    answers: AtomicU64,
    recovered: Notify,
    /// Wakes the probe when a request is held.
    holding: Notify,
}

impl Outage {
    /// Where the answers stand before an attempt, for [`Outage::hold`].
    fn seen(&self) -> u64 {
        self.answers.load(Ordering::SeqCst)
    }

    /// Waits `backoff`, or until the dependencies answer again, or shutdown; at once
    /// if they answered since `seen`.
    async fn hold(&self, backoff: Duration, seen: u64, shutdown: &CancellationToken) {
        // Registered before the count is read: an answer after the read wakes it.
        let recovered = self.recovered.notified();
        self.held.fetch_add(1, Ordering::SeqCst);
        self.holding.notify_one();
        if self.answers.load(Ordering::SeqCst) == seen {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = recovered => {}
                () = shutdown.cancelled() => {}
            }
        }
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    /// The dependencies answer again (a request was decided, or the probe passed).
    fn answered(&self) {
        self.answers.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) > 0 {
            self.recovered.notify_waiters();
        }
    }
}

/// While any request is held, asks `dependencies_answer` every [`PROBE_EVERY`] and
/// ends the holds when it says yes: the backlog does not wait for a new request to
/// arrive, nor for the longest backoff to run out.
async fn probe<F, A>(outage: &Outage, dependencies_answer: F, shutdown: &CancellationToken)
where
    F: Fn() -> A,
    A: Future<Output = bool>,
{
    loop {
        while outage.held.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                () = outage.holding.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        if outage.held.load(Ordering::SeqCst) > 0 && dependencies_answer().await {
            tracing::info!("the dependencies answer again; deciding the held requests");
            outage.answered();
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
    let tracker = TaskTracker::new();
    let reserver = KeyReserver::start(store.clone(), &tracker);
    // Ends with the consumer too: a release still failing then waits out its lease.
    let releasing = shutdown.child_token();
    let releases = KeyReleases::new(store.clone(), &tracker, releasing.clone());
    // Ends with the consumer (on shutdown, or if the consumer stops by itself).
    let probing = shutdown.child_token();
    {
        let (admitter, outage, probing) = (admitter.clone(), outage.clone(), probing.clone());
        tracker.spawn(async move {
            probe(&outage, || admitter.dependencies_answer(), &probing).await;
        });
    }
    let mut consumer = broker.consume(&broker.names().requests.clone(), prefetch);
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else { break };
        let (admitter, store, broker) = (admitter.clone(), store.clone(), broker.clone());
        let (sources, outage, shutdown) = (sources.clone(), outage.clone(), shutdown.clone());
        let (reserver, releases) = (reserver.clone(), releases.clone());
        tracker.spawn(async move {
            let context = Context {
                admitter: &admitter,
                store: &store,
                reserver: &reserver,
                releases: &releases,
                sources: &sources,
            };
            answer(context, &broker, &outage, &shutdown, delivery).await;
        });
    }
    probing.cancel();
    releasing.cancel();
    // The reservations' task ends once the decisions under way drop their handles.
    drop(reserver);
    tracker.close();
    tracker.wait().await;
}

/// What deciding a request needs.
#[derive(Clone, Copy)]
struct Context<'a> {
    admitter: &'a Admitter,
    store: &'a Store,
    reserver: &'a KeyReserver,
    releases: &'a KeyReleases,
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
    let seen = outage.seen();
    let (mut outcome, reply) = handle(context, &delivery).await;
    match outcome {
        Outcome::Retry { after } => {
            outage.hold(after, seen, shutdown).await;
            outcome = Outcome::retry(Duration::ZERO);
        }
        // Answered (a decision, a refusal, a remembered answer): the dependencies it
        // needed answer again. An unparseable message (dead-lettered) needed none.
        Outcome::Ack => outage.answered(),
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
        reserver,
        releases,
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
        match reserver.reserve(&message.tenant_id, key).await {
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
    // An admission records its key's answer in its own commit.
    let remember = fence.as_ref().map(|(key, reserved)| Remember {
        tenant: message.tenant_id.clone(),
        key: (*key).clone(),
        fence: *reserved,
        answer: accepted,
    });
    let decision = match admitter
        .request_answering(&request, remember.as_ref())
        .await
    {
        Ok(decision) => decision,
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "upstream request held back: a dependency is unavailable");
            if let Some((key, fence)) = fence {
                releases.release(&message.tenant_id, key, fence).await;
            }
            return (
                Outcome::retry(unavailable_backoff(delivery.retries())),
                None,
            );
        }
    };
    let remember = remembered(&decision);
    let (status, reply) = match decision {
        Decision::Admitted(record) => {
            // Its key was answered with the admission.
            let (_, reply) = accepted(&record);
            return (Outcome::Ack, Some(reply));
        }
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
            releases.release(&message.tenant_id, key, fence).await;
            Ok(())
        };
        if let Err(error) = recorded {
            tracing::warn!(error = %error_chain(&error), "cannot record the idempotent answer");
        }
    }
    (Outcome::Ack, Some(reply))
}

/// The decision reply of an admission, and its status for the idempotency key.
fn accepted(record: &RefreshRecord) -> (u16, Value) {
    (
        202,
        json!({ "accepted": true, "refreshId": record.refresh_id, "notBefore": record.not_before }),
    )
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

    /// Three requests held for 15 s, starting at `t = 0`; their hold times.
    fn hold_three(
        outage: &Arc<Outage>,
        shutdown: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<Duration>> {
        (0..3)
            .map(|_| {
                let (outage, shutdown) = (outage.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now();
                    let seen = outage.seen();
                    outage.hold(Duration::from_secs(15), seen, &shutdown).await;
                    start.elapsed()
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_ends_every_hold_at_once() {
        let outage = Arc::new(Outage::default());
        let shutdown = CancellationToken::new();
        let held = hold_three(&outage, &shutdown);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(outage.held.load(Ordering::Acquire), 3);
        outage.answered();
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
            .hold(
                Duration::from_secs(4),
                outage.seen(),
                &CancellationToken::new(),
            )
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_failed_after_an_answer_is_not_held() {
        // The attempt began, then another request was decided (its wake went by),
        // then the attempt failed: waiting for the next wake would wait the backoff.
        let outage = Outage::default();
        let seen = outage.seen();
        outage.answered();
        let start = tokio::time::Instant::now();
        outage
            .hold(Duration::from_secs(15), seen, &CancellationToken::new())
            .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A probe whose dependencies answer from `back` on; counts its questions.
    fn prober(
        outage: &Arc<Outage>,
        back: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let (outage, shutdown, count) = (outage.clone(), shutdown.clone(), asked.clone());
        let task = tokio::spawn(async move {
            let answer = || {
                count.fetch_add(1, Ordering::SeqCst);
                async move { tokio::time::Instant::now() >= back }
            };
            probe(&outage, answer, &shutdown).await;
        });
        (asked, task)
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_asks_nothing_while_nothing_is_held() {
        let outage = Arc::new(Outage::default());
        let shutdown = CancellationToken::new();
        let (asked, task) = prober(&outage, tokio::time::Instant::now(), &shutdown);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 0);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_ends_the_holds_within_a_second_of_the_return() {
        let outage = Arc::new(Outage::default());
        let shutdown = CancellationToken::new();
        let back = tokio::time::Instant::now() + Duration::from_millis(3500);
        let (asked, task) = prober(&outage, back, &shutdown);
        for hold in hold_three(&outage, &shutdown) {
            // The probes at 1, 2 and 3 s find the outage; the one at 4 s ends it.
            assert_eq!(hold.await.unwrap(), Duration::from_secs(4));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        shutdown.cancel();
        task.await.unwrap();
    }
}
