//! The rollup actor: keeps a tenant's minute/hour/day rollups up to date, incrementally.
//!
//! The ingest actor sends it a [`RollupBatch`] for every log entry once that entry is durable.
//! Updates collect in memory ([`Deltas`]) and are merged into storage every
//! `rollups.flush_interval` together with the watermark (the last sequence they cover),
//! atomically and fenced (see `storage::rollups::flush`).
//!
//! The actor never trusts that it has seen everything: at start it loads the watermark and
//! replays the log after it, and whenever a batch arrives that does not continue its sequence
//! (one was dropped from a full queue, or the actor was restarted) it reads the missing entries
//! from the log. So a crash, a restart or a full queue can delay rollups but never make them
//! wrong.
//!
//! It is an explicit state machine ([`Phase`]), one storage task at a time:
//!
//! ```text
//!            ┌────────────── flush due between steps ─────────────┐
//!            │                                                    ▼
//! Loading ─▶ CatchingUp ─(log read to its end)─▶ Idle ─(tick)─▶ Flushing ─▶ CatchingUp | Idle
//!    ▲           ▲                                │  (gap in pushed batches)
//!    │           └────────────────────────────────┘
//!    └── Rebuilding ◀── rebuild request (after a running flush)
//! ```
//!
//! Pushed batches are applied only in `Idle` and `Flushing`, and only when they continue the
//! applied sequence. Every storage task carries the actor's `epoch`; a reset (reload, rebuild)
//! starts a new epoch, and a task that finishes for an old one is dropped ([`RollupActor::fenced`]),
//! so no stale read is ever applied to fresh state. A failed task is retried after [`RETRY`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::{Actor, ActorFutureExt, AsyncContext, Context, StreamHandler};

use crate::actors::child::{ChildActor, Mailbox};
use crate::actors::live::LiveItems;
use crate::actors::PipelineDeps;
use crate::event::{now_micros, Micros};
use crate::identity::{Pending, StoredLink};
use crate::ids::TenantId;
use crate::rollup::{Deltas, NameCap, Resolution, Retention, RollupBatch, RollupItems};
use crate::storage::cold;
use crate::storage::event_log::scan_views;
use crate::storage::rollups::{self, FlushOutcome};
use crate::storage::{self, Storage, StorageError};
use crate::telemetry;

/// Log entries read per catch-up step.
const CATCH_UP_BATCHES: usize = 256;
/// Delay before retrying a failed storage task.
pub const RETRY: Duration = Duration::from_secs(1);
/// How often expired buckets are deleted.
const EXPIRY_EVERY: Duration = Duration::from_secs(600);

/// What the rollup actor is sent.
pub enum RollupMessage {
    /// Durable events to roll up.
    Rolled(RollupBatch),
    /// Drop every stored rollup of the tenant and recompute them from the log; the sender is
    /// told once the old rollups and watermark are gone (the replay then runs on).
    Rebuild(tokio::sync::oneshot::Sender<()>),
}

/// Where the actor stands. See the module docs for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the watermark, the event names and the log head.
    Loading,
    /// Reading the log after the applied sequence, a chunk at a time.
    CatchingUp,
    /// Everything known is applied; pushed batches are applied as they come.
    Idle,
    /// Waiting for a flush slot, then merging the deltas into storage.
    Flushing,
    /// Deleting the stored rollups before a replay from the start.
    Rebuilding,
}

pub struct RollupActor {
    tenant: TenantId,
    tenant_label: String,
    deps: Arc<PipelineDeps>,
    live: Mailbox<LiveItems>,
    retention: Retention,
    phase: Phase,
    /// Bumped by every reset; storage tasks of an older epoch are dropped when they finish.
    epoch: u64,
    /// Last sequence whose events are in storage or in `deltas`.
    applied_seq: u64,
    /// The watermark this actor last saw in storage; a flush commits only if it is unchanged.
    stored_watermark: u64,
    /// The tenant's last durable sequence, as far as this actor knows (for the lag metric).
    known_head: u64,
    deltas: Deltas,
    /// The event names this tenant's rollups hold, and the cap on them.
    names: NameCap,
    /// Flushes stored by this actor; every `FOLD_EVERY`th folds sketch deltas (see
    /// `storage::rollups`), starting with the first.
    flushes: u64,
    /// Buckets with sketch delta records written since their last fold; folded once they end.
    unfolded: rustc_hash::FxHashSet<rollups::BucketId>,
    /// Rebuilds asked for while a flush was running; they start when the flush ends.
    rebuild_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// When the last flush started.
    last_flush: Instant,
    /// When the durable sequences not yet in the stored rollups became known.
    freshness: Freshness,
    last_expiry: Option<Instant>,
    /// Identity links over the stored ones (`crate::identity`); `None` until loaded, or when the
    /// tenant is gone.
    identity: Option<Pending>,
}

impl RollupActor {
    pub fn new(tenant: TenantId, deps: Arc<PipelineDeps>, live: Mailbox<LiveItems>) -> RollupActor {
        let retention = deps.rollups.retention();
        RollupActor {
            tenant,
            tenant_label: tenant.to_string(),
            deps,
            live,
            retention,
            phase: Phase::Loading,
            epoch: 0,
            applied_seq: 0,
            stored_watermark: 0,
            known_head: 0,
            deltas: Deltas::default(),
            names: NameCap::default(),
            flushes: 0,
            unfolded: Default::default(),
            rebuild_waiters: Vec::new(),
            last_flush: Instant::now(),
            freshness: Freshness::default(),
            last_expiry: None,
            identity: None,
        }
    }

