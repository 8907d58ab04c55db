//! Redis adapter: the admission gate's atomic scripts, connection, health, and namespace housekeeping.
//!
//! Every key this crate writes starts with `{namespace}:`, so one namespace never sees
//! another's keys and a namespace can be removed as a whole.

mod conn;
mod gate;
mod session;

pub use conn::{ConnectionManager, RedisError, RedisSettings, connect, delete_namespace, health};
pub use gate::{
    AdmittedRefresh, Gate, GateConfig, GateDecision, GateError, GateRequest, QuotaStatus,
    REBUILD_LOOKBACK, RebuildReport, START_MARGIN_MS, StartDecision, Ticket,
};
pub use refresh_core::ConsentFacts;
pub use session::Sessions;
