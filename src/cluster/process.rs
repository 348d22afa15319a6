//! A process node's work: hold a fair share of the partitions by lease and, for each one held,
//! apply its stream to the local log ([`PartitionRunner`]: dedup, sequencing) and roll the
//! log up into Redis with the partition's fence ([`roll_up_tenant`]), publishing each applied
//! batch to the live fan-out.
//!
//! The local store is this node's copy of its partitions' state, rebuilt from the stream: a
//! process node starts with an empty one. It keeps a partition's state (and where it is in the
//! stream) while it runs, also after losing the partition, because any owner's state at a
//! stream position is the same: if it owns the partition again, it continues from there.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::checkpoint::{cold_keys, keys_kept_since, Checkpoints, Snapshot, TenantInput};
use crate::cluster::cold::{ColdFlush, FlushTarget, Manifests, Upkeep};
use crate::cluster::commands::{Command, Markers};
use crate::cluster::connect_redis;
use crate::cluster::deadletters::{self, SharedDeadLetters, Stored};
use crate::cluster::lease::{Fence, Lease, Leases};
use crate::cluster::node::ClusterNode;
use crate::cluster::rollups::{roll_up_tenant, LocalLog, RolledUp, SharedRollups, TenantState};
use crate::cluster::runner::{Applied, PartitionRunner};
use crate::cluster::stream::EventStream;
use crate::erasure::{ErasureJob, JobStatus, Requester};
use crate::event::{duration_micros, last_seq_of};
use crate::ids::TenantId;
use crate::rollup::Retention;
use crate::storage::deadletters::LetterKey;
use crate::storage::writer::LogWriter;
use crate::storage::Storage;
use crate::tenant::TenantDirectory;

/// Stream messages applied per read.
const READ_BATCH: usize = 256;
/// How long a read waits for a message when the partition has none (then the task checks
/// whether to roll up or stop).
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Pause after a failed read or roll-up before trying again.
const RETRY: Duration = Duration::from_millis(500);
/// How often an owner checks every tenant it has a log for against the shared rollups, so
/// what a Redis restart lost is written again without waiting for the tenant's next events.
const RECHECK: Duration = Duration::from_secs(5);
/// Stream messages whose dead letters may wait in memory for the shared store.
const MAX_UNSENT_LETTERS: usize = 4096;
/// Bounds each owner request to Redis; a flush is one script, so this is above the largest.
const OWNER_REDIS_TIMEOUT: Duration = Duration::from_secs(30);

/// What a process node works with.
pub struct ProcessNode {
    pub node: Arc<ClusterNode>,
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    pub directory: Arc<TenantDirectory>,
    pub retention: Retention,
    /// Most ids that take part in a tenant's identity links (`rollups.max_identity_ids`).
    pub max_identity_ids: usize,
    /// The dedup window of a tenant the directory no longer has (`tenant_defaults`).
    pub default_dedup_window: Duration,
    /// Where partitions' checkpoints are kept: the cold tier's store, which the process nodes
    /// share (`None` with a local cold store: no checkpoints, and the stream keeps every
    /// message).
    pub checkpoints: Option<Checkpoints>,
    /// How partitions' cold segments are written: to the same shared store, before each
    /// checkpoint (`None` when there are no checkpoints).
    pub cold: Option<ColdFlush>,
}

/// What the owner knows of an erasure's tenant.
#[derive(Clone, Copy)]
enum TenantKey {
    /// Its user-hash key.
    Known([u8; 32]),
    /// Deleted, with all its data: nothing to erase.
    Deleted,
    /// Not in this node's directory yet.
    Unknown,
}

/// How long an erasure that keeps failing holds its partition's checkpoints back before it is
/// recorded as failed (a damaged segment must not stop the partition for good).
const ERASURE_GIVE_UP: Duration = Duration::from_secs(3600);

