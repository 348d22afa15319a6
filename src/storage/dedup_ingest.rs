//! Writes new dedup keys into the `dedup` keyspace's tables, off the log writer thread.
//!
//! The log writer is the one thread every acknowledgement waits for, so it does not insert each
//! event's key into a dedup memtable: a search of a skiplist of random keys, a cache miss per
//! level, would be its largest cost (docs/decisions/0009). Nor does it need to: a dedup key
//! needs no write of its own to be durable, since it is a hash of the messageId, which the log
//! entry already holds. So the writer only commits the log entry, keeps the keys of its recent
//! appends in memory ([`DedupIndex`](super::dedup::DedupIndex)) and, once the group is durable,
//! hands them to this thread. The thread gathers them (a run of [`RUN_KEYS`], or what came within
//! [`MAX_PENDING_AGE`]), sorts them and writes them straight into a new table (fjall's bulk
//! ingestion: no memtable, no journal), then tells the writer it may forget them.
//!
//! What survives a crash: the tables hold every key up to each tenant's *dedup watermark*, the
//! last log sequence whose keys were ingested (`meta` key `d ‖ tenant`, written after the table).
//! At start, [`recover`] derives the keys of every log entry past its tenant's watermark again
//! (first seen = the entry's receive time) and ingests them before the writer takes requests:
//! a retry of an acknowledged event is still a duplicate after `kill -9`.
//!
//! A key reaches the tables only after its event is on disk: in `fsync` mode the writer sends a
//! group's keys once the group is fsync'd; in `buffered` mode this thread fsyncs the journal
//! before each ingestion, so a retry of an event lost to a power failure is not refused. (The
//! storage engine holds its journal lock through that fsync, stalling the log writer's appends,
//! so it is skipped where it is not needed.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rustc_hash::FxHashMap;

use crate::event::{duration_micros, last_seq_of};
use crate::ids::TenantId;
use crate::storage::dedup::{self, DedupKey};
use crate::storage::dedup_filter::{FilterBuilder, KeyFilters};
use crate::storage::{dedup_periods, event_log, meta, Storage, StorageError};
use crate::telemetry;

/// Keys gathered before they are written as one table (8 MiB of keys and values). Until then
/// they are in the writer's memory (about 60 bytes each, twice this many at most while one run
/// is being written); smaller runs mean more ingestions and level-0 compactions, which cost
/// throughput without lowering the peak RSS (docs/decisions/0009).
const RUN_KEYS: usize = 256 * 1024;

/// Longest a received key waits for its run, however few keys came since: bounds what a start
/// after a crash re-reads from the log on a quiet server (and for events without a messageId,
/// which advance the watermarks without adding keys).
pub const MAX_PENDING_AGE: Duration = Duration::from_secs(30);

/// Groups of keys that may wait for this thread before the log writer waits for it (a group
/// holds one to `max_group_requests` requests' keys).
const QUEUE_GROUPS: usize = 1024;

/// What the log writer sends the ingest thread.
pub enum ToIngest {
    /// The keys of a durable group.
    Group(KeyGroup),
    /// Ingest every key received so far now, then answer (the cold tier's flush waits for
    /// the dedup watermark).
    Now(tokio::sync::oneshot::Sender<()>),
}

impl From<KeyGroup> for ToIngest {
    fn from(group: KeyGroup) -> ToIngest {
        ToIngest::Group(group)
    }
}

/// The keys of one durable group commit.
pub struct KeyGroup {
    /// Numbers groups in the order written, from 1.
    pub number: u64,
    /// Keys with their values ([`dedup::value`]); may be empty (events without a messageId).
    pub entries: Vec<(DedupKey, [u8; 16])>,
    /// Each tenant's last log sequence in the group (a tenant appears once or more).
    pub heads: Vec<(TenantId, u64)>,
    /// The group's events were fsync'd before it was sent.
    pub synced: bool,
}

/// Handle to the ingest thread. The thread ingests what is left and stops when the sender
/// returned by [`DedupIngester::start`] is dropped; [`DedupIngester::join`] waits for that.
pub struct DedupIngester {
    thread: JoinHandle<()>,
    /// Builds the in-memory filter of the keys this thread writes; held for its `Drop`, which
    /// stops it.
    _filter_builder: FilterBuilder,
}

