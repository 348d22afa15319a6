//! The storage upkeep thread: keeps memtables bounded, and frees what the engine lets go of.
//!
//! Two jobs that must stay off the log writer thread: each can take tens of milliseconds, and
//! every request queued behind the writer would wait with it (docs/decisions/0013).
//!
//! - **Sealing.** fjall seals an outgrown memtable from its background workers, which may be
//!   busy with a long compaction: active memtables then grow far past their size. Sealing them
//!   after each commit on the log writer would bound them, but a seal waits for the journal
//!   lock and runs the engine's journal and version maintenance. This thread seals instead
//!   ([`Storage::bound_memtables`]).
//! - **Freeing.** fjall frees a flushed memtable in whichever thread drops the last reference
//!   to it: often its own version maintenance, holding the keyspace's version lock that every
//!   read needs, or the log writer itself when its dedup lookup held the last snapshot. Freeing
//!   a memtable frees each of its skiplist's nodes, one by one. So this thread holds a reference
//!   to every memtable it sees active: fjall's drops then only count down, and the last
//!   reference, and with it the work, falls here. Compacted tables are not held the same way
//!   (so that their files would be deleted here): that costs peak RSS for no latency gain.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fjall::AbstractTree;

use super::Storage;

/// How often memtables are checked: sealed when outgrown, freed when only this thread holds
/// them.
const TICK: Duration = Duration::from_millis(10);

/// Handle to the upkeep thread. Dropping it stops and joins the thread.
pub struct Upkeep {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upkeep {
    /// Starts the thread. `writes` is the log writer's health flag: without upkeep, memtables
    /// would grow without bound, so writes stop if the thread dies.
    pub fn start(storage: Storage, writes: Arc<AtomicBool>) -> std::io::Result<Upkeep> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("storage-upkeep".into())
            .spawn(move || {
                let _watch = storage.health.watch("storage-upkeep", Some(writes));
                run(&storage, &stopped)
            })?;
        Ok(Upkeep {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("storage upkeep thread panicked");
            }
        }
    }
}

/// The thread's loop; runs until `stopped` is sent to or disconnected.
fn run(storage: &Storage, stopped: &Receiver<()>) {
    // Every memtable seen active, until this is its last reference. (The element type is the
    // engine's, inferred.)
    let mut memtables = Vec::new();
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
        storage.health.checkpoint("storage-upkeep");
        for (keyspace, _) in storage.keyspaces() {
            let active = keyspace.tree.active_memtable();
            if !memtables.iter().any(|held| Arc::ptr_eq(held, &active)) {
                memtables.push(active);
            }
        }
        if let Err(error) = storage.bound_memtables() {
            tracing::warn!(%error, "sealing an outgrown memtable failed");
        }
        // Dropping the last reference frees the memtable, here.
        memtables.retain(|held| Arc::strong_count(held) > 1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    /// Writes past a memtable's size and reads everything back after the memtables were sealed,
    /// flushed and let go of; then stops the thread.
    #[test]
    fn seals_outgrown_memtables_and_keeps_data_readable() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let upkeep = Upkeep::start(storage.clone(), Arc::new(AtomicBool::new(true))).unwrap();
        let value = vec![7u8; 64 << 10];
        // 12 MiB into `meta`, whose memtables hold 4 MiB.
        for i in 0u32..192 {
            storage.meta.insert(i.to_be_bytes(), &value).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let sealed = || {
            storage.meta.tree.table_count() >= 2
                && storage.meta.tree.active_memtable().size() <= 4 << 20
        };
        while !sealed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            storage.meta.tree.table_count() >= 2,
            "memtables were not sealed and flushed"
        );
        assert!(storage.meta.tree.active_memtable().size() <= 4 << 20);
        storage.meta.major_compact().unwrap();
        for i in 0u32..192 {
            assert_eq!(
                storage.meta.get(i.to_be_bytes()).unwrap().unwrap().len(),
                64 << 10
            );
        }
        drop(upkeep);
    }
}
