//! A flush: the tenant's oldest log entries become segments, one per hour of event time.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use super::manifest::{self, cold_watermark, Change, ChangeKind, Segment};
use super::segment::{ColdRow, SegmentWriter};
use super::{block_on, segment_path, ColdError, ColdStore, FailPoint, HOUR};
use crate::event::{last_seq_of, LogBatch, Micros};
use crate::ids::TenantId;
use crate::json::MergeBase;
use crate::storage::{dedup_ingest, rollups, Storage};

/// What a flush moved.
#[derive(Debug, Clone, PartialEq)]
pub struct FlushReport {
    pub through: u64,
    pub events: u64,
    pub segments: Vec<Segment>,
}

/// Which log entries a flush may move: those received before `received_before`, and those
/// whose sequences are all at most `through_seq`, whenever they were received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub received_before: Micros,
    pub through_seq: u64,
}

impl Due {
    /// Entries received before `received_before`.
    pub fn received_before(received_before: Micros) -> Due {
        Due {
            received_before,
            through_seq: 0,
        }
    }

    /// Both kinds of entry (a pass that serves several requests).
    pub fn union(self, other: Due) -> Due {
        Due {
            received_before: self.received_before.max(other.received_before),
            through_seq: self.through_seq.max(other.through_seq),
        }
    }
}

/// Moves the tenant's oldest log entries received before `received_before` to segments: see
/// [`flush_due`].
pub fn flush_once(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    received_before: Micros,
    max_events: usize,
    fail: Option<FailPoint>,
) -> Result<Option<FlushReport>, ColdError> {
    let due = Due::received_before(received_before);
    flush_due(storage, store, tenant, due, max_events, fail)
}

/// Moves the tenant's oldest log entries that are `due` to segments: at most `max_events`
/// events (at least one entry), never past the rollup or dedup watermark. `None` when nothing
/// is due. Blocking.
pub fn flush_due(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    due: Due,
    max_events: usize,
    fail: Option<FailPoint>,
) -> Result<Option<FlushReport>, ColdError> {
    let cold = cold_watermark(storage, tenant)?;
    let limit = rollups::watermark(storage, tenant)?.min(dedup_ingest::watermark(storage, tenant)?);
    let is_due = |batch: &LogBatch, last: u64| {
        (batch.received_at < due.received_before || last <= due.through_seq) && last <= limit
    };
    let Some(written) = write_segments(
        storage,
        store,
        (tenant, tenant, None),
        cold,
        max_events,
        is_due,
    )?
    else {
        return Ok(None);
    };
    if fail == Some(FailPoint::AfterWrite) {
        return Err(ColdError::Injected(FailPoint::AfterWrite));
    }
    let change = Change {
        kind: ChangeKind::Flush,
        added: written.segments,
        removed: Vec::new(),
        watermark: Some(written.through),
    };
    if manifest::commit(storage, store, tenant, &change)?.is_none() {
        // The tenant was deleted: what was written goes (its purge may have listed the
        // objects before they existed).
        for segment in &change.added {
            block_on(store.delete(&segment.path))?;
        }
        return Ok(None);
    }
    if fail == Some(FailPoint::AfterCommit) {
        return Err(ColdError::Injected(FailPoint::AfterCommit));
    }
    storage.log().delete_below(tenant, written.through + 1)?;
    Ok(Some(FlushReport {
        through: written.through,
        events: written.events,
        segments: change.added,
    }))
}

/// Segments written for a range of a log, not committed yet.
#[derive(Debug)]
pub struct Written {
    pub segments: Vec<Segment>,
    /// The first and last sequence they hold.
    pub first: u64,
    pub through: u64,
    pub events: u64,
}

