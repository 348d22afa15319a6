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

/// Starts `work` on the blocking pool without waiting for it (a producer that streams its
/// results through a channel, say).
pub fn detach(work: impl FnOnce() + Send + 'static) {
    drop(tokio::task::spawn_blocking(work));
}
