//! The cold tier: closed ranges of a tenant's log become Parquet segments on object storage.
//!
//! Layout under the store's root: `events/tenant=<id>/date=YYYY-MM-DD/hour=HH/<first seq>-<last
//! seq>.parquet` (Hive style, by corrected event time), `manifest/tenant=<id>/` (the published
//! manifest, newest first) and `trash/tenant=<id>/` (objects that left `events/`, deleted after
//! the grace period).
//!
//! A flush ([`flush_once`]) commits in this order, and a crash between any two steps loses and
//! duplicates nothing:
//! 1. write the segments under `events/`, under names that depend only on the flushed range;
//! 2. record them in the manifest with the tenant's cold watermark (the last flushed sequence),
//!    in one atomic `meta` write, then publish that change to `manifest/`;
//! 3. delete the flushed range from the hot log.
//!
//! Before 2 the segments are not committed: [`recover`], which runs before the tenant's first
//! flush, moves every object under the tenant's `events/` that the manifest does not name to
//! `trash/`, so `events/` holds exactly the committed segments. After 2 the range is cold;
//! `recover` finishes 3. Readers ([`scan_tiers`]) switch from the cold tier to the hot log at
//! the watermark and re-check it after each read of the hot log, so a flush committing under
//! them never hides a range.

pub mod segment;
pub mod store;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::event::{format_timestamp, last_seq_of, now_micros, BatchSource, LogBatch, Micros};
use crate::ids::TenantId;
use crate::json::MergeBase;
use crate::storage::event_log::decode_batch;
use crate::storage::{codec, dedup_ingest, meta, rollups, Storage, StorageError};

use self::segment::ColdRow;
pub use self::store::ColdStore;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ColdError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("corrupt cold data: {0}")]
    Corrupt(String),
    /// A failure injected by a test at a step of the commit protocol.
    #[error("injected failure {0:?}")]
    Injected(FailPoint),
}

/// Where a test makes a flush fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// The segments are written, nothing is committed.
    AfterWrite,
    /// The manifest and watermark are committed, the log range is still there.
    AfterCommit,
}

/// A committed segment, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The object's path under the store's root.
    pub path: String,
    /// The flush that wrote it: every segment of a flush covers part of this range.
    pub flush_first: u64,
    pub flush_last: u64,
    /// The hour (start, by event time) of its events.
    pub hour: Micros,
    pub first_seq: u64,
    pub last_seq: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// A runtime for the object store's futures, driven by the blocking threads that flush and
/// read (the store's own work runs on its blocking pool).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("cold-io")
            .build()
            .unwrap_or_else(|error| panic!("cannot build the cold tier's runtime: {error}"))
    })
}

/// Runs an object-store future to completion. Blocking; never from async code.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

fn segment_key(tenant: TenantId, flush_first: u64, hour: Micros) -> Vec<u8> {
    let mut key = meta::tenant_key(meta::kind::SEGMENT, tenant).to_vec();
    key.extend_from_slice(&flush_first.to_be_bytes());
    key.extend_from_slice(&((hour as u64) ^ (1 << 63)).to_be_bytes());
    key
}

/// The tenant's last flushed sequence (0: nothing is cold).
pub fn cold_watermark(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    meta::get_u64(storage, meta::kind::COLD_WATERMARK, tenant)
}

