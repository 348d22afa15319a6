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
use crate::deadletter::{DeadLetter, ReasonKind};
use crate::enrich::{enrich_all, enrich_shared, user_hash, EnrichContext};
use crate::event::{
    flags, BatchShared, BatchSource, EventExtras, EventKind, IncomingEvent, LogBatch, Micros,
};
use crate::ids::TenantId;
use crate::rollup::{series_name, RollupBatch, RollupItems};
use crate::sampling;
use crate::schema::{self, TenantPlan, Unplanned, Verdict, Violation};
use crate::storage::writer::{AppendOutcome, AppendRequest, PreparedBatch, PreparedDeadLetter};
use crate::storage::{deadletters, dedup, StorageError};
use crate::telemetry;
use crate::tenant::TenantSettings;

/// One request's validated events.
pub struct IngestBatch {
    pub events: Vec<IncomingEvent>,
    /// Batch-level `context` and `integrations`, stored once with the batch.
    pub shared: BatchShared,
    pub source: BatchSource,
    /// The client's address as received: GeoIP's fallback for `context.ip`. Never stored.
    pub peer: Option<std::net::IpAddr>,
    pub received_at: Micros,
    /// The tenant's in-flight place, released when the log writer answers (or the batch is
    /// dropped).
    pub permit: InflightPermit,
    pub reply: oneshot::Sender<Result<IngestOutcome, PipelineError>>,
}

/// What became of a request's events, by their positions in the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestOutcome {
    /// Events stored in the log.
    pub accepted: usize,
    /// Events dropped as retries of logged events (dead letters' duplicates included).
    pub duplicates: usize,
    /// Their positions, ascending.
    pub duplicate_positions: Vec<usize>,
    /// Events refused by the tenant's plan and kept as dead letters, with why.
    pub dead_lettered: Vec<(usize, Violation)>,
    /// Events stored although they did not pass the plan (`warn`).
    pub warned: usize,
    /// Positions of the events dropped by the tenant's sampling (never stored, never rolled
    /// up), ascending.
    pub sampled_out: Vec<usize>,
    /// When the request went through the log writer's stages.
    pub timing: Option<crate::storage::writer::Timing>,
}

/// A batch's events sorted by the tenant's sampling and plan.
struct Checked {
    kept: Vec<IncomingEvent>,
    /// Request position of each kept event; `None`: every event was kept, in order.
    positions: Option<Vec<usize>>,
    /// Flags to set on kept events: (index among the kept, flag), with the reason.
    warned: Vec<(usize, u8, ReasonKind)>,
    /// Refused events: (request position, event, why).
    refused: Vec<(usize, IncomingEvent, Violation)>,
    /// The weight of each kept event; empty: all 1.
    weights: Vec<u32>,
    /// Sampled-out events: (request position, messageId).
    sampled_out: Vec<(usize, Option<String>)>,
}

impl Checked {
    fn all(events: Vec<IncomingEvent>) -> Checked {
        Checked {
            kept: events,
            positions: None,
            warned: Vec::new(),
            refused: Vec::new(),
            weights: Vec::new(),
            sampled_out: Vec::new(),
        }
    }
}

