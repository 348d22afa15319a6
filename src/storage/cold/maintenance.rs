//! What keeps a tenant's cold tier in shape once segments exist: recovery after a crash, the
//! trash, raw-data retention, compaction of small segments, per-user erasure, and the purge of a
//! deleted tenant.
//!
//! Compaction, retention and erasure commit like a flush (see the module docs of
//! [`crate::storage::cold`]): new objects first, then the manifest change, then the superseded
//! objects move from `events/` to `trash/`, where they wait out the grace period so that a
//! running export never loses a file under it. A crash before the commit leaves new objects
//! that [`recover`] moves to the trash; a crash after it leaves superseded ones that it moves
//! there. One task at a time per tenant: the tenant's flusher runs them all.

use std::collections::{BTreeMap, HashSet};

use arrow_array::{Array, UInt64Array};

use super::manifest::{self, cold_watermark, segments, Change, ChangeKind, Published, Segment};
use super::segment::{self, SegmentWriter};
use super::{block_on, segment_path, ColdError, ColdStore};
use crate::event::{duration_micros, now_micros, Micros};
use crate::ids::TenantId;
use crate::storage::event_log::decode_batch;
use crate::storage::{meta, Storage, StorageError};

/// Brings a tenant's cold tier to a committed state: finishes the log deletion of the last
/// committed flush, moves objects the manifest does not name out of `events/` to `trash/`, and
/// deletes what waited in `trash/` longer than `grace`. Blocking; before any other cold task of
/// the tenant, and again after one failed.
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
    let committed: HashSet<String> = segments(storage, tenant)?
        .into_iter()
        .map(|segment| segment.path)
        .collect();
    trash_uncommitted(store, tenant, &committed)?;
    purge_trash(store, tenant, grace)?;
    Ok(())
}

/// Moves every object under the tenant's `events/` that is not in `committed` to `trash/`;
/// returns how many. Blocking.
pub fn trash_uncommitted(
    store: &ColdStore,
    tenant: TenantId,
    committed: &HashSet<String>,
) -> Result<usize, ColdError> {
    let now = now_micros();
    let mut moved = 0;
    let mut present = HashSet::new();
    for object in block_on(store.list(&format!("events/tenant={tenant}/")))? {
        let path = object.location.to_string();
        if committed.contains(&path) {
            present.insert(path);
        } else {
            tracing::warn!(%tenant, path, "moving an object the manifest does not name out of events/");
            block_on(store.rename(&path, &trash_path(tenant, now, &path)))?;
            moved += 1;
        }
    }
    let missing: Vec<&String> = committed.difference(&present).collect();
    if !missing.is_empty() {
        restore_from_trash(store, tenant, &missing)?;
    }
    Ok(moved)
}

/// Moves committed objects that are in the trash back to `events/` (a commit that landed
/// after a recovery had moved its objects there). Blocking.
fn restore_from_trash(
    store: &ColdStore,
    tenant: TenantId,
    missing: &[&String],
) -> Result<(), ColdError> {
    let trashed: Vec<String> = block_on(store.list(&format!("trash/tenant={tenant}/")))?
        .into_iter()
        .map(|object| object.location.to_string())
        .collect();
    for path in missing {
        let suffix = format!("/{path}");
        let copy = trashed.iter().filter(|t| t.ends_with(&suffix)).max();
        match copy {
            Some(copy) => {
                tracing::warn!(%tenant, path, "moving a committed object back from the trash");
                block_on(store.rename(copy, path))?;
            }
            None => tracing::error!(%tenant, path, "a committed segment is missing"),
        }
    }
    Ok(())
}

/// `trash/tenant=<id>/<moved at, µs>/<path>`.
fn trash_path(tenant: TenantId, moved_at: Micros, path: &str) -> String {
    format!("trash/tenant={tenant}/{moved_at}/{path}")
}

/// Moves committed-and-superseded segments to the trash.
fn retire(store: &ColdStore, tenant: TenantId, superseded: &[Segment]) -> Result<(), ColdError> {
    let now = now_micros();
    for segment in superseded {
        block_on(store.rename(&segment.path, &trash_path(tenant, now, &segment.path)))?;
    }
    Ok(())
}

