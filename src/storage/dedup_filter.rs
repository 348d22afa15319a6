//! One in-memory Bloom filter over every key in the `dedup` tables, so that the log writer's
//! "never seen" answer costs one filter probe instead of one per table.
//!
//! Almost every event is new, and the engine looks a new key up in every table of the keyspace,
//! through each table's own filter: a probe of scattered bits, a cache miss or more, per table,
//! on the log writer thread that every acknowledgement waits for (docs/decisions/0012). Here one
//! filter answers for all tables; only a key it may hold (a duplicate, or a false positive in
//! about 1% of new keys) is read from the tables.
//!
//! The rule that keeps it exact: every key the tables hold is in the filter the writer uses, or
//! still in the writer's own index of recent keys ([`DedupIndex`](super::dedup::DedupIndex)).
//! - The ingest thread puts a run's keys into the filter (and into one being built) after the
//!   table is written and before it tells the writer it may forget them.
//! - A build registers its new filter with the ingest thread first, then scans the keyspace, so
//!   a key is either in the scan or put in by the ingest thread.
//! - The writer takes the current filter only after reading how far the ingest thread got, and
//!   uses it until it forgets more keys.
//!
//! A filter cannot forget, so filters come in generations (docs/decisions/0038). The ingest
//! thread adds keys to the current filter and to a newer one, started later. Once the newer one
//! is as old as the longest dedup window, it holds every key first seen within any window: it
//! becomes the current one, the older is dropped and another is started. No key is read back
//! for this. The `dedup-filter` thread builds a filter from the tables only at start, when the
//! current filter holds more keys than it was sized for, and when a window grew longer than
//! the current filter covers (until then lookups read the tables). Until the first build is
//! done, and when the keys would need more memory than `storage.dedup_filter_memory`, lookups
//! read the tables' own filters.

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use fastbloom::AtomicBloomFilter;

use crate::event::{duration_micros, Micros};
use crate::storage::dedup::DedupKey;
use crate::storage::{Storage, StorageError};

/// False-positive rate a filter is sized for, when it holds as many keys as it has room for.
const FALSE_POSITIVE_RATE: f64 = 0.01;
/// Fewest keys a filter has room for (about 19 MiB), and the room of the first filter built
/// from the tables: enough that a server starting afresh under load needs no rebuild (a scan of
/// every key) before its first generation has measured how many keys a window brings.
const MIN_CAPACITY: u64 = 16 << 20;
/// See [`KeyFilter::covers`]; a generation takes over once it covers the longest window by
/// this much.
const CLOCK_MARGIN: Micros = 60_000_000;
/// A generation is sized for this many times the keys its predecessor took in one window: it
/// takes keys for two (one as the newer filter, one as the current).
const GENERATION_ROOM: u64 = 3;
/// Keys a build reads with one iterator; between chunks it checks whether the server is stopping.
const SCAN_CHUNK_KEYS: u64 = 1 << 15;

/// A Bloom filter of dedup keys, with room for `capacity` keys.
pub struct KeyFilter {
    bloom: AtomicBloomFilter,
    capacity: u64,
    inserted: AtomicU64,
    /// When this generation started taking keys; `None`: built from the tables (holds every
    /// key they held).
    since: Option<Micros>,
}

impl KeyFilter {
    pub(in crate::storage) fn new(capacity: u64, since: Option<Micros>) -> KeyFilter {
        let items = usize::try_from(capacity).unwrap_or(usize::MAX);
        KeyFilter {
            bloom: AtomicBloomFilter::with_false_pos(FALSE_POSITIVE_RATE).expected_items(items),
            capacity,
            inserted: AtomicU64::new(0),
            since,
        }
    }

    /// Whether this filter holds every stored key first seen at or after `since`: it was built
    /// from the tables, or started taking keys [`CLOCK_MARGIN`] before. A key is first seen
    /// before it is added, so a generation lacks only keys first seen before it started; the
    /// margin covers a lookup clock ahead of this one (a process node's lookups use the ingest
    /// node's receive time).
    pub fn covers(&self, since: Micros) -> bool {
        self.since
            .is_none_or(|start| since >= start.saturating_add(CLOCK_MARGIN))
    }

    /// Whether the key may be in the tables (`false`: certainly not).
    pub fn may_contain(&self, key: &DedupKey) -> bool {
        self.bloom.contains_hash(hash(key))
    }

