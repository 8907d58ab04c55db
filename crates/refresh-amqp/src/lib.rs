//! RabbitMQ adapter, the only crate that knows lapin: the namespace's names and
//! topology, a supervised [`Broker`] (confirmed publishing, consumers that survive
//! reconnects) and the [`Delivery`] through which an outcome becomes ack or nack.
//!
//! Every exchange and queue is named `{namespace}.{name}` (SPEC §4).

mod broker;
mod conn;
mod consumer;
mod dead;
mod names;
pub mod topology;

pub use broker::{Broker, EventQueue};
pub use conn::{AmqpError, AmqpSettings, connect, delete_namespace, queue_depth, queue_exists};
pub use consumer::{Consumer, DEAD_REASON_HEADER, Delivery, RETRIES_HEADER};
pub use dead::{DeadMessage, DeadQueue};
/// An open broker connection (lapin's), handed out by [`connect`].
pub use lapin::Connection;
pub use names::Names;
/// Re-exported because [`Broker::start`] takes them, so callers need not name
/// tokio-util's version themselves.
pub use tokio_util::{sync::CancellationToken, task::TaskTracker};