    /// Runs a storage task on a blocking thread of the actor's arbiter; `done` gets its outcome
    /// on the actor, unless the epoch has changed since it started (the outcome is then stale,
    /// and dropped).
    fn fenced<T: Send + 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        work: impl FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
        done: impl FnOnce(&mut Self, Result<T, String>, &mut Context<Self>) + 'static,
    ) {
        let storage = self.deps.storage.clone();
        let task = crate::blocking::run(move || work(&storage));
        self.when_done(ctx, task, done);
    }

    /// [`Self::fenced`] on the cold-task pool, for reads that may wait long on the object
    /// store: they never hold the arbiter's few blocking threads, which every tenant's flushes
    /// need (docs/decisions/0041).
    fn fenced_cold<T: Send + 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        work: impl FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
        done: impl FnOnce(&mut Self, Result<T, String>, &mut Context<Self>) + 'static,
    ) {
        let storage = self.deps.storage.clone();
        let task = self.deps.cold_tasks.run(move || work(&storage));
        self.when_done(ctx, task, done);
    }

    fn when_done<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        task: impl std::future::Future<
                Output = Result<Result<T, StorageError>, crate::blocking::BlockingError>,
            > + 'static,
        done: impl FnOnce(&mut Self, Result<T, String>, &mut Context<Self>) + 'static,
    ) {
        let epoch = self.epoch;
        ctx.spawn(wrap_future(task).map(move |joined, actor: &mut Self, ctx| {
            if actor.epoch != epoch {
                return;
            }
            let outcome = match joined {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            done(actor, outcome, ctx);
        }));
    }

    /// Logs a failed step and runs `step` again after [`RETRY`], unless the epoch has changed.
    fn retry_later(
        &mut self,
        ctx: &mut Context<Self>,
        what: &'static str,
        error: &str,
        step: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        tracing::error!(tenant = %self.tenant, error, "{what} failed; retrying");
        let epoch = self.epoch;
        ctx.run_later(RETRY, move |actor, ctx| {
            if actor.epoch == epoch {
                step(actor, ctx);
            }
        });
    }

    /// The tenant's cap on distinct event names.
    fn name_cap(&self) -> usize {
        self.deps
            .directory
            .get(self.tenant)
            .map_or(usize::MAX, |tenant| {
                tenant.settings.max_event_names as usize
            })
    }

    /// Rolls up the items of the entry at `first_seq`, renaming the events over the tenant's
    /// name cap first (see [`NameCap`]).
    fn apply(&mut self, first_seq: u64, items: &mut RollupItems) {
        if let Some(identity) = &mut self.identity {
            let (hashes, links) = items.identity_parts();
            let tenant = &self.tenant_label;
            identity.apply(hashes, links, |link, outcome| {
                telemetry::identity_linked(tenant, link.kind, outcome.as_str());
            });
        }
        let overflowed = self.names.apply(items, self.name_cap());
        if overflowed > 0 {
            telemetry::event_names_overflowed(&self.tenant_label, overflowed);
        }
        self.deltas.apply(items, &self.retention, now_micros());
        self.applied_seq = crate::event::last_seq_of(first_seq, items.len());
        self.head_known(self.applied_seq);
    }

    /// Starts a new epoch in `phase`: in-memory updates are discarded and the results of storage
    /// tasks started before are dropped.
    fn start_epoch(&mut self, phase: Phase) {
        self.epoch += 1;
        self.deltas = Deltas::default();
        self.names = NameCap::default();
        if let Some(identity) = &mut self.identity {
            identity.clear();
        }
        self.phase = phase;
    }

    /// Loading: forgets in-memory state, loads the watermark, then catches up from it.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        self.start_epoch(Phase::Loading);
        let heads = self.deps.writer.heads().clone();
        let tenant = self.tenant;
        let hash_key = (self.deps.directory.get(tenant)).map(|record| record.user_hash_key);
        let max_ids = self.deps.rollups.max_identity_ids;
        self.fenced(
            ctx,
            move |storage| {
                let watermark = rollups::watermark(storage, tenant)?;
                let head = crate::query::log_head(storage, &heads, tenant)?;
                let names = rollups::event_names(storage, tenant)?;
                let identity = match hash_key {
                    Some(key) => Some(Pending::new(
                        storage::identity::map(storage, tenant, &key)?,
                        key,
                        max_ids,
                    )),
                    None => None,
                };
                Ok((watermark, head, names, identity))
            },
            |actor, loaded, ctx| match loaded {
                Ok((watermark, head, names, identity)) => {
                    actor.identity = identity;
                    actor.names = NameCap::new(names);
                    actor.applied_seq = watermark;
                    actor.stored_watermark = watermark;
                    actor.head_known(head);
                    actor.catch_up(ctx);
                }
                Err(error) => {
                    actor.retry_later(ctx, "loading the rollup watermark", &error, Self::reload)
                }
            },
        );
    }

    /// CatchingUp: reads the next chunk of the log after `applied_seq` and applies it; goes on
    /// until the log's end (then Idle), flushing between chunks when a flush is due. Entries
    /// the cold tier already holds are read from its segments, on the cold-task pool.
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::CatchingUp;
        let tenant = self.tenant;
        let from = self.applied_seq + 1;
        let heads = self.deps.writer.heads().clone();
        let cold_step = self.deps.cold_settings.max_flush_events as u64;
        // Where the cold tier holds `from` on, the step reads that far from its segments.
        let in_cold = move |storage: &Storage| -> Result<Option<LogRead>, StorageError> {
            let cold_through = cold::cold_watermark(storage, tenant)?;
            Ok((from <= cold_through).then(|| LogRead::InCold {
                through: cold_through.min(from.saturating_add(cold_step)),
            }))
        };
        self.fenced(
            ctx,
            move |storage| {
                if let Some(cold) = in_cold(storage)? {
                    return Ok(cold);
                }
                // Only durable entries: the rollups persist what they apply.
                let durable = crate::query::log_head(storage, &heads, tenant)?;
                let read = read_items(storage, tenant, from, durable, CATCH_UP_BATCHES)?;
                // A cold pass that began before a rebuild may have moved entries from `from`
                // on meanwhile and deleted them here; its commit comes before the deletion, so
                // the watermark then shows it and the read may have skipped them.
                Ok(in_cold(storage)?.unwrap_or(LogRead::Hot(read)))
            },
            move |actor, read, ctx| match read {
                Ok(LogRead::Hot(batches)) => actor.caught_up_chunk(batches, ctx),
                Ok(LogRead::InCold { through }) => actor.catch_up_cold(from, through, ctx),
                Err(error) => {
                    let what = "reading the log for rollups";
                    actor.retry_later(ctx, what, &error, Self::catch_up);
                }
            },
        );
    }

    /// CatchingUp, from cold segments: reads `from..=through` and applies it.
    fn catch_up_cold(&mut self, from: u64, through: u64, ctx: &mut Context<Self>) {
        let tenant = self.tenant;
        let store = self.deps.cold.clone();
        self.fenced_cold(
            ctx,
            move |storage| read_cold_items(storage, &store, tenant, from, through),
            |actor, read, ctx| match read {
                Ok(batches) => actor.caught_up_chunk(batches, ctx),
                Err(error) => {
                    let what = "reading cold segments for rollups";
                    actor.retry_later(ctx, what, &error, Self::catch_up);
                }
            },
        );
    }

    /// Applies a chunk read by a catch-up step, then flushes if one is due, or reads on (an
    /// empty chunk: the log's end, Idle).
    fn caught_up_chunk(&mut self, batches: Vec<(u64, RollupItems)>, ctx: &mut Context<Self>) {
        if batches.is_empty() {
            self.phase = Phase::Idle;
            return;
        }
        telemetry::rollup_log_reads(batches.len());
        for (first_seq, mut items) in batches {
            if first_seq > self.applied_seq {
                self.apply(first_seq, &mut items);
            }
        }
        if self.flush_due() {
            self.flush(ctx);
        } else {
            self.catch_up(ctx);
        }
    }

    fn flush_due(&self) -> bool {
        !self.deltas.is_empty() && self.last_flush.elapsed() >= self.deps.rollups.flush_interval
    }

    /// After a flush: a rebuild asked for meanwhile, else what is left to read, else Idle.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Idle;
        let waiters = std::mem::take(&mut self.rebuild_waiters);
        if !waiters.is_empty() {
            self.rebuild(waiters, ctx);
        } else if self.known_head > self.applied_seq {
            self.catch_up(ctx);
        } else {
            self.phase = Phase::Idle;
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        // Safety net: durable entries that no push delivered are read from the log.
        if let Some(head) = self.deps.writer.heads().get(self.tenant) {
            self.head_known(head);
        }
        if self.phase == Phase::Idle {
            if self.known_head > self.applied_seq {
                self.catch_up(ctx);
            } else if !self.deltas.is_empty() {
                self.flush(ctx);
            }
        }
        self.report_lag();
    }

    /// Flushing: waits for a flush slot (shared by all tenants, first come, first served), then
    /// flushes whatever has been applied by then. Meanwhile pushed batches keep merging in
    /// memory.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Flushing;
        self.last_flush = Instant::now();
        let slots = Arc::clone(&self.deps.rollup_flush_slots);
        ctx.spawn(wrap_future(slots.acquire_owned()).map(
            |slot, actor: &mut Self, ctx| match slot {
                Ok(slot) => actor.flush_in(slot, ctx),
                // Closed: the server is stopping.
                Err(_) => actor.phase = Phase::Idle,
            },
        ));
    }

    fn flush_in(&mut self, slot: tokio::sync::OwnedSemaphorePermit, ctx: &mut Context<Self>) {
        if !self.rebuild_waiters.is_empty() || self.deltas.is_empty() {
            drop(slot);
            return self.resume(ctx);
        }
        let now = now_micros();
        // Hour and day buckets are folded once they have ended (long ranges read them). Minute
        // buckets are not: folding every series' minute at every minute boundary costs more
        // than the at most 7 small deltas a minute keeps (its last fold came at most 7 flushes
        // before it ended); see docs/decisions/0006.
        let ended = |resolution: Resolution, start: Micros| {
            resolution != Resolution::Minute && start + resolution.width() <= now
        };
        let mut fold = rollups::FoldPlan {
            all: self.flushes.is_multiple_of(rollups::FOLD_EVERY),
            buckets: (self.unfolded.iter())
                .filter(|(resolution, _, start)| ended(*resolution, *start))
                .cloned()
                .collect(),
        };
        // Late events into an ended hour or day: fold it at once.
        for (resolution, name, start, _) in self.deltas.buckets() {
            if ended(resolution, start) {
                fold.buckets.insert((resolution, name.to_string(), start));
            }
        }
        let flush = PendingFlush {
            deltas: std::mem::take(&mut self.deltas),
            admitted: self.names.take_unflushed(),
            links: (self.identity.as_mut()).map_or_else(Vec::new, Pending::take_writes),
            fold,
            through: self.applied_seq,
            expected: self.stored_watermark,
            expire: self
                .last_expiry
                .is_none_or(|at| at.elapsed() >= EXPIRY_EVERY),
        };
        let tenant = self.tenant;
        let retention = self.retention;
        let cache = Arc::clone(&self.deps.query_cache);
        self.fenced(
            ctx,
            move |storage| {
                crate::priority::background_thread();
                let _slot = slot;
                Ok(flush.run(storage, tenant, &retention, &cache))
            },
            |actor, flushed, ctx| match flushed {
                Ok((Ok(FlushOutcome::Stored), mut flush, took)) => {
                    actor.stored(&flush, took);
                    if let Some(identity) = &mut actor.identity {
                        identity.stored(std::mem::take(&mut flush.links));
                    }
                    actor.resume(ctx);
                }
                Ok((Ok(FlushOutcome::Conflict { stored }), flush, _)) => {
                    // Another writer moved the watermark: our updates may overlap what it
                    // stored. Start over from storage.
                    let expected = flush.expected;
                    tracing::warn!(tenant = %actor.tenant, expected, stored, "rollup watermark moved under us; reloading");
                    actor.start_over(ctx);
                }
                Ok((Err(error), flush, _)) => {
                    tracing::error!(tenant = %actor.tenant, %error, "flushing rollups failed; will retry");
                    // Not stored: keep the updates for the next flush.
                    actor.deltas.merge(flush.deltas);
                    actor.names.restore_unflushed(flush.admitted);
                    if let Some(identity) = &mut actor.identity {
                        identity.failed(flush.links);
                    }
                    actor.resume(ctx);
                }
                Err(error) => {
                    tracing::error!(tenant = %actor.tenant, %error, "rollup flush task failed; reloading from storage");
                    actor.start_over(ctx);
                }
            },
        );
    }

    /// After a flush that left storage in an unknown state: a rebuild asked for meanwhile (which
    /// reloads after it), else a reload.
    fn start_over(&mut self, ctx: &mut Context<Self>) {
        let waiters = std::mem::take(&mut self.rebuild_waiters);
        self.phase = Phase::Loading;
        if waiters.is_empty() {
            self.reload(ctx);
        } else {
            self.rebuild(waiters, ctx);
        }
    }

    /// Bookkeeping after a stored flush.
    fn stored(&mut self, flush: &PendingFlush, took: Duration) {
        self.stored_watermark = flush.through;
        self.report_lag();
        self.flushes += 1;
        self.note_folds(&flush.deltas, &flush.fold);
        if flush.expire {
            self.last_expiry = Some(Instant::now());
        }
        telemetry::rollup_flushed(
            &self.tenant_label,
            flush.deltas.len(),
            took,
            &flush.deltas.skipped,
        );
    }

    /// Keeps track of the buckets left with delta records by a stored flush.
    fn note_folds(&mut self, deltas: &Deltas, fold: &rollups::FoldPlan) {
        for bucket in &fold.buckets {
            self.unfolded.remove(bucket);
        }
        for (resolution, name, start, delta) in deltas.buckets() {
            let bucket = (resolution, name.to_string(), start);
            if fold.all || fold.buckets.contains(&bucket) {
                self.unfolded.remove(&bucket);
            } else if resolution != Resolution::Minute && !delta.users.is_empty() {
                self.unfolded.insert(bucket);
            }
        }
    }

    /// Rebuilding: deletes the stored rollups, then reloads (from watermark 0: the whole log).
    /// A running flush finishes first.
    fn rebuild(&mut self, waiters: Vec<tokio::sync::oneshot::Sender<()>>, ctx: &mut Context<Self>) {
        if self.phase == Phase::Flushing {
            self.rebuild_waiters.extend(waiters);
            return;
        }
        self.start_epoch(Phase::Rebuilding);
        let tenant = self.tenant;
        self.fenced(
            ctx,
            move |storage| rollups::delete_all(storage, tenant),
            move |actor, deleted, ctx| {
                if let Err(error) = deleted {
                    // Replaying now would lose whatever the failed delete left behind: retry.
                    let what = "deleting rollups for a rebuild";
                    return actor
                        .retry_later(ctx, what, &error, |actor, ctx| actor.rebuild(waiters, ctx));
                }
                tracing::info!(tenant = %actor.tenant, "rebuilding rollups from the log");
                for waiter in waiters {
                    let _ = waiter.send(());
                }
                actor.reload(ctx);
            },
        );
    }

    /// A batch pushed after its entry became durable.
    fn rolled(&mut self, mut batch: RollupBatch, ctx: &mut Context<Self>) {
        self.head_known(batch.last_seq());
        let applying = matches!(self.phase, Phase::Idle | Phase::Flushing);
        let applied = if !applying || batch.last_seq() <= self.applied_seq {
            false
        } else if batch.first_seq != self.applied_seq + 1 {
            // Something was missed: read it from the log (after the flush, if one runs).
            if self.phase == Phase::Idle {
                self.catch_up(ctx);
            }
            false
        } else {
            self.apply(batch.first_seq, &mut batch.items);
            true
        };
        if !applied {
            // Live counts follow the cap and the identity links as far as they are known now.
            self.names.peek(&mut batch.items, self.name_cap());
            if let Some(identity) = &self.identity {
                identity.resolve(batch.items.identity_parts().0);
            }
        }
        // Live counts are best effort under overload; rollups are not (see above).
        let _ = self.live.try_send(LiveItems(Arc::new(batch.items)));
    }

    /// The tenant's log reached `head` (durable), as far as this actor knows.
    fn head_known(&mut self, head: u64) {
        self.known_head = self.known_head.max(head);
        self.freshness.known(self.known_head, Instant::now());
    }

    fn report_lag(&mut self) {
        let lag = self.known_head.saturating_sub(self.stored_watermark);
        self.freshness.stored(self.stored_watermark);
        let now = Instant::now();
        if lag > 0 {
            // Also after a rebuild, which lowers the stored watermark below marks gone by.
            self.freshness.known(self.known_head, now);
        }
        telemetry::rollup_lag(&self.tenant_label, lag, self.freshness.age(now));
    }
}

