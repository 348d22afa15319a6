//! Storage: fjall databases under the data dir, one keyspace per concern. Nothing outside this
//! module touches a keyspace: each concern has its own module and functions.
//!
//! - `log`: the durable event log, reached only through the [`event_log::EventLog`] seam; its
//!   embedded implementation is [`fjall_log`], written by the [`writer`] thread (group commit).
//! - dedup keys: `xxh3-128(messageId, tenant)` → first-seen time ‖ tenant, a keyspace per
//!   period of time ([`dedup_periods`]); see [`dedup`] and [`dedup_ingest`], the thread that
//!   writes them. They live in a database of their own (directory
//!   [`DEDUP_DIR`] inside the main one), because fjall holds a database's journal lock while it
//!   finishes a bulk ingestion, fsync of the new table included, and the log writer's appends
//!   would wait for it (docs/decisions/0004). Data dirs with `dedup` in the main database are
//!   moved over at open.
//! - `meta`: tenants, tombstones, sequence heads, watermarks, identity links ([`identity`]),
//!   schema versions ([`schemas`]);
//!   every key kind is listed in [`meta::kind`].
//! - `rollup_counts`, `rollup_users`: per-bucket counts and distinct-user sketches; see
//!   [`rollups`], the only module that persists rollup types.
//! - `deadletters`: events refused by a tracking plan ([`deadletters`]).
//!
//! The main database runs with manual journal persistence: the log writer decides when to flush
//! and fsync (group commit), and metadata writes persist themselves. Nothing writes the dedup
//! database's journal: its keys arrive by bulk ingestion only.
//!
//! There is no way back to a version from before the dedup database, nor from before the
//! periods: it would not find the keys and would count retries of earlier events again.

pub mod codec;
pub mod cold;
pub mod deadletters;
pub mod dedup;
pub mod dedup_filter;
pub mod dedup_ingest;
pub mod dedup_periods;
pub mod disk;
pub mod event_log;
pub mod fjall_log;
pub mod health;
pub mod identity;
pub mod meta;
pub mod rollups;
pub mod schemas;
pub mod syncer;
pub mod upkeep;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::ids::TenantId;

use self::event_log::EventLog;
use self::fjall_log::FjallLog;

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
    /// Where the batch goes (a cluster's event stream) is unreachable for now: retry later.
    #[error("the event stream is unavailable: {0}")]
    Unavailable(String),
    #[error("tenant {0} has been deleted")]
    TenantDeleted(TenantId),
}

impl StorageError {
    pub(crate) fn engine(context: &'static str) -> impl FnOnce(fjall::Error) -> StorageError {
        move |source| StorageError::Engine { context, source }
    }
}