/// Carries out an erasure request (see `crate::cluster::commands`) once the cold tier holds
/// everything through its head: the tenant's segments rewritten without the user's events,
/// the user's dead letters removed, the outcome in the job record, which counts what each
/// attempt removed. A job already finished is left as it is: a new owner applies requests
/// above the last checkpoint again. An error fails the checkpoint (it is retried) until the
/// job is [`ERASURE_GIVE_UP`] old; then the job is recorded as failed.
async fn erase(
    (cold, shared, manifests): (&ColdFlush, &Shared, &Manifests),
    (lease, fence): (Lease, &Fence),
    (tenant, job_id, user): (TenantId, uuid::Uuid, &str),
    head: u64,
    hash_key: TenantKey,
) -> Result<(), String> {
    use crate::cluster::commands::{load_job, save_job};
    let saved = |job: ErasureJob| async move {
        (save_job(&cold.store, &job).await).map_err(|e| format!("recording erasure {job_id}: {e}"))
    };
    let recorded = (load_job(&cold.store, job_id).await).map_err(|e| e.to_string())?;
    let mut job = match recorded {
        Some(job) if job.status != JobStatus::Running => return Ok(()),
        Some(job) => job,
        // The ingest node writes the record before it publishes the request; if it is gone,
        // the outcome still gets one.
        None => ErasureJob::new(job_id, tenant, user.to_string(), Requester::unknown()),
    };
    job.through_seq = head;
    let now = crate::event::now_micros();
    let hash_key = match hash_key {
        TenantKey::Known(key) => Ok(key),
        // Errors like any other: retried, then recorded after ERASURE_GIVE_UP.
        TenantKey::Unknown => Err(format!(
            "tenant {tenant} is not in this node's directory yet"
        )),
        TenantKey::Deleted => {
            job.status = JobStatus::Failed;
            job.finished_at = Some(now);
            job.error = Some("the tenant was deleted (with all its data)".into());
            return saved(job).await;
        }
    };
    let outcome = async {
        let hash_key = hash_key?;
        let report = (cold.erase_user(tenant, user.to_string(), manifests, lease, fence)).await?;
        job.removed_events += report.removed_events;
        job.rewritten_segments += report.written_segments;
        job.removed_segments += report.removed_segments - report.written_segments;
        let removed_letters =
            (shared.letters.erase_user(tenant, user).await).map_err(|e| e.to_string());
        job.removed_dead_letters += removed_letters?;
        let own = crate::enrich::user_hash(&hash_key, user);
        let forgotten = (shared.rollups)
            .forget_link(tenant, (lease, fence.key()), (own, user))
            .await;
        let forgotten = forgotten.map_err(|e| format!("identity links: {e}"))?;
        job.removed_identity_links += forgotten.ok_or("lost the partition")?;
        Ok::<(), String>(())
    }
    .await;
    match outcome {
        Ok(()) => {
            let purge_after = cold.settings.grace_period + crate::cluster::cold::PURGE_EVERY;
            let purge_after = duration_micros(purge_after);
            job.status = JobStatus::Done;
            job.error = None;
            job.finished_at = Some(now);
            job.superseded_purged_by = Some(now.saturating_add(purge_after));
            tracing::info!(job = %job_id, %tenant, removed_events = job.removed_events, "per-user erasure done");
            saved(job).await
        }
        Err(error) => {
            let give_up = duration_micros(ERASURE_GIVE_UP);
            job.error = Some(error.clone());
            if now.saturating_sub(job.requested_at) < give_up {
                saved(job).await?;
                return Err(error);
            }
            tracing::error!(job = %job_id, %tenant, %error, "per-user erasure failed");
            job.status = JobStatus::Failed;
            job.finished_at = Some(now);
            saved(job).await
        }
    }
}

/// Writes a partition's checkpoint, then lets the stream drop what `trim_below` (this owner's
/// own previous checkpoint, if any) covers. Never below this owner's own checkpoints: a node
/// that starts on the partition later starts from the latest checkpoint, which is at least
/// this owner's previous one, so no trim removes what an owner reads, also when an owner that
/// lost the partition finishes an upload late.
async fn upload(
    checkpoints: &Checkpoints,
    stream: &EventStream,
    lease: Lease,
    covered: u64,
    trim_below: Option<u64>,
    body: &[u8],
) -> Result<(), String> {
    let partition = lease.partition;
    (checkpoints
        .write(partition, covered, lease.token, body)
        .await)
        .map_err(|e| e.to_string())?;
    crate::telemetry::cluster_checkpoint_written(body.len());
    let _ = checkpoints.prune(partition).await;
    if let Some(previous) = trim_below {
        let trimmed = (stream.trim(partition, previous + 1).await).map_err(|e| e.to_string())?;
        crate::telemetry::cluster_stream_trimmed(trimmed);
    }
    Ok(())
}

/// A checkpoint stored: its stream position, and the local id and head of each tenant.
struct Checkpointed {
    covered: u64,
    heads: Vec<(TenantId, u64)>,
}

/// Deletes from the local log what neither the rollups nor a checkpoint can need any more:
/// entries at or below the stored checkpoint's heads (the shared rollups include them) that
/// were received longer than their tenant's window (and an hour) ago (the next checkpoint
/// finds where the window starts among the entries within it). Blocking.
fn prune_local_log(
    storage: &Storage,
    heads: &[(TenantId, u64, Duration)],
    now: crate::event::Micros,
) -> Result<u64, crate::storage::StorageError> {
    let mut deleted = 0;
    for (local, head, window) in heads {
        // What the next checkpoint finds its window's start in stays.
        let recent = crate::storage::event_log::first_seq_received_since(
            storage.log(),
            *local,
            keys_kept_since(*window, now),
            Duration::ZERO,
        )?;
        let below = recent.min(head + 1);
        // Only at an entry boundary: the entry holding `below` starts there or earlier.
        let boundary = match storage.log().entry_holding(*local, below)? {
            Some((first, _)) => first,
            None => below,
        };
        deleted += storage.log().delete_below(*local, boundary)?;
    }
    Ok(deleted)
}

