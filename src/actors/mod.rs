//! Per-tenant actors.
//!
//! Every tenant gets a [`supervisor::TenantSupervisor`], started lazily on the tenant's first
//! request on one of a fixed set of arbiters (threads), round-robin. The supervisor registers the
//! tenant's child actors ([`ingest`], [`rollup`], [`live`]) and rebuilds a failed one with capped
//! backoff; each child has a mailbox that outlives its restarts ([`child`]), which is what
//! senders hold.
//!
//! [`Pipelines`] is the registry the HTTP layer talks to. Each tenant's pipeline admits at most
//! `actors.mailbox_capacity` batches in flight ([`InflightLimit`]); beyond that its requests get
//! 503 at once, while other tenants' pipelines are untouched. (actix's own mailbox bound is per
//! sender, so the bound is enforced here, in one place.)

pub mod child;
pub mod flusher;
pub mod ingest;
pub mod live;
pub mod rollup;
pub mod supervisor;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter};
use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::config::{ActorsConfig, LiveConfig, RollupsConfig};
use crate::event::{BatchShared, BatchSource, IncomingEvent, Micros};
use crate::ids::TenantId;
use crate::query::QueryCache;
use crate::storage::cold::{Due, MaintenanceReport};
use crate::storage::writer::LogWriter;
use crate::storage::Storage;
use crate::storage::StorageError;
use crate::telemetry;
use crate::tenant::TenantDirectory;

use self::child::{ChildState, SendRefused};
use self::flusher::FlusherMessage;
use self::ingest::{IngestBatch, IngestOutcome};
use self::live::{tick_channel, LiveTick, TickSender};
use self::rollup::RollupMessage;
use self::supervisor::{Mailboxes, StopPipeline, TenantSupervisor};

/// Why a pipeline did not take or finish a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Backpressure: the tenant's pipeline or the log writer is full, or a child is restarting.
    #[error("{0}")]
    Busy(&'static str),
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for PipelineError {
    fn from(error: StorageError) -> PipelineError {
        match error {
            StorageError::QueueFull => PipelineError::Busy("the log writer queue is full"),
            other => PipelineError::Storage(other),
        }
    }
}

/// What every tenant actor needs; shared by all pipelines.
pub struct PipelineDeps {
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    /// Where the ingest actors' batches go: the writer, or a cluster's event stream.
    pub append: Arc<dyn crate::storage::writer::Append>,
    pub directory: Arc<TenantDirectory>,
    /// The tenants' tracking plans.
    pub schemas: Arc<crate::schema::SchemaRegistry>,
    pub processing: crate::config::ProcessingConfig,
    /// What enrichment derives from contexts and addresses.
    pub derivers: Arc<crate::enrich::Derivers>,
    pub query_cache: Arc<QueryCache>,
    pub actors: ActorsConfig,
    pub rollups: RollupsConfig,
    pub live: LiveConfig,
    pub future_tolerance: Duration,
    /// Rollup flushes that may run at once across all tenants. A tenant that finds no free slot
    /// keeps merging its updates in memory and flushes on a later tick, so many tenants cannot
    /// oversubscribe the CPU and memory with flushes.
    pub rollup_flush_slots: Arc<tokio::sync::Semaphore>,
    /// Where cold-tier passes and erasures run: a pool of their own, so that tasks waiting on
    /// the object store never take the arbiters' bounded blocking threads, and the rollup work
    /// queued behind them (docs/decisions/0041).
    pub cold_tasks: Arc<crate::blocking::Pool>,
    /// Where cold segments go, and the settings of the tenants' flushers.
    pub cold: crate::storage::cold::ColdStore,
    pub cold_settings: crate::config::ColdConfig,
    pub hot_retention: Duration,
}

/// Counts a tenant's batches in flight; a permit is held from admission to reply.
pub struct InflightLimit {
    tenant: String,
    capacity: usize,
    current: AtomicUsize,
}

impl InflightLimit {
    pub(crate) fn new(tenant: TenantId, capacity: usize) -> InflightLimit {
        InflightLimit {
            tenant: tenant.to_string(),
            capacity,
            current: AtomicUsize::new(0),
        }
    }

    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<InflightPermit> {
        let mut current = self.current.load(Ordering::Acquire);
        loop {
            if current >= self.capacity {
                return None;
            }
            match self.current.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    telemetry::mailbox_depth(&self.tenant, current + 1);
                    return Some(InflightPermit(Arc::clone(self)));
                }
                Err(actual) => current = actual,
            }
        }
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }
}

/// Releases its slot when dropped, whatever happened to the batch.
pub struct InflightPermit(Arc<InflightLimit>);

impl Drop for InflightPermit {
    fn drop(&mut self) {
        let before = self.0.current.fetch_sub(1, Ordering::AcqRel);
        telemetry::mailbox_depth(&self.0.tenant, before.saturating_sub(1));
    }
}

/// Handle to one tenant's running pipeline.
#[derive(Clone)]
pub struct TenantPipeline {
    supervisor: Addr<TenantSupervisor>,
    mailboxes: Mailboxes,
    inflight: Arc<InflightLimit>,
    ticks: TickSender,
}