    pub(in crate::storage) fn insert(&self, key: &DedupKey) {
        self.bloom.insert_hash(hash(key));
    }

    fn inserted(&self, keys: u64) {
        self.inserted.fetch_add(keys, Ordering::Relaxed);
    }

    /// Holds more keys than it was sized for.
    fn full(&self) -> bool {
        self.inserted.load(Ordering::Relaxed) > self.capacity
    }

    pub fn bytes(&self) -> usize {
        self.bloom.num_bits() / 8
    }
}

/// The key is already a uniform hash (xxh3-128): its first eight bytes seed the filter's probes.
fn hash(key: &DedupKey) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_ne_bytes(first)
}

/// Bytes a filter with room for `capacity` keys takes.
fn bytes_for(capacity: u64) -> u64 {
    let bits = fastbloom::optimal_size(
        usize::try_from(capacity).unwrap_or(usize::MAX),
        FALSE_POSITIVE_RATE,
    );
    u64::try_from(bits / 8).unwrap_or(u64::MAX)
}

/// Keys a filter of `bytes` has room for (about 9.6 bits a key at a 1% false-positive rate).
fn capacity_for(bytes: u64) -> u64 {
    bytes.saturating_mul(8) / 10
}

/// The filters shared by the log writer (reads), the ingest thread (adds keys) and the builder.
#[derive(Clone)]
pub struct KeyFilters(Arc<Shared>);

struct Shared {
    /// Both filters under one lock: the ingest thread must see a build's filter either still
    /// building or already current, never neither (its keys would then miss the new filter).
    slots: RwLock<Slots>,
    /// Most memory one filter may take (two exist while one is rebuilt).
    max_bytes: u64,
    /// Whether the last build found the keys over the budget (warned about once).
    over_budget: AtomicBool,
    /// Asks the builder for a new filter; full while one is asked for.
    rebuild: Sender<()>,
    requests: Receiver<()>,
}

#[derive(Default, Clone)]
struct Slots {
    /// The filter lookups use; `None` until the first build, or when over the memory budget.
    current: Option<Arc<KeyFilter>>,
    /// The next generation, started after the current one: the ingest thread adds its keys
    /// here too.
    newer: Option<Arc<KeyFilter>>,
    /// A filter being built: the ingest thread adds its keys here too.
    building: Option<Arc<KeyFilter>>,
}

impl Slots {
    /// No filter (not built yet, or over the budget when last tried), or a full one.
    fn needs_build(&self) -> bool {
        self.current.as_ref().is_none_or(|filter| filter.full())
    }
}

impl KeyFilters {
    /// Filters of at most `max_bytes` each (0: none, lookups always read the tables).
    pub fn new(max_bytes: u64) -> KeyFilters {
        let (rebuild, requests) = crossbeam_channel::bounded(1);
        KeyFilters(Arc::new(Shared {
            slots: RwLock::new(Slots::default()),
            max_bytes,
            over_budget: AtomicBool::new(false),
            rebuild,
            requests,
        }))
    }

    /// The filter lookups use now (see the module docs for when the writer may take it).
    pub fn current(&self) -> Option<Arc<KeyFilter>> {
        self.slots().current
    }

    fn slots(&self) -> Slots {
        let slots = (self.0.slots.read()).unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.clone()
    }

