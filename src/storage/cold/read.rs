//! Reading both tiers as one sequence-ordered stream.
//!
//! Readers switch from the cold tier to the hot log at the cold watermark and re-check it after
//! each read of the hot log, so a flush committing under them never hides a range. In the cold
//! tier, segments of different hours (and compacted segments, which hold several flushes' rows
//! of one hour) overlap in sequence range; each holds its rows in sequence order, so a k-way
//! merge reads them in order, opening a segment only when the merge reaches its first sequence
//! and holding one decoded batch of each open segment.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

use super::manifest::{cold_watermark, segments, Segment};
use super::segment::{self, ColdRow};
use super::{block_on, ColdError, ColdStore};
use crate::event::{last_seq_of, BatchSource, LogBatch, Micros};
use crate::ids::TenantId;
use crate::storage::event_log::decode_batch;
use crate::storage::Storage;

/// Visits the tenant's events from `from_seq` on, in sequence order, across both tiers: the
/// committed segments up to the cold watermark (skipping those whose hour is outside `hours`,
/// when given), then the hot log. A cold event comes as a one-event batch with its batch-level
/// objects already merged. Blocking.
pub fn scan_tiers(
    storage: &Storage,
    store: Option<&ColdStore>,
    tenant: TenantId,
    from_seq: u64,
    hours: Option<(Micros, Micros)>,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<(), ColdError> {
    scan_tiers_from(
        storage, store, tenant, from_seq, from_seq, hours, &mut visit,
    )
}

/// [`scan_tiers`], reading the hot log only from `hot_from` on (entries before it are known to
/// hold nothing the caller wants; the cold tier is pruned by `hours` instead).
pub fn scan_tiers_from(
    storage: &Storage,
    store: Option<&ColdStore>,
    tenant: TenantId,
    from_seq: u64,
    hot_from: u64,
    hours: Option<(Micros, Micros)>,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<(), ColdError> {
    let mut next = from_seq.max(1);
    let mut hot_started = false;
    loop {
        let cold = cold_watermark(storage, tenant)?;
        if next <= cold {
            let Some(store) = store else {
                return Err(ColdError::Corrupt("the cold tier is not configured".into()));
            };
            if scan_cold(storage, store, tenant, next, cold, hours, &mut visit)?.is_break() {
                return Ok(());
            }
            next = cold + 1;
            continue;
        }
        if !hot_started {
            next = next.max(hot_from);
            hot_started = true;
        }
        let entries = storage.log().read(tenant, next, 256)?;
        // A flush that committed past `next` meanwhile may have deleted what this read missed:
        // read that range from its segments instead.
        if cold_watermark(storage, tenant)? >= next {
            continue;
        }
        if entries.is_empty() {
            return Ok(());
        }
        for (first_seq, value) in &entries {
            let batch = decode_batch(value)?;
            if visit(*first_seq, &batch).is_break() {
                return Ok(());
            }
            next = last_seq_of(*first_seq, batch.events.len()) + 1;
        }
    }
}

/// The committed events with sequences in `from_seq..=through`, in sequence order, as one-event
/// batches (see [`scan_tiers`]), skipping segments whose hour is outside `hours`. Blocking.
pub fn scan_cold(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    from_seq: u64,
    through: u64,
    hours: Option<(Micros, Micros)>,
    visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, ColdError> {
    let committed = segments(storage, tenant)?;
    scan_segments(store, tenant, committed, from_seq, through, hours, visit)
}

/// Visits every event of the tenant's newest published manifest (the cold tier as a reader
/// without the local database sees it: a cluster's ingest nodes), in sequence order, as
/// one-event batches, skipping segments whose hour is outside `hours`. Blocking.
pub fn scan_published(
    store: &ColdStore,
    tenant: TenantId,
    hours: Option<(Micros, Micros)>,
    visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, ColdError> {
    let published = super::manifest::newest_published(store, tenant)?;
    let through = published.cold_watermark;
    scan_segments(store, tenant, published.segments, 1, through, hours, visit)
}

/// The events of `segments` with sequences in `from_seq..=through`: see [`scan_cold`].
pub fn scan_segments(
    store: &ColdStore,
    tenant: TenantId,
    segments: Vec<Segment>,
    from_seq: u64,
    through: u64,
    hours: Option<(Micros, Micros)>,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, ColdError> {
    let mut pending: Vec<Segment> = segments
        .into_iter()
        .filter(|segment| {
            segment.last_seq >= from_seq
                && segment.first_seq <= through
                && hours.is_none_or(|(from, to)| segment.hour_end() > from && segment.hour < to)
        })
        .collect();
    // Opened from the end: the lowest first sequence last.
    pending.sort_unstable_by_key(|segment| Reverse(segment.first_seq));
    let range = from_seq..=through;
    let mut open: Vec<OpenSegment> = Vec::new();
    let mut heads: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut rows: Vec<Option<ColdRow>> = Vec::new();
    loop {
        // Every segment that may hold a row before the smallest head is open.
        while let Some(segment) = pending.pop_if(|next| {
            heads
                .peek()
                .is_none_or(|Reverse((seq, _))| next.first_seq <= *seq)
        }) {
            let mut reader = OpenSegment::open(store, tenant, &segment, range.clone())?;
            if let Some(row) = reader.next_row()? {
                heads.push(Reverse((row.seq, open.len())));
                rows.push(Some(row));
                open.push(reader);
            }
        }
        let Some(Reverse((_, index))) = heads.pop() else {
            return Ok(ControlFlow::Continue(()));
        };
        let row = rows[index]
            .take()
            .ok_or_else(|| ColdError::Corrupt("merge lost a row".into()))?;
        if let Some(next) = open[index].next_row()? {
            heads.push(Reverse((next.seq, index)));
            rows[index] = Some(next);
        }
        let seq = row.seq;
        let batch = LogBatch {
            batch_id: row.batch_id,
            received_at: row.event.received_at,
            source: BatchSource {
                endpoint: row.endpoint,
                client_ip: row.client_ip,
            },
            events: vec![row.event],
            shared: Default::default(),
            extras: row.extras.into_iter().collect(),
        };
        if visit(seq, &batch).is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
}

/// A segment that left `events/` after the read began, from `trash/`.
fn retired_copy(
    store: &ColdStore,
    tenant: TenantId,
    path: &str,
) -> Result<bytes::Bytes, ColdError> {
    let suffix = format!("/{path}");
    let copy = block_on(store.list(&format!("trash/tenant={tenant}/")))?
        .into_iter()
        .map(|object| object.location.to_string())
        .filter(|location| location.ends_with(&suffix))
        .max();
    match copy {
        Some(location) => block_on(store.get(&location)),
        None => Err(ColdError::Corrupt(format!(
            "segment {path} is neither under events/ nor in the trash"
        ))),
    }
}

/// A segment being read: its rows within a range, one decoded batch at a time.
struct OpenSegment {
    batches: Box<dyn Iterator<Item = Result<arrow_array::RecordBatch, ColdError>>>,
    rows: std::vec::IntoIter<ColdRow>,
    range: std::ops::RangeInclusive<u64>,
}

impl OpenSegment {
    fn open(
        store: &ColdStore,
        tenant: TenantId,
        segment: &Segment,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<OpenSegment, ColdError> {
        let bytes = match block_on(store.get(&segment.path)) {
            Ok(bytes) => bytes,
            // Superseded since the read began: it waits out the grace period in the trash.
            Err(ColdError::Store(object_store::Error::NotFound { .. })) => {
                retired_copy(store, tenant, &segment.path)?
            }
            Err(error) => return Err(error),
        };
        Ok(OpenSegment {
            batches: Box::new(segment::batches(bytes)?),
            rows: Vec::new().into_iter(),
            range,
        })
    }

    /// The next row within the range (rows are in sequence order).
    fn next_row(&mut self) -> Result<Option<ColdRow>, ColdError> {
        loop {
            for row in self.rows.by_ref() {
                if row.seq > *self.range.end() {
                    return Ok(None);
                }
                if row.seq >= *self.range.start() {
                    return Ok(Some(row));
                }
            }
            match self.batches.next() {
                Some(batch) => self.rows = segment::rows_of(&batch?)?.into_iter(),
                None => return Ok(None),
            }
        }
    }
}