/// When the durable sequences not yet in the stored rollups became known, as marks of (last
/// sequence, when) at most one per [`Freshness::MARK_EVERY`] and at most [`Freshness::MAX_MARKS`],
/// so the freshness gauge is the age of the oldest durable event the stored rollups lack (0 when
/// they have everything), not the time since the tenant was last idle. A mark extended instead of
/// added makes the age too old by at most its interval, never too young; but the marks live with
/// the actor, so after a restart the backlog counts from the restart (an actor that keeps
/// restarting is its own alert).
#[derive(Default)]
struct Freshness {
    marks: std::collections::VecDeque<(u64, Instant)>,
}

impl Freshness {
    const MARK_EVERY: Duration = Duration::from_millis(100);
    /// About 100 seconds of marks, however long the rollups are stuck.
    const MAX_MARKS: usize = 1024;

    fn known(&mut self, head: u64, now: Instant) {
        let full = self.marks.len() >= Self::MAX_MARKS;
        match self.marks.back_mut() {
            Some((seq, _)) if *seq >= head => {}
            Some((seq, at)) if full || now.duration_since(*at) < Self::MARK_EVERY => *seq = head,
            _ => self.marks.push_back((head, now)),
        }
    }

    fn stored(&mut self, watermark: u64) {
        while self.marks.front().is_some_and(|(seq, _)| *seq <= watermark) {
            self.marks.pop_front();
        }
    }

