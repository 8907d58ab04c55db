//! CloudEvents 1.0 (structured JSON) for refresh status changes, refused requests and
//! consent lifecycle changes, and their routing keys.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::ProviderId;
use crate::ids::{ConsentId, EventId, TenantId};
use crate::problem::Problem;
use crate::record::RefreshRecord;
use crate::requested_by::RequestedBy;
use crate::status::ConsentStatus;
use crate::trace::TraceContext;

/// The CloudEvents version produced.
pub const SPEC_VERSION: &str = "1.0";
/// The `source` of every event.
pub const EVENT_SOURCE: &str = "refreshd";
/// The `datacontenttype` of every event.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// Event types are this prefix plus the status segment.
pub const EVENT_TYPE_PREFIX: &str = "io.refreshd.refresh.";
/// The segment of refused requests (not a refresh status).
pub const REJECTED_SEGMENT: &str = "rejected";
/// Consent lifecycle event types are this prefix plus the change's segment.
pub const CONSENT_EVENT_TYPE_PREFIX: &str = "io.refreshd.consent.";

/// A CloudEvent in structured JSON mode; field names as CloudEvents spells them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEvent<T> {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Unique per status change; consumers dedupe on it.
    pub id: EventId,
    /// Always `"refreshd"`.
    pub source: String,
    /// `io.refreshd.refresh.{initialized|updated|error|rejected}`.
    pub r#type: String,
    /// The consent id.
    pub subject: String,
    /// When the change happened.
    #[serde(serialize_with = "crate::time::millis")]
    pub time: DateTime<Utc>,
    /// Always `"application/json"`.
    pub datacontenttype: String,
    /// The CloudEvents distributed-tracing extension: the W3C trace context of the
    /// refresh the event is about; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<TraceContext>,
    /// The payload.
    pub data: T,
}

impl<T> CloudEvent<T> {
    fn new(
        segment: &str,
        id: EventId,
        consent_id: ConsentId,
        time: DateTime<Utc>,
        data: T,
    ) -> Self {
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: EVENT_SOURCE.to_owned(),
            r#type: format!("{EVENT_TYPE_PREFIX}{segment}"),
            subject: consent_id.to_string(),
            time,
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            traceparent: None,
            data,
        }
    }

    /// The event with the trace context of the refresh it is about.
    pub fn with_trace(mut self, traceparent: Option<TraceContext>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The status segment of the type (`updated` etc.), when the type is one of ours.
    pub fn segment(&self) -> Option<&str> {
        self.r#type.strip_prefix(EVENT_TYPE_PREFIX)
    }
}

impl CloudEvent<RefreshRecord> {
    /// The event for `record`'s current status.
    pub fn refresh(record: &RefreshRecord, id: EventId, time: DateTime<Utc>) -> Self {
        Self::new(
            record.status.event_segment(),
            id,
            record.consent_id,
            time,
            record.clone(),
        )
    }

    /// `refresh.{status}.{tenantId}`.
    pub fn routing_key(&self) -> String {
        routing_key(self.data.status.event_segment(), &self.data.tenant_id)
    }
}

/// The data of a `rejected` event: a request the gate refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedRequest {
    /// The consent asked for.
    pub consent_id: ConsentId,
    /// The tenant that asked.
    pub tenant_id: TenantId,
    /// Who asked.
    pub requested_by: RequestedBy,
    /// The refusal, as the requester received it.
    pub problem: Problem,
}

impl CloudEvent<RejectedRequest> {
    /// The event for a refused request.
    pub fn rejected(request: RejectedRequest, id: EventId, time: DateTime<Utc>) -> Self {
        let consent_id = request.consent_id;
        Self::new(REJECTED_SEGMENT, id, consent_id, time, request)
    }

    /// `refresh.rejected.{tenantId}`.
    pub fn routing_key(&self) -> String {
        routing_key(REJECTED_SEGMENT, &self.data.tenant_id)
    }
}

/// The data of a consent lifecycle event: the consent as `GET /v1/consents/{consentId}`
/// shows it, at the change (`quota` is absent: a consent that left `ACTIVE` admits
/// nothing more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentSnapshot {
    pub consent_id: ConsentId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub bank_consent_id: String,
    pub status: ConsentStatus,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
    pub refreshing: bool,
}

impl ConsentSnapshot {
    /// What the gate mirrors of the consent.
    pub fn facts(&self) -> crate::ConsentFacts {
        crate::ConsentFacts {
            tenant_id: self.tenant_id.clone(),
            provider_id: self.provider_id.clone(),
            status: self.status,
            expires_at: self.expires_at,
        }
    }
}

impl ConsentStatus {
    /// The segment of the lifecycle event announcing a change to this status
    /// (`revoked`, `expired`, `inactivated`); none for `ACTIVE`.
    pub fn event_segment(self) -> Option<&'static str> {
        match self {
            Self::Active => None,
            Self::Revoked => Some("revoked"),
            Self::Expired => Some("expired"),
            Self::Inactive => Some("inactivated"),
        }
    }
}

