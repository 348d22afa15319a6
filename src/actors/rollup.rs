//! The rollup actor: keeps a tenant's minute/hour/day rollups up to date, incrementally.
//!
//! It is fed, through its supervisor, a [`RollupBatch`] for every log entry once that entry is
//! durable, in sequence order. Updates collect in memory ([`Deltas`]) and are merged into
//! storage every `rollups.flush_interval` together with the watermark (the last sequence they
//! cover), atomically (see `storage::rollups::flush`).
//!
//! The actor never trusts that it has seen everything: at start it loads the watermark and
//! replays the log after it, and whenever a batch arrives that does not continue its sequence
//! (a message was dropped, or it was restarted) it reads the missing entries from the log. So a
//! crash, a restart or a full mailbox can delay rollups but never make them wrong. Storage reads
//! and writes run on blocking threads, one flush at a time.

use std::sync::Arc;
use std::time::Instant;

use actix::fut::wrap_future;
use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message};

use crate::actors::live::{LiveHub, LiveItems};
use crate::actors::PipelineDeps;
use crate::event::now_micros;
use crate::rollup::{Deltas, Retention, RollupBatch, RollupItem};
use crate::storage::log::read_batches;
use crate::storage::rollups;
use crate::telemetry;
use crate::tenant::TenantId;

/// Log entries read per catch-up step.
const CATCH_UP_BATCHES: usize = 256;

/// Durable events to roll up.
pub struct Rolled(pub RollupBatch);

impl Message for Rolled {
    type Result = ();
}

/// Drop every stored rollup of the tenant and recompute them from the log. `deleted` is told
/// once the old rollups and watermark are gone (the replay then runs on).
pub struct Rebuild {
    pub deleted: tokio::sync::oneshot::Sender<()>,
}

impl Message for Rebuild {
    type Result = ();
}

pub struct RollupActor {
    tenant: TenantId,
    tenant_label: String,
    deps: Arc<PipelineDeps>,
    live: Option<Addr<LiveHub>>,
    retention: Retention,
    /// Last sequence whose events are in storage or in `deltas`.
    applied_seq: u64,
    deltas: Deltas,
    /// The watermark has been loaded and the log replayed up to its end at least once.
    loaded: bool,
    catching_up: bool,
    flushing: bool,
    /// Rebuilds asked for while a flush was running; they start when the flush ends.
    rebuild_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    last_flush: Instant,
    last_expiry: Option<Instant>,
}

impl RollupActor {
    pub fn new(
        tenant: TenantId,
        deps: Arc<PipelineDeps>,
        live: Option<Addr<LiveHub>>,
    ) -> RollupActor {
        let retention = deps.rollups.retention();
        RollupActor {
            tenant,
            tenant_label: tenant.to_string(),
            deps,
            live,
            retention,
            applied_seq: 0,
            deltas: Deltas::default(),
            loaded: false,
            catching_up: false,
            flushing: false,
            rebuild_waiters: Vec::new(),
            last_flush: Instant::now(),
            last_expiry: None,
        }
    }

    fn apply(&mut self, first_seq: u64, items: &[RollupItem]) {
        self.deltas.apply(items, &self.retention, now_micros());
        self.applied_seq = first_seq + (items.len() as u64).max(1) - 1;
    }

