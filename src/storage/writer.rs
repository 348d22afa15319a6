//! The log writer thread: deduplication, sequencing and group commit.
//!
//! One dedicated OS thread, the [`LogWriter`], owns all appends to the [`EventLog`]. Requests
//! arrive on a bounded queue. The thread takes everything queued (up to `max_group_requests`),
//! and for each request drops duplicates, assigns sequence numbers and stages the log entry.
//! Then it writes the group's heads, flushes the journal to the OS and hands the group to the
//! [`syncer`](crate::storage::syncer) thread, and goes on with the next group while that one
//! fsyncs (in `fsync` mode) and answers the requests in order, each with facts
//! ([`AppendOutcome`]): what the events mean is the actors' business. Groups staged during an
//! fsync share the next one: the busier the server, the more requests share an fsync. A durable
//! group's new dedup keys then go to the [`dedup_ingest`] thread, which writes them into the
//! dedup tables.
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

use crate::event::{last_seq_of, now_micros, LogBatch, Micros};
use crate::ids::TenantId;
use crate::storage::dedup_filter::KeyFilters;
use crate::storage::dedup_ingest::{self, DedupIngester, KeyGroup, ToIngest};
use crate::storage::event_log::{decode_batch, encode_entry, EntryBytes, EventLog};
use crate::storage::syncer::{self, Staged, StagedGroup, SyncShared, Syncer, ToSync};
use crate::storage::upkeep::Upkeep;
use crate::storage::{codec, deadletters, dedup, Storage, StorageError};
use crate::telemetry;

/// Called once with the outcome of an append, after the write is durable (or has failed).
pub type AppendReply = Box<dyn FnOnce(Result<AppendOutcome, StorageError>) + Send>;

/// Append one request's events to a tenant's log.
pub struct AppendRequest {
    pub tenant: TenantId,
    /// When the request was queued (for the queue-wait metric).
    pub queued_at: Instant,
    pub dedup_window: Duration,
    /// What counts as now for the dedup window: `None`, the writer's clock; a process node
    /// gives the batch's receive time, so that every replay of the stream decides the same.
    pub clock: Option<Micros>,
    pub batch: PreparedBatch,
    pub reply: AppendReply,
}

/// What an [`AppendRequest`] made with [`AppendRequest::answered`] becomes.
pub type AppendAnswer = oneshot::Receiver<Result<AppendOutcome, StorageError>>;

impl AppendRequest {
    /// A request queued now, whose outcome arrives on the returned receiver (for callers that
    /// await it rather than act in the reply).
    pub fn answered(
        tenant: TenantId,
        dedup_window: Duration,
        batch: PreparedBatch,
    ) -> (AppendRequest, AppendAnswer) {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            tenant,
            queued_at: Instant::now(),
            dedup_window,
            clock: None,
            batch,
            reply: Box::new(move |outcome| {
                let _ = reply.send(outcome);
            }),
        };
        (request, answer)
    }

    /// The same request, deciding the dedup window as of `at` (see [`AppendRequest::clock`]).
    pub fn at(mut self, at: Micros) -> AppendRequest {
        self.clock = Some(at);
        self
    }
}

/// Where prepared batches go to become durable: the local [`LogWriter`], or, on a cluster's
/// ingest nodes, the event stream (`crate::cluster::publish`). Either answers each request
/// through its reply once the batch is durable or has failed.
pub trait Append: Send + Sync {
    fn submit(&self, request: AppendRequest);
}

impl Append for LogWriter {
    fn submit(&self, request: AppendRequest) {
        LogWriter::submit(self, request);
    }
}

/// A log batch made ready by its sender, in parallel with other senders: encoded and compressed
/// as the log entry, with each event's dedup key. The one writer thread then only deduplicates
/// and commits (it decodes and re-encodes only a batch that had duplicates). The decoded events
/// are freed by the sender: freeing them is per-event work, which the writer thread must not
/// do (docs/decisions/0014).
#[derive(Debug, PartialEq)]
pub struct PreparedBatch {
    encoded: EntryBytes,
    /// `None` for an event whose messageId the server generated (never a duplicate).
    dedup_keys: Vec<Option<dedup::DedupKey>>,
    /// Events refused by the tenant's plan, stored with the group unless they are duplicates.
    dead_letters: Vec<PreparedDeadLetter>,
    /// The record the letters share (their request's batch-level objects), stored with them.
    dead_letter_batch: Option<(deadletters::LetterKey, Vec<u8>)>,
    /// Keys only looked up, never stored: of events dropped before the log (sampled out), to
    /// tell the retries of logged events among them.
    probes: Vec<Option<dedup::DedupKey>>,
}

/// A dead letter made ready by its sender.
#[derive(Debug, PartialEq)]
pub struct PreparedDeadLetter {
    /// The event's dedup key (`None`: the client sent no messageId).
    pub dedup_key: Option<dedup::DedupKey>,
    pub key: deadletters::LetterKey,
    pub value: Vec<u8>,
}

