//! Connecting to RabbitMQ and removing a namespace's topology.

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;

use crate::Names;

/// The `[amqp]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// Longest wait for a publisher confirm.
    pub confirm_timeout_ms: u64,
    /// Deliveries of one message before a quorum queue dead-letters it.
    pub delivery_limit: u32,
    /// The `requestedBy` values an upstream request may carry; others are refused
    /// (a source claiming `ADMIN` or `AUTOSYNC` would skip the quota).
    #[serde(default = "default_requested_by")]
    pub requested_by: Vec<refresh_core::RequestedBy>,
    /// Upstream requests an ingress decides at once (the prefetch of its `requests`
    /// consumer): each waits mostly on round trips, so more at once means more
    /// decided per second, up to the machine's CPU.
    #[serde(default = "default_requests_prefetch")]
    pub requests_prefetch: u16,
}

fn default_requests_prefetch() -> u16 {
    128
}

fn default_requested_by() -> Vec<refresh_core::RequestedBy> {
    vec![refresh_core::RequestedBy::App]
}

/// A failed broker operation, classified once: [`AmqpError::is_transient`] says
/// whether to retry / answer 503 (the broker is unreachable, blocked or slow) or to
/// treat it as permanent (a refused operation: a bug, a missing queue, bad input).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The connection or channel failed (I/O, heartbeat, forced close). Transient.
    #[error("rabbitmq unavailable")]
    Unavailable(#[source] lapin::Error),
    /// The broker refused the operation (a channel-level error such as 404 or 406).
    /// Permanent: retrying the same thing fails the same way.
    #[error("rabbitmq refused the operation")]
    Refused(#[source] lapin::Error),
    /// No usable connection right now (the supervisor is reconnecting, or the broker
    /// is shutting down). Transient.
    #[error("no connection to rabbitmq")]
    NotConnected,
    /// The broker blocked publishing (a memory or disk alarm). Transient.
    #[error("rabbitmq blocked publishing (resource alarm)")]
    Blocked,
    /// No publisher confirm within `confirm_timeout_ms`. The message may or may not
    /// have been stored. Transient.
    #[error("rabbitmq did not confirm the publish within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The broker answered the publish with a nack (e.g. a full queue rejecting
    /// publishes). Transient.
    #[error("rabbitmq rejected the publish (nack)")]
    Nacked,
    /// A mandatory publish matched no queue (a missing binding or reply queue).
    /// Permanent.
    #[error("no queue is bound to exchange {exchange:?} with routing key {routing_key:?}")]
    Unroutable {
        /// The exchange published to (`""` is the default exchange).
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
    /// The channel a delivery came on is closed, so it can no longer be settled; the
    /// broker delivers the message again. Transient.
    #[error("the delivery's channel is closed; the broker will redeliver the message")]
    ChannelClosed,
    /// An argument the protocol cannot carry (a name over 255 bytes, a delay over
    /// the broker's maximum). Permanent.
    #[error("invalid amqp argument: {0}")]
    InvalidArgument(String),
}

impl AmqpError {
    /// Classifies a lapin error: a channel-level refusal by the broker is permanent,
    /// anything else (I/O, connection state, forced close) is the broker being
    /// unavailable.
    pub(crate) fn from_lapin(error: lapin::Error) -> Self {
        if error.is_amqp_soft_error() {
            Self::Refused(error)
        } else {
            Self::Unavailable(error)
        }
    }

    /// Worth retrying later (HTTP 503, a requeue), as opposed to permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_)
            | Self::NotConnected
            | Self::Blocked
            | Self::ConfirmTimeout(_)
            | Self::Nacked
            | Self::ChannelClosed => true,
            Self::Refused(_) | Self::Unroutable { .. } | Self::InvalidArgument(_) => false,
        }
    }
}

/// One connection to the broker.
pub async fn connect(settings: &AmqpSettings) -> Result<Connection, AmqpError> {
    Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .map_err(AmqpError::Unavailable)
}

/// Whether a queue exists (a passive declare, on a throwaway channel since a failed
/// passive declare closes its channel).
pub async fn queue_exists(conn: &Connection, queue: &str) -> Result<bool, AmqpError> {
    Ok(queue_depth(conn, queue).await?.is_some())
}

/// How many messages a queue holds ready for delivery (not those delivered and not yet
/// acknowledged), or `None` if it does not exist. A passive declare on a throwaway
/// channel, like [`queue_exists`].
pub async fn queue_depth(conn: &Connection, queue: &str) -> Result<Option<u32>, AmqpError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(AmqpError::Unavailable)?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(declared) => {
            let _ = channel.close(200, "done".into()).await;
            Ok(Some(declared.message_count()))
        }
        Err(e) if e.is_amqp_soft_error() => Ok(None),
        Err(e) => Err(AmqpError::Unavailable(e)),
    }
}

/// Deletes every queue and exchange of the namespace (missing ones are fine).
pub async fn delete_namespace(conn: &Connection, namespace: &str) -> Result<(), AmqpError> {
    let names = Names::new(namespace);
    let channel = conn
        .create_channel()
        .await
        .map_err(AmqpError::Unavailable)?;
    for queue in names.queues() {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map_err(AmqpError::Refused)?;
    }
    for exchange in names.exchanges() {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .map_err(AmqpError::Refused)?;
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}