impl CloudEvent<ConsentSnapshot> {
    /// The event announcing that the consent reached `consent.status`; `None` for
    /// `ACTIVE`, which no event announces.
    pub fn consent(consent: ConsentSnapshot, id: EventId, time: DateTime<Utc>) -> Option<Self> {
        let segment = consent.status.event_segment()?;
        Some(Self {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: EVENT_SOURCE.to_owned(),
            r#type: format!("{CONSENT_EVENT_TYPE_PREFIX}{segment}"),
            subject: consent.consent_id.to_string(),
            time,
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            traceparent: None,
            data: consent,
        })
    }

    /// `consent.{revoked|expired|inactivated}.{tenantId}`.
    pub fn routing_key(&self) -> String {
        let segment = self.data.status.event_segment().unwrap_or("changed");
        format!("consent.{segment}.{}", self.data.tenant_id)
    }
}

/// The `events` exchange routing key `refresh.{segment}.{tenantId}`. Tenant ids
/// may contain dots, so subscribers to one status should bind `refresh.{segment}.#`.
pub fn routing_key(segment: &str, tenant: &TenantId) -> String {
    format!("refresh.{segment}.{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;
    use crate::record::{RefreshError, RefreshSummary};
    use serde_json::json;
    use uuid::Uuid;

    fn event_id() -> EventId {
        EventId::from_uuid(Uuid::from_u128(0x0190f5d3_0000_7000_8000_000000000001))
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn refresh_events() {
        let check = |r: &RefreshRecord, ty: &str, key: &str| {
            let event = CloudEvent::refresh(r, event_id(), at("2024-05-01T10:00:06Z"));
            assert_eq!(event.r#type, ty);
            assert_eq!(event.routing_key(), key);
            assert_eq!(event.segment(), ty.strip_prefix("io.refreshd.refresh."));
            let json = serde_json::to_value(&event).unwrap();
            assert_eq!(json["type"], ty);
            assert_eq!(json["data"], serde_json::to_value(r).unwrap());
            assert_eq!(
                serde_json::from_value::<CloudEvent<RefreshRecord>>(json).unwrap(),
                event
            );
        };
        let initialized = record();
        let mut updated = record();
        updated
            .finish_updated(RefreshSummary::default(), at("2024-05-01T10:00:05Z"))
            .unwrap();
        let mut error = record();
        error
            .finish_error(RefreshError::bank_error(), at("2024-05-01T10:00:05Z"))
            .unwrap();
        check(
            &initialized,
            "io.refreshd.refresh.initialized",
            "refresh.initialized.acme",
        );
        check(
            &updated,
            "io.refreshd.refresh.updated",
            "refresh.updated.acme",
        );
        check(&error, "io.refreshd.refresh.error", "refresh.error.acme");
    }

    #[test]
    fn envelope_fields() {
        let event = CloudEvent::refresh(&record(), event_id(), at("2024-05-01T10:00:06Z"));
        let mut json = serde_json::to_value(&event).unwrap();
        json.as_object_mut().unwrap().remove("data");
        assert_eq!(
            json,
            json!({
                "specversion": "1.0",
                "id": "0190f5d3-0000-7000-8000-000000000001",
                "source": "refreshd",
                "type": "io.refreshd.refresh.initialized",
                "subject": "7d4c4b2a-1111-4222-8333-444455556666",
                "time": "2024-05-01T10:00:06.000Z",
                "datacontenttype": "application/json",
            })
        );
        // The trace extension is a top-level attribute, present only when known.
        let trace: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let traced = event.with_trace(Some(trace));
        let json = serde_json::to_value(&traced).unwrap();
        assert_eq!(
            json["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            serde_json::from_value::<CloudEvent<RefreshRecord>>(json).unwrap(),
            traced
        );
    }

    #[test]
    fn rejected_event() {
        let r = record();
        let request = RejectedRequest {
            consent_id: r.consent_id,
            tenant_id: r.tenant_id.clone(),
            requested_by: RequestedBy::App,
            problem: Problem::refresh_in_progress(r.refresh_id),
        };
        let event = CloudEvent::rejected(request, event_id(), at("2024-05-01T10:00:06Z"));
        assert_eq!(event.routing_key(), "refresh.rejected.acme");
        assert_eq!(event.segment(), Some("rejected"));
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "io.refreshd.refresh.rejected");
        assert_eq!(json["subject"], "7d4c4b2a-1111-4222-8333-444455556666");
        assert_eq!(
            json["data"],
            json!({
                "consentId": "7d4c4b2a-1111-4222-8333-444455556666",
                "tenantId": "acme",
                "requestedBy": "APP",
                "problem": {
                    "type": "https://tools.ietf.org/html/rfc9110#section-15.5.10",
                    "title": "Conflict",
                    "status": 409,
                    "detail": "A refresh is already in progress for this consent",
                    "code": "refresh_in_progress",
                    "refreshId": "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
                },
            })
        );
        assert_eq!(
            serde_json::from_value::<CloudEvent<RejectedRequest>>(json).unwrap(),
            event
        );
    }

    #[test]
    fn routing_keys() {
        let check = |segment: &str, tenant: &str, expected: &str| {
            assert_eq!(
                routing_key(segment, &TenantId::parse(tenant).unwrap()),
                expected
            );
        };
        check("updated", "acme", "refresh.updated.acme");
        check("error", "t-1", "refresh.error.t-1");
        check("rejected", "acme.eu", "refresh.rejected.acme.eu");
    }
}
