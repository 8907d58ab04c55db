//! The rows an admission writes (record, INITIALIZED event, job), for tests that write
//! them through the store themselves: to hold one open, to race a rebuild, or to
//! publish a job their own way.

use chrono::{DateTime, Utc};
use refresh_core::{
    CloudEvent, ConsentId, EventId, Job, ProviderId, RefreshId, RefreshRecord, RequestedBy,
    TenantId, TraceContext,
};
use refresh_pg::{Admission, OutboxEvent};

/// An admission of an `acme` consent of the simulated bank, by `API`.
pub struct AdmissionRows {
    pub record: RefreshRecord,
    pub event: OutboxEvent,
    /// The job as the relay publishes it.
    pub job: Vec<u8>,
    pub trace: Option<TraceContext>,
}

impl AdmissionRows {
    /// Refresh `refresh_id` of `consent`, requested `now`, starting at `not_before`.
    pub fn new(
        refresh_id: RefreshId,
        consent: ConsentId,
        now: DateTime<Utc>,
        not_before: DateTime<Utc>,
        trace: Option<TraceContext>,
    ) -> Self {
        let tenant = TenantId::parse("acme").expect("valid tenant");
        let record = RefreshRecord::initialized(
            refresh_id,
            consent,
            tenant.clone(),
            RequestedBy::Api,
            now,
            not_before,
        );
        let event = CloudEvent::refresh(&record, EventId::from_uuid(uuid::Uuid::now_v7()), now)
            .with_trace(trace);
        let event = OutboxEvent {
            event_id: event.id,
            routing_key: event.routing_key(),
            payload: serde_json::to_value(&event).expect("an event serialises"),
        };
        let job = Job {
            refresh_id,
            consent_id: consent,
            tenant_id: tenant,
            provider_id: ProviderId::parse("sim").expect("valid provider"),
            requested_by: RequestedBy::Api,
            initial: false,
            not_before,
            traceparent: trace,
        };
        Self {
            record,
            event,
            job: job.to_bytes(),
            trace,
        }
    }

    /// A fresh refresh of `consent` requested and starting now.
    pub fn now(consent: ConsentId) -> Self {
        let now = Utc::now();
        Self::new(
            RefreshId::from_uuid(uuid::Uuid::now_v7()),
            consent,
            now,
            now,
            None,
        )
    }

    /// The rows for [`refresh_pg::write_admission`], decided on gate state `epoch`
    /// (`i64::MAX`: no rebuild since).
    pub fn admission(&self, epoch: i64) -> Admission {
        Admission {
            record: self.record.clone(),
            initial: false,
            traceparent: self.trace,
            event: self.event.clone(),
            job: self.job.clone(),
            epoch,
            key: None,
        }
    }
}