    /// Loads the watermark, then replays the log after it.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let storage = self.deps.storage.clone();
        let tenant = self.tenant;
        let task = tokio::task::spawn_blocking(move || rollups::watermark(&storage, tenant));
        self.catching_up = true;
        ctx.spawn(wrap_future(task).map(|result, actor: &mut Self, ctx| {
            actor.catching_up = false;
            match result {
                Ok(Ok(watermark)) => {
                    actor.applied_seq = watermark;
                    actor.catch_up(ctx);
                }
                other => {
                    tracing::error!(tenant = %actor.tenant, ?other, "loading the rollup watermark failed; retrying");
                    ctx.run_later(std::time::Duration::from_secs(1), |actor, ctx| actor.load(ctx));
                }
            }
        }));
    }

    /// Reads the log after `applied_seq` until its end, applying every entry.
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        if self.catching_up {
            return;
        }
        self.catching_up = true;
        let storage = self.deps.storage.clone();
        let tenant = self.tenant;
        let from = self.applied_seq + 1;
        let task = tokio::task::spawn_blocking(move || {
            read_batches(&storage, tenant, from, CATCH_UP_BATCHES)
        });
        ctx.spawn(wrap_future(task).map(move |result, actor: &mut Self, ctx| {
            actor.catching_up = false;
            let batches = match result {
                Ok(Ok(batches)) => batches,
                other => {
                    tracing::error!(tenant = %actor.tenant, ?other, "reading the log for rollups failed; retrying");
                    ctx.run_later(std::time::Duration::from_secs(1), |actor, ctx| actor.catch_up(ctx));
                    return;
                }
            };
            if batches.is_empty() {
                actor.loaded = true;
                return;
            }
            for (first_seq, batch) in batches {
                if first_seq <= actor.applied_seq {
                    continue;
                }
                let items: Vec<RollupItem> = batch.events.iter().map(RollupItem::from_event).collect();
                actor.apply(first_seq, &items);
            }
            actor.catch_up(ctx);
        }));
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        // Safety net: durable entries that no push delivered (dropped while catching up, for
        // example) are read from the log.
        let head = self.deps.writer.heads().get(self.tenant).unwrap_or(0);
        if self.loaded && !self.catching_up && head > self.applied_seq {
            self.catch_up(ctx);
        }
        if self.flushing || self.deltas.is_empty() {
            self.report_lag();
            return;
        }
        self.flushing = true;
        let deltas = std::mem::take(&mut self.deltas);
        let through = self.applied_seq;
        let storage = self.deps.storage.clone();
        let tenant = self.tenant;
        let expire = self
            .last_expiry
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(600));
        let retention = self.retention;
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = rollups::flush(&storage, tenant, &deltas, through);
            if result.is_ok() && expire {
                if let Err(error) = rollups::expire(&storage, tenant, &retention, now_micros()) {
                    tracing::warn!(%tenant, %error, "expiring old rollups failed");
                }
            }
            (result, deltas, started.elapsed())
        });
        ctx.spawn(wrap_future(task).map(move |joined, actor: &mut Self, ctx| {
            actor.flushing = false;
            match joined {
                Ok((Ok(()), deltas, took)) => {
                    actor.last_flush = Instant::now();
                    if expire {
                        actor.last_expiry = Some(Instant::now());
                    }
                    telemetry::rollup_flushed(&actor.tenant_label, deltas.buckets.len(), took, &deltas.skipped);
                    actor.deps.query_cache.invalidate_late(tenant, &deltas);
                }
                Ok((Err(error), deltas, _)) => {
                    tracing::error!(tenant = %actor.tenant, %error, "flushing rollups failed; will retry");
                    // Not stored: keep the updates for the next flush.
                    for (key, agg) in deltas.buckets {
                        actor.deltas.buckets.entry(key).or_default().merge(&agg);
                    }
                }
                Err(error) => {
                    tracing::error!(tenant = %actor.tenant, %error, "rollup flush task failed; rebuilding from the watermark");
                    actor.restart_from_storage(ctx);
                }
            }
            actor.report_lag();
            if !actor.rebuild_waiters.is_empty() {
                let waiters = std::mem::take(&mut actor.rebuild_waiters);
                actor.rebuild(waiters, ctx);
            }
        }));
    }

    /// Forgets in-memory state and replays from the stored watermark.
    fn restart_from_storage(&mut self, ctx: &mut Context<Self>) {
        self.deltas = Deltas::default();
        self.loaded = false;
        self.load(ctx);
    }

    fn rebuild(&mut self, waiters: Vec<tokio::sync::oneshot::Sender<()>>, ctx: &mut Context<Self>) {
        if self.flushing {
            self.rebuild_waiters.extend(waiters);
            return;
        }
        self.deltas = Deltas::default();
        self.loaded = false;
        self.catching_up = true;
        let storage = self.deps.storage.clone();
        let tenant = self.tenant;
        let task = tokio::task::spawn_blocking(move || rollups::delete_all(&storage, tenant));
        ctx.spawn(wrap_future(task).map(|result, actor: &mut Self, ctx| {
            actor.catching_up = false;
            if !matches!(result, Ok(Ok(()))) {
                tracing::error!(tenant = %actor.tenant, ?result, "deleting rollups for a rebuild failed");
            }
            tracing::info!(tenant = %actor.tenant, "rebuilding rollups from the log");
            for waiter in waiters {
                let _ = waiter.send(());
            }
            actor.applied_seq = 0;
            actor.load(ctx);
        }));
    }

    fn report_lag(&self) {
        let head = self
            .deps
            .writer
            .heads()
            .get(self.tenant)
            .unwrap_or(self.applied_seq);
        telemetry::rollup_lag(
            &self.tenant_label,
            head.saturating_sub(self.applied_seq),
            self.last_flush.elapsed(),
        );
    }
}

impl Actor for RollupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.actors.mailbox_capacity);
        self.load(ctx);
        ctx.run_interval(self.deps.rollups.flush_interval, |actor, ctx| {
            actor.flush(ctx)
        });
    }
}

impl Handler<Rolled> for RollupActor {
    type Result = ();

    fn handle(&mut self, Rolled(batch): Rolled, ctx: &mut Self::Context) {
        if let Some(live) = &self.live {
            // Live counts are best effort under overload; rollups are not (see below).
            let _ = live.try_send(LiveItems(Arc::new(batch.items.clone())));
        }
        if !self.loaded || self.catching_up {
            return; // The catch-up reads this entry from the log.
        }
        if batch.last_seq() <= self.applied_seq {
            return; // Already applied (read from the log).
        }
        if batch.first_seq != self.applied_seq + 1 {
            self.catch_up(ctx); // Something was missed: read it from the log.
            return;
        }
        self.apply(batch.first_seq, &batch.items);
    }
}

impl Handler<Rebuild> for RollupActor {
    type Result = ();

    fn handle(&mut self, Rebuild { deleted }: Rebuild, ctx: &mut Self::Context) {
        self.rebuild(vec![deleted], ctx);
    }
}
