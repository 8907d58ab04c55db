//! Prometheus metrics of the ingress: admissions and refusals by code and source, gate
//! and publish latency.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use refresh_core::{ProblemCode, RequestedBy};

type Labels = Vec<(&'static str, &'static str)>;

/// The metrics and the registry they are exported from.
pub struct Metrics {
    registry: Mutex<Registry>,
    admissions: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    gate_seconds: Histogram,
    publish_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("refreshd");
        let admissions = Family::<Labels, Counter>::default();
        let refusals = Family::<Labels, Counter>::default();
        let gate_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        let publish_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "admissions",
            "Admitted refresh requests, by source",
            admissions.clone(),
        );
        registry.register(
            "refusals",
            "Refused refresh requests, by problem code and source",
            refusals.clone(),
        );
        registry.register(
            "gate_seconds",
            "Latency of the Redis admission gate",
            gate_seconds.clone(),
        );
        registry.register(
            "publish_seconds",
            "Latency of a confirmed job publish",
            publish_seconds.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            admissions,
            refusals,
            gate_seconds,
            publish_seconds,
        }
    }

    pub fn admitted(&self, source: RequestedBy) {
        self.admissions
            .get_or_create(&vec![("source", source.as_str())])
            .inc();
    }

    pub fn refused(&self, source: RequestedBy, code: ProblemCode) {
        self.refusals
            .get_or_create(&vec![("code", code.as_str()), ("source", source.as_str())])
            .inc();
    }

    pub fn gate_latency(&self, elapsed: Duration) {
        self.gate_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn publish_latency(&self, elapsed: Duration) {
        self.publish_seconds.observe(elapsed.as_secs_f64());
    }

    /// Lets other roles (the worker in `refreshd dev`) add their metrics.
    pub fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut registry)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
