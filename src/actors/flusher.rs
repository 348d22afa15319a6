//! The segment flusher: the one place that changes a tenant's cold tier.
//!
//! One per tenant, child of the supervisor. Every `cold.flush_interval` it moves log entries
//! older than `storage.hot_retention` to the cold tier, then enforces the tenant's raw-data
//! retention, compacts small segments of settled hours and empties the trash of what waited
//! out the grace period; it also keeps the tenant's dead letters within their retention and
//! size cap. It also runs the admin flush and per-user erasures. One task at a
//! time, on a blocking thread, so no two changes to the tenant's manifest ever race.
//!
//! Its first task, before any other, is the cold tier's recovery for the tenant (an
//! interrupted change finished or undone, see [`crate::storage::cold`]); after a failed task it
//! recovers again. A failed task is logged, counted and retried on a later tick, after a
//! backoff that doubles up to ten flush intervals: with object storage down, the hot log keeps
//! growing and the flush lag shows it, and nothing is lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::{Actor, ActorFutureExt, AsyncContext, Context, StreamHandler};
use tokio::sync::oneshot;

use crate::actors::child::ChildActor;
use crate::actors::PipelineDeps;
use crate::event::{duration_micros, now_micros};
use crate::ids::TenantId;
use crate::storage::cold::{self, ColdError, CompactionPolicy, Due, Ledger, MaintenanceReport};
use crate::telemetry;

/// What the flusher is asked to do besides its periodic pass.
pub enum FlusherMessage {
    /// Flush what is `due` (the admin flush and erasures, whose callers have brought the
    /// rollup and dedup watermarks up to date), then answer with the cold watermark.
    FlushNow {
        due: Due,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Erase a user's events from the cold tier (the hot log was flushed first).
    Erase {
        user: String,
        reply: oneshot::Sender<Result<MaintenanceReport, String>>,
    },
}

type FlushWaiter = (Due, oneshot::Sender<Result<u64, String>>);

pub struct SegmentFlusher {
    tenant: TenantId,
    deps: Arc<PipelineDeps>,
    recovered: bool,
    busy: bool,
    /// Admin flushes asked for; answered after the next pass that starts after them.
    flushes: Vec<FlushWaiter>,
    erasures: VecDeque<(String, oneshot::Sender<Result<MaintenanceReport, String>>)>,
    /// After a failure: no periodic pass before this.
    retry_at: Option<Instant>,
    failures: u32,
}

impl SegmentFlusher {
    pub fn new(tenant: TenantId, deps: Arc<PipelineDeps>) -> SegmentFlusher {
        SegmentFlusher {
            tenant,
            deps,
            recovered: false,
            busy: false,
            flushes: Vec::new(),
            erasures: VecDeque::new(),
            retry_at: None,
            failures: 0,
        }
    }

    /// Starts the next task unless one runs: an erasure, else a pass (periodic, or asked for).
    fn run(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let asked = !self.flushes.is_empty() || !self.erasures.is_empty();
        if !asked && self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.busy = true;
        let (tenant, recovered) = (self.tenant, self.recovered);
        let deps = Arc::clone(&self.deps);
        let pool = Arc::clone(&deps.cold_tasks);
        if let Some((user, reply)) = self.erasures.pop_front() {
            let task = pool.run(move || {
                crate::priority::background_thread();
                let lock = deps.cold.tenant_lock(tenant);
                let _changing = lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !recovered {
                    cold::recover(
                        &deps.storage,
                        &deps.cold,
                        tenant,
                        deps.cold_settings.grace_period,
                    )?;
                }
                cold::erase_user(&mut Ledger::Local(&deps.storage), &deps.cold, tenant, &user)
            });
            ctx.spawn(
                wrap_future(task).map(move |joined, flusher: &mut Self, ctx| {
                    let outcome = flusher.finished(joined, ctx);
                    if let Ok(report) = &outcome {
                        let tenant = flusher.tenant.to_string();
                        telemetry::cold_maintained(
                            &tenant,
                            "erasure",
                            report.removed_segments,
                            report.written_segments,
                            report.removed_events,
                        );
                    }
                    let _ = reply.send(outcome);
                }),
            );
            return;
        }
        let waiters = std::mem::take(&mut self.flushes);
        let retention = duration_micros(deps.hot_retention);
        let periodic = Due::received_before(now_micros().saturating_sub(retention));
        let due = waiters
            .iter()
            .map(|(due, _)| *due)
            .fold(periodic, Due::union);
        let task = pool.run(move || {
            let lock = deps.cold.tenant_lock(tenant);
            let changing = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let passed = pass(&deps, tenant, recovered, due);
            drop(changing);
            // Also after a failed pass: with the store down, the lag is what shows it.
            report_lag(&deps, tenant);
            passed
        });
        ctx.spawn(
            wrap_future(task).map(move |joined, flusher: &mut Self, ctx| {
                let outcome = flusher.finished(joined, ctx);
                for (_, waiter) in waiters {
                    let _ = waiter.send(outcome.clone());
                }
            }),
        );
    }