    fn age(&self, now: Instant) -> Duration {
        self.marks
            .front()
            .map_or(Duration::ZERO, |(_, at)| now.duration_since(*at))
    }
}

/// A flush handed to a blocking thread, and handed back with its outcome.
struct PendingFlush {
    deltas: Deltas,
    admitted: Vec<String>,
    /// Identity links to store with the rollups.
    links: Vec<StoredLink>,
    fold: rollups::FoldPlan,
    /// The watermark the flush stores, and the one it expects to replace.
    through: u64,
    expected: u64,
    /// Whether expired buckets are deleted after it.
    expire: bool,
}

impl PendingFlush {
    /// Stores the flush, drops the cached answers it changed, then expires old buckets if due.
    fn run(
        mut self,
        storage: &Storage,
        tenant: TenantId,
        retention: &Retention,
        cache: &crate::query::QueryCache,
    ) -> (Result<FlushOutcome, StorageError>, PendingFlush, Duration) {
        let started = Instant::now();
        self.deltas.roll_up_users();
        let meta_writes = rollups::FlushMeta {
            admitted: &self.admitted,
            links: &self.links,
        };
        let result = rollups::flush(
            storage,
            tenant,
            &self.deltas,
            &meta_writes,
            self.expected,
            self.through,
            &self.fold,
        );
        if matches!(result, Ok(FlushOutcome::Stored)) {
            // Right after the commit, on this thread, not after a trip through the actor's
            // mailbox or the expiry: until they go, a query can be served an answer older than
            // the watermark another one has just shown.
            cache.invalidate_late(tenant, &self.deltas, retention, now_micros());
        }
        if matches!(result, Ok(FlushOutcome::Stored)) && self.expire {
            if let Err(error) = rollups::expire(storage, tenant, retention, now_micros()) {
                tracing::warn!(%tenant, %error, "expiring old rollups failed");
            }
        }
        (result, self, started.elapsed())
    }
}

