//! The names of a namespace's exchanges and queues (SPEC §4).

/// Every RabbitMQ name a namespace uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Direct exchange and quorum queue of upstream refresh requests.
    pub requests: String,
    /// Request messages that could not be parsed.
    pub requests_dead: String,
    /// Exchange and quorum queue of admitted refreshes.
    pub jobs: String,
    /// Jobs waiting for their `notBefore` slot or a retry backoff; dead-letters into `jobs`.
    pub jobs_wait: String,
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
            jobs_dead: name("jobs.dead"),
            events: name("events"),
        }
    }

    /// Every queue name, for declaration checks and removal.
    pub fn queues(&self) -> Vec<&str> {
        vec![
            &self.requests,
            &self.requests_dead,
            &self.jobs,
            &self.jobs_wait,
            &self.jobs_dead,
        ]
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
        assert!(
            names
                .queues()
                .iter()
                .chain(names.exchanges().iter())
                .all(|n| n.starts_with("ns."))
        );
    }
}
