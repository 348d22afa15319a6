//! Answers to the query API, computed from stored rollups (series, events, uniques) or from
//! the stored events (funnels, exact). Every function here blocks on storage: call it from a
//! blocking thread.
//!
//! [`QueryCache`] keeps answers over closed time ranges per tenant (bounded, least recently
//! used first out), and series answers by blocks ([`blocks`]); the rollup actor invalidates the
//! entries that a late event touches.

pub mod blocks;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use serde::Serialize;

use crate::event::{duration_micros, Micros};
use crate::identity::IdentityMap;
use crate::ids::TenantId;
use crate::rollup::{
    cover, estimate, series_name, Deltas, Resolution, Retention, Sketch, ALL_EVENTS,
};
use crate::sampling::{self, sampled_series, Estimate};
use crate::storage::cold::ColdStore;
use crate::storage::event_log::{first_seq_received_since, scan_views, RECEIVE_ORDER_SLACK};
use crate::storage::rollups;
use crate::storage::writer::LogHeads;
use crate::storage::{Storage, StorageError};

/// What a series counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Count,
    Uniques,
}

/// One point of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub ts: Micros,
    pub value: u64,
    /// The 95% bound of the value's error, relative to it, when sampled events contributed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_error: Option<f64>,
}

/// Every bucket of `[from, to)` at `resolution` (from/to already aligned), zeros included.
pub fn series(
    storage: &Storage,
    tenant: TenantId,
    event: Option<&str>,
    metric: Metric,
    resolution: Resolution,
    from: Micros,
    to: Micros,
) -> Result<Vec<Point>, StorageError> {
    let name = event.unwrap_or(ALL_EVENTS);
    let span = SeriesSpan {
        resolution,
        from,
        to,
    };
    let weights = rollups::sampled_weights(storage, tenant, name)?;
    series_of(storage, tenant, name, metric, &span, &weights)
}

/// [`series`] of the series `name`, whose sampled users are kept at `weights`
/// ([`rollups::sampled_weights`], read once by a caller that asks for several spans).
pub(crate) fn series_of(
    storage: &Storage,
    tenant: TenantId,
    name: &str,
    metric: Metric,
    span: &SeriesSpan,
    weights: &[u32],
) -> Result<Vec<Point>, StorageError> {
    let &SeriesSpan {
        resolution,
        from,
        to,
    } = span;
    // Stored buckets come back in time order: walk them alongside the full range.
    let stored: Vec<(Micros, Estimate)> = if weights.is_empty() {
        match metric {
            Metric::Count => span.counts(storage, tenant, name)?,
            Metric::Uniques => span.sketches(storage, tenant, name)?,
        }
        .into_iter()
        .map(|(at, value)| (at, Estimate::exact(value)))
        .collect()
    } else {
        span.sampled(storage, tenant, name, metric, weights)?
    };
    let mut stored = stored.into_iter().peekable();
    let mut points = Vec::with_capacity(((to - from) / resolution.width()).max(0) as usize);
    let mut at = from;
    while at < to {
        let mut point = Point {
            ts: at,
            value: 0,
            relative_error: None,
        };
        while let Some((bucket, estimate)) = stored.peek() {
            if *bucket > at {
                break;
            }
            if *bucket == at {
                point.value = estimate.rounded();
                point.relative_error = estimate.relative_error;
            }
            stored.next();
        }
        points.push(point);
        at += resolution.width();
    }
    Ok(points)
}

/// The buckets of a series answer: `[from, to)` at `resolution` (aligned).
pub(crate) struct SeriesSpan {
    pub resolution: Resolution,
    pub from: Micros,
    pub to: Micros,
}

impl SeriesSpan {
    fn counts(
        &self,
        storage: &Storage,
        tenant: TenantId,
        name: &str,
    ) -> Result<Vec<(Micros, f64)>, StorageError> {
        let counts =
            rollups::read_counts(storage, tenant, self.resolution, name, self.from, self.to)?;
        Ok(counts.into_iter().map(|(at, n)| (at, n as f64)).collect())
    }

