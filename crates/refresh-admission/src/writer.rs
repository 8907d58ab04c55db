//! Group commit of admissions: the admissions that reach the database while earlier
//! ones are being written share the next statement and its commit
//! (`refresh_pg::write_admissions`). A lone admission is written at once, so nothing
//! waits for a batch to fill; under load each commit carries many, and the database
//! does one round trip and one WAL flush for all of them.

use std::sync::Arc;

use refresh_pg::{Admission, Store, StoreError, Written};
use tokio::sync::{Semaphore, mpsc, oneshot};

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

struct Pending {
    admission: Admission,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// Hands admissions to the batching task. Cheap to clone; the task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct AdmissionWriter {
    queue: mpsc::UnboundedSender<Pending>,
}

impl AdmissionWriter {
    /// Starts the batching task on the current runtime.
    pub fn start(store: Store) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(store, pending));
        Self { queue }
    }

    /// Writes `admission`, in one statement with whatever else is waiting.
    pub async fn write(&self, admission: Admission) -> Result<(), WriteError> {
        let (done, answer) = oneshot::channel();
        let closed = || {
            WriteError::Failed(Arc::new(StoreError::Corrupt(
                "the admission writer stopped".to_owned(),
            )))
        };
        self.queue
            .send(Pending { admission, done })
            .map_err(|_| closed())?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }
}

async fn run(store: Store, mut pending: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = pending.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            let (admissions, waiters): (Vec<Admission>, Vec<_>) =
                batch.into_iter().map(|p| (p.admission, p.done)).unzip();
            match store.admit_many(&admissions).await {
                Ok(outcomes) => {
                    for (done, written) in waiters.into_iter().zip(outcomes) {
                        let _ = done.send(match written {
                            Written::Admitted => Ok(()),
                            Written::StaleGate => Err(WriteError::StaleGate),
                            Written::InFlight => Err(WriteError::InFlight),
                        });
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for done in waiters {
                        let _ = done.send(Err(WriteError::Failed(error.clone())));
                    }
                }
            }
            drop(slot);
        });
    }
}
