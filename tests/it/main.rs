//! The integration test binary: every scenario runs through the real Redis, RabbitMQ
//! and PostgreSQL, each test in its own namespace (see the `refresh_tests` harness).

#![allow(
    clippy::unwrap_used,
    reason = "a test (and its helpers) reports failure by panicking"
)]

mod amqp;
mod berlin_group;
mod changes;
mod data;
mod deploy;
mod events;
mod faults;
mod gate;
mod harness;
mod idempotency;
mod ingress;
mod keys;
mod pending;
mod portal;
mod processes;
mod purity;
mod random_requests;
mod refreshctl;
mod relay;
mod scheduler;
mod security;
mod shape;
mod trace;
mod worker;
