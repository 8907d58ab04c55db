//! Prometheus metrics of admission: admissions and refusals by code and source; the
//! latency of a whole decision, of its gate, of an admission's write and of the
//! relay's confirmed job publishes; quota entries of failed admissions forgotten.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use refresh_core::{ProblemCode, RequestedBy};

type Labels = Vec<(&'static str, &'static str)>;

/// Cheap to clone handles onto the admission metrics (each is an `Arc` inside).
#[derive(Clone)]
pub struct AdmissionMetrics {
    admissions: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    admission_seconds: Histogram,
    gate_seconds: Histogram,
    write_seconds: Histogram,
    publish_seconds: Histogram,
    outbox_jobs: Gauge,
    healed: Counter,
}

impl std::fmt::Debug for AdmissionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionMetrics")
    }
}

impl Default for AdmissionMetrics {
    fn default() -> Self {
        Self {
            admissions: Family::default(),
            refusals: Family::default(),
            admission_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            gate_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            write_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            publish_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            outbox_jobs: Gauge::default(),
            healed: Counter::default(),
        }
    }
}

impl AdmissionMetrics {
    /// Adds the metrics to `registry` (the process's, served at `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "admissions",
            "Admitted refresh requests, by source",
            self.admissions.clone(),
        );
        registry.register(
            "refusals",
            "Refused refresh requests, by problem code and source",
            self.refusals.clone(),
        );
        registry.register(
            "admission_seconds",
            "Latency of deciding a refresh request (consent, gate, write), whatever the answer",
            self.admission_seconds.clone(),
        );
        registry.register(
            "gate_seconds",
            "Latency of the Redis admission gate",
            self.gate_seconds.clone(),
        );
        registry.register(
            "admission_write_seconds",
            "Latency of an admission's one database statement (record, event and job)",
            self.write_seconds.clone(),
        );
        registry.register(
            "publish_seconds",
            "Latency of a confirmed job publish by the outbox relay",
            self.publish_seconds.clone(),
        );
        registry.register(
            "outbox_jobs",
            "Admitted jobs committed but not yet confirmed by RabbitMQ, as the relay last counted",
            self.outbox_jobs.clone(),
        );
        registry.register(
            "quota_entries_healed",
            "Quota entries of admissions that never committed and whose undo never ran, forgotten after a lease",
            self.healed.clone(),
        );
    }

    pub(crate) fn healed(&self) {
        self.healed.inc();
    }

    pub(crate) fn admitted(&self, source: RequestedBy) {
        self.admissions
            .get_or_create(&vec![("source", source.as_str())])
            .inc();
    }

    pub(crate) fn refused(&self, source: RequestedBy, code: ProblemCode) {
        self.refusals
            .get_or_create(&vec![("code", code.as_str()), ("source", source.as_str())])
            .inc();
    }

    pub(crate) fn admission_latency(&self, elapsed: Duration) {
        self.admission_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn gate_latency(&self, elapsed: Duration) {
        self.gate_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn write_latency(&self, elapsed: Duration) {
        self.write_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn outbox_jobs(&self, pending: i64) {
        self.outbox_jobs.set(pending);
    }

    pub(crate) fn publish_latency(&self, elapsed: Duration) {
        self.publish_seconds.observe(elapsed.as_secs_f64());
    }
}