/// A background task aborted when dropped (a partition's upload, when its task ends).
struct Background<T>(JoinHandle<T>);

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This node's copy of one partition's state, kept while the node runs, also after it lost
/// the partition: any owner's state at a stream position is the same, so it can continue
/// from there if it owns the partition again and no checkpoint is further on.
#[derive(Default)]
struct PartitionCopy {
    /// The last stream sequence applied to the local store.
    covered: AtomicU64,
    /// How many times the copy was replaced by a checkpoint's state. Each time, the tenants'
    /// logs move to new local ids ([`PartitionCopy::local`]), so the new state never meets
    /// the old one's log entries or dedup keys in the local store.
    generation: AtomicU64,
    /// Tenants with a log in the copy: their last log sequence, and when they were imported.
    tenants: Mutex<HashMap<TenantId, TenantCopy>>,
    /// What applied messages left to do that no stored checkpoint covers yet. It stays with
    /// the copy, not the task: a later task on this copy starts after those messages.
    owed: Mutex<Owed>,
    /// Tenants whose stored identity links changed behind the owner's roll-ups (an erasure):
    /// their roll-ups read them again.
    stale_identities: Mutex<HashSet<TenantId>>,
}

/// Work owed for messages already applied to a partition copy.
#[derive(Default)]
struct Owed {
    /// Dead letters not yet in the shared store.
    letters: UnsentLetters,
    /// Erasures and flushes (`crate::cluster::commands`) no stored checkpoint covers yet: the
    /// next checkpoint carries them out.
    commands: Vec<Applied>,
    /// Rollup rebuilds not done yet (tenant, command id); no checkpoint is written before
    /// they are.
    rebuilds: VecDeque<(TenantId, uuid::Uuid)>,
}

impl Owed {
    /// Whether a checkpoint may be written: every letter stored, every rebuild done.
    fn settled(&self) -> bool {
        self.letters.is_empty() && self.rebuilds.is_empty()
    }

    /// Whether a flush was asked for: a checkpoint is due at once.
    fn flush_asked(&self) -> bool {
        (self.commands.iter()).any(|applied| matches!(applied.command, Command::Flush { .. }))
    }
}

#[derive(Clone, Default)]
struct TenantCopy {
    head: u64,
    /// The longest dedup window its batches were applied with.
    window: Duration,
    /// When it was imported from a checkpoint, and where that checkpoint said its window
    /// started (see [`TenantInput::imported`]).
    imported: Option<(crate::event::Micros, u64)>,
}