/// Writes the log entries of `log_tenant` after sequence `after` as segments of `tenant` (the
/// same id, except on a process node, whose local ids differ from the tenants'), one per hour
/// of event time, their names tagged with `tag` if any (see `segment_path`): the entries in
/// order while `take(entry, its last sequence)` holds, at most `max_events` events (at least
/// one entry). The segments record `after + 1` as their flush's first sequence. `None` when no
/// entry is taken. Blocking.
pub fn write_segments(
    storage: &Storage,
    store: &ColdStore,
    (log_tenant, tenant, tag): (TenantId, TenantId, Option<&str>),
    after: u64,
    max_events: usize,
    mut take: impl FnMut(&LogBatch, u64) -> bool,
) -> Result<Option<Written>, ColdError> {
    let mut hours: BTreeMap<Micros, HourSegment> = BTreeMap::new();
    let (mut first, mut through, mut events) = (None, after, 0usize);
    let mut failed = None;
    crate::storage::event_log::scan(storage.log(), log_tenant, after + 1, |first_seq, batch| {
        let last = last_seq_of(first_seq, batch.events.len());
        let too_many = events > 0 && events + batch.events.len() > max_events;
        if too_many || !take(batch, last) {
            return ControlFlow::Break(());
        }
        first.get_or_insert(first_seq);
        for (seq, row) in (first_seq..).zip(rows_of(batch)) {
            let hour = row.event.timestamp.div_euclid(HOUR) * HOUR;
            let segment = match hours.entry(hour) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => match HourSegment::new() {
                    Ok(segment) => entry.insert(segment),
                    Err(error) => {
                        failed = Some(error);
                        return ControlFlow::Break(());
                    }
                },
            };
            if let Err(error) = segment.push(ColdRow { seq, ..row }) {
                failed = Some(error);
                return ControlFlow::Break(());
            }
        }
        through = last;
        events += batch.events.len();
        ControlFlow::Continue(())
    })?;
    if let Some(error) = failed {
        return Err(error);
    }
    let Some(first) = first else {
        return Ok(None);
    };
    let mut segments = Vec::with_capacity(hours.len());
    for (hour, segment) in hours {
        let (first, last) = (segment.first, segment.last);
        let (rows, bytes) = segment.finish()?;
        let path = segment_path(tenant, hour, first, last, tag);
        segments.push(Segment {
            path: path.clone(),
            flush_first: after + 1,
            flush_last: through,
            hour,
            first_seq: first,
            last_seq: last,
            rows,
            bytes: bytes.len() as u64,
        });
        block_on(store.put(&path, bytes))?;
    }
    Ok(Some(Written {
        segments,
        first,
        through,
        events: events as u64,
    }))
}

/// Rows kept before they are appended to a segment as one record batch.
const PENDING_ROWS: usize = 4096;

/// One hour's segment of a flush, written as its rows come: what it holds is the compressed
/// object so far, one row group being encoded, and at most [`PENDING_ROWS`] rows.
struct HourSegment {
    writer: SegmentWriter,
    pending: Vec<ColdRow>,
    first: u64,
    last: u64,
}

impl HourSegment {
    fn new() -> Result<HourSegment, ColdError> {
        Ok(HourSegment {
            writer: SegmentWriter::new()?,
            pending: Vec::with_capacity(PENDING_ROWS),
            first: 0,
            last: 0,
        })
    }

    /// Appends a row (rows come in sequence order).
    fn push(&mut self, row: ColdRow) -> Result<(), ColdError> {
        if self.pending.is_empty() && self.writer.rows() == 0 {
            self.first = row.seq;
        }
        self.last = row.seq;
        self.pending.push(row);
        if self.pending.len() >= PENDING_ROWS {
            self.writer.write_rows(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The rows and the finished object.
    fn finish(mut self) -> Result<(u64, bytes::Bytes), ColdError> {
        self.writer.write_rows(&self.pending)?;
        let rows = self.writer.rows();
        Ok((rows, self.writer.finish()?))
    }
}

/// The events of a log entry as rows (sequence numbers not yet set), with the batch-level
/// objects merged into each event's own (the event's members win).
pub(super) fn rows_of(batch: &LogBatch) -> impl Iterator<Item = ColdRow> + '_ {
    fn base(text: &Option<String>) -> Option<MergeBase<'_>> {
        text.as_deref().and_then(|t| MergeBase::parse(t).ok())
    }
    let (context, integrations) = (
        base(&batch.shared.context),
        base(&batch.shared.integrations),
    );
    batch.events.iter().enumerate().map(move |(index, event)| {
        let mut event = event.clone();
        if let Some(base) = &context {
            event.context = Some(base.merge(event.context.as_deref()));
        }
        if let Some(base) = &integrations {
            event.integrations = Some(base.merge(event.integrations.as_deref()));
        }
        ColdRow {
            seq: 0,
            batch_id: batch.batch_id,
            endpoint: batch.source.endpoint.clone(),
            client_ip: batch.source.client_ip.clone(),
            event,
            extras: batch.extras_of(index).cloned(),
        }
    })
}
