//! The RabbitMQ commands: an upstream request, the event tail, and the dead-letter
//! queues (through `refresh-amqp`, the only crate that speaks AMQP).

use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use refresh_amqp::{Broker, DeadMessage, DeadQueue};
use refresh_core::{ConsentId, Outcome as Settle, TenantId, error_chain};
use refreshd::Settings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::outcome_text;
use crate::output::{self, field, table};
use crate::{Failure, Outcome};

/// Longest wait for the ingress's decision on a request.
const DECISION_TIMEOUT: Duration = Duration::from_secs(30);

/// A broker connection that ends with the command.
struct Connected {
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Connected {
    async fn close(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tracker.wait()).await;
    }
}

async fn connect(settings: &Settings) -> Result<Connected, Failure> {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let broker = Broker::start(
        &settings.amqp,
        &settings.namespace,
        shutdown.clone(),
        &tracker,
    )
    .await
    .map_err(|e| Failure::Unreachable(format!("rabbitmq: {}", error_chain(&e))))?;
    Ok(Connected {
        broker,
        shutdown,
        tracker,
    })
}

fn amqp_failure(error: &refresh_amqp::AmqpError) -> Failure {
    let text = format!("rabbitmq: {}", error_chain(error));
    if error.is_transient() {
        Failure::Unreachable(text)
    } else {
        Failure::Refused(text)
    }
}

/// `request`: publishes as an app service would and prints the decision; a refusal
/// exits 1.
pub(crate) async fn request(
    settings: &Settings,
    consent: ConsentId,
    tenant: &TenantId,
    json: bool,
) -> Outcome {
    let connected = connect(settings).await?;
    let outcome = request_on(&connected.broker, consent, tenant, json).await;
    connected.close().await;
    outcome
}

async fn request_on(broker: &Broker, consent: ConsentId, tenant: &TenantId, json: bool) -> Outcome {
    let reply_queue = broker
        .declare_reply_queue()
        .await
        .map_err(|e| amqp_failure(&e))?;
    let mut replies = broker.consume(&reply_queue, 1);
    let body = json!({ "consentId": consent, "tenantId": tenant, "requestedBy": "APP" });
    let id = uuid::Uuid::new_v4().to_string();
    broker
        .publish_request(
            body.to_string().as_bytes(),
            Some(&id),
            Some(&reply_queue),
            Some(&id),
        )
        .await
        .map_err(|e| amqp_failure(&e))?;
    let reply = tokio::time::timeout(DECISION_TIMEOUT, replies.next())
        .await
        .map_err(|_| {
            Failure::Unreachable(format!(
                "no decision within {} s (is an ingress of namespace {:?} running?)",
                DECISION_TIMEOUT.as_secs(),
                broker.names().requests
            ))
        })?
        .ok_or_else(|| Failure::Unreachable("the broker connection closed".to_owned()))?;
    let decision: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    let _ = reply.settle(Settle::Ack).await;
    if json {
        println!("{}", output::compact(&decision));
    }
    match decision.get("accepted").and_then(Value::as_bool) {
        Some(true) => {
            if !json {
                println!(
                    "accepted: refresh {} starts at {}",
                    field(&decision, "refreshId"),
                    field(&decision, "notBefore")
                );
            }
            Ok(())
        }
        Some(false) => {
            let problem = &decision["problem"];
            Err(Failure::Refused(format!(
                "refused: {} {}: {}",
                field(problem, "status"),
                field(problem, "code"),
                field(problem, "detail")
            )))
        }
        None => Err(Failure::Refused(format!(
            "an unreadable decision: {}",
            output::compact(&decision)
        ))),
    }
}

/// `events [PATTERN]`: one readable line per event, or the raw CloudEvent with `--json`.
pub(crate) async fn events(settings: &Settings, pattern: &str, json: bool) -> Outcome {
    let connected = connect(settings).await?;
    let broker = &connected.broker;
    let queue = broker
        .declare_probe_queue(pattern)
        .await
        .map_err(|e| amqp_failure(&e))?;
    let mut consumer = broker.consume(&queue, 16);
    eprintln!(
        "refreshctl: tailing {pattern} on {} (Ctrl-C to stop)",
        broker.names().events
    );
    loop {
        let delivery = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else { break };
        if json {
            println!("{}", String::from_utf8_lossy(&delivery.body));
        } else {
            println!("{}", event_line(&delivery.body));
        }
        let _ = delivery.settle(Settle::Ack).await;
    }
    drop(consumer);
    connected.close().await;
    Ok(())
}