/// Deletes what waited in the tenant's trash longer than `grace`; returns how many objects.
/// Blocking.
pub fn purge_trash(
    store: &ColdStore,
    tenant: TenantId,
    grace: std::time::Duration,
) -> Result<usize, ColdError> {
    let now = now_micros();
    let grace = duration_micros(grace);
    let mut removed = 0;
    for object in block_on(store.list(&format!("trash/tenant={tenant}/")))? {
        let path = object.location.to_string();
        let moved_at = path
            .split('/')
            .nth(2)
            .and_then(|at| at.parse::<Micros>().ok());
        if moved_at.is_some_and(|at| at.saturating_add(grace) <= now) {
            block_on(store.delete(&path))?;
            removed += 1;
        }
    }
    manifest::prune_published(store, tenant, grace)?;
    Ok(removed)
}

/// What a retention pass, a compaction or an erasure changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Segments taken out of `events/`.
    pub removed_segments: u64,
    /// Segments written (merged or rewritten).
    pub written_segments: u64,
    /// Events that left the cold tier (retention, erasure).
    pub removed_events: u64,
}

/// Raw-data retention: removes every segment whose hour ended before `keep_after`. Blocking.
pub fn enforce_retention(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    keep_after: Micros,
) -> Result<MaintenanceReport, ColdError> {
    let expired: Vec<Segment> = ledger
        .segments(tenant)?
        .into_iter()
        .filter(|segment| segment.hour_end() <= keep_after)
        .collect();
    if expired.is_empty() {
        return Ok(MaintenanceReport::default());
    }
    let report = MaintenanceReport {
        removed_segments: expired.len() as u64,
        written_segments: 0,
        removed_events: expired.iter().map(|s| s.rows).sum(),
    };
    if swap(
        ledger,
        store,
        tenant,
        ChangeKind::Retention,
        Vec::new(),
        expired,
    )? {
        Ok(report)
    } else {
        Ok(MaintenanceReport::default())
    }
}

/// Which segments a compaction merges.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// A segment with fewer rows is small.
    pub small_rows: u64,
    /// Most rows of a merged segment.
    pub max_rows: u64,
    /// Fewest small segments merged at once: each merge rewrites the segments it takes, so
    /// waiting for several keeps an hour that keeps receiving late events from being rewritten
    /// at every flush.
    pub min_segments: usize,
    /// Only hours that ended before this are compacted (later ones still receive flushes).
    pub settled_before: Micros,
}

impl CompactionPolicy {
    /// The `cold.compact_*` settings, for hours that ended before `settled_before`.
    pub fn new(settings: &crate::config::ColdConfig, settled_before: Micros) -> CompactionPolicy {
        CompactionPolicy {
            small_rows: settings.compact_below_rows,
            max_rows: settings.compact_max_rows,
            min_segments: settings.compact_min_segments,
            settled_before,
        }
    }
}

/// The maintenance that follows a tenant's flushes (its flusher's, or a cluster owner's):
/// raw-data retention of what was received `raw_retention` before `now` (zero keeps
/// everything), then compaction by `policy`; what each removed or wrote is logged and counted.
/// Blocking.
pub fn retain_and_compact(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    raw_retention: std::time::Duration,
    policy: CompactionPolicy,
    now: Micros,
) -> Result<(), ColdError> {
    let label = tenant.to_string();
    if !raw_retention.is_zero() {
        let keep_after = now.saturating_sub(duration_micros(raw_retention));
        let removed = enforce_retention(ledger, store, tenant, keep_after)?;
        if removed.removed_segments > 0 {
            tracing::info!(
                %tenant,
                segments = removed.removed_segments,
                events = removed.removed_events,
                "raw-data retention removed expired segments"
            );
            crate::telemetry::cold_maintained(
                &label,
                "retention",
                removed.removed_segments,
                0,
                removed.removed_events,
            );
        }
    }
    let compacted = compact(ledger, store, tenant, policy)?;
    if compacted.written_segments > 0 {
        tracing::info!(
            %tenant,
            merged = compacted.removed_segments,
            into = compacted.written_segments,
            "compacted small cold segments"
        );
        crate::telemetry::cold_maintained(
            &label,
            "compaction",
            compacted.removed_segments,
            compacted.written_segments,
            0,
        );
    }
    Ok(())
}

