//! The durable event log and its writer thread (group commit).
//!
//! One dedicated OS thread, the [`LogWriter`], owns all writes to `log`. Requests
//! arrive on a bounded queue. The thread takes everything queued (up to `max_group_requests`),
//! and for each request drops duplicates, assigns sequence numbers and commits the log entry.
//! Then it persists the journal once for the whole group (fsync in `fsync` mode) and only then
//! answers the requests. While it fsyncs, new requests queue up and form the next group: the
//! busier the server, the more requests share an fsync. The group's new dedup keys then go to
//! the [`dedup_ingest`] thread, which writes them into the dedup tables.
//!
//! Being the only writer makes dedup and sequence assignment race-free without locks.
//!
//! If persisting ever fails, the writer refuses every later append (and `/readyz` reports it):
//! after a failed fsync the state of the journal is unknown, so nothing more may be acknowledged,
//! not even as a duplicate of an event that may not be on disk.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tokio::sync::oneshot;

use std::ops::ControlFlow;

use crate::event::{last_seq_of, now_micros, BatchShared, LogBatch, LogBatchView, Micros};
use crate::rollup::{RollupBatch, RollupItems};
use crate::storage::dedup_filter::KeyFilters;
use crate::storage::dedup_ingest::{self, DedupIngester, KeyGroup};
use crate::storage::upkeep::Upkeep;
use crate::storage::{codec, dedup, tenant_key, Storage, StorageError};
use crate::telemetry;
use crate::tenant::TenantId;

/// Called once with the outcome of an append, after the write is durable (or has failed).
pub type AppendReply = Box<dyn FnOnce(Result<AppendOutcome, StorageError>) + Send>;

/// Append one request's events to a tenant's log.
pub struct AppendRequest {
    pub tenant: TenantId,
    /// When the request was queued (for the queue-wait metric).
    pub queued_at: Instant,
    pub dedup_window: Duration,
    pub batch: PreparedBatch,
    pub reply: AppendReply,
}

/// A log batch made ready by its sender, in parallel with other senders: encoded and compressed
/// as the log entry, with each event's dedup key and rollup item. The one writer thread then
/// only deduplicates and commits (it decodes and re-encodes only a batch that had duplicates).
/// The decoded events are freed by the sender: freeing them was 2% of the server's CPU on the
/// writer thread.
pub struct PreparedBatch {
    encoded: fjall::Slice,
    /// `None` for an event whose messageId the server generated (never a duplicate).
    dedup_keys: Vec<Option<dedup::DedupKey>>,
    items: RollupItems,
}

impl PreparedBatch {
    pub fn new(tenant: TenantId, batch: LogBatch) -> Result<PreparedBatch, StorageError> {
        let encoded = encode_entry(&batch)?;
        let dedup_keys = batch
            .events
            .iter()
            .map(|event| dedup::event_key(tenant, event))
            .collect();
        let items = RollupItems::from_events(&batch.events);
        Ok(PreparedBatch {
            encoded,
            dedup_keys,
            items,
        })
    }
}

/// The items whose `keep` flag is set.
fn only_kept<T>(items: Vec<T>, keep: &[bool]) -> Vec<T> {
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, kept)| kept.then_some(item))
        .collect()
}

/// A log entry: the [`LogBatch`], then its [`crate::event::BatchShared`] as a trailer when it
/// has any (entries without one, older ones included, decode with an empty one).
fn encode_entry(batch: &LogBatch) -> Result<fjall::Slice, StorageError> {
    let encoded = if batch.shared.is_empty() {
        codec::encode_compressed_value(batch)
    } else {
        // bincode writes a tuple as its fields one after the other.
        codec::encode_compressed_value(&(batch, &batch.shared))
    };
    encoded.map_err(|source| StorageError::Codec {
        keyspace: "log",
        source,
    })
}

/// What happened to a request's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    /// Sequence number of the first accepted event; `None` if none was accepted.
    pub first_seq: Option<u64>,
    /// What the rollups need of the accepted events (they are durable when this is delivered).
    pub rollup: Option<RollupBatch>,
}