impl PreparedBatch {
    pub fn new(tenant: TenantId, batch: &LogBatch) -> Result<PreparedBatch, StorageError> {
        let encoded = encode_entry(batch)?;
        let dedup_keys = batch
            .events
            .iter()
            .map(|event| dedup::event_key(tenant, event))
            .collect();
        Ok(PreparedBatch {
            encoded,
            dedup_keys,
            dead_letters: Vec::new(),
            dead_letter_batch: None,
            probes: Vec::new(),
        })
    }

    /// The request's dead letters (key and value), then their batch record, if any.
    pub fn dead_letter_records(&self) -> Vec<(deadletters::LetterKey, Vec<u8>)> {
        (self.dead_letters.iter())
            .map(|letter| (letter.key, letter.value.clone()))
            .chain(self.dead_letter_batch.clone())
            .collect()
    }

    /// Adds the request's dead letters: the writer stores those that are not duplicates of
    /// logged events, in the same group commit as the entry.
    /// `batch` is the record they share (stored if any of them is).
    pub fn with_dead_letters(
        mut self,
        letters: Vec<PreparedDeadLetter>,
        batch: Option<(deadletters::LetterKey, Vec<u8>)>,
    ) -> PreparedBatch {
        self.dead_letters = letters;
        self.dead_letter_batch = batch;
        self
    }

    /// The log entry as it will be stored (see `storage::event_log::decode_batch`).
    pub fn entry(&self) -> &[u8] {
        &self.encoded
    }

    /// How many events the entry holds.
    pub fn events(&self) -> usize {
        self.dedup_keys.len()
    }

    /// Adds keys to look up only (see [`AppendOutcome::probe_duplicates`]).
    pub fn with_probes(mut self, probes: Vec<Option<dedup::DedupKey>>) -> PreparedBatch {
        self.probes = probes;
        self
    }

    /// The batch as bytes for another node's writer: what an ingest node publishes to the
    /// event stream in cluster mode. Layout: [`WIRE_VERSION`], the tenant (8 bytes,
    /// big-endian), the length of the rest's metadata (4 bytes), the metadata (dedup keys,
    /// dead letters, probes, the tenant's dedup window; codec-encoded), then the log entry as
    /// it will be stored.
    pub fn to_wire(
        &self,
        tenant: TenantId,
        dedup_window: Duration,
    ) -> Result<Vec<u8>, StorageError> {
        let meta = WireMeta {
            dedup_window_micros: u64::try_from(dedup_window.as_micros()).unwrap_or(u64::MAX),
            dedup_keys: self.dedup_keys.clone(),
            dead_letters: (self.dead_letters.iter())
                .map(|letter| (letter.dedup_key, letter.key.to_vec(), letter.value.clone()))
                .collect(),
            dead_letter_batch: (self.dead_letter_batch.as_ref())
                .map(|(key, value)| (key.to_vec(), value.clone())),
            probes: self.probes.clone(),
        };
        let meta = codec::encode(&meta).map_err(wire_error)?;
        let meta_len = u32::try_from(meta.len())
            .map_err(|_| wire_error(codec::CodecError::Invalid("metadata too large".into())))?;
        let mut out = Vec::with_capacity(13 + meta.len() + self.encoded.len());
        out.push(WIRE_VERSION);
        out.extend_from_slice(&tenant.0.to_be_bytes());
        out.extend_from_slice(&meta_len.to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.encoded);
        Ok(out)
    }

