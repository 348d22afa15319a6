//! The dedup keys: which messageIds a tenant has already stored.
//!
//! Key `xxh3-128(messageId, seeded with the tenant id)` (16 bytes), value the first-seen time
//! (big-endian i64 microseconds) followed by the tenant id. An id seen within the tenant's window
//! is a duplicate; an older entry is overwritten and the event counts as new. One lookup and one
//! key per event, written by the [`dedup_ingest`](super::dedup_ingest) thread. The lookup reads
//! the writer's own index of the keys not yet written ([`DedupIndex`]), then an in-memory filter
//! of every key the tables hold within the longest window ([`dedup_filter`](super::dedup_filter)),
//! which answers the common "never seen" without touching the tables, and only then the tables.
//!
//! Why this key: a 16-byte key is stored inline by the engine (no pointer to chase per
//! comparison), and starting with random hash bits, most comparisons (in the ingest thread's
//! sort, in compactions, in table lookups) end at the first word instead of running `memcmp`
//! over a tenant prefix that every key of a busy tenant shares (docs/decisions/0011).
//!
//! Keys are written into a keyspace per period of time and expire with their period, a whole
//! keyspace at a time, once every tenant's window has passed it
//! ([`dedup_periods`](super::dedup_periods)); a lookup compares the first-seen time with the
//! tenant's own window. (DESIGN.md sketches `tenant ‖ day ‖ hash` keys; one key per id, in
//! keyspaces by period, gives a single point read per period instead of one per day of the
//! window, and the same expiry, by whole tables.)
//!
//! Only the log writer reads this keyspace, and only its ingest thread writes it, after the
//! events are durable: the log entries themselves hold the messageIds, so the keys of entries
//! not yet ingested are derived again after a crash (exactly-once across crashes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fjall::AbstractTree;
use lsm_tree::SeqNo;
use rustc_hash::FxHashMap;

use crate::event::{duration_micros, flags, Micros, StoredEvent};
use crate::ids::TenantId;
use crate::storage::dedup_filter::{KeyFilter, KeyFilters};
use crate::storage::{dedup_periods, Storage, StorageError};

pub type DedupKey = [u8; 16];

pub fn key(tenant: TenantId, message_id: &str) -> DedupKey {
    xxhash_rust::xxh3::xxh3_128_with_seed(message_id.as_bytes(), tenant.0).to_be_bytes()
}

/// The event's dedup key; `None` when the server generated its messageId (never a duplicate).
/// The log writer and the recovery of un-ingested keys must agree on this, so both call it.
pub fn event_key(tenant: TenantId, event: &StoredEvent) -> Option<DedupKey> {
    (event.flags & flags::GENERATED_ID == 0).then(|| key(tenant, &event.message_id))
}

/// The log writer's view of the dedup keys: answers "when was this key first seen?" from the
/// keys of its recent appends, which the tables do not hold yet, and the tables.
///
/// The writer hands each durable group's keys to the ingest thread, which writes them into the
/// tables in runs and publishes the number of the last group it wrote. Until then the keys are
/// here; once the tables hold them they are forgotten. Lookups never search the keyspace's
/// memtables, as fjall's own point read would (a skiplist search per memtable, per event, on
/// the writer): nothing but the ingest thread's bulk ingestion writes the keyspace, so its
/// memtables stay empty (docs/decisions/0010). (The keys a data dir of the layout before the
/// ingest thread left in the journal are written into tables when the storage opens: see
/// `Storage::open`.)
///
/// Memory: 33 bytes per slot of a hash table at most seven-eighths full, for every key not yet
/// in the tables: the run the ingest thread gathers, the one it writes, and the groups queued
/// for it (docs/decisions/0010 has the size measured with many tenants).
pub struct DedupIndex {
    /// Keys not in the tables yet, with their first-seen time and the number of their group.
    /// Key → (first seen, group, tenant): the tenant too, because a cluster's process node
    /// keeps one tenant's log under more than one local id over time (same keys, other ids).
    recent: FxHashMap<DedupKey, (Micros, u64, TenantId)>,
    /// The last group whose keys the tables hold, published by the ingest thread.
    ingested: Arc<AtomicU64>,
    /// The value of `ingested` when `recent` was last purged.
    forgotten: u64,
    /// The filters of the keys in the tables, kept up by the ingest thread.
    filters: KeyFilters,
    /// The filter lookups use, taken with the last `ingested` read (see [`dedup_filter`]).
    ///
    /// [`dedup_filter`]: super::dedup_filter
    filter: Option<Arc<KeyFilter>>,
}

