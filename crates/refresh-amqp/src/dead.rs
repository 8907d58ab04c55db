//! The dead-letter queues for operators: list what is in `requests.dead` / `jobs.dead`
//! (reason, count, first seen) and replay chosen messages onto their queue, once.
//!
//! AMQP has no "peek": both operations take the messages with `basic.get` on a
//! channel of their own, unacknowledged. A message taken this way is not handed
//! out again on that channel, so one pass sees each message once; what is not
//! acknowledged returns to the dead queue, in order, when the channel closes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::time::timeout;

use crate::broker::{Target, short};
use crate::consumer::{
    DEAD_AT_HEADER, DEAD_DELIVERY_COUNT_HEADER, DEAD_QUEUE_HEADER, DEAD_REASON_HEADER,
    DELIVERY_COUNT, RETRIES_HEADER, copy_properties, count_header, header,
};
use crate::topology::{JOB_ROUTING_KEY, REQUEST_ROUTING_KEY};
use crate::{AmqpError, Broker};

/// Which dead-letter queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadQueue {
    /// `jobs.dead`; replayed onto `jobs`.
    Jobs,
    /// `requests.dead`; replayed onto `requests`.
    Requests,
}

/// One dead-lettered message as an operator sees it.
#[derive(Clone, Debug)]
pub struct DeadMessage {
    /// The `message_id` property (a job's refresh id, a request's idempotency key).
    pub message_id: Option<String>,
    /// Why it died: the reason a consumer gave, else the broker's
    /// (`delivery_limit`, `rejected`, `maxlen`, …), else `unknown`.
    pub reason: String,
    /// How many times it was dead-lettered (a replayed message that dies again
    /// counts twice).
    pub count: u32,
    /// Deliveries on its queue before it died, when known.
    pub deliveries: Option<u32>,
    /// When it was first dead-lettered, when known.
    pub first_seen: Option<SystemTime>,
    /// The message body.
    pub body: Vec<u8>,
}

/// Headers written when a message dies and removed when it is replayed.
const DEATH_HEADERS: [&str; 4] = [
    DEAD_REASON_HEADER,
    DEAD_QUEUE_HEADER,
    DEAD_DELIVERY_COUNT_HEADER,
    DEAD_AT_HEADER,
];
/// Header on a replayed message: the dead-letter history it carries forward, so a
/// message that dies again shows its whole count and first death.
const REPLAYED_COUNT_HEADER: &str = "x-refreshd-dead-count";
const REPLAYED_FIRST_HEADER: &str = "x-refreshd-first-dead-at";
/// Most messages one pass takes (they are all held unacknowledged at once).
pub(crate) const MAX_PASS: usize = 10_000;

