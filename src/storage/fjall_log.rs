//! The embedded [`EventLog`]: a keyspace `log` of the main fjall database, the only code that
//! names it.
//!
//! Key `tenant ‖ first sequence` (both big-endian u64), so a tenant's entries sort by sequence;
//! value the encoded entry. Entries are stored apart from their keys, in blob files written once
//! at flush: compactions move only keys and pointers, which keeps a growing multi-tenant log
//! cheap to compact. The entries arrive compressed, so neither the tables nor the blob files
//! compress them again.
//!
//! [`EventLog::commit`] writes each tenant's sequence head to `meta` ([`meta::kind::LOG_HEAD`])
//! and persists the journal once: entries and heads share the journal, so a commit makes both
//! durable together. Data dirs written before heads were recorded have none; the head is then
//! the last sequence of the tenant's last entry, and always at least that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace};

use crate::event::last_seq_of;
use crate::ids::TenantId;
use crate::storage::event_log::{entry_events, EntryBytes, EventLog};
use crate::storage::health::ThreadHealth;
use crate::storage::{meta, persist_journal, purge_keys, StorageError};

/// fsyncs fjall's active journal through a descriptor of its own.
///
/// fjall's own `persist` holds the journal's lock while it fsyncs, so every write (the next
/// group's entries, rollups, anything) would wait for the disk. Instead, the log writer has fjall
/// flush its journal buffer to the OS (`PersistMode::Buffer`, quick), and this fdatasyncs the
/// file from another thread with the lock free: an fsync makes a file's written data durable
/// through any of its descriptors. What this relies on, checked in fjall 3.1's source (pinned
/// in Cargo.toml, where a comment says to check it again on an upgrade): journals are
/// `<database folder>/<n>.jnl`, the highest `n` being the one written to; a rotation fsyncs the
/// old journal before it creates the next; only sealed journals are ever deleted. Bytes
/// flushed before a rotation are in an older file, so every journal created since the last
/// sync is synced too (and the folder, for their entries), and then the newest. fjall's own
/// descriptor may have seen a write error that ours will not report, so the database's poison
/// flag (set by fjall on any journal error) is checked after each sync.
struct JournalSync {
    folder: std::path::PathBuf,
    /// The newest journal's number and a descriptor of it, once one sync has found it.
    open: Mutex<Option<(u64, std::fs::File)>>,
}

impl JournalSync {
    fn sync(&self, db: &Database) -> Result<(), StorageError> {
        let failed =
            |e: std::io::Error| StorageError::engine("persisting the journal")(fjall::Error::Io(e));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let known = match open.as_ref() {
            Some((number, _)) => *number,
            None => self.newest().map_err(failed)?,
        };
        let mut newest = known;
        while self.path(newest + 1).exists() {
            newest += 1;
        }
        if open.as_ref().map(|(number, _)| *number) != Some(newest) {
            // Journals since the one last synced: their data, then their names in the folder.
            for number in known..newest {
                match std::fs::File::open(self.path(number)) {
                    Ok(file) => file.sync_data().map_err(failed)?,
                    // Deleted: sealed, and its data already in the tables.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(failed(e)),
                }
            }
            std::fs::File::open(&self.folder)
                .and_then(|folder| folder.sync_all())
                .map_err(failed)?;
            *open = Some((
                newest,
                std::fs::File::open(self.path(newest)).map_err(failed)?,
            ));
        }
        match open.as_ref() {
            Some((_, file)) => file.sync_data().map_err(failed)?,
            None => unreachable!("opened above"),
        }
        // A journal error fjall met on its own descriptor poisons the database; the flush is
        // otherwise a quick no-op under the journal's lock.
        persist_journal(db, false)
    }

    fn path(&self, number: u64) -> std::path::PathBuf {
        self.folder.join(format!("{number}.jnl"))
    }