/// The rollup items of the tenant's log entries whose first sequence is in `from_seq..=through`,
/// in order, at most `max_batches` entries (at least one, if there is one). Blocking.
pub fn read_items(
    storage: &Storage,
    tenant: TenantId,
    from_seq: u64,
    through: u64,
    max_batches: usize,
) -> Result<Vec<(u64, RollupItems)>, StorageError> {
    let mut out = Vec::new();
    scan_views(storage.log(), tenant, from_seq, |first_seq, batch| {
        if first_seq > through {
            return std::ops::ControlFlow::Break(());
        }
        out.push((first_seq, RollupItems::from_views(batch)));
        if out.len() < max_batches {
            std::ops::ControlFlow::Continue(())
        } else {
            std::ops::ControlFlow::Break(())
        }
    })?;
    Ok(out)
}

/// Where a catch-up step found the next entries.
enum LogRead {
    /// Read from the hot log (empty at its end).
    Hot(Vec<(u64, RollupItems)>),
    /// Already in the cold tier, through this sequence: read from its segments.
    InCold { through: u64 },
}

/// The rollup items of the cold events with sequences in `from_seq..=through`: see
/// [`cold_items`]. Blocking.
fn read_cold_items(
    storage: &Storage,
    store: &cold::ColdStore,
    tenant: TenantId,
    from_seq: u64,
    through: u64,
) -> Result<Vec<(u64, RollupItems)>, StorageError> {
    cold_items(through, |visit| {
        cold::scan_cold(storage, store, tenant, from_seq, through, None, visit).map(|_| ())
    })
    .map_err(|error| StorageError::NotDurable(format!("reading cold segments: {error}")))
}

/// The rollup items of the cold events `scan` visits (in sequence order, through `through`):
/// one item list per run of consecutive sequences, then an empty list that ends at `through`,
/// so that the range counts as applied even where retention or an erasure left no event.
/// Blocking.
pub fn cold_items(
    through: u64,
    scan: impl FnOnce(
        &mut dyn FnMut(u64, &crate::event::LogBatch) -> std::ops::ControlFlow<()>,
    ) -> Result<(), cold::ColdError>,
) -> Result<Vec<(u64, RollupItems)>, cold::ColdError> {
    type Run = (
        u64,
        Vec<crate::event::StoredEvent>,
        Vec<crate::event::EventExtras>,
    );
    let mut runs: Vec<Run> = Vec::new();
    let mut expected = 0;
    scan(&mut |seq, batch| {
        // Cold batches hold one event each, with its extras if it has any.
        let extras = (0..batch.events.len()).map(|at| crate::event::EventExtras {
            weight: batch.weight_of(at),
            derived: None,
        });
        match runs.last_mut() {
            Some((_, events, weights)) if seq == expected => {
                events.extend(batch.events.iter().cloned());
                weights.extend(extras);
            }
            _ => runs.push((seq, batch.events.clone(), extras.collect())),
        }
        expected = seq + batch.events.len() as u64;
        std::ops::ControlFlow::Continue(())
    })?;
    let mut out: Vec<(u64, RollupItems)> = runs
        .into_iter()
        .map(|(first, events, extras)| (first, RollupItems::from_events(&events, &extras)))
        .collect();
    // An empty list at `through` moves the applied sequence to `through` (`last_seq_of`).
    out.push((through, RollupItems::from_events(&[], &[])));
    Ok(out)
}