/// Samples a batch by the tenant's rates, then applies its tracking plan to the events kept
/// (sample, then validate: a sampled-out event is never checked nor dead-lettered). Nothing is
/// looked at when the tenant samples nothing, has no plan and accepts unplanned events (the
/// default).
fn sample_and_check(
    events: Vec<IncomingEvent>,
    plan: &TenantPlan,
    settings: &TenantSettings,
    user_hash_key: &[u8; 32],
    max_errors: usize,
) -> Checked {
    let sampling = &settings.sampling;
    let sampled = !sampling.is_off();
    if !sampled && plan.is_empty() && settings.unplanned_events == Unplanned::Accept {
        return Checked::all(events);
    }
    let mut checked = Checked {
        kept: Vec::with_capacity(events.len()),
        positions: Some(Vec::with_capacity(events.len())),
        warned: Vec::new(),
        refused: Vec::new(),
        weights: Vec::new(),
        sampled_out: Vec::new(),
    };
    for (position, event) in events.into_iter().enumerate() {
        let name = series_name(
            event.kind.unwrap_or(EventKind::Track),
            event.name.as_deref(),
        );
        let weight = if sampled { sampling.weight_of(name) } else { 1 };
        if weight > 1 {
            // The same identity the stored event's user hash is made of.
            let identity = (event.user_id.as_deref())
                .or(event.anonymous_id.as_deref())
                .unwrap_or("");
            if !sampling::keeps(user_hash(user_hash_key, identity), weight) {
                checked.sampled_out.push((position, event.message_id));
                continue;
            }
        }
        let verdict = schema::check(
            plan,
            name,
            &event,
            settings.schema_enforcement,
            settings.unplanned_events,
            max_errors,
        );
        match verdict {
            Verdict::Reject(violation) => checked.refused.push((position, event, violation)),
            pass_or_warn => {
                if let Verdict::Warn(violation) = pass_or_warn {
                    let reason = ReasonKind::of(&violation);
                    let flag = match reason {
                        ReasonKind::SchemaMismatch => flags::SCHEMA_MISMATCH,
                        ReasonKind::Unplanned => flags::UNPLANNED,
                    };
                    checked.warned.push((checked.kept.len(), flag, reason));
                }
                checked.kept.push(event);
                if sampled {
                    checked.weights.push(weight);
                }
                if let Some(positions) = &mut checked.positions {
                    positions.push(position);
                }
            }
        }
    }
    checked
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
            peer,
            received_at,
            permit,
            reply,
        } = message;
        let Some(tenant) = self.deps.directory.get(self.tenant) else {
            let _ = reply.send(Err(StorageError::TenantDeleted(self.tenant).into()));
            return;
        };
        let checked = sample_and_check(
            events,
            &self.deps.schemas.plan(self.tenant),
            &tenant.settings,
            &tenant.user_hash_key,
            self.deps.processing.max_violations_per_event,
        );
        // Derived from the contexts as sent, before enrichment anonymises their addresses.
        let derived = (self.deps.derivers).derive_all(&checked.kept, &shared, peer);
        let (shared, batch_library) = enrich_shared(shared);
        let context = EnrichContext {
            received_at,
            future_tolerance: self.deps.future_tolerance,
            user_hash_key: &tenant.user_hash_key,
            batch_library: &batch_library,
        };
        let Checked {
            kept,
            positions,
            warned,
            refused,
            weights,
            sampled_out,
        } = checked;
        let batch_id = uuid::Uuid::now_v7();
        let (letters, letters_batch) = dead_letters(
            self.tenant,
            &refused,
            &shared,
            &source,
            received_at,
            batch_id,
        );
        let kept_len = kept.len();
        let mut batch = LogBatch {
            batch_id: batch_id.as_u128(),
            received_at,
            source,
            events: enrich_all(kept, &context),
            shared,
            extras: extras(kept_len, derived, &weights),
        };
        for (at, flag, _) in &warned {
            if let Some(event) = batch.events.get_mut(*at) {
                event.flags |= flag;
            }
        }
        let probes = (sampled_out.iter())
            .map(|(_, id)| id.as_deref().map(|id| dedup::key(self.tenant, id)))
            .collect();
        let sampled_positions: Vec<usize> = sampled_out.iter().map(|(at, _)| *at).collect();
        let prepared = match PreparedBatch::new(self.tenant, &batch) {
            Ok(prepared) => prepared
                .with_dead_letters(letters, letters_batch)
                .with_probes(probes),
            Err(error) => {
                let _ = reply.send(Err(error.into()));
                return;
            }
        };
        let tenant_label = self.tenant.to_string();
        for (_, _, reason) in &warned {
            telemetry::schema_violations(&tenant_label, "warned", *reason, 1);
        }
        let refused: Vec<(usize, Violation)> = refused
            .into_iter()
            .map(|(position, _, violation)| (position, violation))
            .collect();
        let warned = warned.len();
        let mut items = RollupItems::from_events(&batch.events, &batch.extras);
        // The events are freed here, not on the writer thread.
        drop(batch);
        let rollup = self.rollup.clone();
        let request = AppendRequest {
            tenant: self.tenant,
            queued_at: std::time::Instant::now(),
            dedup_window: tenant.settings.dedup_window,
            clock: None,
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
                let outcome = outcome.map(|done| {
                    let placed = Placed {
                        positions: positions.as_deref(),
                        refused,
                        warned,
                        sampled: sampled_positions,
                    };
                    by_request_position(&done, placed, &tenant_label)
                });
                let _ = reply.send(outcome.map_err(PipelineError::from));
            }),
        };
        self.deps.append.submit(request);
    }
}

