//! Storage: fjall databases under the data dir, one keyspace per concern.
//!
//! - `log`: the durable event log. Key `tenant ‖ first sequence` (both big-endian u64), value a
//!   [`crate::event::LogBatch`] (see [`codec`]). Written only by the [`log::LogWriter`] thread.
//! - `dedup`: `xxh3-128(messageId, tenant)` → first-seen time ‖ tenant; see [`dedup`] and
//!   [`dedup_ingest`], the thread that writes it. It lives in a database of its own (directory
//!   [`DEDUP_DIR`] inside the main one), because fjall holds a database's journal lock while it
//!   finishes a bulk ingestion, fsync of the new table included: with the dedup keyspace in the
//!   main database, every run of keys stalled the log writer's appends for 10–46 ms. Data dirs
//!   of earlier versions, with `dedup` in the main database, are moved over at open.
//! - `meta`: tenants, the admin token digest, tombstones of deleted tenants; see [`meta`].
//! - `rollup_counts`, `rollup_users`: per-bucket counts and distinct-user sketches; see
//!   [`rollups`].
//!
//! The main database runs with manual journal persistence: the log writer decides when to flush
//! and fsync (group commit), and metadata writes persist themselves. Nothing writes the dedup
//! database's journal: its keys arrive by bulk ingestion only.
//!
//! There is no way back to a version from before the dedup database: it would not look in
//! `db/dedup` and would count retries of earlier events again.

pub mod codec;
pub mod dedup;
pub mod dedup_filter;
pub mod dedup_ingest;
pub mod health;
pub mod log;
pub mod meta;
pub mod rollups;
pub mod upkeep;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::tenant::TenantId;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("storage engine error while {context}: {source}")]
    Engine {
        context: &'static str,
        #[source]
        source: fjall::Error,
    },
    #[error("cannot open storage at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("corrupt value in `{keyspace}`: {source}")]
    Codec {
        keyspace: &'static str,
        #[source]
        source: codec::CodecError,
    },
    #[error("the write could not be made durable: {0}")]
    NotDurable(String),
    #[error("the log writer is not running")]
    WriterStopped,
    #[error("the log writer queue is full")]
    QueueFull,
    #[error("tenant {0} has been deleted")]
    TenantDeleted(TenantId),
}

impl StorageError {
    pub(crate) fn engine(context: &'static str) -> impl FnOnce(fjall::Error) -> StorageError {
        move |source| StorageError::Engine { context, source }
    }
}

/// Memtable size of each keyspace. fjall keeps up to 4 sealed memtables per keyspace waiting to
/// be flushed besides the active one, so these bound the memory writes can take: with fjall's
/// 64 MiB default, the log and the rollup sketches alone reached 1.4 GB of RSS under load from
/// 100 tenants. Smaller memtables mean more, smaller tables to compact, which costs little here
/// (10M events over 100 tenants: 16 MiB log and sketch memtables 93k events/s, peak RSS 611 MiB;
/// 8 MiB 90k events/s, 512 MiB).
const LOG_MEMTABLE_BYTES: u64 = 8 << 20;
/// The dedup keyspace is written by bulk ingestion only: its memtable stays empty.
const DEDUP_MEMTABLE_BYTES: u64 = 4 << 20;
const ROLLUP_MEMTABLE_BYTES: u64 = 8 << 20;
const SMALL_MEMTABLE_BYTES: u64 = 4 << 20;

fn memtable(bytes: u64) -> impl FnOnce() -> KeyspaceCreateOptions {
    move || KeyspaceCreateOptions::default().max_memtable_size(bytes)
}

/// Directory of the dedup keyspace's database, inside the main database's directory.
pub const DEDUP_DIR: &str = "dedup";
/// Table files both databases keep open together unless told otherwise (fjall's default is 900
/// for one database); the server sets it from its descriptor budget (`crate::descriptors`).
pub const DEFAULT_OPEN_FILES: usize = 900;