    /// A batch from [`PreparedBatch::to_wire`]'s bytes, with its tenant and dedup window. The
    /// entry is not copied. Bytes of another layout are an error, never a panic.
    pub fn from_wire(bytes: bytes::Bytes) -> Result<WireBatch, StorageError> {
        let invalid = |why: &str| wire_error(codec::CodecError::Invalid(why.into()));
        if bytes.first() != Some(&WIRE_VERSION) {
            return Err(invalid("unknown stream batch version"));
        }
        let header = |range: std::ops::Range<usize>| {
            bytes
                .get(range)
                .ok_or_else(|| invalid("stream batch cut short"))
        };
        let tenant = TenantId(u64::from_be_bytes(
            header(1..9)?
                .try_into()
                .map_err(|_| invalid("bad tenant"))?,
        ));
        let meta_len = u32::from_be_bytes(
            header(9..13)?
                .try_into()
                .map_err(|_| invalid("bad length"))?,
        ) as usize;
        let meta_end = 13usize
            .checked_add(meta_len)
            .ok_or_else(|| invalid("bad length"))?;
        let meta: WireMeta = codec::decode(header(13..meta_end)?).map_err(wire_error)?;
        let letter_key = |key: Vec<u8>| -> Result<deadletters::LetterKey, StorageError> {
            key.try_into().map_err(|_| invalid("bad dead-letter key"))
        };
        let dead_letters = (meta.dead_letters.into_iter())
            .map(|(dedup_key, key, value)| {
                Ok(PreparedDeadLetter {
                    dedup_key,
                    key: letter_key(key)?,
                    value,
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        let dead_letter_batch = match meta.dead_letter_batch {
            Some((key, value)) => Some((letter_key(key)?, value)),
            None => None,
        };
        let prepared = PreparedBatch {
            encoded: EntryBytes::from(bytes.slice(meta_end..)),
            dedup_keys: meta.dedup_keys,
            dead_letters,
            dead_letter_batch,
            probes: meta.probes,
        };
        Ok(WireBatch {
            tenant,
            dedup_window: Duration::from_micros(meta.dedup_window_micros),
            batch: prepared,
        })
    }
}

/// A batch as another node sent it ([`PreparedBatch::from_wire`]).
#[derive(Debug)]
pub struct WireBatch {
    pub tenant: TenantId,
    /// The tenant's dedup window when the batch was sent: every node applies the batch with
    /// it, whatever the directory says later.
    pub dedup_window: Duration,
    pub batch: PreparedBatch,
}

/// The layout version of [`PreparedBatch::to_wire`].
pub const WIRE_VERSION: u8 = 2;

/// A [`PreparedBatch`]'s parts besides its entry, on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireMeta {
    dedup_window_micros: u64,
    dedup_keys: Vec<Option<dedup::DedupKey>>,
    dead_letters: Vec<(Option<dedup::DedupKey>, Vec<u8>, Vec<u8>)>,
    dead_letter_batch: Option<(Vec<u8>, Vec<u8>)>,
    probes: Vec<Option<dedup::DedupKey>>,
}

fn wire_error(source: codec::CodecError) -> StorageError {
    StorageError::Codec {
        keyspace: "stream",
        source,
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

/// When a request went through the writer's stages: queued, its group started being written,
/// the group's commit (fsync) started and ended. For the request's stage metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub queued_at: Instant,
    pub group_started: Instant,
    pub commit_started: Instant,
    pub committed: Instant,
}

/// What happened to a request's events; delivered once the accepted ones are durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub tenant: TenantId,
    /// The writer's stages (`None` where no local writer appended it: cluster publishes).
    pub timing: Option<Timing>,
    pub accepted: usize,
    pub duplicates: usize,
    /// Sequence number of the first accepted event; `None` if none was accepted. The accepted
    /// events have the sequences from it on, in request order.
    pub first_seq: Option<u64>,
    /// Positions in the request of the events dropped as duplicates, ascending.
    pub duplicate_positions: Vec<usize>,
    /// Dead letters stored.
    pub dead_lettered: usize,
    /// Positions among the request's dead letters of those that were duplicates of logged
    /// events (not stored), ascending.
    pub dead_letter_duplicates: Vec<usize>,
    /// Positions among the request's probes of those whose key a logged event has, ascending.
    pub probe_duplicates: Vec<usize>,
}

impl AppendOutcome {
    /// Whether the event at `position` in the request was new (stored), for every position.
    pub fn new_events(&self) -> Vec<bool> {
        let mut new = vec![true; self.accepted + self.duplicates];
        for position in &self.duplicate_positions {
            if let Some(slot) = new.get_mut(*position) {
                *slot = false;
            }
        }
        new
    }
}

/// The last durable log sequence of each tenant written by this process.
#[derive(Clone, Default)]
pub struct LogHeads(Arc<dashmap::DashMap<TenantId, u64>>);

impl LogHeads {
    pub fn get(&self, tenant: TenantId) -> Option<u64> {
        self.0.get(&tenant).map(|v| *v)
    }

    pub(crate) fn advance(&self, tenant: TenantId, seq: u64) {
        let mut entry = self.0.entry(tenant).or_insert(seq);
        if *entry < seq {
            *entry = seq;
        }
    }
}

/// Dedup keys first seen at one time (the receive time of the batch whose events they are).
pub type KeysSeenAt = (Micros, Vec<dedup::DedupKey>);

enum Command {
    Append(Box<AppendRequest>),
    /// Takes over a tenant's state from elsewhere (a cluster partition's checkpoint): its log
    /// continues after `head`, and `keys` count as seen.
    Import {
        tenant: TenantId,
        head: u64,
        keys: Vec<KeysSeenAt>,
        reply: oneshot::Sender<()>,
    },
    Seal {
        tenant: TenantId,
        reply: oneshot::Sender<()>,
    },
    IngestKeysNow(oneshot::Sender<()>),
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
    /// Longest a new dedup key waits before it is written to the dedup tables (see
    /// [`dedup_ingest::MAX_PENDING_AGE`]); the cold tier flushes only what they cover.
    pub dedup_max_age: Duration,
    /// Whether letters are stored, or only checked for duplicates (a cluster's process node
    /// keeps them in the shared store instead: `crate::cluster::deadletters`).
    pub store_dead_letters: bool,
    /// Benchmarks only: a wait added to every fsync'd commit, to stand for a slow disk
    /// (`benchmark.fsync_delay`).
    pub fsync_delay: Duration,
}

impl LogWriter {
    /// Starts the writer thread, after bringing the dedup tables up to the log (blocking).
    pub fn start(storage: Storage, options: WriterOptions) -> std::io::Result<LogWriter> {
        let log = storage.log_handle();
        LogWriter::start_on(storage, log, options)
    }

    /// [`LogWriter::start`] on `log` (the storage's own, or a test's wrapper of it).
    fn start_on(
        storage: Storage,
        log: Arc<dyn EventLog>,
        options: WriterOptions,
    ) -> std::io::Result<LogWriter> {
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
            options.dedup_max_age,
            filters.clone(),
        )?;
        let dedup = dedup::DedupIndex::open(ingested, filters);
        let sync_failure = Arc::new(Mutex::new(None));
        let syncer = Syncer::start(SyncShared {
            log: Arc::clone(&log),
            heads: heads.clone(),
            key_groups,
            healthy: Arc::clone(&healthy),
            failure: Arc::clone(&sync_failure),
            fsync: options.fsync,
            fsync_delay: options.fsync_delay,
            health: Arc::clone(&storage.health),
        })?;
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let _alive = AliveGuard(Arc::clone(&thread_healthy));
                let _watch = storage.health.watch("log-writer", None);
                let mut writer = Writer {
                    storage,
                    log,
                    options,
                    dedup,
                    syncer,
                    sync_failure,
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

    /// Takes over a tenant's state from a cluster partition's checkpoint: its log continues
    /// after `head`, and `keys` count as seen at their times. The tenant must have nothing in
    /// this writer's log (cluster mode imports under a new local id).
    pub async fn import(
        &self,
        tenant: TenantId,
        head: u64,
        keys: Vec<KeysSeenAt>,
    ) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.clone();
        let command = Command::Import {
            tenant,
            head,
            keys,
            reply,
        };
        let sent = crate::blocking::run(move || queue.send(command).is_ok())
            .await
            .unwrap_or(false);
        if !sent {
            return Err(StorageError::WriterStopped);
        }
        answer.await.map_err(|_| StorageError::WriterStopped)
    }

    /// Refuses every later append for the tenant, after the appends queued before this call
    /// have been written. Once it returns, nothing more is written for the tenant, so its data
    /// can be purged off this thread ([`crate::storage::purge_tenant`]).
    pub async fn seal_tenant(&self, tenant: TenantId) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.clone();
        // Blocking send: sealing is a rare admin call and must not be dropped for a full queue.
        let sent =
            crate::blocking::run(move || queue.send(Command::Seal { tenant, reply }).is_ok())
                .await
                .unwrap_or(false);
        if !sent {
            return Err(StorageError::WriterStopped);
        }
        answer.await.map_err(|_| StorageError::WriterStopped)
    }

    /// Has the dedup keys of every append acknowledged before this call written into the dedup
    /// tables, advancing the dedup watermarks (which the cold tier's flushes wait for).
    pub async fn ingest_dedup_keys_now(&self) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.clone();
        let sent = crate::blocking::run(move || queue.send(Command::IngestKeysNow(reply)).is_ok())
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

struct Writer {
    storage: Storage,
    log: Arc<dyn EventLog>,
    options: WriterOptions,
    /// The keys of recent appends, until the dedup tables hold them.
    dedup: dedup::DedupIndex,
    /// The second half of each group commit: fsync, answers, heads, keys to the ingest thread.
    syncer: Syncer,
    /// Why the sync thread stopped persisting, once it has.
    sync_failure: Arc<Mutex<Option<String>>>,
    /// The current group's new dedup keys with their values, and each tenant's last sequence.
    group_keys: Vec<(dedup::DedupKey, [u8; 16])>,
    group_heads: Vec<(TenantId, u64)>,
    /// Groups sent to the ingest thread so far; the current group will be number + 1.
    groups_sent: u64,
    /// Next sequence number per tenant, from the log's head on first use.
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
            let mut replies: Vec<Staged> = Vec::with_capacity(group.len());
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
                        let outcome = self.append(
                            request.tenant,
                            request.dedup_window,
                            request.clock,
                            request.batch,
                        );
                        replies.push((reply, request.queued_at, outcome));
                    }
                    Command::Import {
                        tenant,
                        head,
                        keys,
                        reply,
                    } => {
                        self.finish_group(&mut replies);
                        self.import(tenant, head, keys);
                        let _ = reply.send(());
                    }
                    Command::Seal { tenant, reply } => {
                        self.finish_group(&mut replies);
                        // Nothing of the tenant's is still being written once this returns.
                        self.syncer.drain();
                        self.sealed.insert(tenant);
                        self.next_seq.remove(&tenant);
                        let _ = reply.send(());
                    }
                    Command::IngestKeysNow(reply) => {
                        // After the keys of everything appended before.
                        self.finish_group(&mut replies);
                        self.syncer.send(ToSync::Ingest(ToIngest::Now(reply)));
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
                let outcome = self.append(
                    request.tenant,
                    request.dedup_window,
                    request.clock,
                    request.batch,
                );
                replies.push((reply, request.queued_at, outcome));
            }
        }
        self.finish_group(&mut replies);
        self.syncer.drain();
        if let Err(error) = self.log.commit(&[], true) {
            tracing::error!(%error, "final persist of the log failed");
        }
        tracing::info!("log writer stopped");
    }