    fn update(&self, change: impl FnOnce(&mut Slots)) {
        let mut slots = (self.0.slots.write()).unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut slots);
    }

    /// Adds keys just written into the tables, before the writer is told it may forget them.
    /// Asks for a build when the current filter has outgrown its size, or when there is none
    /// (the keys may fit the budget again once compaction expired some). Called by the ingest
    /// thread only.
    pub fn add<'a>(&self, keys: impl Iterator<Item = &'a DedupKey> + Clone) {
        let slots = self.slots();
        for filter in [&slots.current, &slots.newer, &slots.building]
            .into_iter()
            .flatten()
        {
            let mut count = 0;
            for key in keys.clone() {
                filter.insert(key);
                count += 1;
            }
            filter.inserted(count);
        }
        if slots.needs_build() {
            let _ = self.0.rebuild.try_send(());
        }
    }

    /// Moves the generations on at `now`, for dedup windows of at most `longest`: starts the
    /// newer filter if there is none, and makes it current once it is `longest` old. Called by
    /// the ingest thread only (the one that adds keys), so a generation holds every key added
    /// since it started.
    pub fn roll(&self, now: Micros, longest: Duration) {
        let longest = duration_micros(longest);
        let max_capacity = capacity_for(self.0.max_bytes);
        let mut rebuild = false;
        self.update(|slots| {
            let Some(current) = &slots.current else {
                return; // Built from the tables first.
            };
            if !current.covers(now.saturating_sub(longest)) {
                // A window grew longer than the current filter covers: it may lack stored keys
                // within it. Lookups read the tables until a filter is built from them.
                slots.current = None;
                slots.newer = None;
                rebuild = true;
                return;
            }
            let capacity = match &slots.newer {
                None => current.capacity,
                Some(newer) if newer.covers(now.saturating_sub(longest)) => {
                    let taken = newer.inserted.load(Ordering::Relaxed);
                    slots.current = slots.newer.take();
                    taken.saturating_mul(GENERATION_ROOM)
                }
                Some(_) => return,
            };
            let capacity = capacity.clamp(MIN_CAPACITY.min(max_capacity), max_capacity);
            slots.newer = Some(Arc::new(KeyFilter::new(capacity, Some(now))));
        });
        if rebuild {
            let _ = self.0.rebuild.try_send(());
        }
    }

    /// Builds a filter of every key in the tables and makes it current. Returns its size in
    /// bytes, or `None` when the keys would take more than the budget (lookups then read the
    /// tables) or the server is stopping.
    fn build(
        &self,
        storage: &Storage,
        stopping: &AtomicBool,
    ) -> Result<Option<usize>, StorageError> {
        let started = Instant::now();
        let keys = storage.dedup.approximate_len() as u64;
        let capacity = keys.saturating_mul(2).max(MIN_CAPACITY);
        if bytes_for(capacity) > self.0.max_bytes {
            self.update(|slots| slots.current = None);
            if !self.0.over_budget.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    keys,
                    max_bytes = self.0.max_bytes,
                    "the dedup keys outgrow storage.dedup_filter_memory: lookups read the tables"
                );
            }
            return Ok(None);
        }
        self.0.over_budget.store(false, Ordering::Relaxed);
        let filter = Arc::new(KeyFilter::new(capacity, None));
        // Registered before the scan starts: what the scan misses, the ingest thread adds.
        self.update(|slots| slots.building = Some(Arc::clone(&filter)));
        let scanned = scan_into(storage, &filter, stopping);
        let scanned = match scanned {
            Ok(Some(scanned)) => scanned,
            failed_or_stopped => {
                self.update(|slots| slots.building = None);
                return failed_or_stopped
                    .map(|_| None)
                    .map_err(StorageError::engine("scanning dedup keys"));
            }
        };
        filter.inserted(scanned);
        let bytes = filter.bytes();
        // In one step: from here on the ingest thread adds to this filter as the current one.
        self.update(|slots| {
            slots.current = Some(filter);
            slots.building = None;
        });
        tracing::info!(
            keys = scanned,
            capacity,
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "built the dedup key filter"
        );
        Ok(Some(bytes))
    }
}

/// Puts every key of every period of dedup keys into `filter`; `None` if the server began to stop.
///
/// In chunks of [`SCAN_CHUNK_KEYS`], each with an iterator of its own: an open iterator holds a
/// snapshot, and one held for the whole scan (seconds, at low priority under load) would keep
/// everything the engine frees meanwhile, raising the peak RSS by as much
/// (docs/decisions/0012).
fn scan_into(
    storage: &Storage,
    filter: &KeyFilter,
    stopping: &AtomicBool,
) -> Result<Option<u64>, fjall::Error> {
    let mut scanned = 0u64;
    for period in storage.dedup.all().iter() {
        let mut after: Bound<DedupKey> = Bound::Unbounded;
        loop {
            let mut chunk = 0;
            for guard in period.keyspace.range((after, Bound::Unbounded)) {
                let key = guard.key()?;
                let Ok(key) = DedupKey::try_from(&key[..]) else {
                    continue; // Not a dedup key of this layout: never looked up.
                };
                filter.insert(&key);
                after = Bound::Excluded(key);
                chunk += 1;
                if chunk == SCAN_CHUNK_KEYS {
                    break;
                }
            }
            scanned += chunk;
            if stopping.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if chunk < SCAN_CHUNK_KEYS {
                break;
            }
        }
    }
    Ok(Some(scanned))
}

/// The `dedup-filter` thread: builds the first filter at start and a new one whenever the
/// current one is full. Dropping it stops a build in progress and joins the thread.
pub struct FilterBuilder {
    thread: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    filters: KeyFilters,
}