/// The last durable log sequence of each tenant written by this process.
#[derive(Clone, Default)]
pub struct LogHeads(Arc<dashmap::DashMap<TenantId, u64>>);

impl LogHeads {
    pub fn get(&self, tenant: TenantId) -> Option<u64> {
        self.0.get(&tenant).map(|v| *v)
    }

    fn advance(&self, tenant: TenantId, seq: u64) {
        let mut entry = self.0.entry(tenant).or_insert(seq);
        if *entry < seq {
            *entry = seq;
        }
    }
}

enum Command {
    Append(Box<AppendRequest>),
    Seal {
        tenant: TenantId,
        reply: oneshot::Sender<()>,
    },
    Shutdown,
}

/// Handle to the writer thread.
pub struct LogWriter {
    queue: Sender<Command>,
    heads: LogHeads,
    /// The writer thread, the thread that writes its dedup keys, and the upkeep thread that
    /// seals the memtables it fills and frees what the engine lets go of; taken at shutdown.
    threads: Mutex<Option<(JoinHandle<()>, DedupIngester, Upkeep)>>,
    /// False once the thread has stopped or a persist has failed.
    healthy: Arc<AtomicBool>,
}

/// Settings of the writer thread.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    pub fsync: bool,
    pub queue_capacity: usize,
    pub max_group_requests: usize,
    /// Most memory the in-memory filter of dedup keys may take (0: no filter).
    pub dedup_filter_bytes: u64,
}

impl LogWriter {
    /// Starts the writer thread, after bringing the dedup tables up to the log (blocking).
    pub fn start(storage: Storage, options: WriterOptions) -> std::io::Result<LogWriter> {
        dedup_ingest::recover(&storage).map_err(std::io::Error::other)?;
        let (queue, commands) = crossbeam_channel::bounded(options.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let thread_healthy = Arc::clone(&healthy);
        let heads = LogHeads::default();
        let thread_heads = heads.clone();
        let upkeep = Upkeep::start(storage.clone(), Arc::clone(&healthy))?;
        let filters = KeyFilters::new(options.dedup_filter_bytes);
        let (ingester, key_groups, ingested) = DedupIngester::start(
            storage.clone(),
            Arc::clone(&healthy),
            dedup_ingest::MAX_PENDING_AGE,
            filters.clone(),
        )?;
        let dedup = dedup::DedupIndex::open(ingested, filters);
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let _alive = AliveGuard(Arc::clone(&thread_healthy));
                let _watch = storage.health.watch("log-writer", None);
                let mut writer = Writer {
                    storage,
                    options,
                    dedup,
                    key_groups,
                    group_keys: Vec::new(),
                    group_heads: Vec::new(),
                    groups_sent: 0,
                    next_seq: HashMap::new(),
                    sealed: HashSet::new(),
                    failure: None,
                    healthy: thread_healthy,
                    heads: thread_heads,
                    group_started: None,
                };
                writer.run(&commands);
            })?;
        Ok(LogWriter {
            queue,
            heads,
            threads: Mutex::new(Some((thread, ingester, upkeep))),
            healthy,
        })
    }

    /// Queues an append without blocking. If the queue is full or the writer has stopped, the
    /// request's reply is called at once with the error.
    pub fn submit(&self, request: AppendRequest) {
        let refused = match self.queue.try_send(Command::Append(Box::new(request))) {
            Ok(()) => return,
            Err(TrySendError::Full(command)) => (command, StorageError::QueueFull),
            Err(TrySendError::Disconnected(command)) => (command, StorageError::WriterStopped),
        };
        if let (Command::Append(request), error) = refused {
            (request.reply)(Err(error));
        }
    }

    /// Refuses every later append for the tenant, after the appends queued before this call
    /// have been written. Once it returns, nothing more is written for the tenant, so its data
    /// can be purged off this thread ([`crate::storage::purge_tenant`]).
    pub async fn seal_tenant(&self, tenant: TenantId) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.clone();
        // Blocking send: sealing is a rare admin call and must not be dropped for a full queue.
        let sent = tokio::task::spawn_blocking(move || {
            queue.send(Command::Seal { tenant, reply }).is_ok()
        })
        .await
        .unwrap_or(false);
        if !sent {
            return Err(StorageError::WriterStopped);
        }
        answer.await.map_err(|_| StorageError::WriterStopped)
    }

    /// The last durable sequence of each tenant written since start.
    pub fn heads(&self) -> &LogHeads {
        &self.heads
    }

    /// True while the thread runs and no persist has failed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Writes everything queued, persists, and stops the thread. Blocking; idempotent.
    pub fn shutdown(&self) {
        let threads = match self.threads.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some((thread, ingester, upkeep)) = threads else {
            return;
        };
        let _ = self.queue.send(Command::Shutdown);
        if thread.join().is_err() {
            tracing::error!("log writer thread panicked");
        }
        // The writer's end closed the ingest thread's queue: it writes the last keys and stops.
        ingester.join();
        // Dropping it stops and joins the upkeep thread, once the writer has written all.
        drop(upkeep);
    }
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type Reply = (AppendReply, Result<AppendOutcome, StorageError>);

