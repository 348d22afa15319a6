//! The one way to run blocking work (storage reads and writes, fsyncs) from async code: on
//! tokio's blocking pool, which actix's own `web::block` uses too, so HTTP handlers, actors and
//! start-up share one bounded pool.

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

/// Starts `work` on the blocking pool without waiting for it (a producer that streams its
/// results through a channel, say).
pub fn detach(work: impl FnOnce() + Send + 'static) {
    drop(tokio::task::spawn_blocking(work));
}
