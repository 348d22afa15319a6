//! The ingest actor: enrich a request's events and hand them to the durable log.
//!
//! One per tenant, child of the [`super::supervisor::TenantSupervisor`]. It runs on an arbiter
//! thread and does only CPU work (enrichment, encoding, rollup items); dedup, sequencing and the
//! fsync happen on the log writer thread, which answers with what became of each event. From
//! that answer this actor sends the rollup actor the items of the events that were new. The
//! actor keeps no state of its own: the tenant's settings and hashing key are read from the
//! directory for each batch, so a rebuilt actor is immediately equivalent to the one it replaces.

use std::sync::Arc;

use actix::{Actor, Context, StreamHandler};
use tokio::sync::oneshot;

use crate::actors::child::{ChildActor, Mailbox};
use crate::actors::rollup::RollupMessage;
use crate::actors::{InflightPermit, PipelineDeps, PipelineError};
use crate::enrich::{enrich_all, enrich_shared, EnrichContext};
use crate::event::{BatchShared, BatchSource, IncomingEvent, LogBatch, Micros};
use crate::ids::TenantId;
use crate::rollup::{RollupBatch, RollupItems};
use crate::storage::writer::{AppendOutcome, AppendRequest, PreparedBatch};
use crate::storage::StorageError;

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

pub struct IngestActor {
    tenant: TenantId,
    deps: Arc<PipelineDeps>,
    /// Where durable events go for rolling up.
    rollup: Mailbox<RollupMessage>,
}

impl IngestActor {
    pub fn new(
        tenant: TenantId,
        deps: Arc<PipelineDeps>,
        rollup: Mailbox<RollupMessage>,
    ) -> IngestActor {
        IngestActor {
            tenant,
            deps,
            rollup,
        }
    }
}

impl Actor for IngestActor {
    type Context = Context<Self>;
}

impl ChildActor for IngestActor {
    type Message = IngestBatch;
}

impl StreamHandler<IngestBatch> for IngestActor {
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
        let prepared = match PreparedBatch::new(self.tenant, &batch) {
            Ok(prepared) => prepared,
            Err(error) => {
                let _ = reply.send(Err(error.into()));
                return;
            }
        };
        let mut items = RollupItems::from_events(&batch.events);
        // The events are freed here, not on the writer thread.
        drop(batch);
        let rollup = self.rollup.clone();
        let request = AppendRequest {
            tenant: self.tenant,
            queued_at: std::time::Instant::now(),
            dedup_window: tenant.settings.dedup_window,
            batch: prepared,
            reply: Box::new(move |outcome| {
                // The new events are durable: roll them up. If the rollup actor's queue is full,
                // it reads the entry from the log instead.
                if let Ok(done) = &outcome {
                    if let Some(first_seq) = done.first_seq {
                        if done.duplicates > 0 {
                            items.retain_kept(&done.new_events());
                        }
                        let batch = RollupBatch {
                            tenant: done.tenant,
                            first_seq,
                            items,
                        };
                        let _ = rollup.try_send(RollupMessage::Rolled(batch));
                    }
                }
                // Free the place first: once the client has its answer, it may send again.
                drop(permit);
                let _ = reply.send(outcome.map_err(PipelineError::from));
            }),
        };
        self.deps.writer.submit(request);
    }
}

/// Test hook: makes the actor panic, to prove that the supervisor rebuilds it.
#[cfg(test)]
pub(crate) struct Crash;

#[cfg(test)]
impl actix::Message for Crash {
    type Result = ();
}

#[cfg(test)]
impl actix::Handler<Crash> for IngestActor {
    type Result = ();
    fn handle(&mut self, _: Crash, _ctx: &mut Self::Context) {
        panic!("injected failure in the ingest actor");
    }
}