    /// The number of the newest journal file.
    fn newest(&self) -> std::io::Result<u64> {
        let mut newest = None;
        for entry in std::fs::read_dir(&self.folder)? {
            let name = entry?.file_name();
            let number = (name.to_str())
                .and_then(|name| name.strip_suffix(".jnl"))
                .and_then(|number| number.parse::<u64>().ok());
            newest = newest.max(number);
        }
        newest.ok_or_else(|| std::io::Error::other("the database has no journal file"))
    }
}

/// `tenant ‖ n`, both big-endian, so a tenant's keys sort by `n`.
pub fn tenant_key(tenant: TenantId, n: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&tenant.0.to_be_bytes());
    key[8..].copy_from_slice(&n.to_be_bytes());
    key
}

pub struct FjallLog {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    /// fsyncs the journal off fjall's journal lock (see [`EventLog::sync`]).
    journal: JournalSync,
    /// The background compaction that gives back deleted entries' space.
    reclaim: Arc<LogReclaim>,
    health: Arc<ThreadHealth>,
}

impl FjallLog {
    /// Opens (or creates) the `log` keyspace of `db`, with heads kept in `meta`.
    /// `folder` is the database's folder, where fjall keeps its journal files (`<n>.jnl`).
    pub(super) fn open(
        db: Database,
        folder: &std::path::Path,
        meta: Keyspace,
        memtable_bytes: u64,
        health: Arc<ThreadHealth>,
    ) -> Result<FjallLog, fjall::Error> {
        let log = db.keyspace("log", || {
            fjall::KeyspaceCreateOptions::default()
                .max_memtable_size(memtable_bytes)
                .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
                .with_kv_separation(Some(
                    fjall::KvSeparationOptions::default().compression(fjall::CompressionType::None),
                ))
        })?;
        Ok(FjallLog {
            db,
            log,
            meta,
            journal: JournalSync {
                folder: folder.to_path_buf(),
                open: Mutex::new(None),
            },
            reclaim: Arc::default(),
            health,
        })
    }

    /// The keyspace, for the engine's upkeep (memtable bounds), which covers every keyspace.
    pub(super) fn keyspace(&self) -> &Keyspace {
        &self.log
    }

    /// Whether a reclaim compaction is running (tests wait for it).
    #[cfg(test)]
    pub(in crate::storage) fn reclaiming(&self) -> bool {
        self.reclaim.running.load(Ordering::SeqCst)
    }

    fn last_entry(&self, tenant: TenantId) -> Result<Option<(u64, EntryBytes)>, StorageError> {
        let Some(guard) = self.log.prefix(tenant.0.to_be_bytes()).next_back() else {
            return Ok(None);
        };
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading the log"))?;
        Ok(Some((entry_seq(&key)?, value.into())))
    }
}

impl EventLog for FjallLog {
    fn append(
        &self,
        tenant: TenantId,
        first_seq: u64,
        entry: EntryBytes,
    ) -> Result<(), StorageError> {
        self.log
            .insert(tenant_key(tenant, first_seq), entry.into_slice())
            .map_err(StorageError::engine("committing a log batch"))
    }

    fn commit(&self, heads: &[(TenantId, u64)], sync: bool) -> Result<(), StorageError> {
        // One record per tenant: its highest head in the group.
        let mut highest: rustc_hash::FxHashMap<TenantId, u64> = Default::default();
        for (tenant, head) in heads {
            let entry = highest.entry(*tenant).or_insert(*head);
            *entry = (*entry).max(*head);
        }
        for (tenant, head) in highest {
            self.meta
                .insert(
                    meta::tenant_key(meta::kind::LOG_HEAD, tenant),
                    head.to_be_bytes(),
                )
                .map_err(StorageError::engine("recording a sequence head"))?;
        }
        persist_journal(&self.db, sync)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.journal.sync(&self.db)
    }

