//! Whether the storage threads are alive. A background thread that dies (a panic in dedup
//! ingestion, memtable upkeep, log reclaim, a purge, the dedup filter builder) must never fail
//! silently: its [`PanicWatch`] logs the thread's name, records it here for `/readyz`, and,
//! for a thread the log writer's guarantees depend on, clears the writer's health flag so that
//! no later write is acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The storage threads that have died, by name. Shared by every clone of a `Storage`.
#[derive(Default)]
pub struct ThreadHealth {
    failed: Mutex<Vec<&'static str>>,
    /// Test hook: the named thread panics at its next [`ThreadHealth::checkpoint`].
    #[cfg(test)]
    inject: Mutex<Option<&'static str>>,
}

impl ThreadHealth {
    /// Threads that have died, in the order they did.
    pub fn failed(&self) -> Vec<&'static str> {
        self.failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A watch for the calling thread, named `name`, to keep on its stack while it runs.
    /// `writes` is the log writer's health flag for a thread its guarantees depend on.
    pub fn watch(
        self: &Arc<Self>,
        name: &'static str,
        writes: Option<Arc<AtomicBool>>,
    ) -> PanicWatch {
        PanicWatch {
            name,
            health: Arc::clone(self),
            writes,
        }
    }

    /// Where a watched thread's loop may be made to panic by a test; nothing otherwise.
    #[inline]
    pub fn checkpoint(&self, name: &'static str) {
        #[cfg(test)]
        {
            let mut inject = self
                .inject
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *inject == Some(name) {
                *inject = None;
                drop(inject);
                panic!("injected panic in the {name} thread");
            }
        }
        #[cfg(not(test))]
        let _ = name;
    }

    /// Makes the thread `name` panic at its next checkpoint.
    #[cfg(test)]
    pub fn inject_panic(&self, name: &'static str) {
        *self
            .inject
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(name);
    }
}

/// Records its thread's death if the thread unwinds through it.
pub struct PanicWatch {
    name: &'static str,
    health: Arc<ThreadHealth>,
    writes: Option<Arc<AtomicBool>>,
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(writes) = &self.writes {
            writes.store(false, Ordering::Release);
        }
        crate::telemetry::storage_thread_panicked(self.name);
        tracing::error!(
            thread = self.name,
            refusing_writes = self.writes.is_some(),
            "storage thread panicked; /readyz reports it until the server is restarted"
        );
        self.health
            .failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.name);
    }
}
