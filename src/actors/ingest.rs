//! The ingest actor: enrich a request's events and hand them to the durable log.
//!
//! One per tenant, child of the [`super::supervisor::TenantSupervisor`]. It runs on an arbiter
//! thread and does only CPU work (enrichment); dedup, sequencing and the fsync happen on the
//! log writer thread, which answers the request through the reply it is given. The actor keeps
//! no state of its own: the tenant's settings and hashing key are read from the directory for
//! each batch, so a rebuilt actor is immediately equivalent to the one it replaces.

use std::sync::Arc;

use actix::{Actor, ActorContext, Addr, Context, Handler, Message};
use tokio::sync::oneshot;

use crate::actors::rollup::Rolled;
use crate::actors::supervisor::TenantSupervisor;
use crate::actors::{InflightPermit, PipelineDeps, PipelineError, StopChild};
use crate::enrich::{enrich_all, enrich_shared, EnrichContext};
use crate::event::{BatchShared, BatchSource, IncomingEvent, LogBatch, Micros};
use crate::storage::log::{AppendOutcome, AppendRequest, PreparedBatch};
use crate::storage::StorageError;
use crate::tenant::TenantId;

/// One request's validated events.
pub struct IngestBatch {
    pub events: Vec<IncomingEvent>,
    /// Batch-level `context` and `integrations`, stored once with the batch.
    pub shared: BatchShared,
    pub source: BatchSource,
    pub received_at: Micros,
    /// The tenant's in-flight place, released when the log writer answers (or the batch is
    /// dropped).
    pub permit: InflightPermit,
    pub reply: oneshot::Sender<Result<AppendOutcome, PipelineError>>,
}

impl Message for IngestBatch {
    type Result = ();
}

pub struct IngestActor {
    tenant: TenantId,
    deps: Arc<PipelineDeps>,
    /// Where durable batches go for rolling up.
    supervisor: Addr<TenantSupervisor>,
}

impl IngestActor {
    pub fn new(
        tenant: TenantId,
        deps: Arc<PipelineDeps>,
        supervisor: Addr<TenantSupervisor>,
    ) -> IngestActor {
        IngestActor {
            tenant,
            deps,
            supervisor,
        }
    }
}

impl Actor for IngestActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.actors.mailbox_capacity);
    }
}

impl Handler<IngestBatch> for IngestActor {
    type Result = ();

    fn handle(&mut self, message: IngestBatch, _ctx: &mut Self::Context) {
        let IngestBatch {
            events,
            shared,
            source,
            received_at,
            permit,
            reply,
        } = message;
        let Some(tenant) = self.deps.directory.get(self.tenant) else {
            let _ = reply.send(Err(StorageError::TenantDeleted(self.tenant).into()));
            return;
        };
        let (shared, batch_library) = enrich_shared(shared);
        let context = EnrichContext {
            received_at,
            future_tolerance: self.deps.future_tolerance,
            user_hash_key: &tenant.user_hash_key,
            batch_library: &batch_library,
        };
        let batch = LogBatch {
            batch_id: uuid::Uuid::now_v7().as_u128(),
            received_at,
            source,
            events: enrich_all(events, &context),
            shared,
        };
        let batch = match PreparedBatch::new(self.tenant, batch) {
            Ok(batch) => batch,
            Err(error) => {
                let _ = reply.send(Err(error.into()));
                return;
            }
        };
        let supervisor = self.supervisor.clone();
        let request = AppendRequest {
            tenant: self.tenant,
            queued_at: std::time::Instant::now(),
            dedup_window: tenant.settings.dedup_window,
            batch,
            reply: Box::new(move |mut outcome| {
                // The events are durable now: hand them to the rollups (through the supervisor,
                // which knows the current rollup actor). If this is dropped, the rollup actor
                // reads the entry from the log instead.
                if let Some(batch) = outcome.as_mut().ok().and_then(|o| o.rollup.take()) {
                    let _ = supervisor.try_send(Rolled(batch));
                }
                // Free the place first: once the client has its answer, it may send again.
                drop(permit);
                let _ = reply.send(outcome.map_err(PipelineError::from));
            }),
        };
        self.deps.writer.submit(request);
    }
}

impl Handler<StopChild> for IngestActor {
    type Result = ();

    fn handle(&mut self, _: StopChild, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Test hook: makes the actor panic, to prove that the supervisor rebuilds it.
#[cfg(test)]
pub(crate) struct Crash;

#[cfg(test)]
impl Message for Crash {
    type Result = ();
}

#[cfg(test)]
impl Handler<Crash> for IngestActor {
    type Result = ();
    fn handle(&mut self, _: Crash, _ctx: &mut Self::Context) {
        panic!("injected failure in the ingest actor");
    }
}