impl FilterBuilder {
    pub fn start(storage: Storage, filters: KeyFilters) -> std::io::Result<FilterBuilder> {
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("dedup-filter".into())
            .spawn({
                let filters = filters.clone();
                let stopping = Arc::clone(&stopping);
                move || {
                    // Lookups stay exact without a filter: writes go on if this thread dies.
                    let _watch = storage.health.watch("dedup-filter", None);
                    crate::priority::background_thread();
                    if filters.0.max_bytes == 0 {
                        return;
                    }
                    let _ = filters.0.rebuild.try_send(());
                    while filters.0.requests.recv().is_ok() && !stopping.load(Ordering::Acquire) {
                        // A request made while the last build ran is already answered.
                        if !filters.slots().needs_build() {
                            continue;
                        }
                        if let Err(error) = filters.build(&storage, &stopping) {
                            // The current filter (or none) stays: lookups remain exact.
                            tracing::error!(%error, "building the dedup key filter failed");
                        }
                    }
                }
            })?;
        Ok(FilterBuilder {
            thread: Some(thread),
            stopping,
            filters,
        })
    }
}

impl Drop for FilterBuilder {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wakes the thread if it waits for a request (if one is queued, it is awake anyway).
        let _ = self.filters.0.rebuild.try_send(());
        if self
            .thread
            .take()
            .is_some_and(|thread| thread.join().is_err())
        {
            tracing::error!("dedup filter thread panicked");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::TenantId;
    use crate::storage::dedup;
    use crate::storage::dedup::tests::into_tables;

    /// Waits for the builder's first filter (a test fails instead of hanging if none comes).
    pub(crate) fn wait_until_built(filters: &KeyFilters) -> Arc<KeyFilter> {
        let started = Instant::now();
        loop {
            if let Some(filter) = filters.current() {
                return filter;
            }
            assert!(started.elapsed().as_secs() < 30, "no filter was built");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn keys(prefix: &str, count: usize) -> Vec<DedupKey> {
        (0..count)
            .map(|i| dedup::key(TenantId(1), &format!("{prefix}{i}")))
            .collect()
    }

    fn false_positives(filter: &KeyFilter, keys: &[DedupKey]) -> usize {
        keys.iter().filter(|key| filter.may_contain(key)).count()
    }

    #[test]
    fn a_build_holds_every_stored_key_and_the_runs_added_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        // More than one chunk of the scan.
        let stored = keys("stored", SCAN_CHUNK_KEYS as usize + 7_000);
        into_tables(&storage, &stored, 1);
        let filters = KeyFilters::new(64 << 20);
        assert!(
            filters.current().is_none(),
            "no filter before the first build"
        );
        let bytes = filters.build(&storage, &AtomicBool::new(false)).unwrap();
        let expected = bytes_for(MIN_CAPACITY) as usize;
        assert!(
            bytes.is_some_and(|bytes| bytes.abs_diff(expected) < 64),
            "{bytes:?}"
        );
        let filter = filters.current().unwrap();
        assert!(stored.iter().all(|key| filter.may_contain(key)));
        let fresh = keys("fresh", 10_000);
        assert!(
            false_positives(&filter, &fresh) < 100,
            "new keys pass the filter"
        );

        let added = keys("added", 100);
        filters.add(added.iter());
        assert!(added.iter().all(|key| filter.may_contain(key)));
        assert_eq!(
            filter.inserted.load(Ordering::Relaxed),
            stored.len() as u64 + 100
        );
    }

    #[test]
    fn keys_added_during_a_build_reach_the_new_filter() {
        let filters = KeyFilters::new(64 << 20);
        let building = Arc::new(KeyFilter::new(1_000, None));
        filters.update(|slots| slots.building = Some(Arc::clone(&building)));
        let added = keys("during", 100);
        filters.add(added.iter());
        assert!(added.iter().all(|key| building.may_contain(key)));
    }

    #[test]
    fn keys_added_while_a_build_runs_and_swaps_are_in_the_new_filter() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        into_tables(&storage, &keys("stored", 4 * SCAN_CHUNK_KEYS as usize), 1);
        let filters = KeyFilters::new(64 << 20);
        let builder = std::thread::spawn({
            let (filters, storage) = (filters.clone(), storage.clone());
            move || filters.build(&storage, &AtomicBool::new(false)).unwrap()
        });
        // As the ingest thread: runs of keys, before, during and right after the swap.
        let mut added = Vec::new();
        let mut round = 0;
        while !builder.is_finished() || round < 3 {
            // Written first, then added: what the ingest thread does.
            let run = keys(&format!("run{round}-"), 50);
            for key in &run {
                let value = dedup::value(TenantId(1), 1);
                storage.dedup.newest().insert(&key[..], &value[..]).unwrap();
            }
            filters.add(run.iter());
            added.extend(run);
            round += 1;
            if builder.is_finished() {
                continue;
            }
            std::thread::yield_now();
        }
        assert!(builder.join().unwrap().is_some());
        let filter = filters.current().unwrap();
        assert!(
            added.iter().all(|key| filter.may_contain(key)),
            "a run added around the build is missing from it"
        );
    }

    #[test]
    fn a_full_filter_asks_for_a_rebuild_once() {
        let filters = KeyFilters::new(64 << 20);
        filters.add(keys("none", 1).iter());
        assert!(
            filters.0.requests.try_recv().is_ok(),
            "without a filter, one is asked for"
        );
        filters.update(|slots| slots.current = Some(Arc::new(KeyFilter::new(10, None))));
        filters.add(keys("a", 10).iter());
        assert!(filters.0.requests.try_recv().is_err(), "not full yet");
        filters.add(keys("b", 1).iter());
        filters.add(keys("c", 1).iter());
        assert!(filters.0.requests.try_recv().is_ok());
        assert!(
            filters.0.requests.try_recv().is_err(),
            "one request at a time"
        );
    }

    #[test]
    fn keys_beyond_the_memory_budget_leave_lookups_to_the_tables() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let filters = KeyFilters::new(1 << 20);
        filters.update(|slots| slots.current = Some(Arc::new(KeyFilter::new(10, None))));
        assert_eq!(
            filters.build(&storage, &AtomicBool::new(false)).unwrap(),
            None
        );
        assert!(filters.current().is_none());
    }

