//! The tenant supervisor: registers a tenant's child actors and keeps them alive.
//!
//! Children, in start order: the [`LiveHub`] (live ticks), the [`RollupActor`] (incremental
//! rollups, feeding the hub), the [`IngestActor`] (enrich, hand to the log, feed the rollups)
//! and the [`SegmentFlusher`] (old log entries to the cold tier).
//! Each is registered once in [`TenantSupervisor::new`] with a factory; the [`Children`] registry
//! gives it a mailbox that survives its restarts, and senders (the pipeline handle, the other
//! children) hold those mailboxes, never an instance. actix's own `Supervisor` neither catches
//! panics nor rebuilds state, so the policy lives here: a panic in a child aborts that instance;
//! the supervisor notices on its heartbeat and rebuilds it from its factory after a backoff (see
//! [`super::child`]). A rebuilt child rebuilds its own state: the rollup actor replays the log
//! after its stored watermark, the others keep none.
//!
//! Adding a child: write the actor (a [`ChildActor`]), register it below, and hand its mailbox to
//! whoever sends to it.

use std::sync::Arc;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message};

use crate::actors::child::{ChildStatus, Children, Mailbox};
use crate::actors::flusher::{FlusherMessage, SegmentFlusher};
use crate::actors::ingest::{IngestActor, IngestBatch};
use crate::actors::live::{LiveHub, LiveItems, TickSender};
use crate::actors::rollup::{RollupActor, RollupMessage};
use crate::actors::PipelineDeps;
use crate::ids::TenantId;

/// Batches of items the live hub may have queued.
const LIVE_QUEUE: usize = 64;

/// Stops the supervisor and its children.
pub struct StopPipeline;

impl Message for StopPipeline {
    type Result = ();
}

/// The mailboxes of a tenant's children that the pipeline handle sends to.
#[derive(Clone)]
pub struct Mailboxes {
    pub ingest: Mailbox<IngestBatch>,
    pub live: Mailbox<LiveItems>,
    pub rollup: Mailbox<RollupMessage>,
    pub flusher: Mailbox<FlusherMessage>,
    /// Every child's status, in start order.
    pub statuses: Vec<Arc<ChildStatus>>,
}

pub struct TenantSupervisor {
    tenant: TenantId,
    deps: Arc<PipelineDeps>,
    children: Children,
}

impl TenantSupervisor {
    /// Registers the tenant's children (started with the supervisor). Runs on any thread: the
    /// children are built later, on the supervisor's arbiter.
    pub fn new(
        tenant: TenantId,
        deps: Arc<PipelineDeps>,
        ticks: TickSender,
    ) -> (TenantSupervisor, Mailboxes) {
        let actors = &deps.actors;
        let capacity = actors.mailbox_capacity;
        let mut children = Children::new(
            tenant.to_string(),
            actors.restart_backoff_min,
            actors.restart_backoff_max,
        );
        let tick_interval = deps.live.tick_interval;
        // Live counts are best effort: a small queue, dropped from when full.
        let live: Mailbox<LiveItems> = children.register("live", LIVE_QUEUE, move || {
            LiveHub::new(Arc::clone(&ticks), tick_interval)
        });
        let rollup = children.register("rollup", capacity, {
            let deps = Arc::clone(&deps);
            let live = live.clone();
            move || RollupActor::new(tenant, Arc::clone(&deps), live.clone())
        });
        let ingest = children.register("ingest", capacity, {
            let deps = Arc::clone(&deps);
            let rollup = rollup.clone();
            move || IngestActor::new(tenant, Arc::clone(&deps), rollup.clone())
        });
        let flusher = children.register("flusher", capacity, {
            let deps = Arc::clone(&deps);
            move || SegmentFlusher::new(tenant, Arc::clone(&deps))
        });
        let mailboxes = Mailboxes {
            ingest,
            live,
            rollup,
            flusher,
            statuses: children.statuses(),
        };
        let supervisor = TenantSupervisor {
            tenant,
            deps,
            children,
        };
        (supervisor, mailboxes)
    }

