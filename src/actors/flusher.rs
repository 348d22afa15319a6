//! The segment flusher: moves a tenant's log entries older than `storage.hot_retention` to the
//! cold tier, every `cold.flush_interval`.
//!
//! One per tenant, child of the supervisor. Its first task, before any flush, is the cold tier's
//! recovery for the tenant (an interrupted flush finished or undone, see
//! [`crate::storage::cold`]); after a restart it runs it again. One task at a time, on a
//! blocking thread; a failed one is logged, counted and retried on a later tick (object storage
//! down: the hot log keeps growing and the flush lag shows it, nothing is lost).

use std::sync::Arc;

use actix::fut::wrap_future;
use actix::{Actor, ActorFutureExt, AsyncContext, Context, StreamHandler};

use crate::actors::child::ChildActor;
use crate::actors::PipelineDeps;
use crate::event::{now_micros, Micros};
use crate::ids::TenantId;
use crate::storage::cold::{self, ColdError};
use crate::telemetry;

/// Flush now (the admin flush), then answer with the cold watermark.
pub struct FlushNow(pub tokio::sync::oneshot::Sender<Result<u64, String>>);

pub struct SegmentFlusher {
    tenant: TenantId,
    deps: Arc<PipelineDeps>,
    recovered: bool,
    busy: bool,
    /// Asked for while a task ran; answered after the next one.
    waiting: Vec<tokio::sync::oneshot::Sender<Result<u64, String>>>,
}

impl SegmentFlusher {
    pub fn new(tenant: TenantId, deps: Arc<PipelineDeps>) -> SegmentFlusher {
        SegmentFlusher {
            tenant,
            deps,
            recovered: false,
            busy: false,
            waiting: Vec::new(),
        }
    }

    /// Recovers if it has not yet, then flushes until nothing more is due.
    fn run(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (tenant, recovered) = (self.tenant, self.recovered);
        let deps = Arc::clone(&self.deps);
        let task = crate::blocking::run(move || flush_due(&deps, tenant, recovered));
        ctx.spawn(wrap_future(task).map(|joined, flusher: &mut Self, _ctx| {
            flusher.busy = false;
            let outcome = match joined {
                Ok(Ok(watermark)) => {
                    flusher.recovered = true;
                    Ok(watermark)
                }
                Ok(Err(error)) => Err(error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = &outcome {
                tracing::warn!(tenant = %flusher.tenant, error, "flushing to the cold tier failed; retrying later");
                telemetry::cold_flush_failed(&flusher.tenant.to_string());
            }
            for waiter in flusher.waiting.drain(..) {
                let _ = waiter.send(outcome.clone());
            }
        }));
    }
}

/// The blocking part of [`SegmentFlusher::run`]: returns the cold watermark reached.
fn flush_due(deps: &PipelineDeps, tenant: TenantId, recovered: bool) -> Result<u64, ColdError> {
    // Acknowledgements come first: encoding segments is background work.
    crate::priority::background_thread();
    let storage = &deps.storage;
    if !recovered {
        cold::recover(storage, &deps.cold, tenant, deps.cold_settings.grace_period)?;
    }
    let retention = Micros::try_from(deps.hot_retention.as_micros()).unwrap_or(Micros::MAX);
    let received_before = now_micros().saturating_sub(retention);
    let max_events = deps.cold_settings.max_flush_events;
    while let Some(report) = cold::flush_once(
        storage,
        &deps.cold,
        tenant,
        received_before,
        max_events,
        None,
    )? {
        let bytes = report.segments.iter().map(|s| s.bytes).sum();
        telemetry::cold_flushed(
            &tenant.to_string(),
            report.events,
            report.segments.len(),
            bytes,
        );
    }
    let watermark = cold::cold_watermark(storage, tenant)?;
    let oldest = cold::oldest_hot_received_at(storage, tenant)?;
    let lag = oldest.map_or(0, |received_at| now_micros().saturating_sub(received_at));
    telemetry::cold_flush_lag(&tenant.to_string(), lag);
    Ok(watermark)
}

impl Actor for SegmentFlusher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.run(ctx);
        ctx.run_interval(self.deps.cold_settings.flush_interval, |flusher, ctx| {
            flusher.run(ctx)
        });
    }
}

impl ChildActor for SegmentFlusher {
    type Message = FlushNow;
}

impl StreamHandler<FlushNow> for SegmentFlusher {
    fn handle(&mut self, FlushNow(reply): FlushNow, ctx: &mut Self::Context) {
        self.waiting.push(reply);
        if self.busy {
            // The running task may have started before what the caller wants flushed was due:
            // run once more after it.
            ctx.run_later(std::time::Duration::from_millis(50), |flusher, ctx| {
                flusher.run(ctx)
            });
        } else {
            self.run(ctx);
        }
    }
}