impl DedupIndex {
    /// Starts tracking.
    pub fn open(ingested: Arc<AtomicU64>, filters: KeyFilters) -> DedupIndex {
        DedupIndex {
            recent: FxHashMap::default(),
            ingested,
            forgotten: 0,
            filters,
            filter: None,
        }
    }

    /// Whether `key`, a key of `tenant`, was first seen within `window` before `now`.
    pub fn seen_within(
        &mut self,
        storage: &Storage,
        tenant: TenantId,
        key: &DedupKey,
        now: Micros,
        window: Duration,
    ) -> Result<bool, StorageError> {
        let window_micros = duration_micros(window);
        let since = now.saturating_sub(window_micros);
        // A filter that may lack keys of this window (it grew, or this clock is behind the
        // filter's) is passed by: the tables answer.
        let filter = (self.filter.as_ref()).filter(|filter| filter.covers(since));
        let first_seen = match self.recent.get(key) {
            Some((first_seen, _, owner)) if *owner == tenant => Some(*first_seen),
            _ if filter.is_some_and(|f| !f.may_contain(key)) => None,
            _ => tables_get(storage, tenant, key, since)?,
        };
        Ok(first_seen.is_some_and(|first_seen| now.saturating_sub(first_seen) < window_micros))
    }

    /// Records keys just committed with their log entry, first seen at `now`, that the ingest
    /// thread will receive in group `group`.
    pub fn record(&mut self, tenant: TenantId, keys: &[DedupKey], now: Micros, group: u64) {
        for key in keys {
            self.recent.insert(*key, (now, group, tenant));
        }
    }

    /// Forgets the keys the tables now hold.
    ///
    /// In one pass over the table each time the ingest thread finishes a run (of up to 256k
    /// keys), not by looking each forgotten key up again: that is a CPU cache miss per key, on
    /// the writer thread (docs/decisions/0010).
    pub fn forget_ingested(&mut self) {
        let ingested = self.ingested.load(Ordering::Acquire);
        // Taken after `ingested`: it holds every key of the groups forgotten below.
        self.filter = self.filters.current();
        if ingested == self.forgotten {
            return;
        }
        self.forgotten = ingested;
        // A key recorded again since (after its window) has the newer group, and stays.
        self.recent.retain(|_, (_, group, _)| *group > ingested);
    }
}

