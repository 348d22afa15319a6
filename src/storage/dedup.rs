//! The `dedup` keyspace: which messageIds a tenant has already stored.
//!
//! Key `xxh3-128(messageId, seeded with the tenant id)` (16 bytes), value the first-seen time
//! (big-endian i64 microseconds) followed by the tenant id. An id seen within the tenant's window
//! is a duplicate; an older entry is overwritten and the event counts as new. One lookup and one
//! insert per event. The lookup reads the writer's own index of what the memtables hold, then
//! the tables, whose bloom filters make the common "never seen" answer cheap ([`DedupIndex`]).
//!
//! Why this key: the writer thread's largest cost was searching the memtable skiplist, twice per
//! event. A 16-byte key is stored inline by the engine (no pointer to chase per comparison), and
//! starting with random hash bits, most comparisons end at the first word instead of running
//! `memcmp` over a tenant prefix that every key of a busy tenant shares.
//!
//! Entries older than their tenant's window, and all entries of a deleted tenant, are dropped
//! during compaction ([`DedupExpiry`]); the tenant id in the value tells whose an entry is.
//! (DESIGN.md sketches `tenant ‖ day ‖ hash` keys; one key per id plus a compaction filter gives
//! a single point read per event instead of one per day of the window, and the same expiry.)
//!
//! Only the log writer reads and writes this keyspace, in the same write batch as the log entry,
//! so an event and its dedup entry are durable together (exactly-once across crashes).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};

use fjall::AbstractTree;
use lsm_tree::SeqNo;
use rustc_hash::FxHashMap;

use crate::event::{now_micros, Micros};
use crate::storage::{Storage, StorageError};
use crate::tenant::TenantId;

pub type DedupKey = [u8; 16];

pub fn key(tenant: TenantId, message_id: &str) -> DedupKey {
    xxhash_rust::xxh3::xxh3_128_with_seed(message_id.as_bytes(), tenant.0).to_be_bytes()
}

/// The log writer's view of the `dedup` keyspace: answers "when was this key first seen?"
/// without searching the engine's memtables.
///
/// A point read in fjall searches the active memtable and every sealed one (skiplists of a
/// quarter of a million 16-byte keys each) before the tables' bloom filters. With one read per
/// event, those searches were a quarter of the whole server's CPU at 140k events/s. But the
/// writer is the only thread that writes this keyspace, so it knows exactly what the memtables
/// hold: every key it inserted whose write is not yet in a table. It keeps those keys in a hash
/// map, and reads only the tables ([`tables_get`]) for the rest. A key is forgotten once the
/// tables hold its write: a flush takes every sealed memtable, and a memtable holds exactly the
/// writes between two seals, so the tables hold every write up to their highest sequence
/// number.
///
/// At start the memtables hold keys recovered from the journal that the map does not: until
/// the tables hold them (the active memtable is sealed at once), lookups take the full read.
///
/// Memory: the map holds what the memtables hold, about 60 bytes per key: 15 MB for a full
/// 16 MiB memtable, at most 75 MB while fjall lets 4 sealed memtables wait for their flush.
pub struct DedupIndex {
    /// Keys in the memtables, with their first-seen time and the sequence number of the write.
    recent: FxHashMap<DedupKey, (Micros, SeqNo)>,
    /// The keys of `recent` in the order written, each with the sequence number of its write.
    order: VecDeque<(SeqNo, DedupKey)>,
    /// Keys recovered at start, up to this sequence number, may be missing from `recent`.
    recovered_through: Option<SeqNo>,
}

impl DedupIndex {
    /// Starts tracking; seals the active memtable if it holds recovered entries, so that they
    /// are flushed soon.
    pub fn open(storage: &Storage) -> Result<DedupIndex, StorageError> {
        let recovered_through = storage.dedup.tree.get_highest_memtable_seqno();
        if !storage.dedup.tree.active_memtable().is_empty() {
            storage
                .dedup
                .rotate_memtable()
                .map_err(StorageError::engine("sealing the dedup memtable"))?;
        }
        Ok(DedupIndex {
            recent: FxHashMap::default(),
            order: VecDeque::new(),
            recovered_through,
        })
    }

    /// Whether `key` was first seen within `window` before `now`.
    pub fn seen_within(
        &mut self,
        storage: &Storage,
        key: &DedupKey,
        now: Micros,
        window: Duration,
    ) -> Result<bool, StorageError> {
        let first_seen = match self.recent.get(key) {
            Some((first_seen, _)) => Some(*first_seen),
            None if self.recovered_through.is_some() => storage
                .dedup
                .get(key)
                .map_err(StorageError::engine("reading dedup"))?
                .and_then(|value| parse_value(&value))
                .map(|(first_seen, _tenant)| first_seen),
            None => tables_get(storage, key)?,
        };
        let window_micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        Ok(first_seen.is_some_and(|first_seen| now.saturating_sub(first_seen) < window_micros))
    }