/// The tenant's committed segments, in flush order, then by hour.
pub fn segments(storage: &Storage, tenant: TenantId) -> Result<Vec<Segment>, StorageError> {
    let prefix = meta::tenant_key(meta::kind::SEGMENT, tenant);
    let mut out = Vec::new();
    for guard in storage.meta.prefix(prefix) {
        let (_key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading the cold manifest"))?;
        out.push(codec::decode(&value).map_err(|source| StorageError::Codec {
            keyspace: "meta",
            source,
        })?);
    }
    Ok(out)
}

/// Records a flush's segments and the new watermark in one atomic write, durably.
fn commit_flush(
    storage: &Storage,
    tenant: TenantId,
    added: &[Segment],
    watermark: u64,
) -> Result<(), StorageError> {
    let mut batch = storage.batch();
    for segment in added {
        let value = codec::encode(segment).map_err(|source| StorageError::Codec {
            keyspace: "meta",
            source,
        })?;
        batch.insert(
            &storage.meta,
            segment_key(tenant, segment.flush_first, segment.hour),
            value,
        );
    }
    batch.insert(
        &storage.meta,
        meta::tenant_key(meta::kind::COLD_WATERMARK, tenant),
        watermark.to_be_bytes(),
    );
    batch
        .commit()
        .map_err(StorageError::engine("committing a flush"))?;
    storage.persist(true)
}

/// The path of a segment.
fn segment_path(tenant: TenantId, hour: Micros, first: u64, last: u64) -> String {
    let at = format_timestamp(hour);
    let (date, hour) = (
        at.get(..10).unwrap_or("0000-00-00"),
        at.get(11..13).unwrap_or("00"),
    );
    format!("events/tenant={tenant}/date={date}/hour={hour}/{first}-{last}.parquet")
}

const HOUR: Micros = 3_600_000_000;

/// What a flush moved.
#[derive(Debug, Clone, PartialEq)]
pub struct FlushReport {
    pub through: u64,
    pub events: u64,
    pub segments: Vec<Segment>,
}

/// Moves the tenant's oldest log entries received before `received_before` to segments: at most
/// `max_events` events (at least one entry), never past the rollup or dedup watermark. `None`
/// when nothing is due. Blocking.
pub fn flush_once(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    received_before: Micros,
    max_events: usize,
    fail: Option<FailPoint>,
) -> Result<Option<FlushReport>, ColdError> {
    let cold = cold_watermark(storage, tenant)?;
    let limit = rollups::watermark(storage, tenant)?.min(dedup_ingest::watermark(storage, tenant)?);
    let mut hours: BTreeMap<Micros, Vec<ColdRow>> = BTreeMap::new();
    let (mut through, mut events) = (cold, 0usize);
    crate::storage::event_log::scan(storage.log(), tenant, cold + 1, |first_seq, batch| {
        let last = last_seq_of(first_seq, batch.events.len());
        let too_many = events > 0 && events + batch.events.len() > max_events;
        if batch.received_at >= received_before || last > limit || too_many {
            return ControlFlow::Break(());
        }
        for (seq, row) in (first_seq..).zip(rows_of(batch)) {
            let hour = row.event.timestamp.div_euclid(HOUR) * HOUR;
            hours.entry(hour).or_default().push(ColdRow { seq, ..row });
        }
        through = last;
        events += batch.events.len();
        ControlFlow::Continue(())
    })?;
    if events == 0 {
        return Ok(None);
    }
    let mut added = Vec::with_capacity(hours.len());
    for (hour, rows) in &hours {
        let (first, last) = (rows[0].seq, rows[rows.len() - 1].seq);
        let bytes = segment::encode(rows)?;
        let path = segment_path(tenant, *hour, first, last);
        added.push(Segment {
            path: path.clone(),
            flush_first: cold + 1,
            flush_last: through,
            hour: *hour,
            first_seq: first,
            last_seq: last,
            rows: rows.len() as u64,
            bytes: bytes.len() as u64,
        });
        block_on(store.put(&path, bytes))?;
    }
    if fail == Some(FailPoint::AfterWrite) {
        return Err(ColdError::Injected(FailPoint::AfterWrite));
    }
    // A tenant deleted meanwhile: nothing is committed (its purge deletes the objects).
    if meta::is_tombstoned(storage, tenant)? {
        return Ok(None);
    }
    commit_flush(storage, tenant, &added, through)?;
    publish(store, tenant, through, &added);
    if fail == Some(FailPoint::AfterCommit) {
        return Err(ColdError::Injected(FailPoint::AfterCommit));
    }
    storage.log().delete_below(tenant, through + 1)?;
    Ok(Some(FlushReport {
        through,
        events: events as u64,
        segments: added,
    }))
}

/// The events of a log entry as rows (sequence numbers not yet set), with the batch-level
/// objects merged into each event's own (the event's members win).
fn rows_of(batch: &LogBatch) -> impl Iterator<Item = ColdRow> + '_ {
    fn base(text: &Option<String>) -> Option<MergeBase<'_>> {
        text.as_deref().and_then(|t| MergeBase::parse(t).ok())
    }
    let (context, integrations) = (
        base(&batch.shared.context),
        base(&batch.shared.integrations),
    );
    batch.events.iter().map(move |event| {
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
        }
    })
}

/// Publishes a committed change to `manifest/` (create-only, named so that listing sorts
/// newest first). A failure is logged: the local manifest is authoritative, and the next
/// commit publishes the whole state again.
fn publish(store: &ColdStore, tenant: TenantId, watermark: u64, added: &[Segment]) {
    let state = serde_json::json!({
        "tenant": tenant.to_string(),
        "cold_watermark": watermark,
        "committed_at": format_timestamp(now_micros()),
        "added": added,
    });
    let path = format!("manifest/tenant={tenant}/{:020}.json", u64::MAX - watermark);
    let body = bytes::Bytes::from(state.to_string());
    if let Err(error) = block_on(store.put_new(&path, body)) {
        tracing::warn!(%tenant, %error, "publishing the cold manifest failed");
    }
}