/// When `key` was last first seen by `tenant` according to the tables alone (not the memtables)
/// of the periods that may hold keys first seen at or after `since`: newest period first, and
/// within one newest table first, as the engine's own point read. A stored entry of another
/// tenant (keys are seeded with the tenant, so only a 128-bit collision could match) is not a
/// sighting.
fn tables_get(
    storage: &Storage,
    tenant: TenantId,
    key: &DedupKey,
    since: Micros,
) -> Result<Option<Micros>, StorageError> {
    let hash = lsm_tree::table::filter::standard_bloom::Builder::get_hash(key);
    let periods = storage.dedup.all();
    for period in dedup_periods::holding_since(&periods, since).iter().rev() {
        let version = period.keyspace.tree.current_version();
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
                    return Ok(parse_value(&entry.value)
                        .filter(|(_, stored)| *stored == tenant.0)
                        .map(|(first_seen, _)| first_seen));
                }
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

/// Each tenant's dedup window, or that it was deleted. Kept up to date by the tenant directory
/// (and, for deletions before this start, from the tombstones); the longest window, at least
/// the default one, decides when a period of keys expires.
#[derive(Clone, Default)]
pub struct DedupWindows(Arc<RwLock<Windows>>);

#[derive(Default)]
struct Windows {
    tenants: HashMap<u64, TenantWindow>,
    /// The default window: keys are kept at least this long, whatever tenants are known.
    floor: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TenantWindow {
    Window(Duration),
    Deleted,
}

impl DedupWindows {
    pub fn set(&self, tenant: TenantId, window: Duration) {
        self.update(|windows| {
            windows
                .tenants
                .insert(tenant.0, TenantWindow::Window(window));
        });
    }

    /// The tenant was deleted: its window no longer keeps keys.
    pub fn deleted(&self, tenant: TenantId) {
        self.update(|windows| {
            windows.tenants.insert(tenant.0, TenantWindow::Deleted);
        });
    }

    /// Keys are kept at least `window` (the tenants' default window).
    pub fn set_floor(&self, window: Duration) {
        self.update(|windows| windows.floor = window);
    }

    fn update(&self, change: impl FnOnce(&mut Windows)) {
        let mut windows = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut windows);
    }

    /// The longest window of any tenant not deleted, and at least the floor.
    pub fn longest(&self) -> Duration {
        let windows = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (windows.tenants.values())
            .filter_map(|window| match window {
                TenantWindow::Window(window) => Some(*window),
                TenantWindow::Deleted => None,
            })
            .fold(windows.floor, Duration::max)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> (DedupIndex, Arc<AtomicU64>) {
        let ingested = Arc::new(AtomicU64::new(0));
        (
            DedupIndex::open(Arc::clone(&ingested), KeyFilters::new(0)),
            ingested,
        )
    }

    /// The tenant whose keys [`into_tables`] stores.
    const TEST_TENANT: TenantId = TenantId(1);

    /// Puts keys into the tables, as the ingest thread does.
    pub(crate) fn into_tables(storage: &Storage, keys: &[DedupKey], now: Micros) {
        let keyspace = storage.dedup.newest();
        for key in keys {
            keyspace
                .insert(key.to_vec(), value(TEST_TENANT, now).to_vec())
                .unwrap();
        }
        keyspace.rotate_memtable_and_wait().unwrap();
    }

    #[test]
    fn a_stored_key_of_another_tenant_is_no_sighting() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let (mut index, _) = index();
        let key = [9u8; 16];
        into_tables(&storage, &[key], 1_000);
        let hour = Duration::from_secs(3600);
        assert!(index
            .seen_within(&storage, TEST_TENANT, &key, 2_000, hour)
            .unwrap());
        assert!(!index
            .seen_within(&storage, TenantId(2), &key, 2_000, hour)
            .unwrap());
    }

    #[test]
    fn index_answers_from_recorded_keys_until_the_tables_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let (mut index, ingested) = index();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        let later = now + 2 * 3_600_000_000;
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        index.record(TenantId(1), &[a, b], now, 1);
        assert!(index
            .seen_within(&storage, TEST_TENANT, &a, now + 1, hour)
            .unwrap());
        assert!(!index
            .seen_within(&storage, TEST_TENANT, &c, now + 1, hour)
            .unwrap());
        assert!(!index
            .seen_within(&storage, TEST_TENANT, &a, later, hour)
            .unwrap());

        // `b` is seen again after its window (group 2) before group 1 reaches the tables.
        index.record(TenantId(1), &[b], later, 2);
        into_tables(&storage, &[a, b], now);
        index.forget_ingested();
        assert_eq!(
            index.recent.len(),
            2,
            "nothing is forgotten before it is ingested"
        );
        ingested.store(1, Ordering::Release);
        index.forget_ingested();
        assert!(
            !index.recent.contains_key(&a),
            "an ingested key is forgotten"
        );
        assert!(index.recent.contains_key(&b), "a newer entry is kept");
        assert!(index
            .seen_within(&storage, TEST_TENANT, &a, now + 1, hour)
            .unwrap());
        assert!(index
            .seen_within(&storage, TEST_TENANT, &b, later + 1, hour)
            .unwrap());
        assert_eq!(index.recent.len(), 1);
    }

    #[test]
    fn with_a_filter_keys_in_the_tables_are_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        let stored: Vec<DedupKey> = (0..100u8).map(|i| [i; 16]).collect();
        into_tables(&storage, &stored, now);
        let filters = KeyFilters::new(64 << 20);
        let builder =
            crate::storage::dedup_filter::FilterBuilder::start(storage.clone(), filters.clone())
                .unwrap();
        crate::storage::dedup_filter::tests::wait_until_built(&filters);
        let mut index = DedupIndex::open(Arc::new(AtomicU64::new(0)), filters);
        index.forget_ingested();
        assert!(index.filter.is_some(), "the index takes the built filter");
        for key in &stored {
            assert!(index
                .seen_within(&storage, TEST_TENANT, key, now + 1, hour)
                .unwrap());
        }
        assert!(!index
            .seen_within(&storage, TEST_TENANT, &[200u8; 16], now + 1, hour)
            .unwrap());
        drop(builder);
    }

    #[test]
    fn keys_of_an_earlier_layout_move_into_the_dedup_database() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000_000;
        let (a, d) = ([1u8; 16], [4u8; 16]);
        {
            // A move that stopped before deleting the old keyspace had written `a` already.
            let moved = fjall::Database::builder(dir.path().join(crate::storage::DEDUP_DIR))
                .open()
                .unwrap();
            let moved = moved
                .keyspace("dedup", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            let mut ingestion = moved.start_ingestion().unwrap();
            ingestion
                .write(a.to_vec(), value(TenantId(1), now).to_vec())
                .unwrap();
            ingestion.finish().unwrap();
        }
        {
            // The layout before: `dedup` in the main database, `a` in a table, `d` still in
            // the memtable (and the journal) when the process stopped.
            let db = fjall::Database::builder(dir.path()).open().unwrap();
            let old = db
                .keyspace("dedup", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            old.insert(a.to_vec(), value(TenantId(1), now).to_vec())
                .unwrap();
            old.rotate_memtable_and_wait().unwrap();
            old.insert(d.to_vec(), value(TenantId(1), now).to_vec())
                .unwrap();
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        for _open in 0..2 {
            let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
            let (mut index, _) = index();
            index.forget_ingested();
            for key in [&a, &d] {
                // From the tables: the memtables are never read.
                assert!(index
                    .seen_within(&storage, TEST_TENANT, key, now + 1, hour)
                    .unwrap());
            }
            assert!(!index
                .seen_within(&storage, TEST_TENANT, &[5u8; 16], now + 1, hour)
                .unwrap());
        }
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        assert!(!db.keyspace_exists("dedup"), "the old keyspace was kept");
    }

    #[test]
    fn keys_are_found_in_every_period_that_may_hold_them_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let (mut index, _) = index();
        let start = storage.dedup.all()[0].start;
        let minute = Duration::from_secs(60);
        let minute_micros = 60_000_000;
        let (old, again, new) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        into_tables(&storage, &[old, again], start);
        // A second period: `again` is seen again after a one-minute window.
        assert!(storage
            .dedup
            .roll(start + 2 * minute_micros, minute)
            .unwrap());
        into_tables(&storage, &[again, new], start + 2 * minute_micros);
        let now = start + 2 * minute_micros + 1;
        let seen = |index: &mut DedupIndex, key, window| {
            index
                .seen_within(&storage, TEST_TENANT, key, now, window)
                .unwrap()
        };
        assert!(seen(&mut index, &old, minute * 3), "in the older period");
        assert!(!seen(&mut index, &old, minute), "outside the window");
        assert!(
            seen(&mut index, &again, minute),
            "the newer sighting counts"
        );
        assert!(seen(&mut index, &new, minute));
        // The older period ended when the newer started: dropped once that is past the
        // longest window, its keys with it.
        assert_eq!(storage.dedup.expire(start + 2 * minute_micros).unwrap(), 1);
        assert!(!seen(&mut index, &old, minute * 3));
        assert!(seen(&mut index, &again, minute));
    }

    #[test]
    fn a_filter_younger_than_the_window_is_passed_by() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let (mut index, _) = index();
        let hour = Duration::from_secs(3600);
        let hour_micros = 3_600_000_000;
        let (stored, added) = ([1u8; 16], [2u8; 16]);
        let now = 12 * hour_micros;
        // Both in the tables, first seen 20 minutes ago.
        into_tables(&storage, &[stored, added], now - hour_micros / 3);
        // A generation started at 10 h holds only `added`.
        let since = 10 * hour_micros;
        let generation = KeyFilter::new(1_000, Some(since));
        generation.insert(&added);
        index.filter = Some(Arc::new(generation));
        let lookup = |index: &mut DedupIndex, key, window| {
            index
                .seen_within(&storage, TEST_TENANT, key, now, window)
                .unwrap()
        };
        // A window the generation covers: it answers (and holds only what it was given).
        assert!(lookup(&mut index, &added, hour));
        assert!(!lookup(&mut index, &stored, hour));
        // A window reaching back before the generation (and its margin): the tables answer.
        assert!(lookup(&mut index, &stored, hour * 3));
    }

    #[test]
    fn the_longest_window_of_the_tenants_not_deleted_keeps_keys() {
        let windows = DedupWindows::default();
        let minute = Duration::from_secs(60);
        assert_eq!(windows.longest(), Duration::ZERO);
        windows.set_floor(minute);
        windows.set(TenantId(1), minute * 10);
        windows.set(TenantId(2), minute * 30);
        assert_eq!(windows.longest(), minute * 30);
        windows.deleted(TenantId(2));
        assert_eq!(windows.longest(), minute * 10);
        windows.set(TenantId(1), Duration::from_secs(1));
        assert_eq!(windows.longest(), minute, "the floor");
        assert_ne!(
            key(TenantId(1), "a"),
            key(TenantId(2), "a"),
            "keys are per tenant"
        );
    }
}