    fn sketches(
        &self,
        storage: &Storage,
        tenant: TenantId,
        name: &str,
    ) -> Result<Vec<(Micros, f64)>, StorageError> {
        let sketches =
            rollups::read_sketches(storage, tenant, self.resolution, name, self.from, self.to)?;
        Ok((sketches.into_iter())
            .map(|(at, sketch)| (at, estimate(&sketch) as f64))
            .collect())
    }

    /// Each bucket's estimate from the series and the series of its sampled users.
    fn sampled(
        &self,
        storage: &Storage,
        tenant: TenantId,
        name: &str,
        metric: Metric,
        weights: &[u32],
    ) -> Result<Vec<(Micros, Estimate)>, StorageError> {
        let (resolution, from, to) = (self.resolution, self.from, self.to);
        let read_users = |series: &str| -> Result<BTreeMap<Micros, Sketch>, StorageError> {
            Ok(
                rollups::read_sketches(storage, tenant, resolution, series, from, to)?
                    .into_iter()
                    .collect(),
            )
        };
        let mut levels = Vec::with_capacity(weights.len());
        for &weight in weights {
            let series = sampled_series(name, weight);
            let kept: BTreeMap<Micros, u64> =
                (rollups::read_counts(storage, tenant, resolution, &series, from, to)?)
                    .into_iter()
                    .collect();
            levels.push((weight, kept, read_users(&series)?));
        }
        let counts: BTreeMap<Micros, u64> =
            (rollups::read_counts(storage, tenant, resolution, name, from, to)?)
                .into_iter()
                .collect();
        let users = match metric {
            Metric::Uniques => read_users(name)?,
            Metric::Count => BTreeMap::new(),
        };
        let mut buckets: std::collections::BTreeSet<Micros> = counts.keys().copied().collect();
        for (_, kept, _) in &levels {
            buckets.extend(kept.keys().copied());
        }
        Ok(buckets
            .into_iter()
            .map(|at| {
                let levels: Vec<Level<'_>> = levels
                    .iter()
                    .map(|(weight, kept, users)| Level {
                        weight: *weight,
                        kept_events: kept.get(&at).copied().unwrap_or(0),
                        users: users.get(&at),
                    })
                    .collect();
                let estimate = match metric {
                    Metric::Count => count_estimate(counts.get(&at).copied().unwrap_or(0), &levels),
                    Metric::Uniques => users_estimate(users.get(&at), &levels),
                };
                (at, estimate)
            })
            .collect())
    }
}

/// The events of one weight in a bucket or range: how many were kept, and their users.
struct Level<'a> {
    weight: u32,
    kept_events: u64,
    users: Option<&'a Sketch>,
}