impl PartitionCopy {
    /// The id `tenant`'s log has in the local store.
    fn local(&self, tenant: TenantId) -> TenantId {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == 0 {
            return tenant;
        }
        let mut key = tenant.0.to_be_bytes().to_vec();
        key.extend_from_slice(&generation.to_be_bytes());
        TenantId(xxhash_rust::xxh3::xxh3_64(&key).max(1))
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantCopy>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stale_identities(&self) -> std::sync::MutexGuard<'_, HashSet<TenantId>> {
        self.stale_identities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn owed(&self) -> std::sync::MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Per tenant, what an owner's roll-ups carry (identity links, admitted names).
type TenantStates = HashMap<TenantId, TenantState>;

/// What an owner writes to Redis.
struct Shared {
    rollups: SharedRollups,
    letters: SharedDeadLetters,
    markers: Markers,
}

/// Dead letters applied to the local log, not yet in the shared store: per stream message,
/// its sequence, tenant and letters.
type UnsentLetters = VecDeque<(u64, TenantId, Vec<(LetterKey, Vec<u8>)>)>;

/// A partition being worked on, or being stopped.
struct Task {
    lease: Lease,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

fn now_ms() -> u64 {
    u64::try_from(crate::event::now_micros() / 1000).unwrap_or(0)
}

/// How long a stopping node waits for its partitions' last roll-ups.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

impl ProcessNode {
    /// Holds and works on partitions until `stop` turns true; then finishes each partition's
    /// roll-up (for at most [`STOP_DEADLINE`]) and releases its lease, so other nodes take
    /// over at once.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let config = &self.node.config;
        let redis = loop {
            match connect_redis(&config.redis_url, OWNER_REDIS_TIMEOUT).await {
                Ok(redis) => break redis,
                Err(error) => {
                    tracing::warn!(%error, "process node cannot reach Redis; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        };
        // A name of its own for every start: a restarted node must not get the tokens its
        // predecessor (perhaps still running somewhere) holds.
        let lease_name = format!("{}#{:08x}", self.node.name, rand::random::<u32>());
        let mut leases = Leases::new(
            redis.clone(),
            &config.prefix,
            &lease_name,
            config.partitions,
            config.lease_timeout,
        );
        let shared = Arc::new(Shared {
            rollups: SharedRollups::new(redis.clone(), &config.prefix).expiring(self.retention),
            letters: SharedDeadLetters::new(redis.clone(), &config.prefix),
            markers: Markers::new(redis.clone(), &config.prefix),
        });
        let mut held: BTreeMap<u16, Lease> = BTreeMap::new();
        let mut tasks: HashMap<u16, Task> = HashMap::new();
        // Tasks told to stop that have not finished: their partition is not started again
        // until they have, so two tasks never apply one partition to the local log.
        let mut stopping: Vec<(u16, Task)> = Vec::new();
        // This node's copy of each partition it has worked on.
        let mut copies: HashMap<u16, Arc<PartitionCopy>> = HashMap::new();
        let mut rounds = tokio::time::interval(config.lease_renew_every);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break;
            }
            let round = match leases.balance(&mut held, now_ms()).await {
                Ok(round) => round,
                Err(error) => {
                    // Leases not renewed expire; their partitions' writes are then fenced out.
                    tracing::warn!(%error, "lease round failed");
                    Default::default()
                }
            };
            for (partition, task) in std::mem::take(&mut tasks) {
                let keep = held.get(&partition) == Some(&task.lease) && !task.handle.is_finished();
                if keep {
                    tasks.insert(partition, task);
                } else {
                    let _ = task.stop.send(true);
                    stopping.push((partition, task));
                }
            }
            stopping.retain(|(_, task)| !task.handle.is_finished());
            for (partition, lease) in &held {
                if tasks.contains_key(partition) || stopping.iter().any(|(p, _)| p == partition) {
                    continue;
                }
                let copy = Arc::clone(copies.entry(*partition).or_default());
                tracing::info!(
                    partition,
                    token = lease.token,
                    from = copy.covered.load(Ordering::Acquire) + 1,
                    "working on partition"
                );
                let (stop_task, stopped) = watch::channel(false);
                let fence = Fence::new(redis.clone(), leases.fence_key(*partition));
                let work = Arc::clone(&self).work(
                    Arc::clone(&shared),
                    *lease,
                    fence,
                    leases.fence_key(*partition),
                    copy,
                    stopped,
                );
                let left = *partition;
                let handle = tokio::spawn(async move {
                    work.await;
                    // Not this node's partition any more (or worked on again, which reports
                    // afresh): its last lag and checkpoint age would keep alerts firing.
                    crate::telemetry::cluster_partition_left(left);
                });
                tasks.insert(
                    *partition,
                    Task {
                        lease: *lease,
                        stop: stop_task,
                        handle,
                    },
                );
            }
            crate::telemetry::cluster_leases(
                held.len(),
                round.acquired.len(),
                round.lost.len(),
                round.released.len(),
            );
        }
        let all: Vec<Task> = (tasks.into_values())
            .chain(stopping.into_iter().map(|(_, task)| task))
            .collect();
        for task in &all {
            let _ = task.stop.send(true);
        }
        let finished = futures_util::future::join_all(all.into_iter().map(|task| task.handle));
        if tokio::time::timeout(STOP_DEADLINE, finished).await.is_err() {
            tracing::warn!(
                "partitions did not finish their roll-ups in time; their next owners will"
            );
        }
        for lease in held.into_values() {
            let _ = leases.release(lease).await;
        }
        let _ = leases.leave().await;
        tracing::info!("process node released its partitions");
    }

    /// Works on one partition, from this node's copy of it or from its latest checkpoint,
    /// whichever is further on, until told to stop or fenced out.
    async fn work(
        self: Arc<Self>,
        shared: Arc<Shared>,
        lease: Lease,
        fence: Fence,
        fence_key: String,
        copy: Arc<PartitionCopy>,
        mut stop: watch::Receiver<bool>,
    ) {
        let partition = lease.partition;
        if let Err(error) = self.catch_up_with_checkpoint(partition, &copy).await {
            // Whether the stream still holds what this copy lacks is unknown: wait.
            tracing::warn!(partition, %error, "cannot read the partition's checkpoint; retrying");
            tokio::time::sleep(RETRY).await;
            return;
        }
        let mut runner = PartitionRunner::new(partition, copy.covered.load(Ordering::Acquire));
        // Tenants whose local log may be ahead of the shared rollups: at first, all of them
        // (a previous task may have stopped before its last roll-up).
        let mut pending: HashMap<TenantId, u64> = (copy.tenants().iter())
            .map(|(tenant, t)| (*tenant, t.head))
            .collect();
        // Per tenant, the log sequence through which live ticks were published (those at or
        // below the shared watermark at first sight were published by an earlier owner).
        let mut live_through: HashMap<TenantId, u64> = HashMap::new();
        // Per tenant, its identity links and admitted names as this task last stored them.
        let mut states = TenantStates::new();
        let mut last_roll_up = Instant::now();
        let mut last_recheck = Instant::now();
        // When the last checkpoint was written, and when one was last started.
        let mut last_checkpoint = Instant::now();
        let mut last_tried = Instant::now();
        let mut checkpointed = runner.covered();
        // This task's last checkpoint stored: the stream may drop what it covers.
        let mut own_previous: Option<u64> = None;
        let mut upload: Option<Background<Result<Checkpointed, String>>> = None;
        // The cold tier's manifests as this task last committed them.
        let manifests = Manifests::default();
        loop {
            if last_recheck.elapsed() >= RECHECK {
                last_recheck = Instant::now();
                pending.extend(copy.tenants().iter().map(|(tenant, t)| (*tenant, t.head)));
            }
            let stopping = *stop.borrow();
            let due = stopping || last_roll_up.elapsed() >= self.node.config.flush_every;
            if due && !pending.is_empty() {
                last_roll_up = Instant::now();
                if self
                    .roll_up(
                        &shared.rollups,
                        lease,
                        &fence_key,
                        &copy,
                        (&mut pending, &mut states, &manifests),
                    )
                    .await
                {
                    tracing::info!(partition, "fenced out of the partition");
                    return;
                }
            }
            if upload.as_ref().is_some_and(|task| task.0.is_finished()) {
                let finished = upload.take().map(|mut task| (&mut task.0).now_or_never());
                match finished {
                    Some(Some(Ok(Ok(stored)))) => {
                        checkpointed = stored.covered;
                        own_previous = Some(stored.covered);
                        last_checkpoint = Instant::now();
                        (copy.owed().commands).retain(|applied| applied.seq > stored.covered);
                        self.prune_local(&copy, stored.heads);
                    }
                    Some(Some(Ok(Err(error)))) => {
                        tracing::warn!(partition, %error, "checkpoint failed; the stream keeps the messages");
                    }
                    _ => {}
                }
            }
            if self
                .store_letters(&shared.letters, (lease, &fence_key), &copy)
                .await
            {
                tracing::info!(partition, "fenced out of the partition");
                return;
            }
            if self
                .rebuild(&shared, (&fence, lease), &copy, &mut pending)
                .await
            {
                tracing::info!(partition, "fenced out of the partition");
                return;
            }
            // A checkpoint only of a state the shared rollups and dead letters include in
            // full, only of a new one, and one at a time; at once when a flush is asked for.
            // Commands owed by an earlier task on this copy may be past `checkpointed` already.
            let (settled, commands_owed, flush_asked) = {
                let owed = copy.owed();
                (
                    owed.settled(),
                    !owed.commands.is_empty(),
                    owed.flush_asked(),
                )
            };
            if pending.is_empty()
                && settled
                && upload.is_none()
                && (flush_asked || last_tried.elapsed() >= self.node.config.checkpoint_every)
                && (runner.covered() > checkpointed || commands_owed)
                && !stopping
            {
                last_tried = Instant::now();
                let checkpoint = self.checkpoint(
                    (lease, &fence),
                    &copy,
                    (&manifests, &shared),
                    (runner.covered(), own_previous),
                    copy.owed().commands.clone(),
                );
                match checkpoint.await {
                    Ok(task) => upload = task.map(Background),
                    Err(error) => {
                        tracing::warn!(partition, %error, "checkpoint failed; the stream keeps the messages");
                    }
                }
            }
            crate::telemetry::cluster_checkpoint_age(partition, last_checkpoint.elapsed());
            if stopping {
                return;
            }
            if copy.owed().letters.len() >= MAX_UNSENT_LETTERS {
                // The shared store is behind: read on once it has caught up (the stream keeps
                // the rest), so letters waiting in memory stay bounded.
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let directory = &self.directory;
            let read = runner
                .run(
                    &self.node.stream,
                    &self.writer,
                    READ_BATCH,
                    IDLE_WAIT,
                    |tenant| directory.was_removed(tenant),
                    |tenant| copy.local(tenant),
                )
                .await;
            copy.covered.store(runner.covered(), Ordering::Release);
            for applied in runner.take_commands() {
                let mut owed = copy.owed();
                match applied.command {
                    Command::RebuildRollups { tenant, id } => owed.rebuilds.push_back((tenant, id)),
                    Command::EraseUser { .. } | Command::Flush { .. } => {
                        owed.commands.push(applied)
                    }
                }
            }
            let pause = match read {
                Ok(mut done) => {
                    crate::telemetry::cluster_partition_progress(
                        partition,
                        done.len(),
                        runner.lag(),
                    );
                    for processed in &mut done {
                        if !processed.letters.is_empty() {
                            let letters = std::mem::take(&mut processed.letters);
                            let owed = (processed.seq, processed.tenant, letters);
                            copy.owed().letters.push_back(owed);
                        }
                        let Some(first) = processed.outcome.first_seq else {
                            continue;
                        };
                        let last = last_seq_of(first, processed.outcome.accepted);
                        pending.insert(processed.tenant, last);
                        {
                            let mut tenants = copy.tenants();
                            let tenant = tenants.entry(processed.tenant).or_default();
                            tenant.head = last;
                            if processed.dedup_window > tenant.window {
                                // The local id's dedup keys are kept this long at least.
                                (self.storage.dedup_windows)
                                    .set(processed.local, processed.dedup_window);
                            }
                            tenant.window = tenant.window.max(processed.dedup_window);
                        }
                        let state = states.get(&processed.tenant);
                        (self.publish_live(&shared.rollups, &mut live_through, processed, state))
                            .await;
                    }
                    None
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "cannot apply the partition's stream; retrying");
                    Some(RETRY)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Replaces this node's copy of the partition by its latest checkpoint's state when that
    /// is further on (the stream below a checkpoint may be gone).
    async fn catch_up_with_checkpoint(
        &self,
        partition: u16,
        copy: &PartitionCopy,
    ) -> Result<(), String> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let latest = (checkpoints.latest(partition).await).map_err(|e| e.to_string())?;
        let Some(checkpoint) = latest else {
            return Ok(());
        };
        if checkpoint.covered <= copy.covered.load(Ordering::Acquire) {
            return Ok(());
        }
        let snapshot =
            Snapshot::decode(checkpoint.version, &checkpoint.body).map_err(|e| e.to_string())?;
        // The older copy's logs are unreachable from now on: they go.
        let replaced: Vec<TenantId> = (copy.tenants().keys())
            .map(|tenant| copy.local(*tenant))
            .collect();
        copy.generation.fetch_add(1, Ordering::AcqRel);
        copy.tenants().clear();
        // The checkpoint's writer did what the older copy's messages left to do.
        *copy.owed() = Owed::default();
        let storage = self.storage.clone();
        crate::blocking::detach(move || {
            for local in replaced {
                if let Err(error) = storage.log().delete_tenant(local) {
                    tracing::warn!(%error, "deleting a replaced copy's log failed");
                }
            }
        });
        let now = crate::event::now_micros();
        for tenant in snapshot.tenants {
            let local = copy.local(tenant.tenant);
            let window = (self.directory.get(tenant.tenant))
                .map_or(self.default_dedup_window, |r| r.settings.dedup_window);
            (self.storage.dedup_windows).set(local, window);
            // The keys of the events within the window, from the cold tier, which holds
            // everything through the checkpoint's heads (older checkpoints carried them).
            let mut keys = tenant.keys;
            if let Some(cold) = &self.cold {
                let (store, id) = (cold.store.clone(), tenant.tenant);
                let range = (tenant.window_from, tenant.head);
                let since = keys_kept_since(window, now);
                let read = crate::blocking::run(move || cold_keys(&store, id, range, since));
                keys.extend(
                    (read.await)
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?,
                );
            }
            (self.writer.import(local, tenant.head, keys).await).map_err(|e| e.to_string())?;
            copy.tenants().insert(
                tenant.tenant,
                TenantCopy {
                    head: tenant.head,
                    window,
                    imported: Some((now, tenant.window_from)),
                },
            );
        }
        copy.covered.store(checkpoint.covered, Ordering::Release);
        tracing::info!(
            partition,
            covered = checkpoint.covered,
            "partition state taken from its checkpoint"
        );
        Ok(())
    }

    /// Reads the partition's state at `covered` for a checkpoint and starts, in the background,
    /// flushing its tenants' logs to the cold tier through their heads in that state, then
    /// writing it (the partition goes on meanwhile, also while the object store is slow or
    /// down); `None` without a checkpoint store.
    /// Erasures applied before `covered` are carried out after the flush and before the
    /// checkpoint is written, so a checkpoint never covers one not carried out; those and the
    /// flushes requested are marked done once it is stored.
    async fn checkpoint(
        &self,
        (lease, fence): (Lease, &Fence),
        copy: &Arc<PartitionCopy>,
        (manifests, shared): (&Manifests, &Arc<Shared>),
        (covered, trim_below): (u64, Option<u64>),
        commands: Vec<Applied>,
    ) -> Result<Option<JoinHandle<Result<Checkpointed, String>>>, String> {
        let Some(checkpoints) = self.checkpoints.clone() else {
            return Ok(None);
        };
        let inputs: Vec<TenantInput> = copy
            .tenants()
            .iter()
            .map(|(tenant, t)| TenantInput {
                tenant: *tenant,
                local: copy.local(*tenant),
                window: (self.directory.get(*tenant))
                    .map_or(self.default_dedup_window, |r| r.settings.dedup_window)
                    .max(t.window),
                head: t.head,
                imported: t.imported,
            })
            .collect();
        let storage = self.storage.clone();
        let now = crate::event::now_micros();
        let snapshot = crate::blocking::run(move || Snapshot::read(&storage, &inputs, now))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let body = snapshot.encode().map_err(|e| e.to_string())?;
        let heads = (snapshot.tenants.iter())
            .map(|t| (copy.local(t.tenant), t.head))
            .collect();
        // A deleted tenant's log is not flushed: its cold tier goes with it.
        let targets: Vec<FlushTarget> = (snapshot.tenants.iter())
            .filter(|t| !self.directory.was_removed(t.tenant))
            .map(|t| FlushTarget {
                tenant: t.tenant,
                local: copy.local(t.tenant),
                head: t.head,
            })
            .collect();
        let upkeep: Vec<Upkeep> = (targets.iter())
            .filter_map(|target| {
                let record = self.directory.get(target.tenant)?;
                Some(Upkeep {
                    tenant: target.tenant,
                    raw_retention: record.settings.raw_retention,
                })
            })
            .collect();
        let stream = Arc::clone(&self.node.stream);
        let (cold, storage) = (self.cold.clone(), self.storage.clone());
        // What the node knows of each erasure's tenant: its key; deleted (the erasure is
        // recorded as failed); or not known yet (an error like any other: retried).
        let hash_keys: HashMap<TenantId, TenantKey> = (commands.iter())
            .filter_map(|applied| applied.command.tenant())
            .map(|tenant| match self.directory.get(tenant) {
                Some(record) => (tenant, TenantKey::Known(record.user_hash_key)),
                None if self.directory.was_removed(tenant) => (tenant, TenantKey::Deleted),
                None => (tenant, TenantKey::Unknown),
            })
            .collect();
        let copy = Arc::clone(copy);
        let (manifests, fence, shared) = (Arc::clone(manifests), fence.clone(), Arc::clone(shared));
        Ok(Some(tokio::spawn(async move {
            if let Some(cold) = &cold {
                (cold.flush_partition(&storage, targets, &manifests, lease, &fence)).await?;
                for applied in &commands {
                    if let Command::EraseUser { tenant, job, user } = &applied.command {
                        let stores = (cold, &*shared, &manifests);
                        let what = (*tenant, *job, user.as_str());
                        let key = hash_keys.get(tenant).copied();
                        let key = key.unwrap_or(TenantKey::Unknown);
                        // The owner's roll-ups read the tenant's links again, before the
                        // erasure changes them and after.
                        copy.stale_identities().insert(*tenant);
                        let erased = erase(stores, (lease, &fence), what, applied.head, key).await;
                        copy.stale_identities().insert(*tenant);
                        erased?;
                    }
                }
            }
            upload(&checkpoints, &stream, lease, covered, trim_below, &body).await?;
            for applied in &commands {
                let marked = shared.markers.mark_done(applied.command.id()).await;
                marked.map_err(|e| format!("marking a command done: {e}"))?;
            }
            if let Some(cold) = &cold {
                let maintained = cold.maintain_partition(upkeep, &manifests, lease, &fence);
                if let Err(error) = maintained.await {
                    tracing::warn!(partition = lease.partition, %error, "cold-tier maintenance failed; retrying at the next checkpoint");
                }
            }
            Ok(Checkpointed { covered, heads })
        })))
    }

    /// Starts [`prune_local_log`] after a checkpoint was stored with these `heads`.
    fn prune_local(&self, copy: &PartitionCopy, heads: Vec<(TenantId, u64)>) {
        let windows: HashMap<TenantId, Duration> = (copy.tenants().iter())
            .map(|(tenant, t)| (copy.local(*tenant), t.window))
            .collect();
        let heads: Vec<(TenantId, u64, Duration)> = (heads.into_iter())
            .map(|(local, head)| {
                let window = windows
                    .get(&local)
                    .copied()
                    .unwrap_or(self.default_dedup_window);
                (local, head, window.max(Duration::from_secs(1)))
            })
            .collect();
        let storage = self.storage.clone();
        let now = crate::event::now_micros();
        crate::blocking::detach(move || match prune_local_log(&storage, &heads, now) {
            Ok(deleted) => crate::telemetry::cluster_local_entries_deleted(deleted),
            Err(error) => tracing::warn!(%error, "pruning the local log failed"),
        });
    }

    /// Rolls each pending tenant up to its local head; true when fenced out.
    async fn roll_up(
        &self,
        shared: &SharedRollups,
        lease: Lease,
        fence_key: &str,
        copy: &PartitionCopy,
        (pending, states, manifests): (&mut HashMap<TenantId, u64>, &mut TenantStates, &Manifests),
    ) -> bool {
        for tenant in copy.stale_identities().drain() {
            states.remove(&tenant);
        }
        for (tenant, head) in pending.clone() {
            // A deleted tenant's events count each id as its own person.
            let state = match self.directory.get(tenant) {
                Some(record) => {
                    let state = states.entry(tenant).or_insert_with(|| {
                        TenantState::new(record.user_hash_key, self.max_identity_ids)
                    });
                    state.max_names = record.settings.max_event_names as usize;
                    Some(state)
                }
                None if self.directory.was_removed(tenant) => None,
                // Not in this node's directory yet: its roll-up waits, so that its identity
                // calls and name cap are not passed over.
                None => continue,
            };
            let log = LocalLog {
                storage: &self.storage,
                tenant,
                local: copy.local(tenant),
                head,
                cold: self.cold.as_ref().map(|cold| &cold.store),
                flushed: crate::cluster::cold::cold_through(manifests, tenant).unwrap_or(0),
                state,
            };
            match roll_up_tenant(shared, log, lease, fence_key, self.retention).await {
                // Short of the head (a range rolled up again from the cold tier, one chunk per
                // round so the partition goes on meanwhile): still pending.
                Ok(RolledUp::Through(through)) => {
                    if through >= head && pending.get(&tenant) == Some(&head) {
                        pending.remove(&tenant);
                    }
                }
                Ok(RolledUp::Fenced) => return true,
                Err(error) => {
                    tracing::warn!(%tenant, %error, "rolling up into Redis failed; retrying");
                }
            }
        }
        false
    }

    /// Carries out the rollup rebuilds applied, oldest first, until one fails (it stays, to be
    /// tried next round): the tenant's shared rollups are dropped, the request marked done, and
    /// the tenant rolled up again from sequence 1 (its log, and the cold tier below it). True
    /// when fenced out.
    async fn rebuild(
        &self,
        shared: &Shared,
        (fence, lease): (&Fence, Lease),
        copy: &PartitionCopy,
        pending: &mut HashMap<TenantId, u64>,
    ) -> bool {
        loop {
            let Some((tenant, id)) = copy.owed().rebuilds.front().copied() else {
                return false;
            };
            match shared
                .rollups
                .drop_tenant(tenant, (lease, fence.key()))
                .await
            {
                Ok(true) => {}
                Ok(false) => return true,
                Err(error) => {
                    tracing::warn!(%tenant, %error, "dropping the rollups to rebuild failed; retrying");
                    return false;
                }
            }
            let head = copy.tenants().get(&tenant).map_or(0, |t| t.head);
            if head > 0 {
                pending.insert(tenant, head);
            }
            if let Err(error) = shared.markers.mark_done(id).await {
                tracing::warn!(%tenant, %error, "marking a rollup rebuild done failed; retrying");
                return false;
            }
            tracing::info!(%tenant, "rollups dropped; rolling up again");
            copy.owed().rebuilds.pop_front();
        }
    }

    /// Writes the dead letters of applied messages to the shared store, oldest first, until one
    /// fails (it stays, to be written next round); true when fenced out.
    async fn store_letters(
        &self,
        letters: &SharedDeadLetters,
        (lease, fence_key): (Lease, &str),
        copy: &PartitionCopy,
    ) -> bool {
        loop {
            let Some((seq, tenant, batch)) = copy.owed().letters.front().cloned() else {
                return false;
            };
            // A deleted tenant's letters go with it; a tenant this node does not know yet
            // (its directory lags) waits.
            if !self.directory.was_removed(tenant) {
                let Some(record) = self.directory.get(tenant) else {
                    return false;
                };
                let limits = deadletters::Limits::of(&record.settings);
                let partition = lease.partition;
                let stored = letters
                    .store((lease, fence_key), partition, seq, tenant, &batch, limits)
                    .await;
                match stored {
                    Ok(Stored::Written | Stored::Already) => {}
                    Ok(Stored::Fenced) => return true,
                    Err(error) => {
                        tracing::warn!(%tenant, %error, "storing dead letters failed; retrying");
                        return false;
                    }
                }
            }
            copy.owed().letters.pop_front();
        }
    }

    /// Publishes a batch's items to the live fan-out, unless an earlier owner did.
    async fn publish_live(
        &self,
        shared: &SharedRollups,
        live_through: &mut HashMap<TenantId, u64>,
        processed: &crate::cluster::runner::Processed,
        state: Option<&TenantState>,
    ) {
        let Some(first) = processed.outcome.first_seq else {
            return;
        };
        let through = match live_through.get(&processed.tenant) {
            Some(through) => *through,
            None => match shared.watermark(processed.tenant).await {
                Ok(stored) => {
                    live_through.insert(processed.tenant, stored);
                    stored
                }
                // Unknown: maybe an earlier owner published it; live ticks are best effort.
                Err(_) => return,
            },
        };
        let last = last_seq_of(first, processed.outcome.accepted);
        if last <= through || processed.items.is_empty() {
            return;
        }
        live_through.insert(processed.tenant, last);
        let (redis, prefix) = (self.node.redis.clone(), self.node.config.prefix.clone());
        let (tenant, mut items) = (processed.tenant, processed.items.clone());
        if let Some(state) = state {
            state.for_live(&mut items);
        }
        tokio::spawn(async move {
            if let Err(error) = crate::cluster::live::publish(&redis, &prefix, tenant, &items).await
            {
                tracing::debug!(%tenant, %error, "live fan-out publish failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::event_log::tests::{batch, read_batches};
    use crate::storage::writer::{AppendRequest, PreparedBatch};

    /// Entries at or below the checkpoint's head and older than the window go; the rest stay.
    #[actix_rt::test]
    async fn the_local_log_keeps_what_a_checkpoint_or_the_window_may_need() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, writer) = crate::cluster::runner::tests::writer(dir.path());
        let (old, recent) = (TenantId(1), TenantId(2));
        for (tenant, ids) in [(old, ["a", "b"]), (old, ["c", "d"]), (old, ["e", "f"])] {
            let prepared = PreparedBatch::new(tenant, &batch(&ids)).unwrap();
            let (request, answer) =
                AppendRequest::answered(tenant, Duration::from_secs(60), prepared);
            writer.submit(request);
            answer.await.unwrap().unwrap();
        }
        let mut fresh = batch(&["x"]);
        fresh.received_at = crate::event::now_micros();
        let prepared = PreparedBatch::new(recent, &fresh).unwrap();
        let (request, answer) = AppendRequest::answered(recent, Duration::from_secs(60), prepared);
        writer.submit(request);
        answer.await.unwrap().unwrap();
        writer.shutdown();
        let window = Duration::from_secs(60);
        // Checkpointed through the second entry of `old` (sequence 4); `recent` entirely.
        let deleted = prune_local_log(
            &storage,
            &[(old, 4, window), (recent, 1, window)],
            crate::event::now_micros(),
        )
        .unwrap();
        assert_eq!(deleted, 2);
        let left: Vec<u64> = read_batches(storage.log(), old, 1, 10)
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(left, vec![5], "the entry after the checkpoint stays");
        assert_eq!(
            read_batches(storage.log(), recent, 1, 10).unwrap().len(),
            1,
            "an entry within the window stays"
        );
    }
}