/// The dead letters of a batch's refused events, and the record of the batch-level objects
/// they share (stored once, not once per letter: a request's letters cost its bytes once).
fn dead_letters(
    tenant: TenantId,
    refused: &[(usize, IncomingEvent, Violation)],
    shared: &BatchShared,
    source: &BatchSource,
    received_at: Micros,
    batch_id: uuid::Uuid,
) -> (
    Vec<PreparedDeadLetter>,
    Option<(deadletters::LetterKey, Vec<u8>)>,
) {
    let batch = (!refused.is_empty() && !shared.is_empty()).then(|| {
        let key = deadletters::key(
            tenant,
            received_at,
            batch_id.as_u128(),
            deadletters::BATCH_POSITION,
        );
        (key, serde_json::to_vec(shared).unwrap_or_default())
    });
    let letters = refused
        .iter()
        .map(|(position, event, violation)| {
            let position = u32::try_from(*position)
                .unwrap_or(u32::MAX)
                .min(deadletters::BATCH_POSITION - 1);
            let letter = DeadLetter {
                received_at,
                batch_id: batch_id.to_string(),
                position,
                endpoint: source.endpoint.clone(),
                client_ip: source.client_ip.clone(),
                event_name: violation.event.clone(),
                event: event.clone(),
                shared: BatchShared::default(),
                reason: violation.clone(),
                checked_at: received_at,
                replays: 0,
            };
            PreparedDeadLetter {
                dedup_key: event.message_id.as_deref().map(|id| dedup::key(tenant, id)),
                key: deadletters::key(tenant, received_at, batch_id.as_u128(), position),
                value: letter.encode(),
            }
        })
        .collect();
    (letters, batch)
}

/// Each of `events` events' extras: its derived fields (`derived` empty: none) and weight
/// (`weights` empty: all 1). None at all
/// when every event has weight 1 and nothing derived.
fn extras(events: usize, derived: Vec<Option<String>>, weights: &[u32]) -> Vec<EventExtras> {
    if weights.iter().all(|w| *w == 1) && derived.iter().all(Option::is_none) {
        return Vec::new();
    }
    let mut derived = derived.into_iter();
    (0..events.max(weights.len()))
        .map(|at| EventExtras {
            weight: weights.get(at).copied().unwrap_or(1),
            derived: derived.next().flatten(),
        })
        .collect()
}

/// Where a batch's events were in the request, as the ingest actor sorted them.
struct Placed<'a> {
    /// Request position of each kept event (`None`: all kept, in order).
    positions: Option<&'a [usize]>,
    /// Refused events' request positions, with why.
    refused: Vec<(usize, Violation)>,
    warned: usize,
    /// Sampled-out events' request positions, in the order of the writer's probes.
    sampled: Vec<usize>,
}

/// The writer's outcome (positions among the logged events, among the dead letters and among
/// the sampled-out events) by positions in the request.
fn by_request_position(
    done: &AppendOutcome,
    placed: Placed<'_>,
    tenant_label: &str,
) -> IngestOutcome {
    let Placed {
        positions,
        refused,
        warned,
        sampled,
    } = placed;
    let in_request = |at: usize| positions.and_then(|p| p.get(at).copied()).unwrap_or(at);
    let mut duplicate_positions: Vec<usize> = (done.duplicate_positions.iter())
        .map(|&at| in_request(at))
        .collect();
    let mut dead_lettered = Vec::with_capacity(refused.len());
    for (at, (position, violation)) in refused.into_iter().enumerate() {
        if done.dead_letter_duplicates.binary_search(&at).is_ok() {
            duplicate_positions.push(position);
        } else {
            telemetry::schema_violations(
                tenant_label,
                "dead_lettered",
                ReasonKind::of(&violation),
                1,
            );
            dead_lettered.push((position, violation));
        }
    }
    // A retry of a logged event is a duplicate even if the sampling now drops it (dedup comes
    // before sampling).
    for &at in &done.probe_duplicates {
        if let Some(position) = sampled.get(at) {
            duplicate_positions.push(*position);
        }
    }
    let sampled_out: Vec<usize> = (sampled.into_iter().enumerate())
        .filter(|(at, _)| done.probe_duplicates.binary_search(at).is_err())
        .map(|(_, position)| position)
        .collect();
    telemetry::sampled_out(tenant_label, sampled_out.len());
    duplicate_positions.sort_unstable();
    IngestOutcome {
        accepted: done.accepted,
        duplicates: duplicate_positions.len(),
        duplicate_positions,
        dead_lettered,
        warned,
        sampled_out,
        timing: done.timing,
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