    /// Stages the group's entries and heads (written, the journal flushed to the OS) and hands
    /// the group to the sync thread, which answers it once an fsync covers it.
    fn finish_group(&mut self, replies: &mut Vec<Staged>) {
        if replies.is_empty() {
            return;
        }
        let commit_started = Instant::now();
        let group_started = self.group_started.take().unwrap_or(commit_started);
        telemetry::log_write(commit_started - group_started);
        let replies = std::mem::take(replies);
        if let Err(error) = self.log.commit(&self.group_heads, false) {
            tracing::error!(%error, "writing the log failed; refusing all further writes");
            let reason = error.to_string();
            self.failure = Some(reason.clone());
            self.healthy.store(false, Ordering::Release);
            syncer::refuse(replies, &reason);
            self.group_keys.clear();
            self.group_heads.clear();
            return;
        }
        let keys = self.take_keys();
        #[cfg(test)]
        let requests = replies.len();
        self.syncer.send(ToSync::Group(StagedGroup {
            replies,
            keys,
            group_started,
            commit_started,
        }));
        #[cfg(test)]
        self.log.handed_to_sync(requests);
        self.dedup.forget_ingested();
    }

    /// Continues `tenant`'s log after `head`, with `keys` counted as seen (see
    /// [`Command::Import`]). The tenant must have nothing in this writer's log.
    fn import(&mut self, tenant: TenantId, head: u64, keys: Vec<KeysSeenAt>) {
        self.next_seq.insert(tenant, head + 1);
        for (first_seen, keys) in keys {
            self.dedup
                .record(tenant, &keys, first_seen, self.groups_sent + 1);
            let value = dedup::value(tenant, first_seen);
            self.group_keys.extend(keys.iter().map(|key| (*key, value)));
        }
        self.group_heads.push((tenant, head));
        self.heads.advance(tenant, head);
        if let Some(keys) = self.take_keys() {
            self.syncer.send(ToSync::Ingest(keys.into()));
        }
        self.dedup.forget_ingested();
    }