/// Background worker threads of each database: fjall's default (one per core, at most 4), but
/// at least 3. With more than one worker, fjall's worker 0 leaves compactions to the others and
/// puts each compaction request it receives back into the queue, so while the only other worker
/// of a 2-core machine compacted, worker 0 took the same request again and again: that loop was
/// about 5% of the server's CPU at full load. A third worker takes the request instead.
fn engine_workers() -> usize {
    std::thread::available_parallelism().map_or(3, |cores| cores.get().clamp(3, 4))
}

/// Handles to the databases and their keyspaces. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    db: Database,
    /// Holds only `dedup`, which is written by bulk ingestion (no journal); kept open as long
    /// as the handles.
    _dedup_db: Database,
    pub log: Keyspace,
    pub dedup: Keyspace,
    pub meta: Keyspace,
    pub rollup_counts: Keyspace,
    pub rollup_users: Keyspace,
    /// Tenants' dedup windows, read by the dedup expiry compaction filter.
    pub dedup_windows: dedup::DedupWindows,
    /// Per-tenant lock that fences rollup flushes and deletions (see [`rollups::flush`]).
    rollup_locks: Arc<dashmap::DashMap<TenantId, Arc<std::sync::Mutex<()>>>>,
    /// The background compaction that gives back purged log entries' space.
    log_reclaim: Arc<LogReclaim>,
    /// Which storage threads have died.
    pub health: Arc<health::ThreadHealth>,
}

impl Storage {
    /// Opens (or creates) the database at `path`. `dedup_windows` feeds the compaction filter
    /// that expires old dedup entries.
    pub fn open(
        path: &Path,
        cache_bytes: u64,
        dedup_windows: dedup::DedupWindows,
    ) -> Result<Storage, StorageError> {
        Self::open_with_files(path, cache_bytes, dedup_windows, DEFAULT_OPEN_FILES)
    }

    /// [`Storage::open`], keeping at most `open_files` table files open (7/9 of them for the
    /// main database, 2/9 for the dedup keys; at least 10 each).
    pub fn open_with_files(
        path: &Path,
        cache_bytes: u64,
        dedup_windows: dedup::DedupWindows,
        open_files: usize,
    ) -> Result<Storage, StorageError> {
        // fjall panics below 10 files.
        let dedup_files = (open_files * 2 / 9).max(10);
        let main_files = open_files.saturating_sub(dedup_files).max(10);
        let open_error = |source| StorageError::Open {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(|e| open_error(fjall::Error::Io(e)))?;
        // A quarter of the block cache for the dedup tables: most lookups are answered by the
        // in-memory key filter (`dedup_filter`).
        let dedup_cache = cache_bytes / 4;
        let db = Database::builder(path)
            .cache_size(cache_bytes - dedup_cache)
            .max_cached_files(Some(main_files))
            .manual_journal_persist(true)
            // Log entries arrive compressed (codec format 3) and the rest is small or dense
            // sketches: compressing the journal again cost the log writer thread CPU for nothing.
            .journal_compression(fjall::CompressionType::None)
            .worker_threads(engine_workers())
            .open()
            .map_err(open_error)?;
        let dedup_db = Database::builder(path.join(DEDUP_DIR))
            .cache_size(dedup_cache)
            .worker_threads(engine_workers())
            .manual_journal_persist(true)
            .journal_compression(fjall::CompressionType::None)
            .max_cached_files(Some(dedup_files))
            .with_compaction_filter_factories({
                let windows = dedup_windows.clone();
                Arc::new(move |keyspace: &str| {
                    let factory: Arc<dyn fjall::compaction::filter::Factory> =
                        Arc::new(dedup::DedupExpiry {
                            windows: windows.clone(),
                        });
                    (keyspace == "dedup").then_some(factory)
                })
            })
            .open()
            .map_err(open_error)?;
        // The dedup database's directory entry must survive a power failure like its tables.
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| open_error(fjall::Error::Io(e)))?;
        // Entries are compressed by their senders: the tables do not compress them again.
        // Entries (one request's events each, kilobytes) are stored apart from their keys, in
        // blob files written once at flush: compactions move only keys and pointers. With
        // many tenants every flushed table spans all of them, so compactions merge, and
        // rewriting the entries themselves fell ever further behind as the log grew.
        let log = db
            .keyspace("log", || {
                memtable(LOG_MEMTABLE_BYTES)()
                    .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
                    .with_kv_separation(Some(
                        fjall::KvSeparationOptions::default()
                            .compression(fjall::CompressionType::None),
                    ))
            })
            .map_err(open_error)?;
        // Random keys, one point read per event; written by bulk ingestion (`dedup_ingest`).
        let dedup = dedup_db
            .keyspace("dedup", memtable(DEDUP_MEMTABLE_BYTES))
            .map_err(open_error)?;
        if db.keyspace_exists("dedup") {
            move_dedup_keyspace(&db, &dedup).map_err(open_error)?;
        }
        let meta = db
            .keyspace("meta", memtable(SMALL_MEMTABLE_BYTES))
            .map_err(open_error)?;
        let rollup_counts = db
            .keyspace("rollup_counts", memtable(SMALL_MEMTABLE_BYTES))
            .map_err(open_error)?;
        // Sketches are compressed when encoded (codec format 4), like log entries.
        let rollup_users = db
            .keyspace("rollup_users", || {
                memtable(ROLLUP_MEMTABLE_BYTES)()
                    .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
            })
            .map_err(open_error)?;
        Ok(Storage {
            db,
            _dedup_db: dedup_db,
            log,
            dedup,
            meta,
            rollup_counts,
            rollup_users,
            dedup_windows,
            rollup_locks: Arc::default(),
            log_reclaim: Arc::default(),
            health: Arc::default(),
        })
    }