/// Memtable size of each keyspace. fjall keeps up to 4 sealed memtables per keyspace waiting to
/// be flushed besides the active one, so these bound the memory writes can take (fjall's 64 MiB
/// default let them take gigabytes with many tenants). Smaller memtables mean more, smaller
/// tables to compact, which costs little here (docs/decisions/0005).
const LOG_MEMTABLE_BYTES: u64 = 8 << 20;
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
/// of a 2-core machine compacts, worker 0 takes the same request again and again, spinning. A
/// third worker takes the request instead (docs/decisions/0007).
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
    log: Arc<FjallLog>,
    pub(in crate::storage) dedup: dedup_periods::DedupPeriods,
    pub(in crate::storage) meta: Keyspace,
    pub(in crate::storage) rollup_counts: Keyspace,
    pub(in crate::storage) rollup_users: Keyspace,
    pub(in crate::storage) deadletters: Keyspace,
    /// Bytes of each tenant's dead letters, once measured.
    deadletter_sizes: deadletters::DeadLetterSizes,
    /// Tenants' dedup windows: the longest decides when a period of dedup keys expires.
    pub dedup_windows: dedup::DedupWindows,
    /// Per-tenant lock that fences rollup flushes and deletions (see [`rollups::flush`]).
    rollup_locks: Arc<dashmap::DashMap<TenantId, Arc<std::sync::Mutex<()>>>>,
    /// Tenants' committed identity links, loaded on first use ([`identity::map`]).
    identities: Arc<dashmap::DashMap<TenantId, Arc<crate::identity::IdentityMap>>>,
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
        let dedup_path = path.join(DEDUP_DIR);
        let dedup_error = |source| StorageError::Open {
            path: dedup_path.clone(),
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
            // Log entries arrive compressed (codec format 3) and the rest is small or compressed
            // too (sketches, codec format 4): compressing the journal again would cost the log
            // writer thread CPU for nothing (docs/decisions/0014).
            .journal_compression(fjall::CompressionType::None)
            .worker_threads(engine_workers())
            .open()
            .map_err(open_error)?;
        let dedup_db = Database::builder(&dedup_path)
            .cache_size(dedup_cache)
            .worker_threads(engine_workers())
            .manual_journal_persist(true)
            .journal_compression(fjall::CompressionType::None)
            .max_cached_files(Some(dedup_files))
            .open()
            .map_err(dedup_error)?;
        // The dedup database's directory entry must survive a power failure like its tables.
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| open_error(fjall::Error::Io(e)))?;
        if db.keyspace_exists("dedup") {
            let undivided = dedup_db
                .keyspace(dedup_periods::UNDIVIDED, dedup_periods::options)
                .map_err(dedup_error)?;
            move_dedup_keyspace(&db, &undivided).map_err(open_error)?;
        }
        // Random keys, written by bulk ingestion (`dedup_ingest`), a keyspace per period.
        let dedup = dedup_periods::DedupPeriods::open(dedup_db.clone(), crate::event::now_micros())
            .map_err(dedup_error)?;
        let meta = db
            .keyspace("meta", memtable(SMALL_MEMTABLE_BYTES))
            .map_err(open_error)?;
        let health: Arc<health::ThreadHealth> = Arc::default();
        let log = FjallLog::open(
            db.clone(),
            path,
            meta.clone(),
            LOG_MEMTABLE_BYTES,
            Arc::clone(&health),
        )
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
        let deadletters = db
            .keyspace("deadletters", memtable(SMALL_MEMTABLE_BYTES))
            .map_err(open_error)?;
        Ok(Storage {
            db,
            _dedup_db: dedup_db,
            log: Arc::new(log),
            dedup,
            meta,
            rollup_counts,
            rollup_users,
            deadletters,
            deadletter_sizes: Default::default(),
            dedup_windows,
            rollup_locks: Arc::default(),
            identities: Arc::default(),
            health,
        })
    }

    /// The durable event log.
    pub fn log(&self) -> &dyn EventLog {
        &*self.log
    }

    /// The durable event log, for a thread that keeps it.
    pub fn log_handle(&self) -> Arc<dyn EventLog> {
        self.log.clone()
    }

    /// Flushes the journal to the OS (`buffered`) or to disk (`fsync`, as `fdatasync`:
    /// docs/decisions/0008).
    pub fn persist(&self, fsync: bool) -> Result<(), StorageError> {
        persist_journal(&self.db, fsync)
    }

    pub(in crate::storage) fn batch(&self) -> fjall::OwnedWriteBatch {
        self.db.batch()
    }

    /// Seals every keyspace's active memtable that has outgrown its size. fjall seals them from
    /// its background workers, which may be busy with a long compaction meanwhile: under load
    /// the active memtables then grow far past their size. The [`upkeep`] thread calls this;
    /// fjall's own back-pressure (writes wait while a keyspace has 4 sealed memtables waiting to
    /// be flushed) bounds the rest (docs/decisions/0013).
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
    /// (The dedup keys' keyspaces are written by bulk ingestion only: no memtable to seal.)
    pub(crate) fn keyspaces(&self) -> [(&Keyspace, u64); 5] {
        [
            (self.log.keyspace(), LOG_MEMTABLE_BYTES),
            (&self.rollup_users, ROLLUP_MEMTABLE_BYTES),
            (&self.rollup_counts, SMALL_MEMTABLE_BYTES),
            (&self.meta, SMALL_MEMTABLE_BYTES),
            (&self.deadletters, SMALL_MEMTABLE_BYTES),
        ]
    }

    /// Moves everything written into compacted on-disk tables, as a long-running server has its
    /// older data: for benchmarks and tests that read such data. Blocking.
    pub fn settle(&self) -> Result<(), StorageError> {
        let periods = self.dedup.all();
        let dedup = periods.iter().map(|period| &period.keyspace);
        for keyspace in self.keyspaces().into_iter().map(|(k, _)| k).chain(dedup) {
            keyspace
                .rotate_memtable_and_wait()
                .and_then(|()| keyspace.major_compact())
                .map_err(StorageError::engine("settling a keyspace"))?;
        }
        Ok(())
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
    let old = db.keyspace("dedup", dedup_periods::options)?;
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

/// Flushes a database's journal to the OS, or to disk with `fdatasync` (the data and whatever
/// metadata reading it back needs, not the modification time, which a crash may lose at no
/// cost: docs/decisions/0008).
pub(crate) fn persist_journal(db: &Database, fsync: bool) -> Result<(), StorageError> {
    let mode = if fsync {
        PersistMode::SyncData
    } else {
        PersistMode::Buffer
    };
    db.persist(mode)
        .map_err(StorageError::engine("persisting the journal"))
}

/// Deletes a tenant's log, dedup watermark and rollups, durably; returns the number of log
/// entries. (Its dedup entries, message-id hashes keyed without a tenant prefix, go with their
/// periods: see [`dedup_periods`].) Blocking, and must only run once the log writer has
/// sealed the tenant (or at start-up).
pub fn purge_tenant(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    storage.dedup_windows.deleted(tenant);
    dedup_ingest::forget_tenant(storage, tenant)?;
    rollups::delete_all(storage, tenant)?;
    identity::delete_all(storage, tenant)?;
    schemas::delete_all(storage, tenant)?;
    deadletters::delete_all(storage, tenant)?;
    storage.persist(true)?;
    storage.log().delete_tenant(tenant)
}

/// Whether any log entry or rollup of the tenant remains (true when the log cannot tell, so
/// that a purge is tried rather than skipped).
pub fn has_tenant_data(storage: &Storage, tenant: TenantId) -> bool {
    let logged = storage
        .log()
        .read(tenant, 0, 1)
        .map_or(true, |entries| !entries.is_empty());
    let cold = cold::cold_watermark(storage, tenant).map_or(true, |watermark| watermark > 0);
    logged
        || cold
        || storage
            .rollup_counts
            .prefix(tenant.0.to_be_bytes())
            .next()
            .is_some()
}

/// Removes every key of `keyspace` that starts with the tenant's id. Blocking.
pub(crate) fn purge_prefix(
    storage: &Storage,
    keyspace: &Keyspace,
    tenant: TenantId,
) -> Result<u64, StorageError> {
    let prefix = tenant.0.to_be_bytes();
    purge_keys(&storage.db, keyspace, || keyspace.prefix(prefix))
}

/// Removes every key the iterators `keys` make yield, 4096 at a time, until one yields none.
/// Blocking.
pub(crate) fn purge_keys(
    db: &Database,
    keyspace: &Keyspace,
    keys: impl Fn() -> fjall::Iter,
) -> Result<u64, StorageError> {
    let mut removed = 0u64;
    loop {
        let mut batch_keys = Vec::with_capacity(4096);
        for guard in keys().take(4096) {
            // Keys only: the log's entries live in blob files, which this need not read.
            let key = guard
                .key()
                .map_err(StorageError::engine("scanning for purge"))?;
            batch_keys.push(key);
        }
        if batch_keys.is_empty() {
            return Ok(removed);
        }
        let mut batch = db.batch();
        for key in &batch_keys {
            batch.remove(keyspace, key.clone());
        }
        batch
            .commit()
            .map_err(StorageError::engine("purging a tenant"))?;
        removed += batch_keys.len() as u64;
    }
}
