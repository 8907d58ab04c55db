//! `GET /v1/events`: the caller's events as server-sent events, resumable with
//! `Last-Event-ID` from the outbox rows still kept.
//!
//! A stream subscribes to the live fan-out first and replays from the outbox second,
//! so nothing published in between is lost; events seen in the replay are dropped
//! when the live feed brings them again.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use refresh_core::{ConsentId, EventId, Problem, TenantId};
use refresh_pg::ReplayedEvent;

use super::extract::{consent_id, param, query_pairs, visible_consent};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::events::{LiveEvent, Next, Subscription};
use crate::state::AppState;

/// SPEC §3: a comment every 15 s keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Outbox rows read per replay query.
const REPLAY_PAGE: u32 = 500;

/// Who may see what on one stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamFilter {
    /// `None`: every tenant (operators).
    pub(crate) tenant: Option<TenantId>,
    pub(crate) consent: Option<ConsentId>,
}

impl StreamFilter {
    fn admits(&self, event: &LiveEvent) -> bool {
        let consent = self.consent.map(|c| c.to_string());
        event.visible_to(self.tenant.as_ref(), consent.as_deref())
    }
}

/// `Last-Event-ID`, if given.
pub(crate) fn last_event_id(headers: &HeaderMap) -> Result<Option<EventId>, ApiError> {
    headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<EventId>().ok())
                .ok_or_else(|| {
                    ApiError::from(Problem::bad_request(
                        "Last-Event-ID must be the id of an event of this stream (a UUID)",
                    ))
                })
        })
        .transpose()
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    summary = "The caller's events as server-sent events (CloudEvents JSON in `data`)",
    params(
        ("consentId" = Option<String>, Query, format = Uuid, description = "Only this consent's events"),
        ("Last-Event-ID" = Option<String>, Header, format = Uuid, description = "Resume after this event (from the events still kept)")
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `id` the CloudEvent id, `event` its type, `data` the CloudEvent; a comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed `consentId` or `Last-Event-ID` (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`consentId` unknown or another tenant's (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down (`unavailable`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    principal: Principal,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri, &["consentId"])?;
    let consent = match param(&pairs, "consentId") {
        Some(raw) => Some(
            visible_consent(&state, &principal, consent_id(raw)?)
                .await?
                .consent_id,
        ),
        None => None,
    };
    let filter = StreamFilter {
        tenant: principal.scope_tenant().cloned(),
        consent,
    };
    let stream = open_stream(&state, filter, last_event_id(&headers)?).await?;
    Ok(stream.into_response())
}

/// Subscribes, reads the first replay page (so a database outage is a 503, not an
/// empty stream) and answers the stream. Shared with the portal.
pub(crate) async fn open_stream(
    state: &AppState,
    filter: StreamFilter,
    last: Option<EventId>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let subscription = state.events.subscribe();
    let mut replay = Replay {
        pending: VecDeque::new(),
        next_row: None,
        seen: HashSet::new(),
    };
    if let Some(last) = last {
        let rows = state
            .store
            .events_after(
                last,
                event_time(last),
                filter.tenant.as_ref(),
                filter.consent,
                REPLAY_PAGE,
            )
            .await?;
        replay.fill(rows);
    }
    let stream = StreamState {
        state: state.clone(),
        filter,
        subscription,
        replay,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok(event), stream))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// The time inside a UUID v7 event id: where to resume when the event itself is no
/// longer kept. Another kind of id carries no time: resume from now.
fn event_time(id: EventId) -> DateTime<Utc> {
    id.as_uuid()
        .get_timestamp()
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
        })
        .unwrap_or_else(Utc::now)
}

struct Replay {
    pending: VecDeque<ReplayedEvent>,
    /// The outbox row after which the next page starts; `None` when done.
    next_row: Option<i64>,
    /// Event ids replayed, dropped when the live feed brings them again.
    seen: HashSet<String>,
}

impl Replay {
    fn fill(&mut self, rows: Vec<(i64, ReplayedEvent)>) {
        self.next_row = if rows.len() == REPLAY_PAGE as usize {
            rows.last().map(|(id, _)| *id)
        } else {
            None
        };
        for (_, event) in rows {
            self.seen.insert(event.event_id.to_string());
            self.pending.push_back(event);
        }
    }
}

struct StreamState {
    state: AppState,
    filter: StreamFilter,
    subscription: Subscription,
    replay: Replay,
}

impl StreamState {
    /// The next SSE event; `None` ends the stream (shutdown, lagging, or a failed
    /// replay read: the client reconnects with `Last-Event-ID`).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.replay.pending.pop_front() {
                match LiveEvent::parse(&event.payload) {
                    Some(event) => return Some(sse_event(&event)),
                    None => continue,
                }
            }
            if let Some(from) = self.replay.next_row.take() {
                // Boxed: an idle stream waits in this state machine for as long as it
                // lives, and should not carry the (large) query future inline.
                let rows = Box::pin(self.state.store.events_after_row(
                    from,
                    self.filter.tenant.as_ref(),
                    self.filter.consent,
                    REPLAY_PAGE,
                ))
                .await;
                match rows {
                    Ok(rows) => {
                        self.replay.fill(rows);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(error = %refresh_core::error_chain(&error), "cannot replay events; ending the stream");
                        return None;
                    }
                }
            }
            match self.subscription.next().await {
                Next::Event(event) => {
                    if !self.filter.admits(&event) || self.replay.seen.remove(&event.id) {
                        continue;
                    }
                    return Some(sse_event(&event));
                }
                Next::Resume | Next::Closed => return None,
            }
        }
    }
}

fn sse_event(event: &LiveEvent) -> Event {
    Event::default()
        .id(event.id.as_str())
        .event(event.r#type.as_str())
        .data(event.json.as_str())
}