    /// Flushes the journal to the OS (`buffered`) or to disk (`fsync`).
    ///
    /// `fsync` is `fdatasync`: it writes the data and whatever metadata reading it back needs
    /// (block allocations, the size), but not the modification time, which a crash may lose
    /// at no cost. Against a full `fsync` this saved about a fifth of each group commit's
    /// sync time here (mean 0.72–0.86 ms against 0.77–1.06 ms, 6 alternating pairs).
    pub fn persist(&self, fsync: bool) -> Result<(), StorageError> {
        let mode = if fsync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        self.db
            .persist(mode)
            .map_err(StorageError::engine("persisting the journal"))
    }

    pub fn batch(&self) -> fjall::OwnedWriteBatch {
        self.db.batch()
    }

    /// Seals every keyspace's active memtable that has outgrown its size. fjall seals them from
    /// its background workers, which may be busy with a long compaction meanwhile: under load
    /// the active memtables then grew far past their size (to gigabytes). The [`upkeep`] thread
    /// calls this; fjall's own back-pressure (writes wait while a keyspace has 4 sealed
    /// memtables waiting to be flushed) bounds the rest.
    pub fn bound_memtables(&self) -> Result<(), StorageError> {
        use fjall::AbstractTree;
        for (keyspace, limit) in self.keyspaces() {
            if keyspace.tree.active_memtable().size() > limit {
                keyspace
                    .rotate_memtable()
                    .map_err(StorageError::engine("sealing a memtable"))?;
            }
        }
        Ok(())
    }

    /// Every keyspace, in a fixed order, with its memtable size.
    pub(crate) fn keyspaces(&self) -> [(&Keyspace, u64); 5] {
        [
            (&self.log, LOG_MEMTABLE_BYTES),
            (&self.dedup, DEDUP_MEMTABLE_BYTES),
            (&self.rollup_users, ROLLUP_MEMTABLE_BYTES),
            (&self.rollup_counts, SMALL_MEMTABLE_BYTES),
            (&self.meta, SMALL_MEMTABLE_BYTES),
        ]
    }

    /// The lock that serialises a tenant's rollup flushes and deletions.
    pub(crate) fn rollup_lock(&self, tenant: TenantId) -> Arc<std::sync::Mutex<()>> {
        Arc::clone(self.rollup_locks.entry(tenant).or_default().value())
    }
}

