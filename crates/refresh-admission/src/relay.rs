//! The outbox relay: publishes events written in database transactions, with
//! confirms, and marks them published. A crash between publish and mark publishes the
//! event again; consumers dedupe on the CloudEvents `id` (SPEC §4).

use std::sync::Arc;
use std::time::Duration;

use refresh_amqp::Broker;
use refresh_pg::{OutboxEvent, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use refresh_core::error_chain;

/// Rows claimed per round.
const BATCH: i64 = 200;
/// A round runs at least this often, even without a nudge (events written by other
/// processes, or left after a failure).
const TICK: Duration = Duration::from_millis(500);

/// Runs until `shutdown`; `nudge` wakes it early after an event was written.
pub async fn run(store: Store, broker: Broker, nudge: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        match relay_once(&store, &broker).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "outbox relay round failed; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                // One last round so events of work finished during shutdown go out.
                let _ = relay_once(&store, &broker).await;
                return;
            }
            () = nudge.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One round: publishes the claimed events (sent in order, confirms awaited
/// together); returns how many were published.
pub async fn relay_once(store: &Store, broker: &Broker) -> Result<usize, String> {
    store
        .publish_pending(BATCH, |event| publish(broker, event))
        .await
        .map_err(|e| error_chain(&e))
}

/// Publishes one outbox event with a confirm.
fn publish<'a>(
    broker: &'a Broker,
    event: &OutboxEvent,
) -> impl Future<Output = Result<(), String>> + use<'a> {
    let body = serde_json::to_vec(&event.payload).unwrap_or_default();
    let id = event.event_id.to_string();
    let routing_key = event.routing_key.clone();
    async move {
        broker
            .publish_event(&routing_key, &body, &id)
            .await
            .map_err(|e| error_chain(&e))
    }
}