impl Broker {
    /// Up to `limit` messages of a dead-letter queue, oldest first. Nothing is
    /// removed: they return to the queue when the listing's channel closes.
    pub async fn dead_letters(
        &self,
        queue: DeadQueue,
        limit: usize,
    ) -> Result<Vec<DeadMessage>, AmqpError> {
        let channel = self.operator_channel().await?;
        let name = self.dead_queue_name(queue);
        let mut listed = Vec::new();
        while listed.len() < limit.min(MAX_PASS) {
            let Some((message, _)) = self.get(&channel, name).await? else {
                break;
            };
            listed.push(describe(&message.properties, message.data));
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(listed)
    }

    /// Puts the dead messages whose `message_id` is in `ids` (every one when `ids`
    /// is empty) back on their queue, each once: republished with a publisher
    /// confirm, and only then is the dead copy acknowledged. Only the messages dead
    /// when the pass begins are looked at (at most 10,000). Returns what was
    /// replayed. A publish that fails stops the pass with the error; that message
    /// and the rest stay in the dead queue.
    pub async fn replay_dead_letters(
        &self,
        queue: DeadQueue,
        ids: &[String],
    ) -> Result<Vec<DeadMessage>, AmqpError> {
        let channel = self.operator_channel().await?;
        let name = self.dead_queue_name(queue);
        let names = self.names();
        let (exchange, routing_key) = match queue {
            DeadQueue::Jobs => (names.jobs.as_str(), JOB_ROUTING_KEY),
            DeadQueue::Requests => (names.requests.as_str(), REQUEST_ROUTING_KEY),
        };
        let mut replayed = Vec::new();
        let mut seen = 0;
        // Only the messages that were dead when the pass began: one that dies
        // again while the pass runs joins the queue's tail and must not come round
        // a second time.
        let mut budget = MAX_PASS;
        let outcome = loop {
            if seen >= budget || (!ids.is_empty() && replayed.len() == ids.len()) {
                break Ok(());
            }
            let message = match self.get(&channel, name).await {
                Ok(Some((message, remaining))) => {
                    if seen == 0 {
                        let remaining = usize::try_from(remaining).unwrap_or(usize::MAX);
                        budget = budget.min(remaining.saturating_add(1));
                    }
                    message
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            };
            seen += 1;
            let dead = describe(&message.properties, message.data.clone());
            let chosen = ids.is_empty()
                || dead
                    .message_id
                    .as_ref()
                    .is_some_and(|id| ids.iter().any(|wanted| wanted == id));
            if !chosen {
                continue; // held until the channel closes, then back in the queue
            }
            let properties = replay_properties(&message.properties, &dead);
            let target = Target {
                exchange,
                routing_key,
                mandatory: true,
            };
            if let Err(error) = self.publish(target, &message.data, properties).await {
                break Err(error);
            }
            match timeout(
                self.confirm_timeout(),
                message.acker.ack(BasicAckOptions::default()),
            )
            .await
            {
                Ok(Ok(true)) => replayed.push(dead),
                // The copy is on its queue but the dead one is not acknowledged: it
                // stays dead too, and a replay again would run it twice (handlers
                // are idempotent, but say so).
                Ok(Ok(false)) => break Err(AmqpError::ChannelClosed),
                Ok(Err(error)) => break Err(AmqpError::from_lapin(error)),
                Err(_) => break Err(AmqpError::NotConnected),
            }
        };
        let _ = channel.close(200, "replayed".into()).await;
        outcome.map(|()| replayed)
    }

    fn dead_queue_name(&self, queue: DeadQueue) -> &str {
        match queue {
            DeadQueue::Jobs => &self.names().jobs_dead,
            DeadQueue::Requests => &self.names().requests_dead,
        }
    }

    /// A plain channel (no confirms) of the current connection, for `basic.get`.
    async fn operator_channel(&self) -> Result<Channel, AmqpError> {
        let work = async {
            let link = self.wait_for_link().await?;
            link.connection
                .create_channel()
                .await
                .map_err(AmqpError::from_lapin)
        };
        timeout(self.confirm_timeout(), work)
            .await
            .map_err(|_| AmqpError::NotConnected)?
    }

    async fn get(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<Option<(lapin::message::Delivery, u32)>, AmqpError> {
        let queue: ShortString = short("queue", queue)?;
        let got = timeout(
            self.confirm_timeout(),
            channel.basic_get(queue, BasicGetOptions { no_ack: false }),
        )
        .await
        .map_err(|_| AmqpError::NotConnected)?
        .map_err(AmqpError::from_lapin)?;
        Ok(got.map(|message| (message.delivery, message.message_count)))
    }
}

/// What an operator needs to know about a dead message, from its headers: ours
/// (a consumer dead-lettered it with a reason) or the broker's `x-death`.
fn describe(properties: &BasicProperties, body: Vec<u8>) -> DeadMessage {
    let ours = text_header(properties, DEAD_REASON_HEADER);
    let deaths = broker_deaths(properties);
    // `x-death` is newest first; `x-first-death-reason` is often a wait queue's
    // TTL expiry, which is how a delayed job reached `jobs`, not why it died.
    let reason = ours
        .clone()
        .or_else(|| deaths.first().map(|death| death.reason.clone()))
        .or_else(|| text_header(properties, "x-first-death-reason").filter(|r| r != "expired"))
        .unwrap_or_else(|| "unknown".to_owned());
    let earlier = count_header(properties, REPLAYED_COUNT_HEADER);
    let now_count = if ours.is_some() {
        1
    } else {
        deaths.iter().map(|d| d.count).sum::<u32>().max(1)
    };
    let died_at = if ours.is_some() {
        timestamp_header(properties, DEAD_AT_HEADER)
    } else {
        deaths.iter().filter_map(|d| d.time).min()
    };
    let first_seen = timestamp_header(properties, REPLAYED_FIRST_HEADER).or(died_at);
    let deliveries = if ours.is_some() {
        header(properties, DEAD_DELIVERY_COUNT_HEADER)
            .map(|_| count_header(properties, DEAD_DELIVERY_COUNT_HEADER).saturating_add(1))
    } else {
        header(properties, DELIVERY_COUNT)
            .map(|_| count_header(properties, DELIVERY_COUNT).saturating_add(1))
    };
    DeadMessage {
        message_id: properties.message_id().as_ref().map(ToString::to_string),
        reason,
        count: earlier.saturating_add(now_count),
        deliveries,
        first_seen,
        body,
    }
}

/// One `x-death` entry that is a real death: not a wait queue's TTL expiry, which
/// is how a delayed job reaches `jobs` and leaves a trace on every job.
struct Death {
    reason: String,
    count: u32,
    time: Option<SystemTime>,
}

fn broker_deaths(properties: &BasicProperties) -> Vec<Death> {
    let Some(AMQPValue::FieldArray(entries)) = header(properties, "x-death") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| {
            let AMQPValue::FieldTable(table) = entry else {
                return None;
            };
            let get = |key: &str| table.inner().get(key);
            let reason = match get("reason")? {
                AMQPValue::LongString(text) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                AMQPValue::ShortString(text) => text.to_string(),
                _ => return None,
            };
            if reason == "expired" {
                return None;
            }
            let count = match get("count") {
                Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
                Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
                _ => 1,
            };
            let time = match get("time") {
                Some(AMQPValue::Timestamp(secs)) => Some(UNIX_EPOCH + Duration::from_secs(*secs)),
                _ => None,
            };
            Some(Death {
                reason,
                count,
                time,
            })
        })
        .collect()
}

fn text_header(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

fn timestamp_header(properties: &BasicProperties, name: &str) -> Option<SystemTime> {
    match header(properties, name)? {
        AMQPValue::Timestamp(secs) => Some(UNIX_EPOCH + Duration::from_secs(*secs)),
        _ => None,
    }
}

/// The replayed copy: the original message as first published (its death and
/// retry headers removed, so it gets a fresh start), carrying its dead-letter
/// count and first death forward.
fn replay_properties(original: &BasicProperties, dead: &DeadMessage) -> BasicProperties {
    let mut extra = vec![(
        REPLAYED_COUNT_HEADER,
        AMQPValue::LongLongInt(dead.count.into()),
    )];
    if let Some(first) = dead
        .first_seen
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    {
        extra.push((REPLAYED_FIRST_HEADER, AMQPValue::Timestamp(first.as_secs())));
    }
    copy_properties(original, &extra, |name| {
        let death = name == "x-death"
            || name.starts_with("x-first-death-")
            || name.starts_with("x-last-death-")
            || DEATH_HEADERS.contains(&name);
        !death && name != DELIVERY_COUNT && name != RETRIES_HEADER
    })
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, FieldTable};

    use super::*;

    fn props(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (key, value) in pairs {
            headers.insert((*key).into(), value.clone());
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(headers)
    }

    fn death(reason: &str, count: i64, time: u64) -> AMQPValue {
        let mut table = FieldTable::default();
        table.insert("reason".into(), AMQPValue::LongString(reason.into()));
        table.insert("count".into(), AMQPValue::LongLongInt(count));
        table.insert("time".into(), AMQPValue::Timestamp(time));
        AMQPValue::FieldTable(table)
    }

    fn check(properties: &BasicProperties, reason: &str, count: u32, first: Option<u64>) {
        let dead = describe(properties, Vec::new());
        assert_eq!(dead.reason, reason);
        assert_eq!(dead.count, count);
        assert_eq!(
            dead.first_seen,
            first.map(|s| UNIX_EPOCH + Duration::from_secs(s))
        );
    }

    #[test]
    fn a_dead_message_is_described_from_its_headers() {
        check(
            &props(&[
                (
                    DEAD_REASON_HEADER,
                    AMQPValue::LongString("malformed".into()),
                ),
                (DEAD_AT_HEADER, AMQPValue::Timestamp(100)),
            ]),
            "malformed",
            1,
            Some(100),
        );
        let broker = FieldArray::from(vec![
            death("expired", 3, 10),
            death("delivery_limit", 1, 50),
        ]);
        check(
            &props(&[
                ("x-death", AMQPValue::FieldArray(broker)),
                (
                    "x-first-death-reason",
                    AMQPValue::LongString("delivery_limit".into()),
                ),
            ]),
            "delivery_limit",
            1,
            Some(50),
        );
        check(
            &props(&[
                (DEAD_REASON_HEADER, AMQPValue::LongString("again".into())),
                (DEAD_AT_HEADER, AMQPValue::Timestamp(900)),
                (REPLAYED_COUNT_HEADER, AMQPValue::LongLongInt(2)),
                (REPLAYED_FIRST_HEADER, AMQPValue::Timestamp(40)),
            ]),
            "again",
            3,
            Some(40),
        );
        check(&props(&[]), "unknown", 1, None);
    }

    #[test]
    fn a_replayed_copy_loses_its_death_and_retry_headers() {
        let original = props(&[
            (DEAD_REASON_HEADER, AMQPValue::LongString("x".into())),
            (DEAD_AT_HEADER, AMQPValue::Timestamp(7)),
            (RETRIES_HEADER, AMQPValue::LongLongInt(4)),
            ("x-death", AMQPValue::FieldArray(FieldArray::from(vec![]))),
            ("traceparent", AMQPValue::LongString("00-abc".into())),
        ]);
        let dead = describe(&original, Vec::new());
        let copy = replay_properties(&original, &dead);
        let headers = copy.headers().clone().unwrap_or_default();
        let mut keys: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["traceparent", REPLAYED_COUNT_HEADER, REPLAYED_FIRST_HEADER]
        );
        assert_eq!(
            copy.message_id().as_ref().map(ShortString::as_str),
            Some("m-1")
        );
    }
}
