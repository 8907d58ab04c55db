//! Idempotency keys of both channels (SPEC §3 `Idempotency-Key`, §4 `message_id`):
//! how long a reservation and an answer stand, which decisions are remembered, and
//! the release of a reservation whose request was not decided for good.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use refresh_admission::{Decision, Group, GroupError};
use refresh_core::{ProblemCode, TenantId};
use refresh_pg::{KeyReservation, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a reservation of an idempotency key stands without an answer: longer
/// than any answer takes (the longest `Prefer: wait` plus the admission's own
/// timeouts). A reservation older than this belongs to a process that died before it
/// answered, and the next request with the key takes it over.
const KEY_LEASE: TimeDelta = TimeDelta::seconds(90);

/// How long an answer stays remembered for its key (SPEC §3).
const KEY_TTL: TimeDelta = TimeDelta::hours(24);
/// How often a release that failed is tried again, within the reservation's lease.
const RELEASE_RETRY: Duration = Duration::from_millis(500);

/// Reservations per statement at most, and statements at once.
const RESERVE_BATCH: usize = 128;
const RESERVE_IN_FLIGHT: usize = 2;

/// Reserves idempotency keys for one channel, the reservations that arrive while
/// others are being written sharing the next statement and commit
/// ([`Store::reserve_keys`]): under load a reservation costs the database a share of
/// a round trip instead of one of its own.
#[derive(Clone)]
pub struct KeyReserver {
    group: Group<(TenantId, String), KeyReservation, StoreError>,
}

impl std::fmt::Debug for KeyReserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyReserver").finish_non_exhaustive()
    }
}

impl KeyReserver {
    /// Starts the batching task on `tracker`.
    pub fn start(store: Store, tracker: &TaskTracker) -> Self {
        let group = Group::start(
            tracker,
            RESERVE_BATCH,
            RESERVE_IN_FLIGHT,
            move |keys: Vec<(TenantId, String)>| {
                let store = store.clone();
                async move {
                    let now = Utc::now();
                    store
                        .reserve_keys(&keys, now, now - KEY_TTL, now - KEY_LEASE)
                        .await
                }
            },
        );
        Self { group }
    }

    /// [`Store::reserve_key`] for `key` of `tenant`, at the time its batch is written.
    pub(crate) async fn reserve(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> Result<KeyReservation, GroupError<StoreError>> {
        self.group.submit((tenant.clone(), key.to_owned())).await
    }
}

/// Releases the reservations of idempotency keys whose requests were not decided for
/// good, so that a retry with the key is decided afresh. When the database is what
/// failed the request, the release fails too: it is then tried again in the
/// background, on the role's tracker, every [`RELEASE_RETRY`] until it succeeds, the
/// lease runs out or the role stops (the key then stays reserved until its lease
/// ends, as after a crash). A release is fenced by the reservation's time, so it
/// never touches a later holder's. Without the retries, a retry of the request after
/// an outage of a few seconds would find the key still reserved, and wait or back
/// off until the lease ran out.
#[derive(Clone)]
pub struct KeyReleases {
    store: Store,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for KeyReleases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyReleases").finish_non_exhaustive()
    }
}

impl KeyReleases {
    pub fn new(store: Store, tracker: &TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            store,
            tracker: tracker.clone(),
            shutdown,
        }
    }

    /// Releases `key` of `tenant` reserved at `fence`, now or in the background.
    pub(crate) async fn release(&self, tenant: &TenantId, key: &str, fence: refresh_pg::KeyFence) {
        let Err(error) = self.store.release_key(tenant, key, fence).await else {
            return;
        };
        tracing::warn!(error = %error, "cannot release an idempotency key yet; trying again");
        let (store, tenant, key) = (self.store.clone(), tenant.clone(), key.to_owned());
        let shutdown = self.shutdown.clone();
        let deadline = tokio::time::Instant::now() + KEY_LEASE.to_std().unwrap_or_default();
        self.tracker.spawn(async move {
            while tokio::time::Instant::now() < deadline {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RELEASE_RETRY) => {}
                }
                if store.release_key(&tenant, &key, fence).await.is_ok() {
                    return;
                }
            }
            tracing::warn!("an idempotency key stays reserved until its lease ends");
        });
    }
}

/// Whether a decision is remembered for its idempotency key (SPEC §3): an admission,
/// or a refusal that cannot change (the consent is unknown, or revoked, expired or
/// inactive, which no later request undoes; a request the gate finds malformed). A
/// refusal that may change (`refresh_in_progress`, `daily_limit_reached`,
/// `backlog_full`, `unavailable`) is not: a retry with the same key is decided afresh.
pub(crate) fn remembered(decision: &Decision) -> bool {
    match decision {
        Decision::Admitted(_) => true,
        Decision::Refused(problem) => matches!(
            problem.code,
            ProblemCode::ConsentNotFound
                | ProblemCode::ConsentRevoked
                | ProblemCode::ConsentExpired
                | ProblemCode::ConsentInactive
                | ProblemCode::BadRequest
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refresh_core::Problem;

    fn check(code: ProblemCode, expected: bool) {
        let decision = Decision::Refused(Problem::new(code, "x"));
        assert_eq!(remembered(&decision), expected, "{code:?}");
    }

    #[test]
    fn only_refusals_that_cannot_change_are_remembered() {
        check(ProblemCode::ConsentNotFound, true);
        check(ProblemCode::ConsentRevoked, true);
        check(ProblemCode::ConsentExpired, true);
        check(ProblemCode::ConsentInactive, true);
        check(ProblemCode::BadRequest, true);
        check(ProblemCode::RefreshInProgress, false);
        check(ProblemCode::DailyLimitReached, false);
        check(ProblemCode::BacklogFull, false);
        check(ProblemCode::Unavailable, false);
        check(ProblemCode::Internal, false);
    }
}