/// Merges runs of small segments of the same hour (adjacent in sequence order) into one
/// segment each. Blocking; holds one record batch and the merged object at a time.
pub fn compact(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    policy: CompactionPolicy,
) -> Result<MaintenanceReport, ColdError> {
    let mut hours: BTreeMap<Micros, Vec<Segment>> = BTreeMap::new();
    for segment in ledger.segments(tenant)? {
        if segment.hour_end() <= policy.settled_before {
            hours.entry(segment.hour).or_default().push(segment);
        }
    }
    let mut report = MaintenanceReport::default();
    for (_, mut list) in hours {
        // Segments of one hour hold disjoint sequence ranges: merging adjacent ones keeps them
        // disjoint, and writing them one after the other keeps the rows in order.
        list.sort_unstable_by_key(|segment| segment.first_seq);
        let mut runs: Vec<Vec<Segment>> = Vec::new();
        let (mut run, mut rows) = (Vec::new(), 0);
        for segment in list {
            let small = segment.rows < policy.small_rows;
            if !small || rows + segment.rows > policy.max_rows {
                runs.push(std::mem::take(&mut run));
                rows = 0;
            }
            if small {
                rows += segment.rows;
                run.push(segment);
            }
        }
        runs.push(run);
        for run in runs
            .iter()
            .filter(|run| run.len() >= policy.min_segments.max(2))
        {
            if merge(ledger, store, tenant, run)? {
                report.removed_segments += run.len() as u64;
                report.written_segments += 1;
            }
        }
    }
    Ok(report)
}

/// Writes one segment holding the rows of `run` (same hour, in sequence order) and swaps it in;
/// false for a deleted tenant.
fn merge(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    run: &[Segment],
) -> Result<bool, ColdError> {
    let (first, last) = (&run[0], &run[run.len() - 1]);
    let mut writer = SegmentWriter::new()?;
    for segment in run {
        for batch in segment::batches(block_on(store.get(&segment.path))?)? {
            writer.write_batch(&batch?)?;
        }
    }
    let rows = writer.rows();
    let bytes = writer.finish()?;
    let tag = ledger.tag(None);
    let path = segment_path(
        tenant,
        first.hour,
        first.first_seq,
        last.last_seq,
        tag.as_deref(),
    );
    let merged = Segment {
        path: path.clone(),
        flush_first: first.flush_first,
        flush_last: run
            .iter()
            .map(|s| s.flush_last)
            .max()
            .unwrap_or(last.flush_last),
        hour: first.hour,
        first_seq: first.first_seq,
        last_seq: last.last_seq,
        rows,
        bytes: bytes.len() as u64,
    };
    block_on(store.put(&path, bytes))?;
    swap(
        ledger,
        store,
        tenant,
        ChangeKind::Compaction,
        vec![merged],
        run.to_vec(),
    )
}

/// The manifest a change commits to.
pub enum Ledger<'a> {
    /// The node's own, in `meta` (published after each change).
    Local(&'a Storage),
    /// The newest published one, where a cluster's process nodes keep it: each change creates
    /// the next object only if no other writer did (see [`manifest::publish_next`]), and moves
    /// `state` on. `writer` (the owner's lease token) tags the names of the objects it writes,
    /// so two owners never write one name, and one that lost a commit deletes only its own.
    Published {
        state: &'a mut Published,
        writer: u64,
    },
}

impl Ledger<'_> {
    fn segments(&self, tenant: TenantId) -> Result<Vec<Segment>, ColdError> {
        match self {
            Ledger::Local(storage) => Ok(segments(storage, tenant)?),
            Ledger::Published { state, .. } => Ok(state.segments.clone()),
        }
    }

    /// The number the next change will have.
    fn next_number(&self, tenant: TenantId) -> Result<u64, ColdError> {
        match self {
            Ledger::Local(storage) => Ok(manifest::next_number(storage, tenant)?),
            Ledger::Published { state, .. } => Ok(state.number + 1),
        }
    }

    /// The tag of an object this ledger's writer writes, for a rewrite by change `rewrite` or
    /// a new range.
    fn tag(&self, rewrite: Option<u64>) -> Option<String> {
        match (self, rewrite) {
            (Ledger::Local(_), rewrite) => rewrite.map(|n| format!("r{n}")),
            (Ledger::Published { writer, .. }, None) => Some(format!("w{writer}")),
            (Ledger::Published { writer, .. }, Some(n)) => Some(format!("r{n}-w{writer}")),
        }
    }

    /// Commits a change: true when committed, false for a deleted tenant (nothing is). A
    /// published ledger that another writer moved on is an error ([`ColdError::Conflict`]).
    fn commit(
        &mut self,
        store: &ColdStore,
        tenant: TenantId,
        change: &Change,
    ) -> Result<bool, ColdError> {
        match self {
            Ledger::Local(storage) => {
                Ok(manifest::commit(storage, store, tenant, change)?.is_some())
            }
            Ledger::Published { state, .. } => {
                match manifest::publish_next(store, tenant, state, change)? {
                    Some(next) => {
                        **state = next;
                        Ok(true)
                    }
                    None => {
                        manifest::discard_unpublished(store, tenant, &change.added)?;
                        Err(ColdError::Conflict(format!(
                            "another writer published change {} of tenant {tenant} first",
                            state.number + 1
                        )))
                    }
                }
            }
        }
    }
}