/// A weighted count (`count`, as stored: each kept event added its weight) with its error.
fn count_estimate(count: u64, levels: &[Level<'_>]) -> Estimate {
    let sampled: Vec<(u32, u64, f64)> = levels
        .iter()
        .filter(|level| level.kept_events > 0)
        .map(|level| {
            let users = level.users.map_or(0, estimate) as f64;
            (level.weight, level.kept_events, users)
        })
        .collect();
    sampling::stored_count_estimate(count, &sampled)
}

/// Distinct users from the unsampled events' users and each weight's kept users.
fn users_estimate(unsampled: Option<&Sketch>, levels: &[Level<'_>]) -> Estimate {
    let sampled: Vec<(u32, &Sketch)> = levels
        .iter()
        .filter_map(|level| Some((level.weight, level.users?)))
        .collect();
    sampling::estimate_users(unsampled, &sampled)
}

/// Count and distinct users of a series over whole buckets, with the series of its sampled
/// users.
fn total_estimates(
    storage: &Storage,
    tenant: TenantId,
    name: &str,
    weights: &[u32],
    parts: &[(Resolution, Micros)],
) -> Result<(Estimate, Estimate), StorageError> {
    let total = rollups::total_over(storage, tenant, name, parts)?;
    if weights.is_empty() {
        return Ok((
            Estimate::exact(total.count as f64),
            Estimate::exact(estimate(&total.users) as f64),
        ));
    }
    let mut sampled = Vec::with_capacity(weights.len());
    for &weight in weights {
        let kept = rollups::total_over(storage, tenant, &sampled_series(name, weight), parts)?;
        sampled.push((weight, kept));
    }
    let levels: Vec<Level<'_>> = sampled
        .iter()
        .map(|(weight, kept)| Level {
            weight: *weight,
            kept_events: kept.count,
            users: (kept.count > 0).then_some(&kept.users),
        })
        .collect();
    let unsampled = (total.count > 0).then_some(&total.users);
    Ok((
        count_estimate(total.count, &levels),
        users_estimate(unsampled, &levels),
    ))
}

/// Rounds `[from, to)` outward to the finest resolution still retained at `from`, so that it
/// can be covered by whole stored buckets.
pub fn align_range(
    from: Micros,
    to: Micros,
    retention: &Retention,
    now: Micros,
) -> (Micros, Micros) {
    let resolution = [Resolution::Minute, Resolution::Hour]
        .into_iter()
        .find(|r| {
            retention
                .oldest(*r, now)
                .is_none_or(|oldest| from >= oldest)
        })
        .unwrap_or(Resolution::Day);
    let width = resolution.width();
    let aligned_to = if to.rem_euclid(width) == 0 {
        to
    } else {
        resolution.bucket(to) + width
    };
    (resolution.bucket(from), aligned_to)
}

/// An event's totals over a range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventTotal {
    pub event: String,
    pub count: u64,
    pub uniques: u64,
    /// The 95% bounds of the errors, relative to the values, when sampled events contributed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_error: Option<RelativeError>,
}

/// The 95% bounds of a count's and a distinct-user count's errors, relative to them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RelativeError {
    pub count: f64,
    pub uniques: f64,
}

impl RelativeError {
    pub(crate) fn of(count: &Estimate, uniques: &Estimate) -> Option<RelativeError> {
        if count.relative_error.is_none() && uniques.relative_error.is_none() {
            return None;
        }
        Some(RelativeError {
            count: count.relative_error.unwrap_or(0.0),
            uniques: uniques.relative_error.unwrap_or(0.0),
        })
    }
}

/// Every event with its count and distinct users over `[from, to)` (aligned), largest first.
pub fn event_totals(
    storage: &Storage,
    tenant: TenantId,
    from: Micros,
    to: Micros,
    limit: usize,
) -> Result<Vec<EventTotal>, StorageError> {
    let parts = cover(from, to);
    let mut totals = Vec::new();
    // Read once: looking each name's weights up would scan every series name per name.
    let weights = rollups::all_sampled_weights(storage, tenant)?;
    for name in rollups::event_names(storage, tenant)? {
        if name == ALL_EVENTS {
            continue;
        }
        let weights = weights.get(&name).map_or(&[][..], Vec::as_slice);
        let (count, uniques) = total_estimates(storage, tenant, &name, weights, &parts)?;
        if count.rounded() == 0 {
            continue;
        }
        totals.push(EventTotal {
            event: name,
            count: count.rounded(),
            uniques: uniques.rounded(),
            relative_error: RelativeError::of(&count, &uniques),
        });
    }
    totals.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.event.cmp(&b.event)));
    totals.truncate(limit);
    Ok(totals)
}