impl TenantPipeline {
    /// Reserves a place for one batch, or `None` when the tenant already has
    /// `actors.mailbox_capacity` batches in flight. The place is held until the log writer has
    /// answered for the batch (not merely until the HTTP request ends), so clients that give up
    /// cannot push more batches into the shared writer queue than their tenant's bound.
    pub fn admit(&self) -> Option<Admission> {
        let permit = self.inflight.try_acquire()?;
        Some(Admission {
            ingest: self.mailboxes.ingest.clone(),
            permit,
        })
    }

    pub fn inflight(&self) -> usize {
        self.inflight.current()
    }

    /// A receiver of the tenant's live ticks.
    pub fn subscribe_live(&self) -> tokio::sync::watch::Receiver<Arc<LiveTick>> {
        self.ticks.subscribe()
    }

    /// Feeds items processed elsewhere (cluster mode's live fan-out) to the tenant's live hub;
    /// dropped when its queue is full, like any live item.
    pub fn feed_live(&self, items: crate::rollup::RollupItems) {
        let _ = (self.mailboxes.live).try_send(crate::actors::live::LiveItems(Arc::new(items)));
    }

    /// The state of each of the tenant's child actors.
    pub fn children(&self) -> Vec<ChildState> {
        self.mailboxes.statuses.iter().map(|s| s.state()).collect()
    }

    /// Asks the rollup actor to drop and recompute the tenant's rollups from the log; resolves
    /// once the old rollups are deleted (the replay continues in the background). False if the
    /// pipeline could not take the request (busy or restarting).
    pub async fn rebuild_rollups(&self) -> bool {
        let (deleted, done) = oneshot::channel();
        let rollup = &self.mailboxes.rollup;
        if rollup.status().is_restarting()
            || rollup.try_send(RollupMessage::Rebuild(deleted)).is_err()
        {
            return false;
        }
        done.await.is_ok()
    }
}

impl TenantPipeline {
    /// Has the tenant's flusher flush what is `due` (once the watermarks allow it); resolves
    /// with the cold watermark reached.
    pub async fn flush_cold(&self, due: Due) -> Result<u64, String> {
        let (reply, answer) = oneshot::channel();
        let message = FlusherMessage::FlushNow { due, reply };
        if self.mailboxes.flusher.try_send(message).is_err() {
            return Err("the tenant's segment flusher is busy or restarting".into());
        }
        answer
            .await
            .map_err(|_| "the tenant's segment flusher restarted".to_string())?
    }

    /// Has the tenant's flusher erase a user's events from the cold tier.
    pub async fn erase_cold(&self, user: String) -> Result<MaintenanceReport, String> {
        let (reply, answer) = oneshot::channel();
        if (self.mailboxes.flusher)
            .try_send(FlusherMessage::Erase { user, reply })
            .is_err()
        {
            return Err("the tenant's segment flusher is busy or restarting".into());
        }
        answer
            .await
            .map_err(|_| "the tenant's segment flusher restarted".to_string())?
    }
}

/// A reserved place in a tenant's pipeline.
pub struct Admission {
    ingest: child::Mailbox<IngestBatch>,
    permit: InflightPermit,
}

impl Admission {
    /// Sends a request's events through the tenant's pipeline; resolves once they are durable.
    /// `peer` is the client's address as received (for GeoIP; never stored).
    pub async fn ingest(
        self,
        events: Vec<IncomingEvent>,
        shared: BatchShared,
        source: BatchSource,
        peer: Option<std::net::IpAddr>,
        received_at: Micros,
    ) -> Result<IngestOutcome, PipelineError> {
        let (reply, answer) = oneshot::channel();
        let message = IngestBatch {
            events,
            shared,
            source,
            peer,
            received_at,
            permit: self.permit,
            reply,
        };
        if self.ingest.status().is_restarting() {
            return Err(PipelineError::Busy(
                "the tenant's ingestion pipeline is restarting",
            ));
        }
        match self.ingest.try_send(message) {
            Ok(()) => {}
            Err((SendRefused::Full, _)) => {
                return Err(PipelineError::Busy(
                    "the tenant's ingestion pipeline is full",
                ))
            }
            Err((SendRefused::Closed, _)) => {
                return Err(PipelineError::Busy(
                    "the tenant's ingestion pipeline is not accepting batches",
                ))
            }
        }
        match answer.await {
            Ok(outcome) => outcome,
            // The actor holding the batch died before answering: nothing was acknowledged.
            Err(_) => Err(PipelineError::Busy(
                "the tenant's ingestion pipeline restarted",
            )),
        }
    }
}

/// The registry of running tenant pipelines.
pub struct Pipelines {
    deps: Arc<PipelineDeps>,
    arbiters: std::sync::Mutex<Vec<Arbiter>>,
    handles: Vec<actix_rt::ArbiterHandle>,
    next_arbiter: AtomicUsize,
    running: DashMap<TenantId, TenantPipeline>,
}

