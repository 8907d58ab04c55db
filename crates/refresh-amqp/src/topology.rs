//! Declares the namespace's exchanges, queues and bindings (SPEC §4), idempotently.
//!
//! `requests` and `jobs` are quorum queues with an explicit delivery limit and
//! at-least-once dead-lettering, so a poison message ends in the `.dead` queue instead
//! of looping. `jobs.wait` and its tiers hold jobs until their TTL expires, then
//! dead-letter them into the `jobs` exchange. They are quorum queues too, with
//! at-least-once dead-lettering (which needs `x-overflow: reject-publish`): a classic
//! queue dead-letters at most once, so a broker restart or failover at the moment a
//! job expires could drop it.
//!
//! A queue cannot be declared again with other arguments (the broker refuses with
//! 406 and closes the channel). A namespace whose wait queues were declared classic
//! by an earlier version keeps them: the quorum declaration is refused, and the queue
//! is then only checked to exist (passively), with a warning. It still works (its
//! arguments are stored with it), at-most-once; once it is empty an operator may
//! delete it, and the next start declares it quorum.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::{AmqpError, Names};

/// Routing key of upstream refresh requests on the `requests` exchange.
pub const REQUEST_ROUTING_KEY: &str = "refresh.request";
/// Routing key of admitted refresh jobs on the `jobs` exchange.
pub const JOB_ROUTING_KEY: &str = "refresh.job";

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares everything; safe to call from every replica at every start.
pub async fn declare(
    connection: &Connection,
    names: &Names,
    delivery_limit: u32,
) -> Result<(), AmqpError> {
    let channel = &connection
        .create_channel()
        .await
        .map_err(AmqpError::from_lapin)?;
    let exchange = |name: &str, kind: ExchangeKind| {
        channel.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
    };
    exchange(&names.requests, ExchangeKind::Direct)
        .await
        .map_err(AmqpError::from_lapin)?;
    exchange(&names.jobs, ExchangeKind::Direct)
        .await
        .map_err(AmqpError::from_lapin)?;
    exchange(&names.events, ExchangeKind::Topic)
        .await
        .map_err(AmqpError::from_lapin)?;

    let quorum_with_dead_letters = |dead: &str| {
        args(&[
            ("x-queue-type", text("quorum")),
            (
                "x-delivery-limit",
                AMQPValue::LongLongInt(delivery_limit.into()),
            ),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(dead)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ])
    };
    for dead in [&names.requests_dead, &names.jobs_dead] {
        channel
            .queue_declare(
                dead.as_str().into(),
                durable(),
                args(&[("x-queue-type", text("quorum"))]),
            )
            .await
            .map_err(AmqpError::from_lapin)?;
    }
    channel
        .queue_declare(
            names.requests.as_str().into(),
            durable(),
            quorum_with_dead_letters(&names.requests_dead),
        )
        .await
        .map_err(AmqpError::from_lapin)?;
    channel
        .queue_declare(
            names.jobs.as_str().into(),
            durable(),
            quorum_with_dead_letters(&names.jobs_dead),
        )
        .await
        .map_err(AmqpError::from_lapin)?;
    // `jobs.wait`: per-message TTL; the tiers: a queue TTL each, so their messages
    // expire in arrival order.
    let mut waits = vec![(names.jobs_wait.as_str(), None)];
    waits.extend(
        names
            .wait_tiers
            .iter()
            .map(|(ttl, tier)| (tier.as_str(), Some(*ttl))),
    );
    for (queue, ttl) in waits {
        declare_wait(connection, queue, ttl, &names.jobs).await?;
    }

    let bind = |queue: &str, exchange: &str, key: &str| {
        channel.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
    };
    bind(&names.requests, &names.requests, REQUEST_ROUTING_KEY)
        .await
        .map_err(AmqpError::from_lapin)?;
    bind(&names.jobs, &names.jobs, JOB_ROUTING_KEY)
        .await
        .map_err(AmqpError::from_lapin)?;
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// The arguments of a wait queue: quorum, dead-lettering at least once into the
/// `jobs` exchange when a message's TTL (or the queue's, `ttl`) expires.
pub fn wait_queue_arguments(jobs_exchange: &str, ttl: Option<std::time::Duration>) -> FieldTable {
    let mut pairs = vec![
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(jobs_exchange)),
        ("x-dead-letter-routing-key", text(JOB_ROUTING_KEY)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ];
    if let Some(ttl) = ttl {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        pairs.push(("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)));
    }
    args(&pairs)
}

/// Declares one wait queue quorum, or keeps the classic one an earlier version
/// declared (see the module's documentation). Each attempt has its own channel,
/// since a refused declaration closes it.
async fn declare_wait(
    connection: &Connection,
    queue: &str,
    ttl: Option<std::time::Duration>,
    jobs_exchange: &str,
) -> Result<(), AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::from_lapin)?;
    let declared = channel
        .queue_declare(
            queue.into(),
            durable(),
            wait_queue_arguments(jobs_exchange, ttl),
        )
        .await
        .map_err(AmqpError::from_lapin);
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(AmqpError::Refused(error)) => {
            let check = connection
                .create_channel()
                .await
                .map_err(AmqpError::from_lapin)?;
            check
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpError::from_lapin)?;
            let _ = check.close(200, "checked".into()).await;
            tracing::warn!(
                queue,
                error = %error,
                "this wait queue was declared with other arguments (classic) before; it is kept, and dead-letters at most once until it is deleted while empty"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}
