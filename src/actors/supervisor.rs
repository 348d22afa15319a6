//! The tenant supervisor: owns a tenant's child actors and keeps them alive.
//!
//! Children: the [`IngestActor`] (enrich, hand to the log), the [`RollupActor`] (incremental
//! rollups) and the [`LiveHub`] (live ticks). actix's own `Supervisor` neither catches panics nor
//! rebuilds state, so the policy lives here. A panic in a child aborts that actor's task and
//! disconnects its mailbox; the supervisor notices on its heartbeat (or when a forward fails),
//! rebuilds the child from storage after a backoff that doubles on repeated failures up to
//! `actors.restart_backoff_max` (and resets once a child has stayed up for a while), and counts
//! the restart in `statsremote_actor_restarts_total`. Senders always talk to the supervisor, so
//! a restart does not change the address they hold. Batches that were inside a failed ingest
//! actor are answered with 503 (their reply channel closes): nothing unacknowledged is reported
//! as stored. A rebuilt rollup actor replays the log after its stored watermark. When the
//! supervisor stops, it stops its children explicitly; children also stop by themselves if
//! their supervisor dies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::SendError;
use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message};

use crate::actors::ingest::{IngestActor, IngestBatch};
use crate::actors::live::{LiveHub, TickSender};
use crate::actors::rollup::{Rebuild, Rolled, RollupActor, SetLive};
use crate::actors::{PipelineDeps, PipelineError, StopChild};
use crate::telemetry;
use crate::tenant::TenantId;

/// A child that stayed up this long is considered healthy: the next failure starts the backoff
/// from the minimum again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Stops the supervisor and its children.
pub struct StopPipeline;

impl Message for StopPipeline {
    type Result = ();
}

/// Drop and recompute the tenant's rollups; `deleted` is told once the old ones are gone.
pub struct RebuildRollups {
    pub deleted: tokio::sync::oneshot::Sender<()>,
}

impl Message for RebuildRollups {
    type Result = ();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildKind {
    Ingest,
    Rollup,
    Live,
}

impl ChildKind {
    fn name(self) -> &'static str {
        match self {
            ChildKind::Ingest => "ingest",
            ChildKind::Rollup => "rollup",
            ChildKind::Live => "live",
        }
    }
}

/// One supervised child and its restart state.
struct Child<A: Actor> {
    addr: Option<Addr<A>>,
    /// When it was started (to reset the backoff after a healthy run).
    started: Instant,
    /// Delay before the next rebuild.
    backoff: Duration,
    /// A rebuild is scheduled; don't schedule another.
    restart_pending: bool,
}

impl<A: Actor> Child<A> {
    fn new(backoff: Duration) -> Child<A> {
        Child {
            addr: None,
            started: Instant::now(),
            backoff,
            restart_pending: false,
        }
    }

    fn alive(&self) -> Option<&Addr<A>> {
        self.addr.as_ref().filter(|addr| addr.connected())
    }
}

pub struct TenantSupervisor {
    tenant: TenantId,
    tenant_label: String,
    deps: Arc<PipelineDeps>,
    ticks: TickSender,
    ingest: Child<IngestActor>,
    rollup: Child<RollupActor>,
    live: Child<LiveHub>,
    restarts: u64,
}

impl TenantSupervisor {
    pub fn new(tenant: TenantId, deps: Arc<PipelineDeps>, ticks: TickSender) -> TenantSupervisor {
        let backoff = deps.actors.restart_backoff_min;
        TenantSupervisor {
            tenant,
            tenant_label: tenant.to_string(),
            deps,
            ticks,
            ingest: Child::new(backoff),
            rollup: Child::new(backoff),
            live: Child::new(backoff),
            restarts: 0,
        }
    }

    fn start_child(&mut self, kind: ChildKind, ctx: &mut Context<Self>) {
        let now = Instant::now();
        match kind {
            ChildKind::Ingest => {
                let actor = IngestActor::new(self.tenant, Arc::clone(&self.deps), ctx.address());
                self.ingest.addr = Some(actor.start());
                self.ingest.started = now;
            }
            ChildKind::Rollup => {
                let live = self.live.addr.clone();
                let supervisor = ctx.address().downgrade();
                let actor = RollupActor::new(self.tenant, Arc::clone(&self.deps), supervisor, live);
                self.rollup.addr = Some(actor.start());
                self.rollup.started = now;
            }
            ChildKind::Live => {
                let hub = LiveHub::new(
                    Arc::clone(&self.ticks),
                    self.deps.live.tick_interval,
                    ctx.address().downgrade(),
                );
                self.live.addr = Some(hub.start());
                self.live.started = now;
                // The rollup actor feeds the hub it was given: give it the new one.
                if let (Some(rollup), Some(hub)) = (self.rollup.alive(), self.live.addr.clone()) {
                    rollup.do_send(SetLive(hub));
                }
            }
        }
    }