    fn head(&self, tenant: TenantId) -> Result<u64, StorageError> {
        let recorded = meta::get_u64_in(&self.meta, meta::kind::LOG_HEAD, tenant)?;
        let last = match self.last_entry(tenant)? {
            Some((first_seq, value)) => last_seq_of(first_seq, entry_events(&value)?),
            None => 0,
        };
        Ok(recorded.max(last))
    }

    fn read(
        &self,
        tenant: TenantId,
        from_seq: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, EntryBytes)>, StorageError> {
        let start = tenant_key(tenant, from_seq);
        let end = tenant_key(tenant, u64::MAX);
        let mut out = Vec::new();
        for guard in self.log.range(start..=end).take(max_entries) {
            let (key, value) = guard
                .into_inner()
                .map_err(StorageError::engine("reading the log"))?;
            out.push((entry_seq(&key)?, value.into()));
        }
        Ok(out)
    }

    fn entry_holding(
        &self,
        tenant: TenantId,
        seq: u64,
    ) -> Result<Option<(u64, EntryBytes)>, StorageError> {
        let range = tenant_key(tenant, 0)..=tenant_key(tenant, seq);
        let Some(guard) = self.log.range(range).next_back() else {
            return Ok(None);
        };
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading the log"))?;
        Ok(Some((entry_seq(&key)?, value.into())))
    }

    fn disk_bytes(&self) -> u64 {
        self.log.disk_space()
    }

    fn tenants(&self) -> Result<Vec<TenantId>, StorageError> {
        // One seek past each tenant's keys.
        let mut tenants = Vec::new();
        let mut from = tenant_key(TenantId(0), 0);
        while let Some(guard) = self.log.range(from..).next() {
            let key = guard
                .key()
                .map_err(StorageError::engine("listing the log's tenants"))?;
            let Some(id) = key.get(..8).and_then(|bytes| bytes.try_into().ok()) else {
                break;
            };
            let tenant = u64::from_be_bytes(id);
            tenants.push(TenantId(tenant));
            let Some(next) = tenant.checked_add(1) else {
                break;
            };
            from = tenant_key(TenantId(next), 0);
        }
        Ok(tenants)
    }

    fn delete_below(&self, tenant: TenantId, seq: u64) -> Result<u64, StorageError> {
        // A tenant not appended to since heads were recorded has none: record it now, before its
        // last entries may go.
        let head = self.head(tenant)?;
        self.meta
            .insert(
                meta::tenant_key(meta::kind::LOG_HEAD, tenant),
                head.to_be_bytes(),
            )
            .map_err(StorageError::engine("recording a sequence head"))?;
        let below = tenant_key(tenant, 0)..tenant_key(tenant, seq);
        let removed = purge_keys(&self.db, &self.log, || self.log.range(below.clone()))?;
        if removed > 0 {
            self.reclaim_space();
        }
        Ok(removed)
    }

    fn delete_tenant(&self, tenant: TenantId) -> Result<u64, StorageError> {
        let prefix = tenant.0.to_be_bytes();
        let removed = purge_keys(&self.db, &self.log, || self.log.prefix(prefix))?;
        self.meta
            .remove(meta::tenant_key(meta::kind::LOG_HEAD, tenant))
            .map_err(StorageError::engine("removing a sequence head"))?;
        persist_journal(&self.db, true)?;
        if removed > 0 {
            self.reclaim_space();
        }
        Ok(removed)
    }
}

