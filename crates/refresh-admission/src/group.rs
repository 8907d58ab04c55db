//! Group commit: items that reach the database while earlier ones are being written
//! share the next statement and its commit. A lone item is written at once, so
//! nothing waits for a batch to fill; under load each statement carries many, and
//! the database does one round trip and one WAL flush for all of them.

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// Why an item got no answer of its own.
#[derive(Debug, thiserror::Error)]
pub enum GroupError<E: std::error::Error + 'static> {
    /// The statement of its batch failed (nothing of the batch was written).
    #[error("the batch could not be written")]
    Failed(#[source] Arc<E>),
    /// The batching task is gone (the runtime is shutting down).
    #[error("the batch writer stopped")]
    Stopped,
}

type Answer<O, E> = oneshot::Sender<Result<O, GroupError<E>>>;

/// Hands items to a batching task that writes them with `write`, at most
/// `max_batch` per call and `in_flight` calls at once (one is written while the
/// next batch gathers). `write` answers one output per input, in order. Cheap to
/// clone; the task, on the tracker it was started on, finishes the statements under
/// way and ends when the last clone is dropped.
pub struct Group<I, O, E: std::error::Error + 'static> {
    queue: mpsc::UnboundedSender<(I, Answer<O, E>)>,
}

impl<I, O, E: std::error::Error + 'static> Clone for Group<I, O, E> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<I, O, E> Group<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    /// Starts the batching task on `tracker`.
    pub fn start<F, W>(tracker: &TaskTracker, max_batch: usize, in_flight: usize, write: F) -> Self
    where
        F: Fn(Vec<I>) -> W + Send + Sync + 'static,
        W: Future<Output = Result<Vec<O>, E>> + Send + 'static,
    {
        let (queue, pending) = mpsc::unbounded_channel();
        tracker.spawn(run(pending, max_batch.max(1), in_flight.max(1), write));
        Self { queue }
    }

    /// Writes `item` in one statement with whatever else is waiting; its output.
    pub async fn submit(&self, item: I) -> Result<O, GroupError<E>> {
        let (done, answer) = oneshot::channel();
        self.queue
            .send((item, done))
            .map_err(|_| GroupError::Stopped)?;
        answer.await.unwrap_or(Err(GroupError::Stopped))
    }
}

/// Gathers batches while fewer than `in_flight` statements are under way, and drives
/// those statements itself; once every handle is gone, finishes them and returns.
async fn run<I, O, E, F, W>(
    mut pending: mpsc::UnboundedReceiver<(I, Answer<O, E>)>,
    max_batch: usize,
    in_flight: usize,
    write: F,
) where
    I: Send + 'static,
    O: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(Vec<I>) -> W + Send + Sync + 'static,
    W: Future<Output = Result<Vec<O>, E>> + Send + 'static,
{
    let mut writing = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = writing.next(), if !writing.is_empty() => {}
            first = pending.recv(), if writing.len() < in_flight => {
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match pending.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (items, waiters): (Vec<I>, Vec<Answer<O, E>>) = batch.into_iter().unzip();
                writing.push(answer(write(items), waiters));
            }
        }
    }
    while writing.next().await.is_some() {}
}

/// Awaits one statement and hands each waiter its output, or the batch's failure.
async fn answer<O, E, W>(written: W, waiters: Vec<Answer<O, E>>)
where
    E: std::error::Error + Send + Sync + 'static,
    W: Future<Output = Result<Vec<O>, E>>,
{
    match written.await {
        Ok(outputs) if outputs.len() == waiters.len() => {
            for (done, output) in waiters.into_iter().zip(outputs) {
                let _ = done.send(Ok(output));
            }
        }
        // A writer that answers a different count is a bug; its waiters are told the
        // writer stopped rather than paired with the wrong output.
        Ok(_) => {
            tracing::error!("a batch writer answered a different number of items");
        }
        Err(error) => {
            let error = Arc::new(error);
            for done in waiters {
                let _ = done.send(Err(GroupError::Failed(error.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[tokio::test]
    async fn concurrent_items_share_a_batch_and_each_gets_its_own_output() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let group: Group<u32, u32, Boom> =
            Group::start(&TaskTracker::new(), 8, 1, move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.len());
                async move {
                    tokio::task::yield_now().await;
                    Ok(items.iter().map(|i| i * 10).collect())
                }
            });
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let group = group.clone();
                tokio::spawn(async move { group.submit(i).await.unwrap() })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), u32::try_from(i).unwrap() * 10);
        }
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(sizes.len() < 20, "some items shared a batch: {sizes:?}");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items_and_the_next_batch_goes_on() {
        let group: Group<u32, u32, Boom> =
            Group::start(&TaskTracker::new(), 8, 1, |items: Vec<u32>| async move {
                if items.contains(&13) {
                    Err(Boom)
                } else {
                    Ok(items)
                }
            });
        assert!(matches!(group.submit(13).await, Err(GroupError::Failed(_))));
        assert_eq!(group.submit(7).await.unwrap(), 7);
    }
}