    /// Schedules a rebuild of a child after its current backoff.
    fn restart_child(&mut self, kind: ChildKind, ctx: &mut Context<Self>) {
        let min = self.deps.actors.restart_backoff_min;
        let max = self.deps.actors.restart_backoff_max;
        let (restart_pending, started, backoff) = match kind {
            ChildKind::Ingest => self.ingest.schedule(),
            ChildKind::Rollup => self.rollup.schedule(),
            ChildKind::Live => self.live.schedule(),
        };
        if restart_pending {
            return;
        }
        if started.elapsed() >= HEALTHY_AFTER {
            *backoff = min;
        }
        let delay = *backoff;
        *backoff = (*backoff * 2).min(max);
        self.restarts += 1;
        telemetry::actor_restarted(&self.tenant_label, kind.name(), delay);
        ctx.run_later(delay, move |supervisor, ctx| {
            match kind {
                ChildKind::Ingest => supervisor.ingest.restart_pending = false,
                ChildKind::Rollup => supervisor.rollup.restart_pending = false,
                ChildKind::Live => supervisor.live.restart_pending = false,
            }
            supervisor.start_child(kind, ctx);
        });
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if !self.ingest.restart_pending && self.ingest.alive().is_none() {
            self.restart_child(ChildKind::Ingest, ctx);
        }
        if !self.live.restart_pending && self.live.alive().is_none() {
            self.restart_child(ChildKind::Live, ctx);
        }
        if !self.rollup.restart_pending && self.rollup.alive().is_none() {
            self.restart_child(ChildKind::Rollup, ctx);
        }
    }
}

impl<A: Actor> Child<A> {
    /// Marks a restart as pending; returns (was it already pending, started, backoff slot).
    fn schedule(&mut self) -> (bool, Instant, &mut Duration) {
        let already = self.restart_pending;
        if !already {
            self.addr = None;
            self.restart_pending = true;
        }
        (already, self.started, &mut self.backoff)
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.actors.mailbox_capacity.max(64));
        self.start_child(ChildKind::Live, ctx);
        self.start_child(ChildKind::Rollup, ctx);
        self.start_child(ChildKind::Ingest, ctx);
        ctx.run_interval(self.deps.actors.heartbeat, |supervisor, ctx| {
            supervisor.heartbeat(ctx);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Children with timers would outlive their addresses: stop them explicitly.
        if let Some(child) = self.ingest.addr.take() {
            child.do_send(StopChild);
        }
        if let Some(child) = self.rollup.addr.take() {
            child.do_send(StopChild);
        }
        if let Some(child) = self.live.addr.take() {
            child.do_send(StopChild);
        }
        tracing::debug!(tenant = %self.tenant, "tenant pipeline stopped");
    }
}

impl Handler<IngestBatch> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, message: IngestBatch, ctx: &mut Self::Context) {
        let Some(child) = self.ingest.alive() else {
            let _ = message.reply.send(Err(PipelineError::Busy(
                "the tenant's ingestion pipeline is restarting",
            )));
            self.restart_child(ChildKind::Ingest, ctx);
            return;
        };
        match child.try_send(message) {
            Ok(()) => {}
            Err(SendError::Full(message)) => {
                let _ = message.reply.send(Err(PipelineError::Busy(
                    "the tenant's ingestion pipeline is full",
                )));
            }
            Err(SendError::Closed(message)) => {
                let _ = message.reply.send(Err(PipelineError::Busy(
                    "the tenant's ingestion pipeline is restarting",
                )));
                self.restart_child(ChildKind::Ingest, ctx);
            }
        }
    }
}

impl Handler<Rolled> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, message: Rolled, _ctx: &mut Self::Context) {
        // Dropped if the rollup actor is down or full: it reads the entry from the log.
        if let Some(rollup) = self.rollup.alive() {
            let _ = rollup.try_send(message);
        }
    }
}

impl Handler<RebuildRollups> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, RebuildRollups { deleted }: RebuildRollups, _ctx: &mut Self::Context) {
        // If the rollup actor is down, `deleted` is dropped and the caller reports it.
        if let Some(rollup) = self.rollup.alive() {
            rollup.do_send(Rebuild { deleted });
        }
    }
}

