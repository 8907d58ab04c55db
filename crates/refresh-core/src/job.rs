//! An admitted refresh as it travels on the `jobs` queue: written by the ingress once
//! the gate admitted it, read by the workers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ConsentId, ProviderId, RefreshId, RequestedBy, TenantId, TraceContext};

/// The body of a job message (JSON, camelCase). Parsing validates every id, so a job
/// that parses is well-formed. Fields it does not know are ignored, so that during a
/// rolling upgrade a worker reads the jobs of a newer (or older) ingress: the attempt
/// count, for one, lives in `refreshes.attempts`, and older jobs still carry an
/// `attempt` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub refresh_id: RefreshId,
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub requested_by: RequestedBy,
    /// The initial connection load (all data kinds) rather than a plain refresh.
    pub initial: bool,
    /// The worker must not start the refresh before this instant.
    pub not_before: DateTime<Utc>,
    /// The refresh's W3C trace context; jobs published before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<TraceContext>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed job message: {0}")]
pub struct JobError(String);

impl Job {
    pub fn parse(body: &[u8]) -> Result<Self, JobError> {
        serde_json::from_slice(body).map_err(|e| JobError(e.to_string()))
    }

    /// The `refreshId` of a body that is not a valid job as a whole (a field missing
    /// or malformed), when that much of it can be read: its refresh can then be ended
    /// instead of waiting forever.
    pub fn refresh_id_of(body: &[u8]) -> Option<RefreshId> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        value.get("refreshId")?.as_str()?.parse().ok()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_id_of_a_broken_job() {
        let check = |body: &str, expected: Option<&str>| {
            assert_eq!(
                Job::refresh_id_of(body.as_bytes()),
                expected.map(|id| id.parse().unwrap()),
                "{body}"
            );
        };
        let id = "0190d3c4-7a00-7000-8000-000000000001";
        check(&format!(r#"{{"refreshId": "{id}"}}"#), Some(id));
        check(
            &format!(r#"{{"refreshId": "{id}", "consentId": 7}}"#),
            Some(id),
        );
        check(r#"{"refreshId": "nope"}"#, None);
        check(r#"{"refreshId": 1}"#, None);
        check("not json", None);
        check("[]", None);
    }

    fn check_refused(body: &str) {
        assert!(Job::parse(body.as_bytes()).is_err(), "{body}");
    }

    #[test]
    fn round_trip_and_refusals() {
        let job = Job {
            refresh_id: "0190d3c4-7a00-7000-8000-000000000001".parse().unwrap(),
            consent_id: "5b1d0c2e-6f1a-4d3b-9c8e-7a6b5c4d3e2f".parse().unwrap(),
            tenant_id: TenantId::parse("acme").unwrap(),
            provider_id: ProviderId::parse("sim").unwrap(),
            requested_by: RequestedBy::Api,
            initial: false,
            not_before: "2026-01-01T00:00:00Z".parse().unwrap(),
            traceparent: None,
        };
        assert_eq!(Job::parse(&job.to_bytes()).unwrap(), job);
        // A job of an older or newer version, with fields this one does not know.
        let older = String::from_utf8(job.to_bytes())
            .unwrap()
            .replace("\"initial\"", "\"attempt\":2,\"initial\"");
        assert!(older.contains("\"attempt\":2"), "{older}");
        assert_eq!(Job::parse(older.as_bytes()).unwrap(), job);
        // Jobs without a trace (published before it existed) still parse, and one with
        // a trace keeps it.
        assert!(
            !String::from_utf8(job.to_bytes())
                .unwrap()
                .contains("traceparent")
        );
        let traced = Job {
            traceparent: Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .unwrap(),
            ),
            ..job.clone()
        };
        assert_eq!(Job::parse(&traced.to_bytes()).unwrap(), traced);
        check_refused(
            &String::from_utf8(traced.to_bytes())
                .unwrap()
                .replace("-01\"", "-1\""),
        );
        let check = check_refused;
        check("");
        check("{}");
        check("not json");
        check(
            &String::from_utf8(job.to_bytes())
                .unwrap()
                .replace("acme", "a c m e"),
        );
        check(
            &String::from_utf8(job.to_bytes())
                .unwrap()
                .replace("\"API\"", "\"NOBODY\""),
        );
    }
}
