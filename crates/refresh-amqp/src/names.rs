//! The names of a namespace's exchanges and queues (SPEC §4), and which wait queue a
//! delayed job goes through.

use std::time::Duration;

/// The fixed waits of the tiered wait queues `jobs.wait.{1s,5s,30s,300s}`. Every message
/// in one tier waits the same time, so messages expire in the order they came (a
/// queue expires only its head: mixed per-message TTLs would hold a short wait behind
/// a long one). Delays under the first tier use `jobs.wait` with a per-message TTL,
/// where such blocking is bounded by that first tier.
pub(crate) const WAIT_TIERS: [(Duration, &str); 4] = [
    (Duration::from_secs(1), "1s"),
    (Duration::from_secs(5), "5s"),
    (Duration::from_secs(30), "30s"),
    (Duration::from_secs(300), "300s"),
];

/// Every RabbitMQ name a namespace uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Direct exchange and quorum queue of upstream refresh requests.
    pub requests: String,
    /// Request messages that could not be parsed.
    pub requests_dead: String,
    /// Exchange and quorum queue of admitted refreshes.
    pub jobs: String,
    /// Jobs waiting less than the first tier (per-message TTL); dead-letters into `jobs`.
    pub jobs_wait: String,
    /// The tiered wait queues (queue TTL each), longest last; dead-letter into `jobs`.
    pub wait_tiers: Vec<(Duration, String)>,
    /// Jobs past their delivery limit or unparseable.
    pub jobs_dead: String,
    /// Topic exchange of status events.
    pub events: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        let name = |suffix: &str| format!("{namespace}.{suffix}");
        Self {
            requests: name("requests"),
            requests_dead: name("requests.dead"),
            jobs: name("jobs"),
            jobs_wait: name("jobs.wait"),
            wait_tiers: WAIT_TIERS
                .iter()
                .map(|(ttl, label)| (*ttl, name(&format!("jobs.wait.{label}"))))
                .collect(),
            jobs_dead: name("jobs.dead"),
            events: name("events"),
        }
    }

    /// Every queue name, for declaration checks and removal.
    pub fn queues(&self) -> Vec<&str> {
        let mut queues = vec![
            self.requests.as_str(),
            &self.requests_dead,
            &self.jobs,
            &self.jobs_wait,
            &self.jobs_dead,
        ];
        queues.extend(self.wait_tiers.iter().map(|(_, name)| name.as_str()));
        queues
    }

    /// Where a job delayed by `delay` waits: the longest tier not longer than `delay`
    /// (the job comes back early by the difference, and its consumer waits the rest
    /// from its `notBefore`), or `jobs.wait` with a per-message TTL of `delay` below
    /// the first tier. The second value is that per-message TTL.
    pub fn wait_queue(&self, delay: Duration) -> (&str, Option<Duration>) {
        match self.wait_tiers.iter().rev().find(|(ttl, _)| *ttl <= delay) {
            Some((_, name)) => (name, None),
            None => (&self.jobs_wait, Some(delay)),
        }
    }

    /// Every exchange name.
    pub fn exchanges(&self) -> Vec<&str> {
        vec![&self.requests, &self.jobs, &self.events]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed() {
        let names = Names::new("ns");
        assert_eq!(names.requests, "ns.requests");
        assert_eq!(names.jobs_wait, "ns.jobs.wait");
        let check = |delay_ms: u64, queue: &str, ttl: Option<u64>| {
            let (name, per_message) = names.wait_queue(Duration::from_millis(delay_ms));
            assert_eq!(
                (name, per_message),
                (queue, ttl.map(Duration::from_millis)),
                "{delay_ms}"
            );
        };
        check(20, "ns.jobs.wait", Some(20));
        check(999, "ns.jobs.wait", Some(999));
        check(1_000, "ns.jobs.wait.1s", None);
        check(4_999, "ns.jobs.wait.1s", None);
        check(5_000, "ns.jobs.wait.5s", None);
        check(59_000, "ns.jobs.wait.30s", None);
        check(3_600_000, "ns.jobs.wait.300s", None);
        assert!(
            names
                .queues()
                .iter()
                .chain(names.exchanges().iter())
                .all(|n| n.starts_with("ns."))
        );
    }
}
