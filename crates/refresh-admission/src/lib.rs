//! Admission (SPEC §2) for every channel — the HTTP API, the upstream AMQP consumer,
//! the dashboard and the scheduler all decide a refresh request through one
//! [`Admitter`] — the group commit of admissions ([`writer`], on [`group`]), and the outbox relay
//! that publishes the jobs and events written by any role's transactions.

mod admission;
pub mod group;
mod metrics;
mod rebuild;
pub mod relay;
pub mod writer;

pub use admission::{
    Admitter, Decision, RefreshRequest, Remember, Unavailable, new_trace, trace_or_new,
};
pub use group::{Group, GroupError};
pub use metrics::AdmissionMetrics;
pub use rebuild::{GateRebuild, RebuildError};
pub use writer::{AdmissionWriter, WriteError};