    /// Records keys just committed to the keyspace with first-seen time `now`, and forgets the
    /// keys whose writes the tables now hold.
    pub fn inserted(&mut self, storage: &Storage, keys: &[DedupKey], now: Micros) {
        // Only this thread writes the keyspace: the newest write in its memtables is ours. With
        // none, the memtables are empty and the write is already in the tables: the commit
        // waited on fjall's back-pressure while a flush took it.
        if let Some(seqno) = storage.dedup.tree.get_highest_memtable_seqno() {
            for key in keys {
                self.recent.insert(*key, (now, seqno));
                self.order.push_back((seqno, *key));
            }
        }
        let Some(flushed) = storage.dedup.tree.get_highest_persisted_seqno() else {
            return;
        };
        while let Some((seqno, key)) = self.order.front() {
            if *seqno > flushed {
                break;
            }
            // A key written again since (after its window) keeps its newer write.
            if self
                .recent
                .get(key)
                .is_some_and(|(_, written)| written == seqno)
            {
                self.recent.remove(key);
            }
            self.order.pop_front();
        }
        if self.recovered_through.is_some_and(|seqno| seqno <= flushed) {
            self.recovered_through = None;
        }
    }
}

/// When `key` was first seen according to the keyspace's tables alone (not its memtables),
/// newest table first, as the engine's own point read.
fn tables_get(storage: &Storage, key: &DedupKey) -> Result<Option<Micros>, StorageError> {
    let hash = lsm_tree::table::filter::standard_bloom::Builder::get_hash(key);
    let version = storage.dedup.tree.current_version();
    for level in version.iter_levels() {
        for run in level.iter() {
            let Some(table) = run.get_for_key(key) else {
                continue;
            };
            let found = table
                .get(key, SeqNo::MAX, hash)
                .map_err(|e| StorageError::engine("reading dedup")(e.into()))?;
            if let Some(entry) = found {
                if entry.is_tombstone() {
                    return Ok(None);
                }
                return Ok(parse_value(&entry.value).map(|(first_seen, _tenant)| first_seen));
            }
        }
    }
    Ok(None)
}

/// `first seen ‖ tenant`.
pub fn value(tenant: TenantId, now: Micros) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&now.to_be_bytes());
    value[8..].copy_from_slice(&tenant.0.to_be_bytes());
    value
}

fn parse_value(value: &[u8]) -> Option<(Micros, u64)> {
    let first_seen = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let tenant = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((first_seen, tenant))
}