impl Actor for RollupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.reload(ctx);
        ctx.run_interval(self.deps.rollups.flush_interval, |actor, ctx| {
            actor.tick(ctx)
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // A stopped pipeline (a deleted tenant) has nothing left to roll up; a last value left
        // behind would keep the freshness alert firing.
        telemetry::rollup_lag(&self.tenant_label, 0, Duration::ZERO);
    }
}

impl ChildActor for RollupActor {
    type Message = RollupMessage;
}

impl StreamHandler<RollupMessage> for RollupActor {
    fn handle(&mut self, message: RollupMessage, ctx: &mut Self::Context) {
        match message {
            RollupMessage::Rolled(batch) => self.rolled(batch, ctx),
            RollupMessage::Rebuild(deleted) => self.rebuild(vec![deleted], ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    #[test]
    fn freshness_is_the_age_of_the_oldest_event_not_stored() {
        use super::Freshness;
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut freshness = Freshness::default();
        assert_eq!(freshness.age(at(0)), Duration::ZERO);
        freshness.known(10, at(0));
        freshness.known(20, at(500));
        assert_eq!(freshness.age(at(600)), Duration::from_millis(600));
        // Stored through 10: the oldest missing event (11) became known at 500 ms.
        freshness.stored(10);
        assert_eq!(freshness.age(at(600)), Duration::from_millis(100));
        // Under constant load the age stays that of the oldest missing event, not the time
        // since the rollups last had everything.
        for ms in (600..10_000).step_by(10) {
            freshness.known(ms, at(ms));
            freshness.stored(ms.saturating_sub(1000));
            assert!(freshness.age(at(ms)) <= Duration::from_millis(1100), "{ms}");
        }
        freshness.stored(10_000);
        assert_eq!(freshness.age(at(10_000)), Duration::ZERO);
        // A head known again once stored is nothing missing.
        freshness.known(10_000, at(10_000));
        freshness.stored(10_000);
        assert_eq!(freshness.age(at(10_000)), Duration::ZERO);
        // Stuck rollups: the marks stop growing, and the age keeps the oldest mark's time.
        for ms in 10_001..200_000 {
            freshness.known(ms, at(ms));
        }
        assert_eq!(freshness.marks.len(), Freshness::MAX_MARKS);
        assert_eq!(freshness.age(at(200_000)), Duration::from_millis(189_999));
    }

    use super::*;
    use crate::actors::child::Children;
    use crate::config::{Config, Overrides};
    use crate::event::LogBatch;
    use crate::storage::writer::{
        AppendOutcome, AppendRequest, LogWriter, PreparedBatch, WriterOptions,
    };
    use crate::tenant::TenantDirectory;
    use actix::{Addr, Handler, Message};

    /// What the tests observe of the actor.
    #[derive(Debug, Clone, Copy)]
    struct Snapshot {
        phase: Phase,
        epoch: u64,
        applied_seq: u64,
        stored_watermark: u64,
    }

    struct Inspect;

    impl Message for Inspect {
        type Result = Snapshot;
    }

    impl Handler<Inspect> for RollupActor {
        type Result = actix::MessageResult<Inspect>;
        fn handle(&mut self, _: Inspect, _ctx: &mut Context<Self>) -> Self::Result {
            actix::MessageResult(Snapshot {
                phase: self.phase,
                epoch: self.epoch,
                applied_seq: self.applied_seq,
                stored_watermark: self.stored_watermark,
            })
        }
    }

    /// A rollup actor of one tenant over a fresh data dir, run by a child registry as its
    /// supervisor would.
    struct Rig {
        _dir: tempfile::TempDir,
        deps: Arc<PipelineDeps>,
        tenant: TenantId,
        children: Children,
        mailbox: Mailbox<RollupMessage>,
        next_id: u64,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let config = Config::load_from(&Overrides::default(), &[]).unwrap();
            let storage =
                Storage::open(&dir.path().join("db"), 1 << 20, Default::default()).unwrap();
            let options = WriterOptions {
                fsync: false,
                queue_capacity: 64,
                max_group_requests: 8,
                dedup_filter_bytes: 0,
                dedup_max_age: crate::storage::dedup_ingest::MAX_PENDING_AGE,
                store_dead_letters: true,
                fsync_delay: Duration::ZERO,
            };
            let writer = LogWriter::start(storage.clone(), options).unwrap();
            let directory =
                TenantDirectory::load(storage.clone(), config.tenant_defaults.clone(), [0; 32])
                    .unwrap();
            let tenant = directory.create("acme").unwrap().0.id;
            let mut rollups = config.rollups.clone();
            rollups.flush_interval = Duration::from_millis(20);
            let schema_storage = storage.clone();
            let writer = Arc::new(writer);
            let deps = Arc::new(PipelineDeps {
                storage,
                writer: Arc::clone(&writer),
                append: writer,
                directory: Arc::new(directory),
                schemas: crate::schema::SchemaRegistry::for_tests(schema_storage),
                processing: config.processing.clone(),
                derivers: Arc::new(crate::enrich::Derivers::off()),
                query_cache: Arc::new(crate::query::QueryCache::new(8, 8)),
                actors: config.actors.clone(),
                rollups,
                live: config.live.clone(),
                future_tolerance: Duration::from_secs(3600),
                rollup_flush_slots: Arc::new(tokio::sync::Semaphore::new(1)),
                cold_tasks: Arc::new(
                    crate::blocking::Pool::new("cold-tasks", 1, Duration::from_secs(1)).unwrap(),
                ),
                cold: cold::ColdStore::local(&dir.path().join("cold")).unwrap(),
                cold_settings: config.cold.clone(),
                hot_retention: config.storage.hot_retention,
            });
            let mut children = Children::new("test".into(), RETRY, RETRY);
            let live = children.register("live", 64, {
                let ticks = crate::actors::live::tick_channel();
                move || crate::actors::live::LiveHub::new(Arc::clone(&ticks), RETRY)
            });
            let mailbox = children.register("rollup", 64, {
                let deps = Arc::clone(&deps);
                move || RollupActor::new(tenant, Arc::clone(&deps), live.clone())
            });
            Rig {
                _dir: dir,
                deps,
                tenant,
                children,
                mailbox,
                next_id: 0,
            }
        }

        fn start(&mut self) -> Addr<RollupActor> {
            self.children.start_all();
            self.children.addr("rollup").unwrap()
        }

        /// Appends a request of `events` new "Signed Up" events, timestamped now, through the
        /// log writer; returns the batch the ingest actor would push.
        async fn append(&mut self, events: usize) -> RollupBatch {
            let ids: Vec<String> = (0..events)
                .map(|_| {
                    self.next_id += 1;
                    format!("m{}", self.next_id)
                })
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut batch: LogBatch = crate::storage::event_log::tests::batch(&ids);
            let now = now_micros();
            batch.received_at = now;
            for event in &mut batch.events {
                event.timestamp = now;
            }
            let items = RollupItems::from_events(&batch.events, &batch.extras);
            let prepared = PreparedBatch::new(self.tenant, &batch).unwrap();
            let (request, answer) =
                AppendRequest::answered(self.tenant, Duration::from_secs(3600), prepared);
            self.deps.writer.submit(request);
            let outcome: AppendOutcome = answer.await.unwrap().unwrap();
            RollupBatch {
                tenant: self.tenant,
                first_seq: outcome.first_seq.unwrap(),
                items,
            }
        }

        /// Asks the actor for a rebuild; the receiver is answered once the old rollups are gone.
        fn ask_rebuild(&self) -> tokio::sync::oneshot::Receiver<()> {
            let (deleted, done) = tokio::sync::oneshot::channel();
            self.mailbox
                .try_send(RollupMessage::Rebuild(deleted))
                .ok()
                .unwrap();
            done
        }

        fn push(&self, batch: RollupBatch) {
            self.mailbox
                .try_send(RollupMessage::Rolled(batch))
                .ok()
                .unwrap();
        }

        /// Events counted in the stored day buckets of today and yesterday (a test may cross
        /// midnight between its appends and its checks).
        fn stored_count(&self) -> u64 {
            let day = Resolution::Day.bucket(now_micros());
            let width = Resolution::Day.width();
            rollups::read_counts(
                &self.deps.storage,
                self.tenant,
                Resolution::Day,
                "Signed Up",
                day - width,
                day + width,
            )
            .unwrap()
            .iter()
            .map(|(_, count)| count)
            .sum()
        }
    }

    /// Polls the actor until `done` holds (or fails after 10 s).
    async fn until(
        actor: &Addr<RollupActor>,
        what: &str,
        done: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snapshot = actor.send(Inspect).await.unwrap();
            if done(&snapshot) {
                return snapshot;
            }
            assert!(Instant::now() < deadline, "{what}: {snapshot:?}");
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix_rt::test]
    async fn loading_catches_up_with_the_log_then_idles_and_flushes() {
        let mut rig = Rig::new();
        for events in [2, 1, 3] {
            rig.append(events).await;
        }
        let actor = rig.start();
        let idle = until(&actor, "caught up", |s| s.phase == Phase::Idle).await;
        assert_eq!(idle.applied_seq, 6);
        until(&actor, "flushed", |s| s.stored_watermark == 6).await;
        assert_eq!(rig.stored_count(), 6);
        assert_eq!(
            rollups::watermark(&rig.deps.storage, rig.tenant).unwrap(),
            6
        );
    }

    #[actix_rt::test]
    async fn pushes_apply_in_order_and_a_gap_is_read_from_the_log() {
        let mut rig = Rig::new();
        let actor = rig.start();
        until(&actor, "loaded", |s| s.phase == Phase::Idle).await;
        let first = rig.append(2).await;
        rig.push(first);
        until(&actor, "applied", |s| s.applied_seq == 2).await;
        // The second batch is never pushed (a full queue dropped it); the third is.
        rig.append(1).await;
        let third = rig.append(1).await;
        rig.push(third);
        let caught_up = until(&actor, "gap read", |s| {
            s.applied_seq == 4 && s.phase == Phase::Idle
        })
        .await;
        assert_eq!(caught_up.epoch, 1, "a gap is read without a reset");
        until(&actor, "flushed", |s| s.stored_watermark == 4).await;
        assert_eq!(rig.stored_count(), 4, "every event once");
    }

    #[actix_rt::test]
    async fn a_flush_waits_for_a_slot_while_pushes_keep_applying() {
        let mut rig = Rig::new();
        let actor = rig.start();
        until(&actor, "loaded", |s| s.phase == Phase::Idle).await;
        let slot = Arc::clone(&rig.deps.rollup_flush_slots)
            .acquire_owned()
            .await
            .unwrap();
        let first = rig.append(1).await;
        rig.push(first);
        until(&actor, "waiting for a slot", |s| s.phase == Phase::Flushing).await;
        let second = rig.append(2).await;
        rig.push(second);
        let flushing = until(&actor, "applied while flushing", |s| s.applied_seq == 3).await;
        assert_eq!(flushing.phase, Phase::Flushing);
        assert_eq!(flushing.stored_watermark, 0);
        drop(slot);
        until(&actor, "flushed", |s| s.stored_watermark == 3).await;
        until(&actor, "idle", |s| s.phase == Phase::Idle).await;
        assert_eq!(rig.stored_count(), 3);
    }

    #[actix_rt::test]
    async fn a_rebuild_deletes_then_replays_everything_once() {
        let mut rig = Rig::new();
        for _ in 0..3 {
            rig.append(1).await;
        }
        let actor = rig.start();
        until(&actor, "flushed", |s| s.stored_watermark == 3).await;
        let before = actor.send(Inspect).await.unwrap().epoch;
        rig.ask_rebuild().await.unwrap();
        let rebuilt = until(&actor, "replayed", |s| {
            s.phase == Phase::Idle && s.stored_watermark == 3
        })
        .await;
        // One epoch for the deletion, one for the reload after it.
        assert_eq!(rebuilt.epoch, before + 2);
        assert_eq!(rig.stored_count(), 3);
    }

    #[actix_rt::test]
    async fn a_catch_up_reads_cold_segments_on_the_cold_task_pool() {
        let mut rig = Rig::new();
        for _ in 0..3 {
            rig.append(2).await;
        }
        let actor = rig.start();
        until(&actor, "flushed", |s| s.stored_watermark == 6).await;
        // The cold tier takes only what the dedup tables cover too.
        rig.deps.writer.ingest_dedup_keys_now().await.unwrap();
        let (deps, tenant) = (Arc::clone(&rig.deps), rig.tenant);
        let moved = crate::blocking::run(move || {
            cold::flush_once(
                &deps.storage,
                &deps.cold,
                tenant,
                now_micros() + 1,
                1000,
                None,
            )
        })
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(moved.through, 6);
        // The pool's one thread is taken: a rebuild's replay of the cold entries must wait.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let blocker = rig.deps.cold_tasks.run(move || released.recv());
        rig.ask_rebuild().await.unwrap();
        until(&actor, "reloaded", |s| s.phase == Phase::CatchingUp).await;
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        let waiting = actor.send(Inspect).await.unwrap();
        assert_eq!(
            (waiting.phase, waiting.applied_seq),
            (Phase::CatchingUp, 0),
            "{waiting:?}"
        );
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        until(&actor, "replayed from cold", |s| {
            s.phase == Phase::Idle && s.stored_watermark == 6
        })
        .await;
        assert_eq!(rig.stored_count(), 6);
    }

    #[actix_rt::test]
    async fn a_reset_during_a_catch_up_drops_the_stale_read() {
        let mut rig = Rig::new();
        // Enough entries for many catch-up chunks: the poll below must find the actor
        // still catching up, between two of its 5 ms sleeps.
        for _ in 0..(10 * CATCH_UP_BATCHES) {
            rig.append(1).await;
        }
        let total = 10 * CATCH_UP_BATCHES as u64;
        let actor = rig.start();
        until(&actor, "catching up", |s| s.phase == Phase::CatchingUp).await;
        // A rebuild starts a new epoch while a chunk is being read: that chunk's result must
        // not be applied on top of the replay.
        rig.ask_rebuild().await.unwrap();
        until(&actor, "replayed", |s| {
            s.phase == Phase::Idle && s.stored_watermark == total
        })
        .await;
        assert_eq!(rig.stored_count(), total, "no event counted twice");
    }

    #[actix_rt::test]
    async fn a_rebuild_asked_while_a_flush_waits_is_served_after_it() {
        let mut rig = Rig::new();
        let actor = rig.start();
        until(&actor, "loaded", |s| s.phase == Phase::Idle).await;
        let slot = Arc::clone(&rig.deps.rollup_flush_slots)
            .acquire_owned()
            .await
            .unwrap();
        let first = rig.append(2).await;
        rig.push(first);
        until(&actor, "waiting for a slot", |s| s.phase == Phase::Flushing).await;
        let done = rig.ask_rebuild();
        drop(slot);
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .expect("the rebuild is answered")
            .unwrap();
        until(&actor, "replayed", |s| {
            s.phase == Phase::Idle && s.stored_watermark == 2
        })
        .await;
        assert_eq!(rig.stored_count(), 2);
    }

    #[actix_rt::test]
    async fn a_flush_that_finds_the_watermark_moved_reloads_from_storage() {
        let mut rig = Rig::new();
        let actor = rig.start();
        until(&actor, "loaded", |s| s.phase == Phase::Idle).await;
        let slot = Arc::clone(&rig.deps.rollup_flush_slots)
            .acquire_owned()
            .await
            .unwrap();
        let first = rig.append(1).await;
        let mut theirs = Deltas::default();
        theirs.apply(&first.items, &rig.deps.rollups.retention(), now_micros());
        theirs.roll_up_users();
        rig.push(first);
        until(&actor, "waiting for a slot", |s| s.phase == Phase::Flushing).await;
        // Another writer stores the same entry first.
        let fold = rollups::FoldPlan::default();
        let stored = rollups::flush(
            &rig.deps.storage,
            rig.tenant,
            &theirs,
            &Default::default(),
            0,
            1,
            &fold,
        );
        assert_eq!(stored.unwrap(), FlushOutcome::Stored);
        let before = actor.send(Inspect).await.unwrap().epoch;
        drop(slot);
        let reloaded = until(&actor, "reloaded", |s| {
            s.epoch > before && s.phase == Phase::Idle
        })
        .await;
        assert_eq!((reloaded.applied_seq, reloaded.stored_watermark), (1, 1));
        assert_eq!(rig.stored_count(), 1, "counted once, by the other writer");
        let second = rig.append(1).await;
        rig.push(second);
        until(&actor, "flushed", |s| s.stored_watermark == 2).await;
        assert_eq!(rig.stored_count(), 2);
    }
}