/// Brings a tenant's cold tier to a committed state: finishes the log deletion of the last
/// committed flush, moves objects the manifest does not name out of `events/` to `trash/`, and
/// deletes what waited in `trash/` longer than `grace`. Blocking; before the tenant's flushes.
pub fn recover(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    grace: std::time::Duration,
) -> Result<(), ColdError> {
    let cold = cold_watermark(storage, tenant)?;
    if cold > 0 {
        storage.log().delete_below(tenant, cold + 1)?;
    }
    let committed: std::collections::HashSet<String> = segments(storage, tenant)?
        .into_iter()
        .map(|segment| segment.path)
        .collect();
    let now = now_micros();
    for object in block_on(store.list(&format!("events/tenant={tenant}/")))? {
        let path = object.location.to_string();
        if !committed.contains(&path) {
            tracing::warn!(%tenant, path, "moving an uncommitted segment out of events/");
            block_on(store.rename(&path, &format!("trash/tenant={tenant}/{now}/{path}")))?;
        }
    }
    let grace = Micros::try_from(grace.as_micros()).unwrap_or(Micros::MAX);
    for object in block_on(store.list(&format!("trash/tenant={tenant}/")))? {
        let path = object.location.to_string();
        let moved_at = path
            .split('/')
            .nth(2)
            .and_then(|at| at.parse::<Micros>().ok());
        if moved_at.is_some_and(|at| at.saturating_add(grace) <= now) {
            block_on(store.delete(&path))?;
        }
    }
    Ok(())
}

/// When the tenant's oldest entry still in the hot log was received, if it has one. Blocking.
pub fn oldest_hot_received_at(
    storage: &Storage,
    tenant: TenantId,
) -> Result<Option<Micros>, StorageError> {
    let from = cold_watermark(storage, tenant)? + 1;
    let oldest = storage.log().read(tenant, from, 1)?;
    oldest
        .first()
        .map(|(_, value)| decode_batch(value).map(|batch| batch.received_at))
        .transpose()
}

/// Deletes every cold object of a deleted tenant (segments, published manifest, trash) and then
/// its manifest records. Blocking; once nothing more is flushed for the tenant.
pub fn purge_tenant(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
) -> Result<u64, ColdError> {
    let mut removed = 0;
    for prefix in ["events", "manifest", "trash"] {
        for object in block_on(store.list(&format!("{prefix}/tenant={tenant}/")))? {
            block_on(store.delete(object.location.as_ref()))?;
            removed += 1;
        }
    }
    let mut batch = storage.batch();
    for guard in storage
        .meta
        .prefix(meta::tenant_key(meta::kind::SEGMENT, tenant))
    {
        let key = guard
            .key()
            .map_err(StorageError::engine("reading the cold manifest"))?;
        batch.remove(&storage.meta, key);
    }
    batch.remove(
        &storage.meta,
        meta::tenant_key(meta::kind::COLD_WATERMARK, tenant),
    );
    batch
        .commit()
        .map_err(StorageError::engine("removing a cold manifest"))?;
    storage.persist(true)?;
    Ok(removed)
}

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

/// The committed events with sequences in `from_seq..=through`, flush by flush, each flush's
/// rows in sequence order, as one-event batches (see [`scan_tiers`]). A flush's rows are
/// consecutive sequences. Blocking.
pub fn scan_cold(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    from_seq: u64,
    through: u64,
    hours: Option<(Micros, Micros)>,
    mut visit: impl FnMut(u64, &LogBatch) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, ColdError> {
    let mut flushes: BTreeMap<u64, Vec<Segment>> = BTreeMap::new();
    for segment in segments(storage, tenant)? {
        let wanted = hours.is_none_or(|(from, to)| segment.hour + HOUR > from && segment.hour < to);
        if segment.flush_last >= from_seq && segment.flush_first <= through && wanted {
            flushes
                .entry(segment.flush_first)
                .or_default()
                .push(segment);
        }
    }
    for (_, flush) in flushes {
        let mut rows = Vec::new();
        for segment in &flush {
            let bytes = block_on(store.get(&segment.path))?;
            rows.extend(
                segment::decode(bytes)?
                    .into_iter()
                    .filter(|row| row.seq >= from_seq && row.seq <= through),
            );
        }
        rows.sort_unstable_by_key(|row| row.seq);
        for row in rows {
            let batch = LogBatch {
                batch_id: row.batch_id,
                received_at: row.event.received_at,
                source: BatchSource {
                    endpoint: row.endpoint,
                    client_ip: row.client_ip,
                },
                events: vec![row.event],
                shared: Default::default(),
            };
            if visit(row.seq, &batch).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
    }
    Ok(ControlFlow::Continue(()))
}

#[cfg(test)]
mod tests;