impl Handler<StopPipeline> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, _: StopPipeline, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Test hooks: observe the child and the restart count.
#[cfg(test)]
pub(crate) struct Inspect;

#[cfg(test)]
impl Message for Inspect {
    type Result = (Option<Addr<IngestActor>>, u64);
}

#[cfg(test)]
impl Handler<Inspect> for TenantSupervisor {
    type Result = actix::MessageResult<Inspect>;
    fn handle(&mut self, _: Inspect, _ctx: &mut Self::Context) -> Self::Result {
        actix::MessageResult((self.ingest.addr.clone(), self.restarts))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::actors::ingest::Crash;
    use crate::config::{Config, Overrides};
    use crate::event::{BatchSource, EventKind, IncomingEvent};
    use crate::storage::log::{LogWriter, WriterOptions};
    use crate::storage::Storage;
    use crate::tenant::TenantDirectory;
    use tokio::sync::oneshot;

    fn batch(
        limit: &Arc<crate::actors::InflightLimit>,
        id: &str,
    ) -> (
        IngestBatch,
        oneshot::Receiver<Result<crate::storage::log::AppendOutcome, PipelineError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let event = IncomingEvent {
            kind: Some(EventKind::Track),
            message_id: Some(id.into()),
            name: Some("Clicked".into()),
            user_id: Some("u1".into()),
            ..IncomingEvent::default()
        };
        let message = IngestBatch {
            events: vec![event],
            shared: Default::default(),
            source: BatchSource {
                endpoint: "/v1/track".into(),
                client_ip: None,
            },
            received_at: crate::event::now_micros(),
            permit: limit.try_acquire().expect("a free place"),
            reply,
        };
        (message, answer)
    }

    #[actix_rt::test]
    async fn a_panicking_child_is_rebuilt_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load_from(&Overrides::default(), &[]).unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let writer = LogWriter::start(
            storage.clone(),
            WriterOptions {
                fsync: false,
                queue_capacity: 8,
                max_group_requests: 8,
                dedup_filter_bytes: 0,
            },
        )
        .unwrap();
        let directory =
            TenantDirectory::load(storage.clone(), config.tenant_defaults.clone(), [0; 32])
                .unwrap();
        let (tenant, _keys) = directory.create("acme").unwrap();
        let mut actors = config.actors.clone();
        actors.heartbeat = Duration::from_millis(20);
        actors.restart_backoff_min = Duration::from_millis(10);
        let mut rollups = config.rollups.clone();
        rollups.flush_interval = Duration::from_millis(20);
        let deps = Arc::new(PipelineDeps {
            storage: storage.clone(),
            writer: Arc::new(writer),
            directory: Arc::new(directory),
            query_cache: Arc::new(crate::query::QueryCache::new(8, 8)),
            actors,
            rollups,
            live: config.live.clone(),
            future_tolerance: Duration::from_secs(3600),
            rollup_flush_slots: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        let supervisor = TenantSupervisor::new(
            tenant.id,
            Arc::clone(&deps),
            crate::actors::live::tick_channel(),
        )
        .start();
        let limit = Arc::new(crate::actors::InflightLimit::new(tenant.id, 4));

        let (message, answer) = batch(&limit, "before");
        supervisor.try_send(message).unwrap();
        assert_eq!(answer.await.unwrap().unwrap().accepted, 1);

        let (child, restarts) = supervisor.send(Inspect).await.unwrap();
        assert_eq!(restarts, 0);
        let child = child.expect("child running");
        child.do_send(Crash);

        // The heartbeat notices the dead child and rebuilds it.
        let mut rebuilt = None;
        for _ in 0..100 {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
            let (current, restarts) = supervisor.send(Inspect).await.unwrap();
            if restarts == 1 && current.as_ref().is_some_and(|c| c.connected()) {
                rebuilt = current;
                break;
            }
        }
        assert!(!child.connected(), "the crashed child is gone");
        assert!(rebuilt.is_some(), "supervisor rebuilt the child");

        let (message, answer) = batch(&limit, "after");
        supervisor.try_send(message).unwrap();
        assert_eq!(answer.await.unwrap().unwrap().accepted, 1);
        assert_eq!(
            limit.current(),
            0,
            "places are released once the writer answers"
        );
        // Both durable batches reach the rollups (fed through the supervisor after the fsync).
        let mut watermark = 0;
        for _ in 0..200 {
            watermark = crate::storage::rollups::watermark(&storage, tenant.id).unwrap();
            if watermark == 2 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(watermark, 2, "rollups cover every durable event");
        deps.writer.shutdown();
    }
}