    fn children(&mut self) -> &mut Children {
        &mut self.children
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.children.start_all();
        ctx.run_interval(self.deps.actors.heartbeat, |supervisor, ctx| {
            supervisor.children.check(ctx, TenantSupervisor::children);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the registry closes the children's queues; they stop once drained.
        tracing::debug!(tenant = %self.tenant, "tenant pipeline stopped");
    }
}

impl Handler<StopPipeline> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, _: StopPipeline, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Test hook: the running instance of a child.
#[cfg(test)]
pub(crate) struct Instance<A>(pub &'static str, pub std::marker::PhantomData<A>);

#[cfg(test)]
impl<A: crate::actors::child::ChildActor> Message for Instance<A> {
    type Result = Option<actix::Addr<A>>;
}

#[cfg(test)]
impl<A: crate::actors::child::ChildActor> Handler<Instance<A>> for TenantSupervisor {
    type Result = actix::MessageResult<Instance<A>>;
    fn handle(&mut self, Instance(name, _): Instance<A>, _ctx: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.children.addr::<A>(name))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::actors::ingest::Crash;
    use crate::actors::PipelineError;
    use crate::config::{Config, Overrides};
    use crate::event::{BatchSource, EventKind, IncomingEvent};
    use crate::storage::writer::{LogWriter, WriterOptions};
    use crate::storage::Storage;
    use crate::tenant::TenantDirectory;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn batch(
        limit: &Arc<crate::actors::InflightLimit>,
        id: &str,
    ) -> (
        IngestBatch,
        oneshot::Receiver<Result<crate::actors::ingest::IngestOutcome, PipelineError>>,
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
            peer: None,
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
        let storage = Storage::open(&dir.path().join("db"), 1 << 20, Default::default()).unwrap();
        let writer = LogWriter::start(
            storage.clone(),
            WriterOptions {
                fsync: false,
                queue_capacity: 8,
                max_group_requests: 8,
                dedup_filter_bytes: 0,
                dedup_max_age: crate::storage::dedup_ingest::MAX_PENDING_AGE,
                store_dead_letters: true,
                fsync_delay: Duration::ZERO,
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
        let schema_storage = storage.clone();
        let writer = Arc::new(writer);
        let deps = Arc::new(PipelineDeps {
            storage: storage.clone(),
            writer: Arc::clone(&writer),
            append: writer,
            directory: Arc::new(directory),
            schemas: crate::schema::SchemaRegistry::for_tests(schema_storage),
            processing: config.processing.clone(),
            derivers: Arc::new(crate::enrich::Derivers::off()),
            query_cache: Arc::new(crate::query::QueryCache::new(8, 8)),
            actors,
            rollups,
            live: config.live.clone(),
            future_tolerance: Duration::from_secs(3600),
            rollup_flush_slots: Arc::new(tokio::sync::Semaphore::new(1)),
            cold_tasks: Arc::new(
                crate::blocking::Pool::new("cold-tasks", 1, Duration::from_secs(1)).unwrap(),
            ),
            cold: crate::storage::cold::ColdStore::local(&dir.path().join("cold")).unwrap(),
            cold_settings: config.cold.clone(),
            hot_retention: config.storage.hot_retention,
        });
        let (supervisor, mailboxes) = TenantSupervisor::new(
            tenant.id,
            Arc::clone(&deps),
            crate::actors::live::tick_channel(),
        );
        let supervisor = supervisor.start();
        let restarts = || mailboxes.statuses[2].state().restarts;
        let inspect = || async {
            let child = supervisor
                .send(Instance::<IngestActor>("ingest", Default::default()))
                .await
                .unwrap();
            (child, restarts())
        };
        let limit = Arc::new(crate::actors::InflightLimit::new(tenant.id, 4));

        let (message, answer) = batch(&limit, "before");
        mailboxes.ingest.try_send(message).ok().unwrap();
        assert_eq!(answer.await.unwrap().unwrap().accepted, 1);

        let (child, restarts) = inspect().await;
        assert_eq!(restarts, 0);
        let child = child.expect("child running");
        child.do_send(Crash);

        // The heartbeat notices the dead child and rebuilds it.
        let mut rebuilt = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
            let (current, restarts) = inspect().await;
            if restarts == 1 && current.as_ref().is_some_and(|c| c.connected()) {
                rebuilt = current;
                break;
            }
        }
        assert!(!child.connected(), "the crashed child is gone");
        assert!(rebuilt.is_some(), "supervisor rebuilt the child");

        let (message, answer) = batch(&limit, "after");
        mailboxes.ingest.try_send(message).ok().unwrap();
        assert_eq!(answer.await.unwrap().unwrap().accepted, 1);
        assert_eq!(
            limit.current(),
            0,
            "places are released once the writer answers"
        );
        // Both durable batches reach the rollups (fed by the ingest actor after the fsync).
        let mut watermark = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
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