impl FjallLog {
    /// Gives back the disk space of deleted entries, in the background. The log keeps its
    /// entries in blob files and only keys and pointers in its tables, which stay small and are
    /// compacted rarely: a deletion's tombstones could wait indefinitely to meet the entries
    /// they delete. So the tombstones are flushed and the log's tables compacted now. That
    /// rewrites the keys only: a blob file is deleted once none of its entries is live (one that
    /// is only partly dead is rewritten later, by the engine's own compactions, once a quarter
    /// of it is dead). A failure only delays the reclaim, to those compactions.
    ///
    /// One reclaim at a time: a deletion that comes while one runs leaves its reclaim to that
    /// thread, which runs once more for it. Only for a key-value separated log (a data dir
    /// created before that layout compacts its entries as it goes).
    fn reclaim_space(&self) {
        if !self.log.is_kv_separated() {
            return;
        }
        let reclaim = Arc::clone(&self.reclaim);
        reclaim.pending.store(true, Ordering::SeqCst);
        if reclaim.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let log = self.log.clone();
        let health = Arc::clone(&self.health);
        let spawned = std::thread::Builder::new()
            .name("log-reclaim".into())
            .spawn(move || {
                let _watch = health.watch("log-reclaim", None);
                crate::priority::background_thread();
                loop {
                    reclaim.pending.store(false, Ordering::SeqCst);
                    if let Err(error) = compact_log_keys(&log) {
                        tracing::warn!(%error, "compacting the log after a deletion failed; its space returns later");
                    }
                    reclaim.running.store(false, Ordering::SeqCst);
                    // A deletion since the compaction began found this thread running and left
                    // its tombstones to it; unless another thread has started meanwhile, go again.
                    if !reclaim.pending.load(Ordering::SeqCst)
                        || reclaim.running.swap(true, Ordering::SeqCst)
                    {
                        break;
                    }
                }
            });
        if let Err(error) = spawned {
            self.reclaim.running.store(false, Ordering::SeqCst);
            tracing::warn!(%error, "cannot start the log reclaim thread; the space returns later");
        }
    }
}

/// Whether a log reclaim thread runs, and whether a deletion has come since it began.
#[derive(Default)]
struct LogReclaim {
    running: AtomicBool,
    pending: AtomicBool,
}

/// Flushes the log's memtable (the deletion's tombstones) and compacts its tables twice: the
/// first compaction drops the deleted entries and counts their blob files' dead bytes, and a
/// blob file found wholly dead is deleted when the next version is made, by the second.
/// `rotate_memtable` and `major_compact` are fjall's, public but hidden from its documentation
/// (fjall is pinned to 3.1 for them). The wait for the flush gives up after a minute (the
/// database may be closing): the tombstones then wait for the engine's own compactions.
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

/// The first sequence in a log key.
fn entry_seq(key: &[u8]) -> Result<u64, StorageError> {
    key.get(8..16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or(StorageError::Codec {
            keyspace: "log",
            source: crate::storage::codec::CodecError::Empty,
        })
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::{dedup, purge_tenant, Storage};

    #[test]
    fn purged_log_entries_give_their_blob_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 16 << 20, dedup::DedupWindows::default()).unwrap();
        let log = &storage.log;
        assert!(log.keyspace().is_kv_separated());
        let (gone, kept) = (TenantId(7), TenantId(8));
        // Two flushes: one with only the purged tenant's entries, one shared with another.
        for (tenants, flush) in [(&[gone][..], 0u64), (&[gone, kept][..], 1)] {
            for n in 0..20 {
                for tenant in tenants {
                    let value = vec![flush as u8 + 1; 4096 + n];
                    log.log
                        .insert(tenant_key(*tenant, flush * 100 + n as u64), value)
                        .unwrap();
                }
            }
            log.log.rotate_memtable_and_wait().unwrap();
        }
        assert!(log.log.blob_file_count() >= 2);
        let before = log.log.disk_space();
        assert_eq!(purge_tenant(&storage, gone).unwrap(), 40);
        // The reclaim runs on a thread of its own.
        let started = std::time::Instant::now();
        while log.reclaiming() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(log.log.prefix(gone.0.to_be_bytes()).next().is_none());
        // The other tenant's entries are all there, values and all.
        let kept_entries: Vec<(u64, Vec<u8>)> = storage
            .log
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
        let after = log.log.disk_space();
        assert!(
            after < before * 3 / 4,
            "disk space {before} -> {after}, {} blob files",
            log.log.blob_file_count()
        );
    }
}
