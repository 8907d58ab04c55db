//! The scheduler's Prometheus metrics (SPEC §6): due consents, auto-syncs requested and
//! refused by code, consents expired and inactivated, rows removed by kind, stalled
//! refreshes ended, bank tokens re-encrypted and left to re-encrypt, and how long each
//! tick took and when the last one ended.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Cheap to clone handles onto the metrics (each is an `Arc` inside).
#[derive(Clone)]
pub struct SchedulerMetrics {
    pub(crate) due: Gauge,
    pub(crate) requested: Counter,
    pub(crate) refused: Family<Labels, Counter>,
    pub(crate) expired: Counter,
    pub(crate) inactivated: Counter,
    pub(crate) removed: Family<Labels, Counter>,
    pub(crate) stalled: Counter,
    pub(crate) rekeyed: Counter,
    pub(crate) to_rekey: Gauge,
    pub(crate) tick_seconds: Histogram,
    pub(crate) last_tick: Gauge,
}

impl std::fmt::Debug for SchedulerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchedulerMetrics")
    }
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self {
            due: Gauge::default(),
            requested: Counter::default(),
            refused: Family::default(),
            expired: Counter::default(),
            inactivated: Counter::default(),
            removed: Family::default(),
            stalled: Counter::default(),
            rekeyed: Counter::default(),
            to_rekey: Gauge::default(),
            tick_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            last_tick: Gauge::default(),
        }
    }
}

impl SchedulerMetrics {
    /// Adds the metrics to `registry` (the process's, served at `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "scheduler_due_consents",
            "Consents due for auto-sync at the last tick (backing off or not)",
            self.due.clone(),
        );
        registry.register(
            "scheduler_autosync_requested",
            "AUTOSYNC refreshes requested and admitted",
            self.requested.clone(),
        );
        registry.register(
            "scheduler_autosync_refused",
            "AUTOSYNC requests refused, by problem code (asked again later)",
            self.refused.clone(),
        );
        registry.register(
            "scheduler_consents_expired",
            "Consents marked EXPIRED",
            self.expired.clone(),
        );
        registry.register(
            "scheduler_consents_inactivated",
            "Consents marked INACTIVE",
            self.inactivated.clone(),
        );
        registry.register(
            "scheduler_rows_removed",
            "Rows removed, by kind (stored data of inactive consents, history, outbox, idempotency keys)",
            self.removed.clone(),
        );
        registry.register(
            "scheduler_stalled_refreshes",
            "Refreshes ended ERROR internal_error because no worker held them long after their start slot",
            self.stalled.clone(),
        );
        registry.register(
            "scheduler_tokens_rekeyed",
            "Stored bank tokens re-encrypted with crypto.key",
            self.rekeyed.clone(),
        );
        registry.register(
            "scheduler_tokens_to_rekey",
            "Stored bank tokens not yet sealed with crypto.key at the last tick (a retired key, or none named)",
            self.to_rekey.clone(),
        );
        registry.register(
            "scheduler_tick_seconds",
            "Duration of a scheduler tick",
            self.tick_seconds.clone(),
        );
        registry.register(
            "scheduler_last_tick_timestamp_seconds",
            "When the last scheduler tick ended (Unix time)",
            self.last_tick.clone(),
        );
    }

    pub(crate) fn removed(&self, kind: &'static str, rows: u64) {
        if rows > 0 {
            self.removed
                .get_or_create(&vec![("kind", kind)])
                .inc_by(rows);
        }
    }
}