/// Commits `added` in place of `removed` and retires the removed objects; false, with the added
/// objects deleted, when the tenant was deleted meanwhile (its purge removes everything else).
fn swap(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    kind: ChangeKind,
    added: Vec<Segment>,
    removed: Vec<Segment>,
) -> Result<bool, ColdError> {
    let change = Change {
        kind,
        added,
        removed,
        watermark: None,
    };
    if !ledger.commit(store, tenant, &change)? {
        for segment in &change.added {
            block_on(store.delete(&segment.path))?;
        }
        return Ok(false);
    }
    retire(store, tenant, &change.removed)?;
    Ok(true)
}

/// Removes every cold event whose `userId` or `anonymousId` is `user`: each segment whose bloom
/// filters may hold the user is read, and rewritten without those rows if it held any (removed
/// if nothing is left). Blocking.
pub fn erase_user(
    ledger: &mut Ledger<'_>,
    store: &ColdStore,
    tenant: TenantId,
    user: &str,
) -> Result<MaintenanceReport, ColdError> {
    let mut report = MaintenanceReport::default();
    for old in ledger.segments(tenant)? {
        let bytes = block_on(store.get(&old.path))?;
        if !segment::may_hold_user(bytes.clone(), user)? {
            continue;
        }
        let mut writer = SegmentWriter::new()?;
        let (mut removed, mut seqs) = (0, None::<(u64, u64)>);
        for batch in segment::batches(bytes)? {
            let (kept, dropped) = segment::without_user(&batch?, user)?;
            removed += dropped as u64;
            if kept.num_rows() == 0 {
                continue;
            }
            let seq = kept
                .column_by_name("seq")
                .and_then(|array| array.as_any().downcast_ref::<UInt64Array>().cloned())
                .ok_or_else(|| ColdError::Corrupt("segment has no column `seq`".into()))?;
            let (first, last) = (seq.value(0), seq.value(seq.len() - 1));
            seqs = Some(seqs.map_or((first, last), |(f, _)| (f, last)));
            writer.write_batch(&kept)?;
        }
        if removed == 0 {
            continue;
        }
        let mut added = Vec::new();
        if let Some((first, last)) = seqs {
            let rows = writer.rows();
            let bytes = writer.finish()?;
            // Tagged with the change's number: the range may equal the replaced object's.
            let tag = ledger.tag(Some(ledger.next_number(tenant)?));
            let path = segment_path(tenant, old.hour, first, last, tag.as_deref());
            added.push(Segment {
                path: path.clone(),
                first_seq: first,
                last_seq: last,
                rows,
                bytes: bytes.len() as u64,
                ..old.clone()
            });
            block_on(store.put(&path, bytes))?;
        }
        let written = added.len() as u64;
        if !swap(ledger, store, tenant, ChangeKind::Erasure, added, vec![old])? {
            break;
        }
        report.written_segments += written;
        report.removed_segments += 1;
        report.removed_events += removed;
    }
    Ok(report)
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
    for kind in [meta::kind::COLD_WATERMARK, meta::kind::MANIFEST_NUMBER] {
        batch.remove(&storage.meta, meta::tenant_key(kind, tenant));
    }
    batch
        .commit()
        .map_err(StorageError::engine("removing a cold manifest"))?;
    storage.persist(true)?;
    Ok(removed)
}