    /// The current group's dedup keys and heads, numbered, for the ingest thread once the group
    /// is durable (`None` when the group appended nothing).
    fn take_keys(&mut self) -> Option<KeyGroup> {
        if self.group_heads.is_empty() {
            return None;
        }
        self.groups_sent += 1;
        Some(KeyGroup {
            number: self.groups_sent,
            entries: std::mem::take(&mut self.group_keys),
            heads: std::mem::take(&mut self.group_heads),
            synced: self.options.fsync,
        })
    }

    /// Drops duplicates, assigns sequence numbers and stages the log entry. Not yet durable:
    /// the caller commits the whole group.
    fn append(
        &mut self,
        tenant: TenantId,
        dedup_window: Duration,
        clock: Option<Micros>,
        prepared: PreparedBatch,
    ) -> Result<AppendOutcome, StorageError> {
        if self.failure.is_none() && !self.healthy.load(Ordering::Acquire) {
            let synced = self.sync_failure.lock().unwrap_or_else(|p| p.into_inner());
            self.failure = Some(
                synced
                    .clone()
                    .unwrap_or_else(|| "writing dedup keys failed".into()),
            );
        }
        if let Some(reason) = &self.failure {
            return Err(StorageError::NotDurable(reason.clone()));
        }
        if self.sealed.contains(&tenant) {
            return Err(StorageError::TenantDeleted(tenant));
        }
        let now = clock.unwrap_or_else(now_micros);
        let store_letters = self.options.store_dead_letters;
        let mut in_request: rustc_hash::FxHashSet<dedup::DedupKey> = Default::default();
        let (storage, dedup) = (&self.storage, &mut self.dedup);
        // Whether `key` is a retry: earlier in this request, or logged within the window.
        // `claim`: the key's event is to be stored (or kept as a letter), so later ones in
        // the request with the same key are its duplicates.
        let mut is_duplicate = |key: &dedup::DedupKey, claim: bool| {
            let earlier = if claim {
                !in_request.insert(*key)
            } else {
                in_request.contains(key)
            };
            Ok::<bool, StorageError>(
                earlier || dedup.seen_within(storage, tenant, key, now, dedup_window)?,
            )
        };
        let mut duplicate_positions = Vec::new();
        let mut inserted = Vec::with_capacity(prepared.dedup_keys.len());
        for (position, key) in prepared.dedup_keys.iter().enumerate() {
            let Some(key) = key else {
                continue;
            };
            if is_duplicate(key, true)? {
                duplicate_positions.push(position);
            } else {
                inserted.push(*key);
            }
        }
        // Dead letters are checked against the log's keys too: a retry of a logged event is a
        // duplicate, whatever the plan says of it now.
        let mut dead_letter_duplicates = Vec::new();
        for (position, letter) in prepared.dead_letters.iter().enumerate() {
            let duplicate = match &letter.dedup_key {
                Some(key) => is_duplicate(key, true)?,
                None => false,
            };
            if duplicate {
                dead_letter_duplicates.push(position);
            } else if store_letters {
                deadletters::stage(storage, tenant, &letter.key, &letter.value)?;
            }
        }
        // Sampled-out events are looked up only: they are never stored.
        let mut probe_duplicates = Vec::new();
        for (position, key) in prepared.probes.iter().enumerate() {
            if let Some(key) = key {
                if is_duplicate(key, false)? {
                    probe_duplicates.push(position);
                }
            }
        }
        if dead_letter_duplicates.len() < prepared.dead_letters.len() && store_letters {
            if let Some((key, value)) = &prepared.dead_letter_batch {
                deadletters::stage(&self.storage, tenant, key, value)?;
            }
        }
        let duplicates = duplicate_positions.len();
        let accepted = prepared.dedup_keys.len() - duplicates;
        let mut outcome = AppendOutcome {
            tenant,
            timing: None,
            accepted,
            duplicates,
            first_seq: None,
            duplicate_positions,
            dead_lettered: prepared.dead_letters.len() - dead_letter_duplicates.len(),
            dead_letter_duplicates,
            probe_duplicates,
        };
        if accepted == 0 {
            return Ok(outcome);
        }
        let value = if duplicates == 0 {
            prepared.encoded
        } else {
            let mut batch = decode_batch(&prepared.encoded)?;
            let kept = outcome.new_events();
            batch.events = only_kept(std::mem::take(&mut batch.events), &kept);
            if !batch.extras.is_empty() {
                batch.extras = only_kept(std::mem::take(&mut batch.extras), &kept);
            }
            encode_entry(&batch)?
        };
        let first_seq = self.next_seq(tenant)?;
        // The entry is the only write: its events' dedup keys go to the ingest thread later.
        self.log.append(tenant, first_seq, value)?;
        self.dedup
            .record(tenant, &inserted, now, self.groups_sent + 1);
        let value = dedup::value(tenant, now);
        self.group_keys
            .extend(inserted.iter().map(|key| (*key, value)));
        self.group_heads
            .push((tenant, last_seq_of(first_seq, accepted)));
        self.next_seq.insert(tenant, first_seq + accepted as u64);
        outcome.first_seq = Some(first_seq);
        Ok(outcome)
    }

