//! The one way to run blocking work (storage reads and writes, fsyncs) from async code: on the
//! blocking pool of the tokio runtime the caller runs on (each actix-web worker and each actor
//! arbiter has its own), never on the async thread itself, whose other requests or actors would
//! wait.

/// A blocking task that panicked or was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("a blocking task failed: {0}")]
pub struct BlockingError(String);

/// Runs `work` on the blocking pool and waits for it.
pub async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| BlockingError(error.to_string()))
}

/// Runs `work` on the blocking pool once one of `slots` is free, holding it while `work` runs.
/// The wait is asynchronous: no blocking thread is taken until a slot is. A closed semaphore is
/// an error (the server is stopping).
pub async fn run_with_slot<T: Send + 'static>(
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingError> {
    let slot = slots
        .acquire_owned()
        .await
        .map_err(|error| BlockingError(error.to_string()))?;
    run(move || {
        let _slot = slot;
        work()
    })
    .await
}

/// Starts `work` on the blocking pool without waiting for it (a producer that streams its
/// results through a channel, say).
pub fn detach(work: impl FnOnce() + Send + 'static) {
    drop(tokio::task::spawn_blocking(work));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn work_with_a_slot_waits_for_one() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..3).map(|_| {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            run_with_slot(Arc::clone(&slots), move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            })
        });
        let ran = futures_util::future::join_all(tasks).await;
        assert!(ran.iter().all(Result::is_ok));
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "one slot, one task at a time"
        );
        assert_eq!(slots.available_permits(), 1, "the slot is given back");
        slots.close();
        assert!(run_with_slot(slots, || ()).await.is_err());
    }
}
