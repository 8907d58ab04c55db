//! Admission (SPEC §2) for every channel — the HTTP API, the upstream AMQP consumer,
//! the dashboard and the scheduler all decide a refresh request through one
//! [`Admitter`] — and the outbox relay that publishes the events written by any
//! role's transactions.

mod admission;
mod metrics;
mod rebuild;
pub mod relay;

pub use admission::{Admitter, Decision, RefreshRequest, Unavailable, new_trace, trace_or_new};
pub use metrics::AdmissionMetrics;
pub use rebuild::{GateRebuild, RebuildError};