    /// Bookkeeping after a task; starts the next one if something was asked for meanwhile.
    fn finished<T>(
        &mut self,
        joined: Result<Result<T, ColdError>, crate::blocking::BlockingError>,
        ctx: &mut Context<Self>,
    ) -> Result<T, String> {
        self.busy = false;
        let outcome = match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match &outcome {
            Ok(_) => {
                self.recovered = true;
                self.failures = 0;
                self.retry_at = None;
            }
            Err(error) => {
                tracing::warn!(tenant = %self.tenant, error, "a cold-tier task failed; retrying later");
                telemetry::cold_flush_failed(&self.tenant.to_string());
                // Objects of the failed task may be left under events/: recover first.
                self.recovered = false;
                self.failures = self.failures.saturating_add(1);
                let interval = self.deps.cold_settings.flush_interval;
                let backoff = (interval / 4)
                    .saturating_mul(1 << self.failures.min(8))
                    .min(interval * 10);
                self.retry_at = Some(Instant::now() + backoff);
            }
        }
        if !self.flushes.is_empty() || !self.erasures.is_empty() {
            ctx.run_later(Duration::ZERO, |flusher, ctx| flusher.run(ctx));
        }
        outcome
    }
}

/// One pass (blocking): recovery if needed, flushes of what is `due`, retention, compaction,
/// trash. Returns the cold watermark reached.
fn pass(
    deps: &PipelineDeps,
    tenant: TenantId,
    recovered: bool,
    due: Due,
) -> Result<u64, ColdError> {
    // Acknowledgements come first: encoding segments is background work.
    crate::priority::background_thread();
    let (storage, store, settings) = (&deps.storage, &deps.cold, &deps.cold_settings);
    let label = tenant.to_string();
    expire_dead_letters(deps, tenant, &label)?;
    if !recovered {
        cold::recover(storage, store, tenant, settings.grace_period)?;
    }
    while let Some(report) =
        cold::flush_due(storage, store, tenant, due, settings.max_flush_events, None)?
    {
        let bytes = report.segments.iter().map(|s| s.bytes).sum();
        telemetry::cold_flushed(&label, report.events, report.segments.len(), bytes);
    }
    let now = now_micros();
    let raw_retention =
        (deps.directory.get(tenant)).map_or(Duration::ZERO, |record| record.settings.raw_retention);
    let settled_before = now
        .saturating_sub(duration_micros(deps.hot_retention))
        .saturating_sub(duration_micros(settings.flush_interval));
    let policy = CompactionPolicy::new(settings, settled_before);
    let mut ledger = Ledger::Local(storage);
    cold::retain_and_compact(&mut ledger, store, tenant, raw_retention, policy, now)?;
    cold::purge_trash(store, tenant, settings.grace_period)?;
    let segments = cold::segments(storage, tenant)?;
    telemetry::cold_segments(
        &label,
        segments.len(),
        segments.iter().map(|s| s.bytes).sum(),
        segments.iter().map(|s| s.rows).sum(),
    );
    Ok(cold::cold_watermark(storage, tenant)?)
}

/// Deletes the tenant's dead letters past its retention, then the oldest beyond its size cap.
/// Blocking.
fn expire_dead_letters(
    deps: &PipelineDeps,
    tenant: TenantId,
    label: &str,
) -> Result<(), crate::storage::StorageError> {
    let Some(record) = deps.directory.get(tenant) else {
        return Ok(());
    };
    let keep = duration_micros(record.settings.deadletter_retention);
    let removed = crate::storage::deadletters::enforce_limits(
        &deps.storage,
        tenant,
        now_micros().saturating_sub(keep),
        record.settings.deadletter_max_bytes.as_u64(),
    )?;
    if removed > 0 {
        tracing::info!(%tenant, letters = removed, "dead-letter retention removed letters");
        telemetry::dead_letters_expired(label, removed);
    }
    let bytes = crate::storage::deadletters::bytes(&deps.storage, tenant)?;
    telemetry::dead_letter_bytes(label, bytes);
    Ok(())
}

/// Publishes the flush lag: the age of the oldest entry still in the hot log. Blocking.
fn report_lag(deps: &PipelineDeps, tenant: TenantId) {
    match cold::oldest_hot_received_at(&deps.storage, tenant) {
        Ok(oldest) => {
            let lag = oldest.map_or(0, |received_at| now_micros().saturating_sub(received_at));
            telemetry::cold_flush_lag(&tenant.to_string(), lag);
        }
        Err(error) => tracing::warn!(%tenant, %error, "reading the flush lag failed"),
    }
}

impl Actor for SegmentFlusher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.run(ctx);
        ctx.run_interval(self.deps.cold_settings.flush_interval, |flusher, ctx| {
            flusher.run(ctx)
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // A stopped pipeline (a deleted tenant) owes nothing to the cold tier; a last value
        // left behind would keep the lag alert firing.
        telemetry::cold_flush_lag(&self.tenant.to_string(), 0);
    }
}

impl ChildActor for SegmentFlusher {
    type Message = FlusherMessage;
}

impl StreamHandler<FlusherMessage> for SegmentFlusher {
    fn handle(&mut self, message: FlusherMessage, ctx: &mut Self::Context) {
        match message {
            FlusherMessage::FlushNow { due, reply } => self.flushes.push((due, reply)),
            FlusherMessage::Erase { user, reply } => self.erasures.push_back((user, reply)),
        }
        self.run(ctx);
    }
}
