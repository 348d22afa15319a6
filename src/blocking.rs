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

/// A blocking pool of its own, for work that may wait long on something outside the server
/// (the object store): at most `threads` such tasks run at once, and they never take the threads
/// of the runtime that started them. Tasks beyond that wait in the pool's queue.
pub struct Pool {
    /// Never driven: only its blocking pool is used. `None` once finished.
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
}

impl Pool {
    /// A thread idle for `keep_alive` exits; periodic work should find its threads still there
    /// (threads that come and go leave the allocator's pages behind, docs/decisions/0041).
    pub fn new(
        name: &str,
        threads: usize,
        keep_alive: std::time::Duration,
    ) -> std::io::Result<Pool> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name(name)
            .max_blocking_threads(threads.max(1))
            .thread_keep_alive(keep_alive)
            .build()?;
        Ok(Pool {
            runtime: std::sync::Mutex::new(Some(runtime)),
        })
    }

    /// Starts `work` on the pool; the future waits for it (and may be awaited on any runtime).
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, BlockingError>> + Send + 'static {
        let task = (self.runtime().as_ref()).map(|runtime| runtime.spawn_blocking(work));
        async move {
            match task {
                Some(task) => task.await.map_err(|error| BlockingError(error.to_string())),
                None => Err(BlockingError("the pool is shut down".into())),
            }
        }
    }

    /// Refuses new tasks and waits up to `wait` for the running ones (shutdown). Blocking.
    pub fn finish(&self, wait: std::time::Duration) {
        let runtime = self.runtime().take();
        if let Some(runtime) = runtime {
            runtime.shutdown_timeout(wait);
        }
    }

    fn runtime(&self) -> std::sync::MutexGuard<'_, Option<tokio::runtime::Runtime>> {
        (self.runtime.lock()).unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropping a runtime waits for its blocking threads, which is not allowed on an async
        // thread (where the last owner may be); unless `finish` ran, tasks end on their own.
        let runtime = (self.runtime.get_mut())
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

/// Counts how many of its tasks run at once, for tests of the pools' bounds.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct ConcurrencyProbe {
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(test)]
impl ConcurrencyProbe {
    /// A task that runs for `millis`, counted while it runs.
    pub(crate) fn task(&self, millis: u64) -> impl FnOnce() + Send + 'static {
        use std::sync::atomic::Ordering;
        let probe = self.clone();
        move || {
            let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            probe.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(millis));
            probe.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The most tasks that ran at once.
    pub(crate) fn most(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_pool_runs_at_most_its_threads_at_once() {
        let pool = Pool::new("test-pool", 2, std::time::Duration::from_secs(1)).unwrap();
        let probe = ConcurrencyProbe::default();
        let tasks = (0..6).map(|_| pool.run(probe.task(20)));
        let ran = futures_util::future::join_all(tasks).await;
        assert!(ran.iter().all(Result::is_ok));
        let most = probe.most();
        assert!(most <= 2, "{most} tasks at once on a pool of two threads");
        let pool = run(move || {
            pool.finish(std::time::Duration::from_secs(5));
            pool
        })
        .await
        .unwrap();
        assert!(
            pool.run(|| ()).await.is_err(),
            "a finished pool refuses work"
        );
        // On this async thread, without blocking it.
        drop(pool);
    }
}