/// Moves the `dedup` keyspace of an earlier version's main database (its tables, and what its
/// journal held) into `dedup`, then deletes it. A crash in between repeats the move at the next
/// open, which writes the same entries again.
fn move_dedup_keyspace(db: &Database, dedup: &Keyspace) -> Result<(), fjall::Error> {
    let old = db.keyspace("dedup", memtable(DEDUP_MEMTABLE_BYTES))?;
    let mut moved = 0u64;
    let mut ingestion = dedup.start_ingestion()?;
    for guard in old.iter() {
        let (key, value) = guard.into_inner()?;
        ingestion.write(key, value)?;
        moved += 1;
    }
    ingestion.finish()?;
    db.delete_keyspace(old)?;
    tracing::info!(keys = moved, "moved the dedup keys into their own database");
    Ok(())
}

/// `tenant ‖ n`, both big-endian, so a tenant's keys sort by `n`.
pub fn tenant_key(tenant: TenantId, n: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&tenant.0.to_be_bytes());
    key[8..].copy_from_slice(&n.to_be_bytes());
    key
}

/// Deletes a tenant's log and rollups and persists; returns the number of log entries. (Its
/// dedup entries, message-id hashes keyed without a tenant prefix, are dropped by compaction:
/// see [`dedup::DedupExpiry`].) Blocking, and must only run once the log writer has sealed the
/// tenant (or at start-up).
pub fn purge_tenant(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    storage.dedup_windows.deleted(tenant);
    let removed = purge_prefix(storage, &storage.log, tenant)?;
    dedup_ingest::forget_tenant(storage, tenant)?;
    rollups::delete_all(storage, tenant)?;
    storage.persist(true)?;
    if removed > 0 && storage.log.is_kv_separated() {
        reclaim_log_space(storage);
    }
    Ok(removed)
}