impl DedupIngester {
    /// Starts the thread, which writes a run once it has [`RUN_KEYS`] keys or its oldest key
    /// has waited `max_age`, and adds each run's keys to `filters` (whose builder it starts).
    /// Returns the sender for key groups and the number of the last group whose keys the tables
    /// hold. On a failed ingestion the thread clears `healthy` and stops.
    pub fn start(
        storage: Storage,
        healthy: Arc<AtomicBool>,
        max_age: Duration,
        filters: KeyFilters,
    ) -> std::io::Result<(DedupIngester, Sender<ToIngest>, Arc<AtomicU64>)> {
        let (groups, received) = crossbeam_channel::bounded(QUEUE_GROUPS);
        let ingested = Arc::new(AtomicU64::new(0));
        let published = Arc::clone(&ingested);
        let filter_builder = FilterBuilder::start(storage.clone(), filters.clone())?;
        let thread = std::thread::Builder::new()
            .name("dedup-ingest".into())
            .spawn(move || {
                // A panic here would leave acknowledged events' keys out of the dedup tables.
                let _watch = storage
                    .health
                    .watch("dedup-ingest", Some(Arc::clone(&healthy)));
                // Background work like the engine's flushes: the writer holds the keys meanwhile.
                crate::priority::background_thread();
                if let Err(error) = run(&storage, &received, &published, &filters, max_age) {
                    tracing::error!(%error, "writing dedup keys failed; refusing all further writes");
                    healthy.store(false, Ordering::Release);
                }
            })?;
        Ok((
            DedupIngester {
                thread,
                _filter_builder: filter_builder,
            },
            groups,
            ingested,
        ))
    }

    /// Waits until the thread has ingested every key sent and stopped.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("dedup ingest thread panicked");
        }
        // Dropping the rest of `self` stops the filter builder.
    }
}

/// Keys received and not yet ingested, with each tenant's last sequence among them.
#[derive(Default)]
struct Pending {
    /// Keeps its capacity from run to run.
    entries: Vec<(DedupKey, [u8; 16])>,
    heads: FxHashMap<TenantId, u64>,
    last_group: u64,
    /// Some group since the last run was sent before its events were fsync'd.
    unsynced: bool,
    /// When the oldest group not yet ingested arrived.
    since: Option<Instant>,
}

impl Pending {
    fn add(&mut self, group: KeyGroup) {
        self.since.get_or_insert_with(Instant::now);
        self.entries.extend_from_slice(&group.entries);
        for (tenant, seq) in group.heads {
            let head = self.heads.entry(tenant).or_default();
            *head = (*head).max(seq);
        }
        self.last_group = group.number;
        self.unsynced |= !group.synced;
    }

    /// How long the thread may wait for more keys before this run is due.
    fn wait(&self, max_age: Duration) -> Duration {
        self.since
            .map_or(max_age, |since| max_age.saturating_sub(since.elapsed()))
    }

    fn due(&self, max_age: Duration) -> bool {
        self.entries.len() >= RUN_KEYS || (self.since.is_some() && self.wait(max_age).is_zero())
    }

    fn ingest(
        &mut self,
        storage: &Storage,
        ingested: &AtomicU64,
        filters: &KeyFilters,
    ) -> Result<(), StorageError> {
        if self.heads.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let keys = ingest(storage, &mut self.entries, &self.heads, self.unsynced)?;
        // In the filter before the writer may forget them (see `dedup_filter`).
        filters.add(self.entries.iter().map(|(key, _)| key));
        ingested.store(self.last_group, Ordering::Release);
        self.entries.clear();
        self.heads.clear();
        self.unsynced = false;
        self.since = None;
        telemetry::dedup_ingested(keys, started.elapsed());
        Ok(())
    }
}