    #[test]
    fn generations_take_over_once_they_cover_the_longest_window() {
        let filters = KeyFilters::new(64 << 20);
        let hour = Duration::from_secs(3600);
        let hour_micros = 3_600_000_000;
        filters.roll(0, hour);
        assert!(
            filters.current().is_none(),
            "nothing before the first build"
        );
        let built = Arc::new(KeyFilter::new(1_000, None));
        filters.update(|slots| slots.current = Some(Arc::clone(&built)));
        let before = keys("before", 100);
        filters.add(before.iter());

        // The first generation starts; keys go into both filters.
        filters.roll(10, hour);
        let first = filters.slots().newer.unwrap();
        assert_eq!(first.since, Some(10));
        let during = keys("during", 100);
        filters.add(during.iter());
        assert!(during.iter().all(|key| first.may_contain(key)));
        assert!(false_positives(&first, &before) < 10, "it starts empty");

        // Not yet an hour (and the clock margin) old: the built filter stays current.
        let covered = 10 + hour_micros + CLOCK_MARGIN;
        filters.roll(covered - 1, hour);
        assert!(Arc::ptr_eq(&filters.current().unwrap(), &built));
        // Old enough: it holds every key first seen within the hour and takes over; the next
        // generation is sized for three times what it took.
        filters.roll(covered, hour);
        assert!(Arc::ptr_eq(&filters.current().unwrap(), &first));
        assert!(first.covers(covered - hour_micros));
        assert!(!first.covers(covered - hour_micros - 1));
        let second = filters.slots().newer.unwrap();
        assert_eq!(second.since, Some(covered));
        assert_eq!(second.capacity, MIN_CAPACITY, "at least the smallest room");
        assert!(filters.0.requests.try_recv().is_err(), "no build asked for");

        // A window longer than the current generation covers: no filter until one is built.
        filters.roll(covered + 1, hour * 2);
        assert!(filters.current().is_none());
        assert!(filters.slots().newer.is_none());
        assert!(
            filters.0.requests.try_recv().is_ok(),
            "a build is asked for"
        );
    }

    #[test]
    fn the_builder_thread_builds_at_start_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let stored = keys("stored", 1_000);
        into_tables(&storage, &stored, 1);
        let filters = KeyFilters::new(64 << 20);
        let builder = FilterBuilder::start(storage.clone(), filters.clone()).unwrap();
        let filter = wait_until_built(&filters);
        assert!(stored.iter().all(|key| filter.may_contain(key)));
        drop(builder);
    }
}