    fn next_seq(&mut self, tenant: TenantId) -> Result<u64, StorageError> {
        if let Some(next) = self.next_seq.get(&tenant) {
            return Ok(*next);
        }
        let head = self.log.head(tenant)?;
        // Durable (the writer has staged nothing for the tenant yet): publish it, so that readers
        // bounded by the published heads never need the log's own head, which counts staged
        // entries.
        self.heads.advance(tenant, head);
        let next = head + 1;
        self.next_seq.insert(tenant, next);
        Ok(next)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::event_log::tests::{batch, read_batches};

    async fn append(writer: &LogWriter, tenant: TenantId, ids: &[&str]) -> AppendOutcome {
        try_append(writer, tenant, ids).await.unwrap()
    }

    fn options() -> WriterOptions {
        WriterOptions {
            fsync: true,
            queue_capacity: 16,
            max_group_requests: 8,
            dedup_filter_bytes: 16 << 20,
            dedup_max_age: dedup_ingest::MAX_PENDING_AGE,
            store_dead_letters: true,
            fsync_delay: Duration::ZERO,
        }
    }

    async fn try_append(
        writer: &LogWriter,
        tenant: TenantId,
        ids: &[&str],
    ) -> Result<AppendOutcome, StorageError> {
        let batch = PreparedBatch::new(tenant, &batch(ids)).unwrap();
        let (request, answer) = AppendRequest::answered(tenant, Duration::from_secs(3600), batch);
        writer.submit(request);
        // A reply dropped unanswered (its thread died) is a refusal too.
        answer.await.unwrap_or(Err(StorageError::WriterStopped))
    }

    /// The storage's log, with each sync held until the test lets it go, and every append
    /// counted: shows what the writer does while an fsync runs.
    struct HeldSyncs {
        log: Arc<dyn EventLog>,
        appends: std::sync::atomic::AtomicUsize,
        /// The highest sequence staged (written and flushed to the OS).
        staged: std::sync::atomic::AtomicUsize,
        /// Requests handed to the sync thread.
        handed: std::sync::atomic::AtomicUsize,
        syncing: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }

    impl EventLog for HeldSyncs {
        fn append(
            &self,
            tenant: TenantId,
            first_seq: u64,
            entry: EntryBytes,
        ) -> Result<(), StorageError> {
            self.appends.fetch_add(1, Ordering::SeqCst);
            self.log.append(tenant, first_seq, entry)
        }
        fn commit(&self, heads: &[(TenantId, u64)], sync: bool) -> Result<(), StorageError> {
            self.log.commit(heads, sync)?;
            let highest = heads.iter().map(|(_, head)| *head as usize).max();
            self.staged
                .fetch_max(highest.unwrap_or(0), Ordering::SeqCst);
            Ok(())
        }
        fn handed_to_sync(&self, requests: usize) {
            self.handed.fetch_add(requests, Ordering::SeqCst);
        }
        fn sync(&self) -> Result<(), StorageError> {
            let _ = self.syncing.send(());
            // A schedule the test did not foresee fails it rather than hangs it.
            (self.release.recv_timeout(Duration::from_secs(10)))
                .map_err(|_| StorageError::NotDurable("the test never released the sync".into()))?;
            self.log.sync()
        }
        fn head(&self, tenant: TenantId) -> Result<u64, StorageError> {
            self.log.head(tenant)
        }
        fn read(
            &self,
            tenant: TenantId,
            from_seq: u64,
            max_entries: usize,
        ) -> Result<Vec<(u64, EntryBytes)>, StorageError> {
            self.log.read(tenant, from_seq, max_entries)
        }
        fn entry_holding(
            &self,
            tenant: TenantId,
            seq: u64,
        ) -> Result<Option<(u64, EntryBytes)>, StorageError> {
            self.log.entry_holding(tenant, seq)
        }
        fn tenants(&self) -> Result<Vec<TenantId>, StorageError> {
            self.log.tenants()
        }
        fn disk_bytes(&self) -> u64 {
            self.log.disk_bytes()
        }
        fn delete_below(&self, tenant: TenantId, seq: u64) -> Result<u64, StorageError> {
            self.log.delete_below(tenant, seq)
        }
        fn delete_tenant(&self, tenant: TenantId) -> Result<u64, StorageError> {
            self.log.delete_tenant(tenant)
        }
    }

    /// The group commit is pipelined: while one group's fsync runs, the next group is
    /// written; neither is answered before an fsync that started after it was written, and
    /// the groups written during one fsync share the next.
    #[actix_rt::test]
    async fn the_next_group_is_written_while_an_fsync_runs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 8 << 20, Default::default()).unwrap();
        let (syncing, syncs) = crossbeam_channel::unbounded();
        let (releases, release) = crossbeam_channel::unbounded();
        let log = Arc::new(HeldSyncs {
            log: storage.log_handle(),
            appends: Default::default(),
            staged: Default::default(),
            handed: Default::default(),
            syncing,
            release,
        });
        let writer = LogWriter::start_on(storage.clone(), log.clone(), options()).unwrap();
        let tenant = TenantId(7);
        let submit = |id: &'static str| {
            let batch = PreparedBatch::new(tenant, &batch(&[id])).unwrap();
            let (request, answer) =
                AppendRequest::answered(tenant, Duration::from_secs(3600), batch);
            writer.submit(request);
            answer
        };
        let first = submit("p1");
        syncs.recv_timeout(Duration::from_secs(10)).unwrap();
        // The first group's fsync is held; the next two are written meanwhile.
        let (second, third) = (submit("p2"), submit("p3"));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Staged (written, flushed) and handed to the sync thread while the first fsync is
        // held: both of them.
        while log.staged.load(Ordering::SeqCst) < 3 || log.handed.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "not written during the fsync");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(log.appends.load(Ordering::SeqCst), 3);
        let mut first = first;
        assert!(first.try_recv().is_err(), "answered before its fsync");
        releases.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().first_seq, Some(1));
        // One more fsync covers both groups written during the first.
        syncs.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut second = second;
        assert!(second.try_recv().is_err(), "answered before its fsync");
        releases.send(()).unwrap();
        assert_eq!(second.await.unwrap().unwrap().first_seq, Some(2));
        let third = third.await.unwrap().unwrap();
        assert_eq!(third.first_seq, Some(3));
        assert!(syncs.try_recv().is_err(), "a third fsync");
        let timing = third.timing.unwrap();
        assert!(timing.queued_at <= timing.group_started);
        assert!(timing.commit_started <= timing.committed);
        // Anything later (the writer's stop) syncs freely.
        drop(releases);
        writer.shutdown();
    }

    /// A prepared batch crosses the wire whole (entry, dedup keys, dead letters, probes), and
    /// a writer given the decoded batch treats it as the original: a second copy is a duplicate.
    #[actix_rt::test]
    async fn prepared_batches_cross_the_wire_whole() {
        let tenant = TenantId(0x42);
        let letter = PreparedDeadLetter {
            dedup_key: Some(dedup::key(tenant, "refused")),
            key: deadletters::key(tenant, 5, 6, 1),
            value: b"{\"letter\": 1}".to_vec(),
        };
        let batch_record = (
            deadletters::key(tenant, 5, 6, deadletters::BATCH_POSITION),
            b"{}".to_vec(),
        );
        let original = PreparedBatch::new(tenant, &batch(&["w1", "w2"]))
            .unwrap()
            .with_dead_letters(vec![letter], Some(batch_record))
            .with_probes(vec![Some(dedup::key(tenant, "sampled")), None]);
        let wire = original.to_wire(tenant, Duration::from_secs(60)).unwrap();
        let back = PreparedBatch::from_wire(bytes::Bytes::from(wire.clone())).unwrap();
        assert_eq!(back.tenant, tenant);
        assert_eq!(back.dedup_window, Duration::from_secs(60));
        assert_eq!(back.batch, original);
        // Cut or altered bytes are errors, never panics.
        for end in 0..wire.len() {
            let _ = PreparedBatch::from_wire(bytes::Bytes::copy_from_slice(&wire[..end]));
        }
        let mut other = wire.clone();
        other[0] = 9;
        assert!(PreparedBatch::from_wire(bytes::Bytes::from(other)).is_err());

        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let writer = LogWriter::start(storage.clone(), options()).unwrap();
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let prepared = PreparedBatch::from_wire(bytes::Bytes::from(wire.clone()))
                .unwrap()
                .batch;
            let (request, answer) =
                AppendRequest::answered(tenant, Duration::from_secs(3600), prepared);
            writer.submit(request);
            outcomes.push(answer.await.unwrap().unwrap());
        }
        assert_eq!((outcomes[0].accepted, outcomes[0].dead_lettered), (2, 1));
        assert_eq!((outcomes[1].accepted, outcomes[1].duplicates), (0, 2));
        assert_eq!(outcomes[1].dead_letter_duplicates, Vec::<usize>::new());
        assert_eq!(read_batches(storage.log(), tenant, 1, 10).unwrap().len(), 1);
    }

    /// A panic in a thread that writes depend on is reported by name and stops the
    /// acknowledgement of writes.
    #[actix_rt::test]
    async fn a_panicking_storage_thread_is_reported_and_stops_the_writes_it_guards() {
        for thread in ["dedup-ingest", "storage-upkeep", "log-sync"] {
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
        let entries = read_batches(storage.log(), tenant, 0, 100).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        writer.seal_tenant(tenant).await.unwrap();
        let (reply, answer) = oneshot::channel();
        writer.submit(AppendRequest {
            tenant,
            queued_at: Instant::now(),
            dedup_window: Duration::from_secs(3600),
            clock: None,
            batch: PreparedBatch::new(tenant, &batch(&["late"])).unwrap(),
            reply: Box::new(move |outcome| {
                let _ = reply.send(outcome);
            }),
        });
        assert!(matches!(
            answer.await.unwrap(),
            Err(StorageError::TenantDeleted(_))
        ));
        assert_eq!(crate::storage::purge_tenant(&storage, tenant).unwrap(), 3);
        assert!(read_batches(storage.log(), tenant, 0, 100)
            .unwrap()
            .is_empty());
        writer.shutdown();
    }

    /// Deleting old entries (the cold tier moves them away) never makes a tenant's sequences
    /// start again, across a restart too.
    #[actix_rt::test]
    async fn sequences_never_repeat_after_old_entries_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId(9);
        {
            let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
            let writer = LogWriter::start(storage.clone(), options()).unwrap();
            append(&writer, tenant, &["a", "b"]).await;
            let second = append(&writer, tenant, &["c"]).await;
            assert_eq!(second.first_seq, Some(3));
            writer.shutdown();
            assert_eq!(storage.log().delete_below(tenant, 4).unwrap(), 2);
            assert!(read_batches(storage.log(), tenant, 0, 10)
                .unwrap()
                .is_empty());
            assert_eq!(storage.log().head(tenant).unwrap(), 3);
            // The deletion's space reclaim runs on a thread of its own, which waits for the
            // engine's workers: they stop when the database is dropped.
            while storage.log.reclaiming() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // That thread holds the database (and its lock) until it has ended.
        let started = Instant::now();
        let storage = loop {
            match Storage::open(dir.path(), 1 << 20, Default::default()) {
                Err(StorageError::Open {
                    source: fjall::Error::Locked,
                    ..
                }) if started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened => break opened.unwrap(),
            }
        };
        let writer = LogWriter::start(storage.clone(), options()).unwrap();
        let third = append(&writer, tenant, &["d", "e"]).await;
        assert_eq!(
            third.first_seq,
            Some(4),
            "continues after the deleted entries"
        );
        // Duplicates of deleted entries are still known to dedup.
        let again = append(&writer, tenant, &["a", "f"]).await;
        assert_eq!((again.accepted, again.duplicates), (1, 1));
        assert_eq!(again.duplicate_positions, vec![0]);
        assert_eq!(again.first_seq, Some(6));
        writer.shutdown();
    }

    /// A data dir written before heads were recorded: the head is the last entry's last
    /// sequence.
    #[test]
    fn without_a_recorded_head_the_log_continues_after_its_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(3);
        let log = storage.log();
        let entry = encode_entry(&batch(&["a", "b", "c"])).unwrap();
        log.append(tenant, 5, entry).unwrap();
        log.commit(&[], true).unwrap();
        assert_eq!(log.head(tenant).unwrap(), 7);
        assert_eq!(log.head(TenantId(4)).unwrap(), 0);
        // A recorded head beyond the entries wins.
        log.commit(&[(tenant, 20)], true).unwrap();
        assert_eq!(log.head(tenant).unwrap(), 20);
        assert_eq!(log.tenants().unwrap(), vec![tenant]);
        // Deleting the tenant removes its head too.
        assert_eq!(log.delete_tenant(tenant).unwrap(), 1);
        assert_eq!(log.head(tenant).unwrap(), 0);
        assert!(log.tenants().unwrap().is_empty());
    }

    #[test]
    fn an_outcome_marks_the_duplicates_among_the_events() {
        let outcome = AppendOutcome {
            tenant: TenantId(1),
            timing: None,
            accepted: 3,
            duplicates: 2,
            first_seq: Some(10),
            duplicate_positions: vec![1, 4],
            dead_lettered: 0,
            dead_letter_duplicates: Vec::new(),
            probe_duplicates: Vec::new(),
        };
        assert_eq!(outcome.new_events(), vec![true, false, true, true, false]);
    }
}
