//! The worker's Prometheus metrics: refreshes by outcome and their duration, bank call
//! latency and errors by provider, retries, dead-letters, deviations read past, start
//! slot waits, duplicate deliveries deferred, and the refreshes in flight.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    // 5 ms .. ~80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Cheap to clone handles onto the metrics (each is an `Arc` inside).
#[derive(Clone)]
pub struct WorkerMetrics {
    refreshes: Family<Labels, Counter>,
    refresh_seconds: Histograms,
    bank_seconds: Histograms,
    bank_errors: Family<Labels, Counter>,
    deviations: Family<Labels, Counter>,
    retries: Counter,
    dead_letters: Counter,
    start_waits: Counter,
    duplicates_deferred: Counter,
    in_flight: Gauge,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            refreshes: Family::default(),
            refresh_seconds: Family::new_with_constructor(seconds_buckets),
            bank_seconds: Family::new_with_constructor(seconds_buckets),
            bank_errors: Family::default(),
            deviations: Family::default(),
            retries: Counter::default(),
            dead_letters: Counter::default(),
            start_waits: Counter::default(),
            duplicates_deferred: Counter::default(),
            in_flight: Gauge::default(),
        }
    }
}

impl WorkerMetrics {
    /// Adds the metrics to `registry` (the process's, served at `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "refreshes",
            "Refreshes ended by a worker, by outcome and error code",
            self.refreshes.clone(),
        );
        registry.register(
            "refresh_seconds",
            "From a refresh's start slot to its terminal status, by outcome",
            self.refresh_seconds.clone(),
        );
        registry.register(
            "bank_fetch_seconds",
            "One fetch from the bank (all its pages), by provider",
            self.bank_seconds.clone(),
        );
        registry.register(
            "bank_errors",
            "Failed bank fetches, by provider and kind",
            self.bank_errors.clone(),
        );
        registry.register(
            "bank_deviations",
            "Deviations from the bank's schema read past, by kind",
            self.deviations.clone(),
        );
        registry.register(
            "refresh_retries",
            "Bank attempts retried after a transient failure",
            self.retries.clone(),
        );
        registry.register(
            "jobs_dead_lettered",
            "Jobs dead-lettered as unparseable",
            self.dead_letters.clone(),
        );
        registry.register(
            "start_slot_waits",
            "Times a job waited for a start slot at the bank (the stagger)",
            self.start_waits.clone(),
        );
        registry.register(
            "duplicate_deliveries_deferred",
            "Deliveries of a job deferred because another delivery of it was running its bank attempt",
            self.duplicates_deferred.clone(),
        );
        registry.register(
            "refreshes_in_flight",
            "Jobs being handled by this worker",
            self.in_flight.clone(),
        );
    }

    pub(crate) fn finished(&self, outcome: &'static str, code: Option<&str>, elapsed: Duration) {
        let mut labels = vec![("outcome", outcome.to_owned())];
        self.refresh_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        labels.push(("code", code.unwrap_or("").to_owned()));
        self.refreshes.get_or_create(&labels).inc();
    }

    pub(crate) fn bank_fetch(
        &self,
        provider: &str,
        elapsed: Duration,
        error: Option<&'static str>,
    ) {
        self.bank_seconds
            .get_or_create(&vec![("provider", provider.to_owned())])
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.bank_errors
                .get_or_create(&vec![
                    ("provider", provider.to_owned()),
                    ("kind", kind.to_owned()),
                ])
                .inc();
        }
    }

    pub(crate) fn deviation(&self, kind: &str, count: u64) {
        self.deviations
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc_by(count);
    }

    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_letters.inc();
    }

    pub(crate) fn waited_for_start(&self) {
        self.start_waits.inc();
    }

    pub(crate) fn duplicate_delivery_deferred(&self) {
        self.duplicates_deferred.inc();
    }

    pub(crate) fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }
}