/// Gives back the disk space of purged log entries, in the background. The log keeps its
/// entries in blob files and only keys and pointers in its tables, which stay small and are
/// compacted rarely: a purge's tombstones could wait indefinitely to meet the entries they
/// delete. So the tombstones are flushed and the log's tables compacted now. That rewrites
/// the keys only: a blob file is deleted once none of its entries is live (one that is only
/// partly dead is rewritten later, by the engine's own compactions, once a quarter of it is
/// dead). A failure only delays the reclaim, to those compactions.
///
/// Only for a key-value separated log (a data dir created before that layout compacts its
/// entries as it goes), and one reclaim at a time per database: a purge that comes while one
/// runs leaves its reclaim to that thread, which runs once more for it.
fn reclaim_log_space(storage: &Storage) {
    let reclaim = Arc::clone(&storage.log_reclaim);
    reclaim.pending.store(true, Ordering::SeqCst);
    if reclaim.running.swap(true, Ordering::SeqCst) {
        return;
    }
    let log = storage.log.clone();
    let health = Arc::clone(&storage.health);
    let spawned = std::thread::Builder::new()
        .name("log-reclaim".into())
        .spawn(move || {
            let _watch = health.watch("log-reclaim", None);
            crate::priority::background_thread();
            loop {
                reclaim.pending.store(false, Ordering::SeqCst);
                if let Err(error) = compact_log_keys(&log) {
                    tracing::warn!(%error, "compacting the log after a purge failed; its space returns later");
                }
                reclaim.running.store(false, Ordering::SeqCst);
                // A purge since the compaction began found this thread running and left its
                // tombstones to it; unless another thread has started meanwhile, go again.
                if !reclaim.pending.load(Ordering::SeqCst)
                    || reclaim.running.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        });
    if let Err(error) = spawned {
        storage.log_reclaim.running.store(false, Ordering::SeqCst);
        tracing::warn!(%error, "cannot start the log reclaim thread; the space returns later");
    }
}

/// Whether a log reclaim thread runs, and whether a purge has come since it began.
#[derive(Default)]
struct LogReclaim {
    running: AtomicBool,
    pending: AtomicBool,
}

/// Flushes the log's memtable (the purge's tombstones) and compacts its tables twice: the first
/// compaction drops the purged entries and counts their blob files' dead bytes, and a blob file
/// found wholly dead is deleted when the next version is made, by the second. `rotate_memtable`
/// and `major_compact` are fjall's, public but hidden from its documentation (fjall is pinned
/// to 3.1 for them). The wait for the flush gives up after a minute (the database may be
/// closing): the tombstones then wait for the engine's own compactions.
fn compact_log_keys(log: &Keyspace) -> Result<(), fjall::Error> {
    log.rotate_memtable()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while log.sealed_memtable_count() > 0 {
        if std::time::Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log.major_compact()?;
    log.major_compact()
}

/// Whether any log entry or rollup of the tenant remains.
pub fn has_tenant_data(storage: &Storage, tenant: TenantId) -> bool {
    let prefix = tenant.0.to_be_bytes();
    storage.log.prefix(prefix).next().is_some()
        || storage.rollup_counts.prefix(prefix).next().is_some()
}

/// Removes every key of `keyspace` that starts with the tenant's id. Blocking.
pub(crate) fn purge_prefix(
    storage: &Storage,
    keyspace: &Keyspace,
    tenant: TenantId,
) -> Result<u64, StorageError> {
    let prefix = tenant.0.to_be_bytes();
    let mut removed = 0u64;
    loop {
        let mut keys = Vec::with_capacity(4096);
        for guard in keyspace.prefix(prefix).take(4096) {
            // Keys only: the log's entries live in blob files, which this need not read.
            let key = guard
                .key()
                .map_err(StorageError::engine("scanning for purge"))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Ok(removed);
        }
        let mut batch = storage.batch();
        for key in &keys {
            batch.remove(keyspace, key.clone());
        }
        batch
            .commit()
            .map_err(StorageError::engine("purging a tenant"))?;
        removed += keys.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn purged_log_entries_give_their_blob_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 16 << 20, dedup::DedupWindows::default()).unwrap();
        assert!(storage.log.is_kv_separated());
        let (gone, kept) = (TenantId(7), TenantId(8));
        // Two flushes: one with only the purged tenant's entries, one shared with another.
        for (tenants, flush) in [(&[gone][..], 0u64), (&[gone, kept][..], 1)] {
            for n in 0..20 {
                for tenant in tenants {
                    let value = vec![flush as u8 + 1; 4096 + n];
                    storage
                        .log
                        .insert(tenant_key(*tenant, flush * 100 + n as u64), value)
                        .unwrap();
                }
            }
            storage.log.rotate_memtable_and_wait().unwrap();
        }
        assert!(storage.log.blob_file_count() >= 2);
        let before = storage.log.disk_space();
        assert_eq!(purge_tenant(&storage, gone).unwrap(), 40);
        // The reclaim runs on a thread of its own.
        let started = std::time::Instant::now();
        while storage.log_reclaim.running.load(Ordering::SeqCst) {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(storage.log.prefix(gone.0.to_be_bytes()).next().is_none());
        // The other tenant's entries are all there, values and all.
        let kept_entries: Vec<(u64, Vec<u8>)> = storage
            .log
            .prefix(kept.0.to_be_bytes())
            .map(|guard| {
                let (key, value) = guard.into_inner().unwrap();
                (
                    u64::from_be_bytes(key[8..].try_into().unwrap()),
                    value.to_vec(),
                )
            })
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = (0..20)
            .map(|n| (100 + n as u64, vec![2u8; 4096 + n]))
            .collect();
        assert_eq!(kept_entries, expected);
        // The first flush's blob file held only purged entries: it is gone. (The shared one
        // stays: half stale, it is rewritten once it is among the oldest stale files.)
        let after = storage.log.disk_space();
        assert!(
            after < before * 3 / 4,
            "disk space {before} -> {after}, {} blob files",
            storage.log.blob_file_count()
        );
    }
}