struct Writer {
    storage: Storage,
    options: WriterOptions,
    /// The keys of recent appends, until the dedup tables hold them.
    dedup: dedup::DedupIndex,
    /// To the ingest thread: each durable group's new dedup keys.
    key_groups: crossbeam_channel::Sender<KeyGroup>,
    /// The current group's new dedup keys with their values, and each tenant's last sequence.
    group_keys: Vec<(dedup::DedupKey, [u8; 16])>,
    group_heads: Vec<(TenantId, u64)>,
    /// Groups sent to the ingest thread so far; the current group will be number + 1.
    groups_sent: u64,
    /// Next sequence number per tenant, loaded from the log on first use.
    next_seq: HashMap<TenantId, u64>,
    /// Tenants being deleted: late appends for them are refused.
    sealed: HashSet<TenantId>,
    /// Set by the first failed persist; every later append is refused with it.
    failure: Option<String>,
    healthy: Arc<AtomicBool>,
    heads: LogHeads,
    /// When the current group started being written (for the write-time metric).
    group_started: Option<Instant>,
}

impl Writer {
    fn run(&mut self, commands: &Receiver<Command>) {
        let mut stopping = false;
        while !stopping {
            let first = match commands.recv() {
                Ok(command) => command,
                Err(_) => break,
            };
            let mut group = vec![first];
            while group.len() < self.options.max_group_requests {
                match commands.try_recv() {
                    Ok(command) => group.push(command),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            telemetry::log_queue_depth(commands.len());
            let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
            let group_started = Instant::now();
            self.group_started = Some(group_started);
            let oldest_wait = group
                .iter()
                .filter_map(|command| match command {
                    Command::Append(request) => Some(group_started - request.queued_at),
                    _ => None,
                })
                .max();
            if let Some(wait) = oldest_wait {
                telemetry::log_queue_wait(wait);
            }
            for command in group {
                match command {
                    Command::Append(request) => {
                        let reply = request.reply;
                        let outcome =
                            self.append(request.tenant, request.dedup_window, request.batch);
                        replies.push((reply, outcome));
                    }
                    Command::Seal { tenant, reply } => {
                        self.finish_group(&mut replies);
                        self.sealed.insert(tenant);
                        self.next_seq.remove(&tenant);
                        let _ = reply.send(());
                    }
                    Command::Shutdown => stopping = true,
                }
            }
            self.finish_group(&mut replies);
        }
        // Anything queued behind the shutdown command is still written.
        let mut replies = Vec::new();
        while let Ok(command) = commands.try_recv() {
            if let Command::Append(request) = command {
                let reply = request.reply;
                let outcome = self.append(request.tenant, request.dedup_window, request.batch);
                replies.push((reply, outcome));
            }
        }
        self.finish_group(&mut replies);
        if let Err(error) = self.storage.persist(true) {
            tracing::error!(%error, "final persist of the log failed");
        }
        tracing::info!("log writer stopped");
    }

    /// Persists the journal once for every commit of the group, then answers the requests.
    fn finish_group(&mut self, replies: &mut Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let started = Instant::now();
        if let Some(group_started) = self.group_started.take() {
            telemetry::log_write(started - group_started);
        }
        let persisted = self.storage.persist(self.options.fsync);
        let sync = started.elapsed();
        let events: usize = replies
            .iter()
            .filter_map(|(_, outcome)| outcome.as_ref().ok())
            .map(|outcome| outcome.accepted)
            .sum();
        telemetry::group_committed(replies.len(), events, sync);
        match persisted {
            Ok(()) => {
                for (reply, outcome) in replies.drain(..) {
                    if let Ok(AppendOutcome {
                        rollup: Some(batch),
                        ..
                    }) = &outcome
                    {
                        self.heads.advance(batch.tenant, batch.last_seq());
                    }
                    reply(outcome);
                }
                self.send_keys();
            }
            Err(error) => {
                tracing::error!(%error, "persisting the log failed; refusing all further writes");
                let reason = error.to_string();
                self.failure = Some(reason.clone());
                self.healthy.store(false, Ordering::Release);
                for (reply, _) in replies.drain(..) {
                    reply(Err(StorageError::NotDurable(reason.clone())));
                }
                self.group_keys.clear();
                self.group_heads.clear();
            }
        }
    }

    /// Hands the durable group's dedup keys to the ingest thread (waiting if it is far behind)
    /// and forgets the keys it has written.
    fn send_keys(&mut self) {
        if !self.group_heads.is_empty() {
            self.groups_sent += 1;
            let group = KeyGroup {
                number: self.groups_sent,
                entries: std::mem::take(&mut self.group_keys),
                heads: std::mem::take(&mut self.group_heads),
                synced: self.options.fsync,
            };
            // Fails only once the ingest thread has stopped on an error; it cleared `healthy`,
            // and the next append is refused.
            let _ = self.key_groups.send(group);
        }
        self.dedup.forget_ingested();
    }

    /// Drops duplicates, assigns sequence numbers and commits the log entry. Not yet durable:
    /// the caller persists the whole group.
    fn append(
        &mut self,
        tenant: TenantId,
        dedup_window: Duration,
        prepared: PreparedBatch,
    ) -> Result<AppendOutcome, StorageError> {
        if self.failure.is_none() && !self.healthy.load(Ordering::Acquire) {
            self.failure = Some("writing dedup keys failed".into());
        }
        if let Some(reason) = &self.failure {
            return Err(StorageError::NotDurable(reason.clone()));
        }
        if self.sealed.contains(&tenant) {
            return Err(StorageError::TenantDeleted(tenant));
        }
        let now = now_micros();
        let mut in_request: rustc_hash::FxHashSet<dedup::DedupKey> = Default::default();
        let mut keep = Vec::with_capacity(prepared.dedup_keys.len());
        let mut inserted = Vec::with_capacity(prepared.dedup_keys.len());
        for key in &prepared.dedup_keys {
            let Some(key) = key else {
                keep.push(true);
                continue;
            };
            let duplicate = !in_request.insert(*key)
                || (self.dedup).seen_within(&self.storage, tenant, key, now, dedup_window)?;
            if !duplicate {
                inserted.push(*key);
            }
            keep.push(!duplicate);
        }
        let accepted = keep.iter().filter(|kept| **kept).count();
        let duplicates = keep.len() - accepted;
        if accepted == 0 {
            return Ok(AppendOutcome {
                accepted: 0,
                duplicates,
                first_seq: None,
                rollup: None,
            });
        }
        let PreparedBatch { encoded, items, .. } = prepared;
        let (value, items) = if duplicates == 0 {
            (encoded, items)
        } else {
            let mut batch = decode_batch(&encoded)?;
            batch.events = only_kept(std::mem::take(&mut batch.events), &keep);
            let mut items = items;
            items.retain_kept(&keep);
            (encode_entry(&batch)?, items)
        };
        let first_seq = self.next_seq(tenant)?;
        // The entry is the only write: its events' dedup keys go to the ingest thread later.
        self.storage
            .log
            .insert(tenant_key(tenant, first_seq), value)
            .map_err(StorageError::engine("committing a log batch"))?;
        self.dedup.record(&inserted, now, self.groups_sent + 1);
        let value = dedup::value(tenant, now);
        self.group_keys
            .extend(inserted.iter().map(|key| (*key, value)));
        self.group_heads
            .push((tenant, last_seq_of(first_seq, accepted)));
        self.next_seq.insert(tenant, first_seq + accepted as u64);
        Ok(AppendOutcome {
            accepted,
            duplicates,
            first_seq: Some(first_seq),
            rollup: Some(RollupBatch {
                tenant,
                first_seq,
                items,
            }),
        })
    }

    fn next_seq(&mut self, tenant: TenantId) -> Result<u64, StorageError> {
        if let Some(next) = self.next_seq.get(&tenant) {
            return Ok(*next);
        }
        let next = last_seq(&self.storage, tenant)? + 1;
        self.next_seq.insert(tenant, next);
        Ok(next)
    }
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<(u64, LogBatch), StorageError> {
    Ok((entry_seq(key)?, decode_batch(value)?))
}

fn decode_batch(value: &[u8]) -> Result<LogBatch, StorageError> {
    let plain = codec::plain(value).map_err(log_codec_error)?;
    let (mut batch, shared): (LogBatch, BatchShared) =
        plain.decode_with_trailer().map_err(log_codec_error)?;
    batch.shared = shared;
    Ok(batch)
}

/// The tenant's last sequence number in the log (0 when it has none). Blocking.
pub fn last_seq(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let Some(guard) = storage.log.prefix(tenant.0.to_be_bytes()).next_back() else {
        return Ok(0);
    };
    let (key, value) = guard
        .into_inner()
        .map_err(StorageError::engine("reading the log"))?;
    let (first_seq, batch) = decode_entry(&key, &value)?;
    Ok(last_seq_of(first_seq, batch.events.len()))
}

/// Visits every log entry of a tenant from `from_seq` on, in sequence order, reading in chunks;
/// `visit` may stop the scan early. Blocking.
pub fn scan(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    scan_entries(storage, tenant, from_seq, |first_seq, value| {
        let batch = decode_batch(value)?;
        Ok((visit(first_seq, &batch), batch.events.len()))
    })
}

/// Like [`scan`], with each entry decoded as a [`LogBatchView`], whose text borrows from the
/// entry: for scans that keep little of each event. Blocking.
pub fn scan_views(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    mut visit: impl FnMut(u64, &LogBatchView<'_>) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    scan_entries(storage, tenant, from_seq, |first_seq, value| {
        let plain = codec::plain(value).map_err(log_codec_error)?;
        let batch: LogBatchView = plain.decode().map_err(log_codec_error)?;
        Ok((visit(first_seq, &batch), batch.events.len()))
    })
}

/// The loop of [`scan`] and [`scan_views`]: `each` decodes and visits one raw entry, and says
/// whether to go on and how many events the entry held.
fn scan_entries(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    mut each: impl FnMut(u64, &[u8]) -> Result<(ControlFlow<()>, usize), StorageError>,
) -> Result<(), StorageError> {
    let mut next_seq = from_seq;
    loop {
        let entries = read_entries(storage, tenant, next_seq, SCAN_CHUNK)?;
        if entries.is_empty() {
            return Ok(());
        }
        for (first_seq, value) in &entries {
            let (flow, events) = each(*first_seq, value)?;
            if flow.is_break() {
                return Ok(());
            }
            next_seq = last_seq_of(*first_seq, events) + 1;
        }
    }
}

/// How far out of receive order entries may be committed (requests are timestamped when they
/// arrive and sequenced when the writer takes them), with room for small clock adjustments.
pub const RECEIVE_ORDER_SLACK: Micros = 10 * 60 * 1_000_000;

/// The first sequence a scan for events timestamped at or after `from` must start at, so that a
/// funnel or an export over recent events does not read the tenant's whole history. An event's
/// timestamp is at most its receive time plus `future_tolerance` (later ones are clamped at
/// ingestion), so no entry received before `from - future_tolerance - RECEIVE_ORDER_SLACK` holds
/// one. Entries are appended in arrival order, so this is a binary search over the tenant's
/// sequence numbers: O(log n) entries read, each only as far as its receive time. Blocking.
pub fn first_seq_received_since(
    storage: &Storage,
    tenant: TenantId,
    from: Micros,
    future_tolerance: Duration,
) -> Result<u64, StorageError> {
    let tolerance = Micros::try_from(future_tolerance.as_micros()).unwrap_or(Micros::MAX);
    let since = from
        .saturating_sub(tolerance)
        .saturating_sub(RECEIVE_ORDER_SLACK);
    // The answer is in [low, high]: entries starting at or after it were received since `since`.
    let (mut low, mut high) = (0u64, last_seq(storage, tenant)?.saturating_add(1));
    while low < high {
        let middle = low + (high - low) / 2;
        match entry_holding(storage, tenant, middle)? {
            Some((first_seq, received_at)) if received_at >= since => high = first_seq,
            _ => low = middle + 1,
        }
    }
    Ok(low)
}

/// The first sequence and receive time of the tenant's entry holding `seq` (or the last one
/// before it), if any.
fn entry_holding(
    storage: &Storage,
    tenant: TenantId,
    seq: u64,
) -> Result<Option<(u64, Micros)>, StorageError> {
    /// The leading fields of a [`LogBatch`]; decoding stops after them.
    #[derive(serde::Deserialize)]
    struct EntryHead {
        _batch_id: u128,
        received_at: Micros,
    }
    let range = tenant_key(tenant, 0)..=tenant_key(tenant, seq);
    let Some(guard) = storage.log.range(range).next_back() else {
        return Ok(None);
    };
    let (key, value) = guard
        .into_inner()
        .map_err(StorageError::engine("reading the log"))?;
    let head: EntryHead = codec::decode(&value).map_err(log_codec_error)?;
    Ok(Some((entry_seq(&key)?, head.received_at)))
}

/// Log entries read per step of [`scan`].
const SCAN_CHUNK: usize = 256;

/// The rollup items of the tenant's log entries whose first sequence is ≥ `from_seq`, in order,
/// at most `max_batches` entries (at least one, if there is one). Blocking.
pub fn read_items(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    max_batches: usize,
) -> Result<Vec<(u64, RollupItems)>, StorageError> {
    let mut out = Vec::new();
    scan_views(storage, tenant, from_seq, |first_seq, batch| {
        let items = RollupItems::from_views(&batch.events);
        out.push((first_seq, items));
        if out.len() < max_batches {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    })?;
    Ok(out)
}

/// Up to `max_entries` raw log entries of a tenant from `from_seq` on: (first sequence, value).
fn read_entries(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    max_entries: usize,
) -> Result<Vec<(u64, fjall::Slice)>, StorageError> {
    let start = tenant_key(tenant, from_seq);
    let end = tenant_key(tenant, u64::MAX);
    let mut out = Vec::new();
    for guard in storage.log.range(start..=end).take(max_entries) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading the log"))?;
        out.push((entry_seq(&key)?, value));
    }
    Ok(out)
}

/// The first sequence in a log key.
fn entry_seq(key: &[u8]) -> Result<u64, StorageError> {
    key.get(8..16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or(StorageError::Codec {
            keyspace: "log",
            source: codec::CodecError::Empty,
        })
}

fn log_codec_error(source: codec::CodecError) -> StorageError {
    StorageError::Codec {
        keyspace: "log",
        source,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event::{BatchSource, EventKind, StoredEvent};

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            kind: EventKind::Track,
            message_id: id.into(),
            name: Some("Signed Up".into()),
            user_id: Some("u1".into()),
            anonymous_id: None,
            group_id: None,
            previous_id: None,
            timestamp: 1,
            original_timestamp: None,
            sent_at: None,
            received_at: 1,
            user_hash: 7,
            library_name: None,
            library_version: None,
            flags: 0,
            properties: None,
            traits: None,
            context: None,
            integrations: None,
            extra: vec![],
        }
    }

    /// Up to `max_batches` log entries of a tenant from `from_seq` on, decoded.
    fn read_batches(
        storage: &Storage,
        tenant: TenantId,
        from_seq: u64,
        max_batches: usize,
    ) -> Result<Vec<(u64, LogBatch)>, StorageError> {
        let mut out = Vec::new();
        scan(storage, tenant, from_seq, |first_seq, batch| {
            out.push((first_seq, batch.clone()));
            if out.len() < max_batches {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })?;
        Ok(out)
    }

    /// A log batch of track events with these messageIds.
    pub(crate) fn batch(ids: &[&str]) -> LogBatch {
        LogBatch {
            batch_id: 1,
            received_at: 1,
            source: BatchSource {
                endpoint: "/v1/batch".into(),
                client_ip: None,
            },
            events: ids.iter().map(|id| event(id)).collect(),
            shared: Default::default(),
        }
    }

    async fn append(writer: &LogWriter, tenant: TenantId, ids: &[&str]) -> AppendOutcome {
        try_append(writer, tenant, ids).await.unwrap()
    }

    fn options() -> WriterOptions {
        WriterOptions {
            fsync: true,
            queue_capacity: 16,
            max_group_requests: 8,
            dedup_filter_bytes: 16 << 20,
        }
    }

    async fn try_append(
        writer: &LogWriter,
        tenant: TenantId,
        ids: &[&str],
    ) -> Result<AppendOutcome, StorageError> {
        let (reply, answer) = oneshot::channel();
        writer.submit(AppendRequest {
            tenant,
            queued_at: Instant::now(),
            dedup_window: Duration::from_secs(3600),
            batch: PreparedBatch::new(tenant, batch(ids)).unwrap(),
            reply: Box::new(move |outcome| {
                let _ = reply.send(outcome);
            }),
        });
        answer.await.unwrap()
    }

    /// A panic in a thread that writes depend on is reported by name and stops the
    /// acknowledgement of writes.
    #[actix_rt::test]
    async fn a_panicking_storage_thread_is_reported_and_stops_the_writes_it_guards() {
        for thread in ["dedup-ingest", "storage-upkeep"] {
            let dir = tempfile::tempdir().unwrap();
            let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
            let writer = LogWriter::start(storage.clone(), options()).unwrap();
            append(&writer, TenantId(1), &["a"]).await;
            storage.health.inject_panic(thread);
            let deadline = Instant::now() + Duration::from_secs(10);
            while storage.health.failed().is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{thread} did not reach its checkpoint"
                );
                // The ingest thread passes its checkpoint when it receives a group.
                let _ = try_append(&writer, TenantId(1), &["b"]).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(storage.health.failed(), vec![thread]);
            assert!(!writer.is_healthy(), "{thread}");
            let refused = try_append(&writer, TenantId(1), &["c"]).await;
            assert!(
                matches!(refused, Err(StorageError::NotDurable(_))),
                "{thread}: {refused:?}"
            );
            writer.shutdown();
        }
    }

    #[test]
    fn batch_level_objects_are_a_trailer_that_old_entries_lack() {
        let mut with_shared = batch(&["a", "b"]);
        with_shared.shared = BatchShared {
            context: Some(r#"{"library":{"name":"x"}}"#.into()),
            integrations: None,
        };
        let encoded = encode_entry(&with_shared).unwrap();
        assert_eq!(decode_batch(&encoded).unwrap(), with_shared);
        // Views skip the trailer.
        let plain = codec::plain(&encoded).unwrap();
        let view: LogBatchView = plain.decode().unwrap();
        assert_eq!(view.events.len(), 2);
        // An entry written before the trailer existed (the plain batch) decodes with none.
        let old = codec::encode_compressed(&batch(&["c"])).unwrap();
        assert_eq!(decode_batch(&old).unwrap(), batch(&["c"]));
    }

    #[test]
    fn scans_for_recent_events_start_at_the_first_entry_received_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(7);
        let tolerance = Duration::from_secs(3600);
        let start = |from: Micros| first_seq_received_since(&storage, tenant, from, tolerance);
        assert_eq!(
            start(0).unwrap(),
            1,
            "empty log: from the first sequence a tenant gets"
        );
        // Entries of 1 to 4 events, received one hour apart, with another tenant's in between.
        let hour: Micros = 3_600_000_000;
        let mut seq = 1;
        let mut firsts = Vec::new();
        for n in 0..200u64 {
            let mut entry = batch(&vec!["e"; (n % 4 + 1) as usize]);
            entry.received_at = n as Micros * hour;
            storage
                .log
                .insert(tenant_key(tenant, seq), encode_entry(&entry).unwrap())
                .unwrap();
            storage
                .log
                .insert(tenant_key(TenantId(8), n), encode_entry(&entry).unwrap())
                .unwrap();
            firsts.push((seq, entry.received_at));
            seq += entry.events.len() as u64;
        }
        let margin = hour + RECEIVE_ORDER_SLACK;
        for from in [
            -5 * hour,
            0,
            1,
            hour,
            2 * hour + 1,
            117 * hour,
            199 * hour,
            500 * hour,
        ] {
            let expected = firsts
                .iter()
                .find(|(_, received)| *received >= from - margin)
                .map_or(seq, |(first, _)| *first);
            let found = start(from).unwrap();
            // Every entry before `found` was received too early; `found` itself starts an entry.
            assert!(found <= expected, "from {from}: {found} > {expected}");
            assert_eq!(
                read_batches(&storage, tenant, found, 1)
                    .unwrap()
                    .first()
                    .map(|(s, _)| *s),
                read_batches(&storage, tenant, expected, 1)
                    .unwrap()
                    .first()
                    .map(|(s, _)| *s),
                "from {from}"
            );
        }
    }

    #[actix_rt::test]
    async fn sequences_continue_and_duplicates_are_dropped_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId(42);
        {
            let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
            let writer = LogWriter::start(storage, options()).unwrap();
            let first = append(&writer, tenant, &["a", "b", "a"]).await;
            assert_eq!(
                (first.accepted, first.duplicates, first.first_seq),
                (2, 1, Some(1))
            );
            let second = append(&writer, tenant, &["c"]).await;
            assert_eq!(second.first_seq, Some(3));
            writer.shutdown();
        }
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let writer = LogWriter::start(storage.clone(), options()).unwrap();
        let third = append(&writer, tenant, &["b", "d"]).await;
        assert_eq!(
            (third.accepted, third.duplicates, third.first_seq),
            (1, 1, Some(4))
        );
        let entries = read_batches(&storage, tenant, 0, 100).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        writer.seal_tenant(tenant).await.unwrap();
        let (reply, answer) = oneshot::channel();
        writer.submit(AppendRequest {
            tenant,
            queued_at: Instant::now(),
            dedup_window: Duration::from_secs(3600),
            batch: PreparedBatch::new(tenant, batch(&["late"])).unwrap(),
            reply: Box::new(move |outcome| {
                let _ = reply.send(outcome);
            }),
        });
        assert!(matches!(
            answer.await.unwrap(),
            Err(StorageError::TenantDeleted(_))
        ));
        assert_eq!(crate::storage::purge_tenant(&storage, tenant).unwrap(), 3);
        assert!(read_batches(&storage, tenant, 0, 100).unwrap().is_empty());
        writer.shutdown();
    }
}