/// What the compaction filter needs to know of each tenant: its window in microseconds, or that
/// it was deleted. Kept up to date by the tenant directory (and, for deletions before this start,
/// from the tombstones); a tenant missing here keeps its entries (the safe side).
#[derive(Clone, Default)]
pub struct DedupWindows(Arc<RwLock<HashMap<u64, TenantWindow>>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TenantWindow {
    Micros(i64),
    Deleted,
}

impl DedupWindows {
    pub fn set(&self, tenant: TenantId, window: Duration) {
        let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        self.put(tenant, TenantWindow::Micros(micros));
    }

    /// The tenant was deleted: compaction drops its entries.
    pub fn deleted(&self, tenant: TenantId) {
        self.put(tenant, TenantWindow::Deleted);
    }

    fn put(&self, tenant: TenantId, window: TenantWindow) {
        let mut windows = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.insert(tenant.0, window);
    }

    /// A copy for one compaction run, so items are filtered without locking.
    fn snapshot(&self) -> HashMap<u64, TenantWindow> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Compaction filter factory that drops dedup entries older than their tenant's window (so the
/// keyspace holds about one window of ids instead of every id ever seen) and those of deleted
/// tenants.
pub struct DedupExpiry {
    pub windows: DedupWindows,
}

impl Factory for DedupExpiry {
    fn name(&self) -> &str {
        "dedup-expiry"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpiryFilter {
            windows: self.windows.snapshot(),
            now: now_micros(),
        })
    }
}

struct ExpiryFilter {
    windows: HashMap<u64, TenantWindow>,
    now: Micros,
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _ctx: &Context) -> CompactionFilterResult {
        let value = item.value()?;
        let Some((first_seen, tenant)) = parse_value(&value) else {
            return Ok(Verdict::Remove); // Not ours (an older layout): useless for lookups.
        };
        let expired = match self.windows.get(&tenant) {
            None => false,
            Some(TenantWindow::Deleted) => true,
            Some(TenantWindow::Micros(window)) => self.now.saturating_sub(first_seen) >= *window,
        };
        Ok(if expired {
            Verdict::Remove
        } else {
            Verdict::Keep
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Commits dedup entries the way the log writer does.
    fn commit(storage: &Storage, keys: &[DedupKey], now: Micros) {
        let mut batch = storage.batch();
        for key in keys {
            batch.insert(
                &storage.dedup,
                key.to_vec(),
                value(TenantId(1), now).to_vec(),
            );
        }
        batch.commit().unwrap();
        storage.persist(true).unwrap();
    }

    /// Commits dedup entries and tells the index.
    fn insert(storage: &Storage, index: &mut DedupIndex, keys: &[DedupKey], now: Micros) {
        commit(storage, keys, now);
        index.inserted(storage, keys, now);
    }

    #[test]
    fn keys_flushed_before_they_are_recorded_are_found_in_the_tables() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let mut index = DedupIndex::open(&storage).unwrap();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        commit(&storage, &[[7u8; 16]], now);
        // As when a commit waits on the engine's back-pressure while a flush takes its write.
        storage.dedup.rotate_memtable_and_wait().unwrap();
        index.inserted(&storage, &[[7u8; 16]], now);
        assert!(
            index.order.is_empty(),
            "nothing pins the queue of keys to forget"
        );
        assert!(index
            .seen_within(&storage, &[7u8; 16], now + 1, hour)
            .unwrap());
        insert(&storage, &mut index, &[[8u8; 16]], now);
        storage.dedup.rotate_memtable_and_wait().unwrap();
        insert(&storage, &mut index, &[[9u8; 16]], now);
        assert!(
            !index.recent.contains_key(&[8u8; 16]),
            "a flushed key is forgotten"
        );
    }

    #[test]
    fn index_answers_from_memtables_tables_and_recovered_journal() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        let (a, b, c, d) = ([1u8; 16], [2u8; 16], [3u8; 16], [4u8; 16]);
        {
            let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
            let mut index = DedupIndex::open(&storage).unwrap();
            assert!(index.recovered_through.is_none());
            insert(&storage, &mut index, &[a], now);
            assert!(index.recent.contains_key(&a));
            assert!(index.seen_within(&storage, &a, now + 1, hour).unwrap());
            assert!(!index.seen_within(&storage, &b, now + 1, hour).unwrap());

            // Once `a`'s memtable is flushed, the next insert forgets it: the tables answer.
            storage.dedup.rotate_memtable_and_wait().unwrap();
            insert(&storage, &mut index, &[c], now);
            assert!(!index.recent.contains_key(&a) && index.recent.contains_key(&c));
            assert!(index.seen_within(&storage, &a, now + 1, hour).unwrap());
            let later = now + 2 * 3_600_000_000;
            assert!(!index.seen_within(&storage, &a, later, hour).unwrap());

            // `d` stays in the memtable (and the journal) when the process stops.
            insert(&storage, &mut index, &[d], now);
        }
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let mut index = DedupIndex::open(&storage).unwrap();
        assert!(
            index.recovered_through.is_some(),
            "recovered entries are not in the index"
        );
        for key in [&a, &c, &d] {
            assert!(index.seen_within(&storage, key, now + 1, hour).unwrap());
        }
        // The recovered memtable was sealed at open; once it is flushed, lookups use the index.
        while storage.dedup.tree.sealed_memtable_count() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        insert(&storage, &mut index, &[b], now);
        assert!(index.recovered_through.is_none());
        for key in [&a, &b, &c, &d] {
            assert!(index.seen_within(&storage, key, now + 1, hour).unwrap());
        }
        assert!(!index
            .seen_within(&storage, &[5u8; 16], now + 1, hour)
            .unwrap());
    }

    #[test]
    fn compaction_drops_entries_older_than_the_tenant_window() {
        let dir = tempfile::tempdir().unwrap();
        let windows = DedupWindows::default();
        let storage = Storage::open(dir.path(), 1 << 20, windows.clone()).unwrap();
        let short = TenantId(1);
        let long = TenantId(2);
        let unknown = TenantId(3);
        let deleted = TenantId(4);
        windows.set(short, Duration::from_secs(60));
        windows.set(long, Duration::from_secs(86_400));
        windows.set(deleted, Duration::from_secs(86_400));
        let now = now_micros();
        let two_hours_ago = now - 7_200_000_000;
        for tenant in [short, long, unknown, deleted] {
            storage
                .dedup
                .insert(key(tenant, "old"), value(tenant, two_hours_ago).to_vec())
                .unwrap();
            storage
                .dedup
                .insert(key(tenant, "new"), value(tenant, now).to_vec())
                .unwrap();
        }
        windows.deleted(deleted);
        storage.dedup.rotate_memtable_and_wait().unwrap();
        storage.dedup.major_compact().unwrap();
        let present = |tenant, id| storage.dedup.contains_key(key(tenant, id)).unwrap();
        assert!(!present(short, "old"), "expired entry survived compaction");
        assert!(present(short, "new"));
        assert!(present(long, "old"));
        assert!(
            present(unknown, "old"),
            "entries of unknown tenants are kept"
        );
        assert!(
            !present(deleted, "new"),
            "a deleted tenant's entries are dropped"
        );
        assert_ne!(key(short, "new"), key(long, "new"), "keys are per tenant");
        let mut index = DedupIndex::open(&storage).unwrap();
        let minute = Duration::from_secs(60);
        assert!(index
            .seen_within(&storage, &key(short, "new"), now, minute)
            .unwrap());
    }
}
