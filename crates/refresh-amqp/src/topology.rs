//! Declares the namespace's exchanges, queues and bindings (SPEC §4), idempotently.
//!
//! `requests` and `jobs` are quorum queues with an explicit delivery limit and
//! at-least-once dead-lettering, so a poison message ends in the `.dead` queue instead
//! of looping. `jobs.wait` holds jobs until their TTL expires, then dead-letters them
//! into the `jobs` exchange.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

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
    channel: &Channel,
    names: &Names,
    delivery_limit: u32,
) -> Result<(), AmqpError> {
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
    // A classic queue: per-message TTL with dead-lettering into the jobs exchange.
    channel
        .queue_declare(
            names.jobs_wait.as_str().into(),
            durable(),
            args(&[
                ("x-dead-letter-exchange", text(&names.jobs)),
                ("x-dead-letter-routing-key", text(JOB_ROUTING_KEY)),
            ]),
        )
        .await
        .map_err(AmqpError::from_lapin)?;

    // The tiers: a queue TTL each, so their messages expire in arrival order.
    for (ttl, tier) in &names.wait_tiers {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        channel
            .queue_declare(
                tier.as_str().into(),
                durable(),
                args(&[
                    ("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)),
                    ("x-dead-letter-exchange", text(&names.jobs)),
                    ("x-dead-letter-routing-key", text(JOB_ROUTING_KEY)),
                ]),
            )
            .await
            .map_err(AmqpError::from_lapin)?;
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
    Ok(())
}