fn run(
    storage: &Storage,
    received: &Receiver<ToIngest>,
    ingested: &AtomicU64,
    filters: &KeyFilters,
    max_age: Duration,
) -> Result<(), StorageError> {
    let mut pending = Pending::default();
    let mut periods = PeriodUpkeep::default();
    let mut asked: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        match received.recv_timeout(pending.wait(max_age)) {
            Ok(message) => {
                let mut next = Some(message);
                while let Some(message) = next {
                    match message {
                        ToIngest::Group(group) => pending.add(group),
                        ToIngest::Now(reply) => asked.push(reply),
                    }
                    next = received.try_recv().ok();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        storage.health.checkpoint("dedup-ingest");
        periods.tend(storage, filters)?;
        if pending.due(max_age) || !asked.is_empty() {
            pending.ingest(storage, ingested, filters)?;
            for reply in asked.drain(..) {
                let _ = reply.send(());
            }
        }
    }
    // The writer has stopped: what it sent last is written now, with the watermarks, so a
    // clean stop leaves nothing for the next start to recover.
    pending.ingest(storage, ingested, filters)?;
    storage.persist(true)
}

/// Starts and drops the periods of dedup keys ([`dedup_periods`](super::dedup_periods)), and the
/// generations of the in-memory filter with them, at most once a second.
#[derive(Default)]
struct PeriodUpkeep {
    last: Option<Instant>,
}

impl PeriodUpkeep {
    fn tend(&mut self, storage: &Storage, filters: &KeyFilters) -> Result<(), StorageError> {
        if self
            .last
            .is_some_and(|last| last.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let now = crate::event::now_micros();
        let longest = storage.dedup_windows.longest();
        let longest_micros = duration_micros(longest);
        (storage.dedup)
            .roll(now, dedup_periods::period_length(longest))
            .map_err(StorageError::engine("starting a period of dedup keys"))?;
        if let Err(error) = storage.dedup.expire(now.saturating_sub(longest_micros)) {
            // Expired keys only take space until the next try.
            tracing::warn!(%error, "dropping a period of dedup keys failed; tried again later");
        }
        filters.roll(now, longest);
        Ok(())
    }
}

/// Writes `entries` into the dedup tables as one run, then advances the tenants' watermarks to
/// `heads`; returns how many distinct keys were written. With `sync_first`, fsyncs the journal
/// before (the entries' events may not be on disk yet). Blocking.
fn ingest(
    storage: &Storage,
    entries: &mut Vec<(DedupKey, [u8; 16])>,
    heads: &FxHashMap<TenantId, u64>,
    sync_first: bool,
) -> Result<usize, StorageError> {
    // A run holds each key once, in order. A key seen again after its window has two entries:
    // the later first-seen time (the value starts with it, big-endian) wins, as it did in the
    // keyspace.
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.dedup_by_key(|(key, _)| *key);
    // The events of these keys must be on disk before the keys are (see the module docs).
    if sync_first {
        storage.log().commit(&[], true)?;
    }
    let failed = StorageError::engine("ingesting dedup keys");
    let written = (|| {
        let keyspace = storage.dedup.newest();
        let mut ingestion = keyspace.start_ingestion()?;
        for (key, value) in entries.iter() {
            ingestion.write(&key[..], &value[..])?;
        }
        ingestion.finish()
    })();
    written.map_err(failed)?;
    let mut batch = storage.batch();
    for (tenant, seq) in heads {
        batch.insert(&storage.meta, watermark_key(*tenant), seq.to_be_bytes());
    }
    batch
        .commit()
        .map_err(StorageError::engine("writing dedup watermarks"))?;
    Ok(entries.len())
}

fn watermark_key(tenant: TenantId) -> [u8; 9] {
    meta::tenant_key(meta::kind::DEDUP_WATERMARK, tenant)
}

/// The last log sequence of the tenant whose dedup key the tables hold (0 = none).
pub fn watermark(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    meta::get_u64(storage, meta::kind::DEDUP_WATERMARK, tenant)
}

/// Forgets a purged tenant's watermark.
pub fn forget_tenant(storage: &Storage, tenant: TenantId) -> Result<(), StorageError> {
    storage
        .meta
        .remove(watermark_key(tenant))
        .map_err(StorageError::engine("removing a dedup watermark"))
}

/// Brings the dedup tables up to the log before the writer starts: ingests the keys of every
/// log entry past its tenant's watermark. Returns how many keys were recovered. Blocking.
pub fn recover(storage: &Storage) -> Result<usize, StorageError> {
    let tenants = storage.log().tenants()?;
    let layout_known = storage
        .meta
        .get(meta::kind::DEDUP_LAYOUT)
        .map_err(StorageError::engine("reading the dedup layout"))?
        .is_some();
    if !layout_known {
        // A new data dir, or one whose log writer wrote every key with its log entry.
        let mut batch = storage.batch();
        for tenant in &tenants {
            let head = storage.log().head(*tenant)?;
            batch.insert(&storage.meta, watermark_key(*tenant), head.to_be_bytes());
        }
        batch.insert(&storage.meta, meta::kind::DEDUP_LAYOUT, [1u8]);
        batch
            .commit()
            .map_err(StorageError::engine("writing dedup watermarks"))?;
        storage.persist(true)?;
        return Ok(0);
    }
    let mut entries = Vec::new();
    let mut heads = FxHashMap::default();
    for tenant in tenants {
        let from = watermark(storage, tenant)? + 1;
        event_log::scan(storage.log(), tenant, from, |first_seq, batch| {
            let value = dedup::value(tenant, batch.received_at);
            entries.extend(
                (batch.events.iter())
                    .filter_map(|event| dedup::event_key(tenant, event))
                    .map(|key| (key, value)),
            );
            heads.insert(tenant, last_seq_of(first_seq, batch.events.len()));
            std::ops::ControlFlow::Continue(())
        })?;
    }
    if heads.is_empty() {
        return Ok(0);
    }
    // Entries recovered from the journal may have been written in `buffered` mode.
    let keys = ingest(storage, &mut entries, &heads, true)?;
    storage.persist(true)?;
    tracing::info!(keys, "recovered dedup keys from the log");
    Ok(keys)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::event_log::tests::batch;
    use fjall::AbstractTree;

    fn first_seen(storage: &Storage, key: DedupKey) -> Option<i64> {
        let value = storage.dedup.newest().get(key).unwrap()?;
        Some(i64::from_be_bytes(value[..8].try_into().unwrap()))
    }

    /// Commits a log entry as the writer does, without handing its keys to the ingest thread
    /// (as when the process dies before the thread writes them).
    fn append_only_to_log(storage: &Storage, tenant: TenantId, first_seq: u64, ids: &[&str]) {
        let mut entry = batch(ids);
        entry.received_at = 1_000 + first_seq as i64;
        if let Some(event) = entry.events.last_mut().filter(|_| ids.len() > 1) {
            event.flags |= crate::event::flags::GENERATED_ID;
        }
        let value = crate::storage::codec::encode_compressed(&entry).unwrap();
        storage
            .log()
            .append(tenant, first_seq, value.into())
            .unwrap();
        storage.log().commit(&[], true).unwrap();
    }

    #[test]
    fn recovery_ingests_the_keys_of_log_entries_past_each_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        assert_eq!(recover(&storage).unwrap(), 0, "a new data dir has nothing");
        let (one, two) = (TenantId(1), TenantId(2));
        append_only_to_log(&storage, one, 1, &["a", "b", "generated"]);
        append_only_to_log(&storage, two, 1, &["a"]);
        assert_eq!(recover(&storage).unwrap(), 3);
        assert_eq!(first_seen(&storage, dedup::key(one, "a")), Some(1_001));
        assert_eq!(first_seen(&storage, dedup::key(one, "b")), Some(1_001));
        assert_eq!(first_seen(&storage, dedup::key(two, "a")), Some(1_001));
        assert_eq!(first_seen(&storage, dedup::key(one, "generated")), None);
        assert_eq!(
            (
                watermark(&storage, one).unwrap(),
                watermark(&storage, two).unwrap()
            ),
            (3, 1)
        );

        append_only_to_log(&storage, one, 4, &["c"]);
        assert_eq!(
            recover(&storage).unwrap(),
            1,
            "only entries past the watermark"
        );
        assert_eq!(first_seen(&storage, dedup::key(one, "c")), Some(1_004));
        assert_eq!(recover(&storage).unwrap(), 0);
        forget_tenant(&storage, two).unwrap();
        assert_eq!(watermark(&storage, two).unwrap(), 0);
    }

    #[test]
    fn a_data_dir_of_the_earlier_layout_counts_as_ingested() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        // Its writer wrote each key with the log entry.
        append_only_to_log(&storage, TenantId(7), 1, &["a", "b"]);
        assert_eq!(recover(&storage).unwrap(), 0);
        assert_eq!(watermark(&storage, TenantId(7)).unwrap(), 2);
        append_only_to_log(&storage, TenantId(7), 3, &["c"]);
        assert_eq!(recover(&storage).unwrap(), 1);
    }

    #[test]
    fn a_run_fsyncs_the_journal_first_only_after_an_unsynced_group() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let ingested = AtomicU64::new(0);
        let tenant = TenantId(9);
        let group = |number: u64, synced| KeyGroup {
            number,
            entries: vec![(
                dedup::key(tenant, &number.to_string()),
                dedup::value(tenant, 1),
            )],
            heads: vec![(tenant, number)],
            synced,
        };
        let mut pending = Pending::default();
        pending.add(group(1, true));
        assert!(
            !pending.unsynced,
            "fsync mode: the group is on disk already"
        );
        pending.add(group(2, false));
        pending.add(group(3, true));
        assert!(pending.unsynced, "buffered mode: the run fsyncs first");
        pending
            .ingest(&storage, &ingested, &KeyFilters::new(0))
            .unwrap();
        assert!(!pending.unsynced, "the next run starts over");
        assert_eq!(ingested.load(Ordering::Acquire), 3);
        assert_eq!(watermark(&storage, tenant).unwrap(), 3);
    }

    #[test]
    fn the_thread_writes_every_group_it_was_sent_and_the_newest_entry_of_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        recover(&storage).unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let filters = KeyFilters::new(64 << 20);
        let (thread, groups, ingested) = DedupIngester::start(
            storage.clone(),
            Arc::clone(&healthy),
            MAX_PENDING_AGE,
            filters.clone(),
        )
        .unwrap();
        crate::storage::dedup_filter::tests::wait_until_built(&filters);
        let tenant = TenantId(3);
        let (a, b) = (dedup::key(tenant, "a"), dedup::key(tenant, "b"));
        for (number, entries) in [
            (
                1,
                vec![(a, dedup::value(tenant, 10)), (b, dedup::value(tenant, 10))],
            ),
            (2, vec![]),
            // `a` again, after its window.
            (3, vec![(a, dedup::value(tenant, 99))]),
        ] {
            let heads = vec![(tenant, number * 10)];
            groups
                .send(
                    KeyGroup {
                        number,
                        entries,
                        heads,
                        synced: true,
                    }
                    .into(),
                )
                .unwrap();
        }
        drop(groups);
        thread.join();
        assert!(healthy.load(Ordering::Acquire));
        assert_eq!(ingested.load(Ordering::Acquire), 3);
        assert_eq!(first_seen(&storage, a), Some(99));
        assert_eq!(first_seen(&storage, b), Some(10));
        assert_eq!(watermark(&storage, tenant).unwrap(), 30);
        let filter = filters.current().unwrap();
        assert!(
            filter.may_contain(&a) && filter.may_contain(&b),
            "ingested keys are in the filter"
        );
        assert_eq!(
            storage.dedup.newest().tree.active_memtable().size(),
            0,
            "no memtable writes"
        );
    }

    #[test]
    fn a_few_keys_are_written_once_the_oldest_has_waited_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        recover(&storage).unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let max_age = Duration::from_millis(50);
        let (thread, groups, ingested) =
            DedupIngester::start(storage.clone(), healthy, max_age, KeyFilters::new(0)).unwrap();
        let tenant = TenantId(5);
        let key = dedup::key(tenant, "quiet");
        let entries = vec![(key, dedup::value(tenant, 10))];
        let heads = vec![(tenant, 1)];
        groups
            .send(
                KeyGroup {
                    number: 1,
                    entries,
                    heads,
                    synced: true,
                }
                .into(),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ingested.load(Ordering::Acquire) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Written while the writer still runs (its sender is alive).
        assert_eq!(ingested.load(Ordering::Acquire), 1);
        assert_eq!(first_seen(&storage, key), Some(10));
        assert_eq!(watermark(&storage, tenant).unwrap(), 1);
        drop(groups);
        thread.join();
    }
}