/// One event as a line: time, type, refresh, consent, status and what came of it.
fn event_line(body: &[u8]) -> String {
    let Ok(event) = serde_json::from_slice::<Value>(body) else {
        return format!("(not JSON) {}", String::from_utf8_lossy(body));
    };
    let data = &event["data"];
    let kind = field(&event, "type");
    let kind = kind.strip_prefix("io.refreshd.").unwrap_or(&kind);
    let time = field(&event, "time");
    if kind.starts_with("consent.") {
        return format!(
            "{time}  {kind:<20}  consent {}  {}  tenant {}",
            field(data, "consentId"),
            field(data, "status"),
            field(data, "tenantId")
        );
    }
    if kind == "refresh.rejected" {
        let problem = &data["problem"];
        return format!(
            "{time}  {kind:<20}  consent {}  REJECTED  {} {}: {}",
            field(data, "consentId"),
            field(problem, "status"),
            field(problem, "code"),
            field(problem, "detail")
        );
    }
    let status = field(data, "status");
    let result = if status == "INITIALIZED" {
        format!(
            "{}, starts at {}",
            field(data, "requestedBy"),
            field(data, "notBefore")
        )
    } else {
        outcome_text(data)
    };
    format!(
        "{time}  {kind:<20}  refresh {}  consent {}  {status}  {result}",
        field(data, "refreshId"),
        field(data, "consentId"),
    )
}

fn rfc3339(time: Option<SystemTime>) -> Value {
    time.map_or(Value::Null, |t| {
        Value::String(DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true))
    })
}

fn dead_json(dead: &DeadMessage) -> Value {
    let body = serde_json::from_slice::<Value>(&dead.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&dead.body).into_owned()));
    json!({
        "messageId": dead.message_id,
        "reason": dead.reason,
        "count": dead.count,
        "deliveries": dead.deliveries,
        "firstSeen": rfc3339(dead.first_seen),
        "body": body,
    })
}

fn dead_table(messages: &[DeadMessage]) -> String {
    let rows = messages
        .iter()
        .map(|dead| {
            vec![
                dead.message_id.clone().unwrap_or_else(|| "-".to_owned()),
                dead.count.to_string(),
                dead.deliveries
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                rfc3339(dead.first_seen).as_str().unwrap_or("-").to_owned(),
                dead.reason.clone(),
            ]
        })
        .collect();
    table(
        &["MESSAGE ID", "COUNT", "DELIVERIES", "FIRST SEEN", "REASON"],
        rows,
    )
}

/// `dlq list`.
pub(crate) async fn dlq_list(
    settings: &Settings,
    queue: DeadQueue,
    limit: usize,
    json: bool,
) -> Outcome {
    let connected = connect(settings).await?;
    let listed = connected.broker.dead_letters(queue, limit).await;
    connected.close().await;
    let listed = listed.map_err(|e| amqp_failure(&e))?;
    if json {
        let all: Vec<Value> = listed.iter().map(dead_json).collect();
        println!("{}", output::compact(&Value::Array(all)));
    } else {
        print!("{}", dead_table(&listed));
    }
    Ok(())
}

/// `dlq replay`: each chosen message back on its queue, once; ids not found fail.
pub(crate) async fn dlq_replay(
    settings: &Settings,
    queue: DeadQueue,
    ids: &[String],
    json: bool,
) -> Outcome {
    let connected = connect(settings).await?;
    let replayed = connected.broker.replay_dead_letters(queue, ids).await;
    connected.close().await;
    let replayed = replayed.map_err(|e| amqp_failure(&e))?;
    if json {
        let all: Vec<Value> = replayed.iter().map(dead_json).collect();
        println!("{}", output::compact(&json!({ "replayed": all })));
    } else {
        print!("{}", dead_table(&replayed));
        eprintln!("replayed {} message(s)", replayed.len());
    }
    let missing: Vec<&str> = ids
        .iter()
        .filter(|id| {
            !replayed
                .iter()
                .any(|dead| dead.message_id.as_deref() == Some(id.as_str()))
        })
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "not in the dead-letter queue: {}",
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_readable_line() {
        let updated = json!({
            "type": "io.refreshd.refresh.updated", "time": "2026-12-01T10:00:00.123Z",
            "data": {"refreshId": "r1", "consentId": "c1", "status": "UPDATED",
                     "summary": {"accountsUpdated": 2, "balancesUpdated": 2, "transactionsAdded": 5,
                                 "transactionsUpdated": 1, "transactionsRemoved": 0}}
        });
        assert_eq!(
            event_line(updated.to_string().as_bytes()),
            "2026-12-01T10:00:00.123Z  refresh.updated       refresh r1  consent c1  UPDATED  2 accounts, 2 balances, transactions +5 ~1 -0"
        );
        let error = json!({
            "type": "io.refreshd.refresh.error", "time": "t",
            "data": {"refreshId": "r1", "consentId": "c1", "status": "ERROR",
                     "error": {"code": "mfa_required", "message": "The bank asks for authentication"}}
        });
        assert_eq!(
            event_line(error.to_string().as_bytes()),
            "t  refresh.error         refresh r1  consent c1  ERROR  mfa_required: The bank asks for authentication"
        );
        assert_eq!(event_line(b"oops"), "(not JSON) oops");
    }
}
