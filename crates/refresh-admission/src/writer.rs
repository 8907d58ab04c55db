//! Group commit of admissions ([`crate::group`]): the admissions that reach the
//! database while earlier ones are being written share the next statement and its
//! commit (`refresh_pg::write_admissions`).
//!
//! A statement whose connection broke after it was sent may have committed. Its
//! admissions are not answered until that is known: the writer asks the database
//! which of them were written ([`Store::written_admissions`], batched too) until it
//! answers, so an admission that committed is answered as admitted and one that did
//! not is answered as failed, whose gate may then be undone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use refresh_core::RefreshId;
use refresh_pg::{Admission, Store, StoreError, Written};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::group::{Group, GroupError};

/// Admissions per statement at most.
const MAX_BATCH: usize = 128;
/// Statements in flight at once: one is written while the next batch gathers.
const IN_FLIGHT: usize = 4;
/// How long an admission in doubt asks whether it was written before it gives up
/// (its caller then gets 503 and its gate is kept until its lease runs out): as long
/// as the longest wait an HTTP caller is ever asked for (`Prefer: wait=60`).
const IN_DOUBT_PATIENCE: Duration = Duration::from_secs(60);
/// The first pause between two questions, doubled up to [`IN_DOUBT_PAUSE_MAX`].
const IN_DOUBT_PAUSE: Duration = Duration::from_millis(100);
const IN_DOUBT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Why an admission could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A gate rebuild began after the state that admitted it.
    #[error("the gate's state was rebuilt after this admission was decided")]
    StaleGate,
    /// Another refresh of the consent is still INITIALIZED.
    #[error("another refresh of the consent is in flight")]
    InFlight,
    /// The consent may not be refreshed: gone, of another tenant, not ACTIVE or
    /// expired (the gate decided on stale mirrored facts).
    #[error("the consent may not be refreshed")]
    ConsentRefused,
    /// The statement of its batch failed (nothing of the batch was written).
    #[error("the admissions could not be written")]
    Failed(#[source] Arc<StoreError>),
    /// The statement of its batch lost its connection once sent, and the database
    /// could not be asked within [`IN_DOUBT_PATIENCE`] (or before the role stopped)
    /// whether it committed.
    #[error("whether the admission was written is unknown")]
    InDoubt(#[source] Arc<StoreError>),
}

/// Hands admissions to the batching task ([`Group`]). Cheap to clone; the task ends
/// when the last clone is dropped (and the statements under way are answered).
#[derive(Clone)]
pub struct AdmissionWriter {
    group: Group<Admission, Written, StoreError>,
    /// Asks which admissions in doubt were written, many at a time.
    written: Group<RefreshId, bool, StoreError>,
}

impl AdmissionWriter {
    /// Starts the batching task on `tracker`.
    pub fn start(store: Store, tracker: &TaskTracker) -> Self {
        let writing = store.clone();
        let group = Group::start(
            tracker,
            MAX_BATCH,
            IN_FLIGHT,
            move |admissions: Vec<Admission>| {
                let store = writing.clone();
                async move { store.admit_many(&admissions).await }
            },
        );
        let written = Group::start(tracker, MAX_BATCH, 1, move |ids: Vec<RefreshId>| {
            let store = store.clone();
            async move {
                let found: HashSet<RefreshId> = store.written_admissions(&ids).await?;
                Ok(ids.iter().map(|id| found.contains(id)).collect())
            }
        });
        Self { group, written }
    }

    /// Writes `admission`, in one statement with whatever else is waiting.
    pub async fn write(&self, admission: Admission) -> Result<(), WriteError> {
        let refresh_id = admission.record.refresh_id;
        match self.group.submit(admission).await {
            Ok(Written::Admitted) => Ok(()),
            Ok(Written::StaleGate) => Err(WriteError::StaleGate),
            Ok(Written::InFlight) => Err(WriteError::InFlight),
            Ok(Written::ConsentRefused) => Err(WriteError::ConsentRefused),
            Err(GroupError::Failed(error)) if matches!(*error, StoreError::InDoubt(_)) => {
                self.resolve(refresh_id, error).await
            }
            Err(GroupError::Failed(error)) => Err(WriteError::Failed(error)),
            Err(GroupError::Stopped) => Err(stopped()),
        }
    }

    /// Whether the admission whose statement failed with `error` (in doubt) was
    /// written after all: asked until the database answers or the patience ends. Not
    /// found means not written: its statement was refused it (another refresh in
    /// flight, a stale gate) or never committed; either way it is answered as failed.
    async fn resolve(
        &self,
        refresh_id: RefreshId,
        error: Arc<StoreError>,
    ) -> Result<(), WriteError> {
        let give_up = Instant::now() + IN_DOUBT_PATIENCE;
        let mut pause = IN_DOUBT_PAUSE;
        loop {
            match self.written.submit(refresh_id).await {
                Ok(true) => {
                    tracing::warn!(%refresh_id, error = %error, "an admission's statement lost its answer; it was written");
                    return Ok(());
                }
                Ok(false) => {
                    tracing::warn!(%refresh_id, error = %error, "an admission's statement lost its answer; it was not written");
                    return Err(WriteError::Failed(error));
                }
                Err(GroupError::Stopped) => {
                    tracing::error!(%refresh_id, "the ingress stopped before it could tell whether an admission was written; its gate is kept until its lease runs out");
                    return Err(WriteError::InDoubt(error));
                }
                Err(GroupError::Failed(asked)) => {
                    if Instant::now() + pause > give_up {
                        tracing::error!(%refresh_id, error = %asked, "cannot tell whether an admission was written; its gate is kept until its lease runs out");
                        return Err(WriteError::InDoubt(error));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(IN_DOUBT_PAUSE_MAX);
                }
            }
        }
    }
}

fn stopped() -> WriteError {
    WriteError::Failed(Arc::new(StoreError::Corrupt(
        "the admission writer stopped".to_owned(),
    )))
}