/// Distinct users over `[from, to)` (aligned), merging the sketches of the covering buckets.
pub fn uniques(
    storage: &Storage,
    tenant: TenantId,
    event: Option<&str>,
    from: Micros,
    to: Micros,
) -> Result<Estimate, StorageError> {
    let name = event.unwrap_or(ALL_EVENTS);
    let weights = rollups::sampled_weights(storage, tenant, name)?;
    Ok(total_estimates(storage, tenant, name, &weights, &cover(from, to))?.1)
}

/// Where a funnel reads the stored events.
#[derive(Clone, Copy)]
pub enum Stored<'a> {
    /// The node's own log and cold tier.
    Tiers {
        storage: &'a Storage,
        cold: Option<&'a ColdStore>,
    },
    /// Only the cold tier, as its newest published manifest has it (a cluster's ingest node).
    Published(&'a ColdStore),
}

/// Most matching events a funnel may gather (each costs 32 bytes while it is computed).
pub const MAX_FUNNEL_EVENTS: usize = 10_000_000;

/// Why a funnel could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FunnelError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Cold(#[from] crate::storage::cold::ColdError),
    #[error("more than {MAX_FUNNEL_EVENTS} events match the funnel's steps in this range; narrow the range")]
    TooManyEvents,
}

/// The events a funnel looks at: those timestamped in `[from, to)`. `future_tolerance` is the
/// server's `limits.future_tolerance`, which bounds how far back in the log they can be.
#[derive(Debug, Clone, Copy)]
pub struct FunnelSpan {
    pub from: Micros,
    pub to: Micros,
    pub future_tolerance: std::time::Duration,
    /// Events received more than this after `to` are not read (`reads.funnel_late_arrival`):
    /// the scan stops there instead of reading the rest of the log.
    pub late_arrival: std::time::Duration,
}