/// An arbiter whose runtime runs blocking work on at most `blocking_threads` threads.
fn bounded_arbiter(blocking_threads: usize) -> std::io::Result<Arbiter> {
    Arbiter::try_with_tokio_rt(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(blocking_threads.max(1))
            .build()
    })
}

impl Pipelines {
    /// Starts `arbiter_count` arbiters for tenant actors, each running its actors' blocking
    /// work ([`crate::blocking::run`]) on at most `blocking_threads` threads. Must run inside an
    /// actix System.
    ///
    /// The bound matters with many tenants: their periodic storage work (rollup flushes, cold
    /// passes) comes due together, and an unbounded pool starts a thread per waiting task.
    /// Threads that start and stop again leave the allocator's pages holding the objects they
    /// allocated, so the RSS grew with the number of tenants (docs/decisions/0041).
    pub fn new(
        deps: PipelineDeps,
        arbiter_count: usize,
        blocking_threads: usize,
    ) -> std::io::Result<Pipelines> {
        let arbiters = (0..arbiter_count.max(1))
            .map(|_| bounded_arbiter(blocking_threads))
            .collect::<std::io::Result<Vec<Arbiter>>>()?;
        let handles = arbiters.iter().map(|a| a.handle()).collect();
        Ok(Pipelines {
            deps: Arc::new(deps),
            arbiters: std::sync::Mutex::new(arbiters),
            handles,
            next_arbiter: AtomicUsize::new(0),
            running: DashMap::new(),
        })
    }

    /// The tenant's pipeline, started if it is not running.
    pub fn pipeline(&self, tenant: TenantId) -> TenantPipeline {
        if let Some(pipeline) = self.running.get(&tenant) {
            if pipeline.supervisor.connected() {
                return pipeline.clone();
            }
        }
        let pipeline = self
            .running
            .entry(tenant)
            .and_modify(|existing| {
                if !existing.supervisor.connected() {
                    tracing::warn!(%tenant, "tenant supervisor died; starting a new one");
                    *existing = self.start(tenant);
                }
            })
            .or_insert_with(|| self.start(tenant))
            .clone();
        telemetry::tenant_pipelines(self.running.len());
        pipeline
    }

    fn start(&self, tenant: TenantId) -> TenantPipeline {
        let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let ticks = tick_channel();
        let (supervisor, mailboxes) =
            TenantSupervisor::new(tenant, Arc::clone(&self.deps), Arc::clone(&ticks));
        let supervisor =
            TenantSupervisor::start_in_arbiter(&self.handles[index], move |_| supervisor);
        tracing::debug!(%tenant, arbiter = index, "started tenant pipeline");
        TenantPipeline {
            supervisor,
            mailboxes,
            inflight: Arc::new(InflightLimit::new(
                tenant,
                self.deps.actors.mailbox_capacity,
            )),
            ticks,
        }
    }

    /// Stops a tenant's pipeline (tenant deleted).
    pub fn stop(&self, tenant: TenantId) {
        if let Some((_, pipeline)) = self.running.remove(&tenant) {
            pipeline.supervisor.do_send(StopPipeline);
        }
        telemetry::tenant_pipelines(self.running.len());
    }

    /// True while every arbiter is running.
    pub fn healthy(&self) -> bool {
        self.handles.iter().all(|h| h.spawn(async {}))
    }

    /// Stops every pipeline and arbiter (shutdown, after HTTP has drained). Blocking.
    pub fn shutdown(&self) {
        let tenants: Vec<TenantId> = self.running.iter().map(|e| *e.key()).collect();
        for tenant in tenants {
            self.stop(tenant);
        }
        let arbiters = match self.arbiters.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for arbiter in arbiters {
            arbiter.stop();
            let _ = arbiter.join();
        }
        // Cold-tier passes started by the stopped flushers get a while to end; one still running
        // after it is cut short when the process exits, and recovered at the next start.
        self.deps.cold_tasks.finish(COLD_TASKS_FINISH);
    }
}

/// How long shutdown waits for running cold-tier passes; one cut short is recovered at the next
/// start, like one interrupted by a crash.
const COLD_TASKS_FINISH: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// More blocking tasks than threads: at most `blocking_threads` run at once, and the rest
    /// still run, in turn.
    #[test]
    fn an_arbiter_runs_blocking_work_on_its_bounded_threads() {
        actix_rt::System::new().block_on(async {
            let arbiter = bounded_arbiter(2).unwrap();
            let (done, finished) = tokio::sync::oneshot::channel();
            arbiter.spawn(async move {
                let probe = crate::blocking::ConcurrencyProbe::default();
                let tasks = (0..6).map(|_| crate::blocking::run(probe.task(30)));
                let ran = futures_util::future::join_all(tasks).await;
                let _ = done.send((ran.iter().filter(|r| r.is_ok()).count(), probe.most()));
            });
            let (ran, most) = finished.await.unwrap();
            assert_eq!(ran, 6);
            assert!(
                most <= 2,
                "{most} blocking tasks at once, over the bound of two"
            );
            arbiter.stop();
            let _ = arbiter.join();
        });
    }
}
