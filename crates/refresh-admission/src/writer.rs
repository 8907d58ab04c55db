//! Group commit of admissions ([`crate::group`]): the admissions that reach the
//! database while earlier ones are being written share the next statement and its
//! commit (`refresh_pg::write_admissions`).

use std::sync::Arc;

use refresh_pg::{Admission, Store, StoreError, Written};
use tokio_util::task::TaskTracker;

use crate::group::{Group, GroupError};

/// Admissions per statement at most.
const MAX_BATCH: usize = 128;
/// Statements in flight at once: one is written while the next batch gathers.
const IN_FLIGHT: usize = 4;

/// Why an admission could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A gate rebuild began after the state that admitted it.
    #[error("the gate's state was rebuilt after this admission was decided")]
    StaleGate,
    /// Another refresh of the consent is still INITIALIZED.
    #[error("another refresh of the consent is in flight")]
    InFlight,
    /// The statement of its batch failed (nothing of the batch was written).
    #[error("the admissions could not be written")]
    Failed(#[source] Arc<StoreError>),
}

/// Hands admissions to the batching task ([`Group`]). Cheap to clone; the task ends
/// when the last clone is dropped (and the statements under way are answered).
#[derive(Clone)]
pub struct AdmissionWriter {
    group: Group<Admission, Written, StoreError>,
}

impl AdmissionWriter {
    /// Starts the batching task on `tracker`.
    pub fn start(store: Store, tracker: &TaskTracker) -> Self {
        let group = Group::start(
            tracker,
            MAX_BATCH,
            IN_FLIGHT,
            move |admissions: Vec<Admission>| {
                let store = store.clone();
                async move { store.admit_many(&admissions).await }
            },
        );
        Self { group }
    }

    /// Writes `admission`, in one statement with whatever else is waiting.
    pub async fn write(&self, admission: Admission) -> Result<(), WriteError> {
        match self.group.submit(admission).await {
            Ok(Written::Admitted) => Ok(()),
            Ok(Written::StaleGate) => Err(WriteError::StaleGate),
            Ok(Written::InFlight) => Err(WriteError::InFlight),
            Err(GroupError::Failed(error)) => Err(WriteError::Failed(error)),
            Err(GroupError::Stopped) => Err(WriteError::Failed(Arc::new(StoreError::Corrupt(
                "the admission writer stopped".to_owned(),
            )))),
        }
    }
}
