//! The tenant supervisor: owns a tenant's child actors and keeps them alive.
//!
//! actix's own `Supervisor` neither catches panics nor rebuilds state, so the policy lives here.
//! A panic in a child aborts that actor's task and disconnects its mailbox; the supervisor
//! notices on its heartbeat (or when a forward fails), rebuilds the child from storage after a
//! backoff that doubles on repeated failures up to `actors.restart_backoff_max` (and resets once
//! a child has stayed up for a while), and counts the restart in
//! `statsremote_actor_restarts_total`. Senders always talk to the supervisor, so a restart does
//! not change the address they hold. Batches that were inside the failed child are answered
//! with 503 (their reply channel closes): nothing unacknowledged is reported as stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::SendError;
use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message};

use crate::actors::ingest::{IngestActor, IngestBatch};
use crate::actors::{PipelineDeps, PipelineError};
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

pub struct TenantSupervisor {
    tenant: TenantId,
    tenant_label: String,
    deps: Arc<PipelineDeps>,
    ingest: Option<Addr<IngestActor>>,
    /// When the current child was started (to reset the backoff after a healthy run).
    ingest_started: Instant,
    /// Delay before the next rebuild.
    backoff: Duration,
    /// A rebuild is scheduled; don't schedule another.
    restart_pending: bool,
    restarts: u64,
}

impl TenantSupervisor {
    pub fn new(tenant: TenantId, deps: Arc<PipelineDeps>) -> TenantSupervisor {
        let backoff = deps.actors.restart_backoff_min;
        TenantSupervisor {
            tenant,
            tenant_label: tenant.to_string(),
            deps,
            ingest: None,
            ingest_started: Instant::now(),
            backoff,
            restart_pending: false,
            restarts: 0,
        }
    }

    fn start_ingest(&mut self) {
        let actor = IngestActor::new(self.tenant, Arc::clone(&self.deps));
        self.ingest = Some(actor.start());
        self.ingest_started = Instant::now();
    }

    fn ingest_alive(&self) -> bool {
        self.ingest.as_ref().is_some_and(|child| child.connected())
    }

    /// Schedules a rebuild of the ingest actor after the current backoff.
    fn restart_ingest(&mut self, ctx: &mut Context<Self>) {
        if self.restart_pending {
            return;
        }
        self.ingest = None;
        self.restart_pending = true;
        if self.ingest_started.elapsed() >= HEALTHY_AFTER {
            self.backoff = self.deps.actors.restart_backoff_min;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.deps.actors.restart_backoff_max);
        self.restarts += 1;
        telemetry::actor_restarted(&self.tenant_label, "ingest", delay);
        ctx.run_later(delay, |supervisor, _ctx| {
            supervisor.restart_pending = false;
            supervisor.start_ingest();
        });
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if !self.restart_pending && !self.ingest_alive() {
            self.restart_ingest(ctx);
        }
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.actors.mailbox_capacity);
        self.start_ingest();
        ctx.run_interval(self.deps.actors.heartbeat, |supervisor, ctx| {
            supervisor.heartbeat(ctx);
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the last address stops the child once its mailbox is empty.
        self.ingest = None;
        tracing::debug!(tenant = %self.tenant, "tenant pipeline stopped");
    }
}

impl Handler<IngestBatch> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, message: IngestBatch, ctx: &mut Self::Context) {
        let Some(child) = self.ingest.as_ref().filter(|child| child.connected()) else {
            let _ = message.reply.send(Err(PipelineError::Busy(
                "the tenant's ingestion pipeline is restarting",
            )));
            self.restart_ingest(ctx);
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
                self.restart_ingest(ctx);
            }
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
        actix::MessageResult((self.ingest.clone(), self.restarts))
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
            },
        )
        .unwrap();
        let directory =
            TenantDirectory::load(storage, config.tenant_defaults.clone(), [0; 32]).unwrap();
        let (tenant, _keys) = directory.create("acme").unwrap();
        let mut actors = config.actors.clone();
        actors.heartbeat = Duration::from_millis(20);
        actors.restart_backoff_min = Duration::from_millis(10);
        let deps = Arc::new(PipelineDeps {
            writer: Arc::new(writer),
            directory: Arc::new(directory),
            actors,
            future_tolerance: Duration::from_secs(3600),
        });
        let supervisor = TenantSupervisor::new(tenant.id, Arc::clone(&deps)).start();
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
        deps.writer.shutdown();
    }
}