/// Users reaching each step of a funnel, in order, a user being a person as `identity`
/// resolves it, with every step within `window` of the first,
/// over the events whose time is in the span. Exact: computed from the stored events, read from
/// the first log entry that can hold one ([`first_seq_received_since`]) to the last one received
/// within `late_arrival` (plus [`RECEIVE_ORDER_SLACK`]) of `to`.
pub fn funnel(
    stored: Stored<'_>,
    tenant: TenantId,
    steps: &[String],
    window: Micros,
    span: &FunnelSpan,
    identity: &IdentityMap,
) -> Result<FunnelCounts, FunnelError> {
    let FunnelSpan { from, to, .. } = *span;
    // Distinct step names, by first appearance, so repeated steps share one code.
    let step_of: HashMap<&str, u8> = {
        let mut map = HashMap::new();
        for name in steps {
            let next = map.len() as u8;
            map.entry(name.as_str()).or_insert(next);
        }
        map
    };
    let codes: Vec<u8> = steps.iter().map(|name| step_of[name.as_str()]).collect();
    // Per user: (time, sequence, step code, weight) of the matching events.
    let mut per_user: HashMap<u64, Vec<FunnelEvent>> = HashMap::new();
    let mut gathered = 0usize;
    let mut gather = |seq: u64, timestamp: Micros, name: &str, user_hash: u64, weight: u32| {
        if timestamp < from || timestamp >= to {
            return ControlFlow::Continue(());
        }
        if let Some(code) = step_of.get(name) {
            gathered += 1;
            if gathered > MAX_FUNNEL_EVENTS {
                return ControlFlow::Break(());
            }
            per_user
                .entry(user_hash)
                .or_default()
                .push((timestamp, seq, *code, weight));
        }
        ControlFlow::Continue(())
    };
    // A break while reading the cold tier means too many events, which `gathered` tells.
    match stored {
        Stored::Published(store) => {
            let hours = Some((from, to));
            let _ = crate::storage::cold::scan_published(store, tenant, hours, |seq, batch| {
                gather_cold(&mut gather, seq, batch)
            })?;
        }
        Stored::Tiers { storage, cold } => {
            let read_cold = |from_seq: u64, through: u64, gather: &mut Gather<'_>| {
                let Some(store) = cold else {
                    return Ok::<_, FunnelError>(());
                };
                let hours = Some((from, to));
                let _ = crate::storage::cold::scan_cold(
                    storage,
                    store,
                    tenant,
                    from_seq,
                    through,
                    hours,
                    |seq, batch| gather_cold(gather, seq, batch),
                )?;
                Ok(())
            };
            // The cold tier up to its watermark, pruned by hour; then the hot log; then
            // whatever a flush committed meanwhile (it may have left the hot log before the
            // scan reached it; events read twice are dropped below).
            let cold_before = crate::storage::cold::cold_watermark(storage, tenant)?;
            if cold_before > 0 {
                read_cold(1, cold_before, &mut gather)?;
            }
            let start =
                first_seq_received_since(storage.log(), tenant, from, span.future_tolerance)?
                    .max(cold_before + 1);
            let late_arrival = duration_micros(span.late_arrival);
            // Entries are appended in arrival order, give or take RECEIVE_ORDER_SLACK.
            let last_received = to
                .saturating_add(late_arrival)
                .saturating_add(RECEIVE_ORDER_SLACK);
            scan_views(storage.log(), tenant, start, |first_seq, batch| {
                if batch.received_at > last_received {
                    return ControlFlow::Break(());
                }
                for (offset, event) in batch.events.iter().enumerate() {
                    let name = series_name(event.kind, event.name);
                    let seq = first_seq + offset as u64;
                    let weight = batch.weight_of(offset);
                    if gather(seq, event.timestamp, name, event.user_hash, weight).is_break() {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            })?;
            let cold_after = crate::storage::cold::cold_watermark(storage, tenant)?;
            if cold_after > cold_before {
                read_cold(cold_before + 1, cold_after, &mut gather)?;
            }
        }
    }
    if gathered > MAX_FUNNEL_EVENTS {
        return Err(FunnelError::TooManyEvents);
    }
    // Each id's events count for its person, as the stored identity links resolve it now.
    if !identity.is_empty() {
        let resolver = identity.resolver();
        let mut per_person: HashMap<u64, Vec<FunnelEvent>> = HashMap::new();
        for (user, events) in per_user {
            per_person
                .entry(resolver.resolve(user))
                .or_default()
                .extend(events);
        }
        per_user = per_person;
    }
    for events in per_user.values_mut() {
        events.sort_unstable();
        events.dedup();
    }
    let mut reached = FunnelCounts {
        users: vec![0; steps.len()],
        variance: vec![0.0; steps.len()],
        sampled: false,
    };
    // A user who reached step k stands for as many users as the highest weight among their
    // events of steps 1..=k: being kept at that weight's rate is what let the funnel see them
    // there (the sample is nested, see `crate::sampling`).
    let mut step_weight = vec![1u32; steps.len()];
    for events in per_user.values_mut() {
        let depth = deepest_step(events, &codes, window);
        step_weight.fill(1);
        for (_, _, code, weight) in events.iter() {
            for (step, _) in codes.iter().enumerate().filter(|(_, c)| *c == code) {
                step_weight[step] = step_weight[step].max(*weight);
            }
        }
        let mut weight = 1u32;
        for (step, own) in step_weight.iter().enumerate().take(depth) {
            weight = weight.max(*own);
            reached.users[step] += u64::from(weight);
            if weight > 1 {
                let weight = f64::from(weight);
                reached.variance[step] += weight * (weight - 1.0);
                reached.sampled = true;
            }
        }
    }
    Ok(reached)
}

/// What a funnel does with each event it reads: sequence, time, series name, user hash,
/// weight.
type Gather<'a> = dyn FnMut(u64, Micros, &str, u64, u32) -> ControlFlow<()> + 'a;

/// Gathers a cold event (a one-event batch, its objects merged).
fn gather_cold(
    gather: &mut Gather<'_>,
    seq: u64,
    batch: &crate::event::LogBatch,
) -> ControlFlow<()> {
    let mut flow = ControlFlow::Continue(());
    for (at, event) in batch.events.iter().enumerate() {
        flow = gather(
            seq,
            event.timestamp,
            series_name(event.kind, event.name.as_deref()),
            event.user_hash,
            batch.weight_of(at),
        );
    }
    flow
}

/// A funnel event of one user: time, sequence, step code, weight.
type FunnelEvent = (Micros, u64, u8, u32);

/// Users reaching each step of a funnel (weighted, when sampled events contributed).
#[derive(Debug, Clone, PartialEq)]
pub struct FunnelCounts {
    pub users: Vec<u64>,
    /// Variance of each step's estimate (0 without sampling).
    variance: Vec<f64>,
    /// Whether any sampled event contributed.
    pub sampled: bool,
}

impl FunnelCounts {
    /// The 95% bound of each step's error, relative to it, if sampled events contributed.
    pub fn relative_errors(&self) -> Option<Vec<f64>> {
        self.sampled.then(|| {
            (self.users.iter().zip(&self.variance))
                .map(|(users, variance)| {
                    if *users == 0 {
                        0.0
                    } else {
                        sampling::Z95 * variance.sqrt() / *users as f64
                    }
                })
                .collect()
        })
    }
}

/// How many steps, in order, one user completes, with every step within `window` of the first.
/// One pass over the user's events (in time order), O(events × steps): for each step, the latest
/// first-step time of a partial match that reached it. A later start leaves more of the window
/// for the remaining steps, so it is all that needs keeping. Steps are advanced from the last to
/// the first, so one event never completes two consecutive steps.
fn deepest_step(events: &[FunnelEvent], codes: &[u8], window: Micros) -> usize {
    let mut latest_start: Vec<Option<Micros>> = vec![None; codes.len()];
    for (at, _, code, _) in events {
        for step in (1..codes.len()).rev() {
            if codes[step] != *code {
                continue;
            }
            if let Some(start) = latest_start[step - 1] {
                if at - start <= window && latest_start[step].is_none_or(|s| s < start) {
                    latest_start[step] = Some(start);
                }
            }
        }
        if codes.first() == Some(code) {
            latest_start[0] = Some(*at);
        }
    }
    latest_start.iter().take_while(|s| s.is_some()).count()
}

/// The last durable log sequence of a tenant.
pub fn log_head(
    storage: &Storage,
    heads: &LogHeads,
    tenant: TenantId,
) -> Result<u64, StorageError> {
    if let Some(head) = heads.get(tenant) {
        return Ok(head);
    }
    storage.log().head(tenant)
}

struct CachedAnswer {
    from: Micros,
    to: Micros,
    body: Arc<str>,
}

/// Largest answer kept in the cache.
const MAX_CACHED_BYTES: usize = 1 << 20;

struct TenantCache {
    answers: lru::LruCache<String, CachedAnswer>,
    /// Rendered blocks of series answers (see `http::query::series`); `None` when off.
    blocks: Option<lru::LruCache<String, CachedAnswer>>,
    /// Bumped by every invalidation: an answer computed before it is not stored after it.
    version: u64,
}

/// One of a tenant's caches (`TenantCache::answers` or `TenantCache::blocks`).
type CachePart = fn(&mut TenantCache) -> Option<&mut lru::LruCache<String, CachedAnswer>>;

impl TenantCache {
    fn answers(&mut self) -> Option<&mut lru::LruCache<String, CachedAnswer>> {
        Some(&mut self.answers)
    }

    fn blocks(&mut self) -> Option<&mut lru::LruCache<String, CachedAnswer>> {
        self.blocks.as_mut()
    }
}

/// Per-tenant cache of answers, and of blocks of series answers, over closed ranges.
pub struct QueryCache {
    /// `None`: caching is off.
    capacity: Option<NonZeroUsize>,
    block_capacity: Option<NonZeroUsize>,
    tenants: DashMap<TenantId, Mutex<TenantCache>>,
}

impl QueryCache {
    /// Keeps up to `capacity` answers (each at most 1 MiB) and `block_capacity` series blocks per
    /// tenant; a capacity of 0 turns that part off (`capacity` 0: the whole cache).
    pub fn new(capacity: usize, block_capacity: usize) -> QueryCache {
        QueryCache {
            capacity: NonZeroUsize::new(capacity),
            block_capacity: NonZeroUsize::new(block_capacity),
            tenants: DashMap::new(),
        }
    }

    fn with_tenant<T>(&self, tenant: TenantId, f: impl FnOnce(&mut TenantCache) -> T) -> Option<T> {
        let capacity = self.capacity?;
        let entry = self.tenants.entry(tenant).or_insert_with(|| {
            Mutex::new(TenantCache {
                answers: lru::LruCache::new(capacity),
                blocks: self.block_capacity.map(lru::LruCache::new),
                version: 0,
            })
        });
        let mut cache = entry.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut cache))
    }

    /// The current version; pass it to [`QueryCache::put`] with an answer computed after this.
    pub fn version(&self, tenant: TenantId) -> u64 {
        self.with_tenant(tenant, |cache| cache.version).unwrap_or(0)
    }

    pub fn get(&self, tenant: TenantId, key: &str) -> Option<Arc<str>> {
        self.fetch(tenant, key, TenantCache::answers)
    }

    /// Stores an answer computed at `version`, unless an invalidation happened since.
    pub fn put(
        &self,
        tenant: TenantId,
        version: u64,
        key: String,
        range: (Micros, Micros),
        body: Arc<str>,
    ) {
        if body.len() > MAX_CACHED_BYTES {
            return;
        }
        self.store(tenant, version, key, range, body, TenantCache::answers);
    }

    /// Cached series blocks, one answer per key (`None` for a key of `None`), under one lock.
    pub fn get_blocks(&self, tenant: TenantId, keys: &[Option<String>]) -> Vec<Option<Arc<str>>> {
        self.with_tenant(tenant, |cache| {
            let Some(blocks) = TenantCache::blocks(cache) else {
                return vec![None; keys.len()];
            };
            keys.iter()
                .map(|key| {
                    let entry = blocks.get(key.as_deref()?)?;
                    Some(Arc::clone(&entry.body))
                })
                .collect()
        })
        .unwrap_or_else(|| vec![None; keys.len()])
    }

    /// Stores a series block computed at `version`, unless an invalidation happened since.
    pub fn put_block(
        &self,
        tenant: TenantId,
        version: u64,
        key: String,
        range: (Micros, Micros),
        body: Arc<str>,
    ) {
        self.store(tenant, version, key, range, body, TenantCache::blocks);
    }

    fn fetch(&self, tenant: TenantId, key: &str, lru: CachePart) -> Option<Arc<str>> {
        self.with_tenant(tenant, |cache| {
            let entry = lru(cache)?.get(key)?;
            Some(Arc::clone(&entry.body))
        })
        .flatten()
    }

    fn store(
        &self,
        tenant: TenantId,
        version: u64,
        key: String,
        (from, to): (Micros, Micros),
        body: Arc<str>,
        lru: CachePart,
    ) {
        self.with_tenant(tenant, |cache| {
            if cache.version != version {
                return;
            }
            if let Some(lru) = lru(cache) {
                lru.put(key, CachedAnswer { from, to, body });
            }
        });
    }

    /// Drops the answers whose range overlaps a closed bucket that `deltas` changed (a late
    /// event). Each event is judged by the finest resolution still kept for it, so ordinary live
    /// traffic (the current minute) invalidates nothing.
    pub fn invalidate_late(
        &self,
        tenant: TenantId,
        deltas: &Deltas,
        retention: &Retention,
        now: Micros,
    ) {
        let open_minute = Resolution::Minute.bucket(now);
        let oldest_minute = retention.oldest(Resolution::Minute, now);
        let oldest_hour = retention.oldest(Resolution::Hour, now);
        let touched: Vec<(Micros, Micros)> = deltas
            .buckets()
            .filter(|(resolution, _, start, _)| match resolution {
                Resolution::Minute => true,
                Resolution::Hour => oldest_minute.is_some_and(|oldest| *start < oldest),
                Resolution::Day => oldest_hour.is_some_and(|oldest| *start < oldest),
            })
            .map(|(resolution, _, start, _)| (start, start + resolution.width()))
            .filter(|(_, end)| *end <= open_minute)
            .collect();
        if touched.is_empty() {
            return;
        }
        let overlaps = |answer: &CachedAnswer| {
            touched
                .iter()
                .any(|(start, end)| *start < answer.to && answer.from < *end)
        };
        self.with_tenant(tenant, |cache| {
            cache.version += 1;
            for part in [TenantCache::answers as CachePart, TenantCache::blocks] {
                let Some(lru) = part(cache) else {
                    continue;
                };
                let stale: Vec<String> = lru
                    .iter()
                    .filter(|(_, entry)| overlaps(entry))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in stale {
                    lru.pop(&key);
                }
            }
        });
    }

    pub fn forget(&self, tenant: TenantId) {
        self.tenants.remove(&tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn funnel_steps_in_order_within_the_window() {
        // Steps a -> b -> c, window 10.
        let codes = [0u8, 1, 2];
        let ev = |at: Micros, code: u8| (at, at as u64, code, 1);
        assert_eq!(deepest_step(&[ev(0, 0), ev(5, 1), ev(9, 2)], &codes, 10), 3);
        // c before b does not count; the window is measured from the first step.
        assert_eq!(deepest_step(&[ev(0, 0), ev(3, 2), ev(5, 1)], &codes, 10), 2);
        assert_eq!(
            deepest_step(&[ev(0, 0), ev(5, 1), ev(11, 2)], &codes, 10),
            2
        );
        // A later start can do better than an earlier one.
        assert_eq!(
            deepest_step(&[ev(0, 0), ev(20, 0), ev(25, 1), ev(29, 2)], &codes, 10),
            3
        );
        // Window edge is inclusive.
        assert_eq!(deepest_step(&[ev(0, 0), ev(10, 1)], &codes, 10), 2);
        assert_eq!(deepest_step(&[ev(5, 1)], &codes, 10), 0);
        // Repeated steps: a -> b -> a needs a second a after b.
        let repeated = [0u8, 1, 0];
        assert_eq!(deepest_step(&[ev(0, 0), ev(1, 1)], &repeated, 10), 2);
        assert_eq!(
            deepest_step(&[ev(0, 0), ev(1, 1), ev(2, 0)], &repeated, 10),
            3
        );
        assert_eq!(
            deepest_step(&[ev(0, 0), ev(0, 0), ev(1, 1)], &repeated, 10),
            2
        );
    }

    #[test]
    fn ranges_are_aligned_to_retained_resolutions() {
        let minute = Resolution::Minute.width();
        let hour = Resolution::Hour.width();
        let day = Resolution::Day.width();
        let retention = Retention {
            minute: std::time::Duration::from_secs(86_400),
            hour: std::time::Duration::from_secs(10 * 86_400),
            day: None,
        };
        let now = 100 * day;
        assert_eq!(
            align_range(now - 90 * minute - 5, now - 5, &retention, now),
            (now - 91 * minute, now)
        );
        assert_eq!(
            align_range(now - 2 * day - 5, now - 5, &retention, now),
            (now - 2 * day - hour, now)
        );
        assert_eq!(
            align_range(now - 20 * day - 5, now - 5, &retention, now),
            (now - 21 * day, now)
        );
    }
}
