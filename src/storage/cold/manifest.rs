//! The manifest: a tenant's committed segments and cold watermark, in `meta`, and its published
//! copy under `manifest/` in the object store.
//!
//! Every change (a flush, a compaction, a retention pass, an erasure) commits in one atomic
//! `meta` write: the segments it adds and removes, the cold watermark, and the change's number.
//! It is then published as `manifest/tenant=<id>/<u64::MAX - number, 20 digits>.json`, created
//! only if absent, so a listing sorts newest first; each object holds the whole list of current
//! segments, so the newest one alone tells a reader without the local database what `events/`
//! holds. On a single node the local manifest is authoritative: a failed publication is logged,
//! and the next change publishes the whole state again. A cluster's process nodes keep no
//! manifest of their own: there the published one is authoritative, and a change commits by
//! creating its object ([`publish_next`]), which only one of two writers of a number can do.

use serde::{Deserialize, Serialize};

use super::{block_on, ColdError, ColdStore, HOUR};
use crate::event::{format_timestamp, now_micros, Micros};
use crate::ids::TenantId;
use crate::storage::{codec, meta, Storage, StorageError};

/// A committed segment, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The object's path under the store's root.
    pub path: String,
    /// The sequence range of the flushes whose events it holds: the flush that wrote it, or the
    /// first and last of those whose segments a compaction merged. Together with `hour`, the
    /// first names the segment in the manifest.
    pub flush_first: u64,
    pub flush_last: u64,
    /// The hour (start, by event time) of its events.
    pub hour: Micros,
    pub first_seq: u64,
    pub last_seq: u64,
    pub rows: u64,
    pub bytes: u64,
}

impl Segment {
    /// The end of its hour.
    pub fn hour_end(&self) -> Micros {
        self.hour + HOUR
    }
}

/// What a change did, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Flush,
    Compaction,
    Retention,
    Erasure,
}

/// One commit to the manifest.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    pub added: Vec<Segment>,
    pub removed: Vec<Segment>,
    /// The new cold watermark (a flush), or `None` to keep it.
    pub watermark: Option<u64>,
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

/// The tenant's committed segments, by first flush, then by hour.
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

/// The number the tenant's next change will have. Numbers grow, and stay above the cold
/// watermark, which named the published objects of data dirs from before numbers.
pub fn next_number(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let watermark = cold_watermark(storage, tenant)?;
    Ok(meta::get_u64(storage, meta::kind::MANIFEST_NUMBER, tenant)?.max(watermark) + 1)
}

/// Commits a change in one atomic, durable `meta` write, then publishes it. Returns the
/// change's number, or `None` for a deleted tenant: nothing is committed (its purge removes
/// what it had; the caller removes the objects it wrote). Blocking; under the tenant's lock
/// (`ColdStore::tenant_lock`), which the purge takes too, so no commit lands after a purge.
pub fn commit(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    change: &Change,
) -> Result<Option<u64>, ColdError> {
    if meta::is_tombstoned(storage, tenant)? {
        return Ok(None);
    }
    let watermark = cold_watermark(storage, tenant)?;
    let number = next_number(storage, tenant)?;
    let mut batch = storage.batch();
    let added: std::collections::HashSet<Vec<u8>> = (change.added.iter())
        .map(|segment| segment_key(tenant, segment.flush_first, segment.hour))
        .collect();
    for segment in &change.removed {
        let key = segment_key(tenant, segment.flush_first, segment.hour);
        if !added.contains(&key) {
            batch.remove(&storage.meta, key);
        }
    }
    for segment in &change.added {
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
    let watermark = change.watermark.unwrap_or(watermark);
    for (kind, value) in [
        (meta::kind::COLD_WATERMARK, watermark),
        (meta::kind::MANIFEST_NUMBER, number),
    ] {
        batch.insert(
            &storage.meta,
            meta::tenant_key(kind, tenant),
            value.to_be_bytes(),
        );
    }
    batch
        .commit()
        .map_err(StorageError::engine("committing a cold manifest change"))?;
    storage.persist(true)?;
    publish(storage, store, tenant, number, watermark, change);
    Ok(Some(number))
}

fn publish(
    storage: &Storage,
    store: &ColdStore,
    tenant: TenantId,
    number: u64,
    watermark: u64,
    change: &Change,
) {
    let current = match segments(storage, tenant) {
        Ok(current) => current,
        Err(error) => {
            tracing::warn!(%tenant, %error, "publishing the cold manifest failed");
            return;
        }
    };
    let (path, body) = published_object(tenant, number, watermark, change, &current);
    if let Err(error) = block_on(store.put_new(&path, body)) {
        tracing::warn!(%tenant, %error, "publishing the cold manifest failed");
    }
}

/// The object that publishes change `number` and the state after it.
fn published_object(
    tenant: TenantId,
    number: u64,
    watermark: u64,
    change: &Change,
    current: &[Segment],
) -> (String, bytes::Bytes) {
    let state = serde_json::json!({
        "tenant": tenant.to_string(),
        "number": number,
        "cold_watermark": watermark,
        "committed_at": format_timestamp(now_micros()),
        "change": {
            "kind": change.kind,
            "added": change.added,
            "removed": change.removed,
        },
        "segments": current,
    });
    let path = format!("{}{:020}.json", prefix(tenant), u64::MAX - number);
    (path, bytes::Bytes::from(state.to_string()))
}

/// A tenant's state as its newest published manifest has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Published {
    /// The change's number (0: nothing published yet).
    pub number: u64,
    pub cold_watermark: u64,
    pub segments: Vec<Segment>,
}

/// The tenant's newest published manifest (the empty state when there is none). Blocking.
pub fn newest_published(store: &ColdStore, tenant: TenantId) -> Result<Published, ColdError> {
    // Names sort newest first, and pruning never removes the newest.
    let newest = block_on(store.list(&prefix(tenant)))?
        .into_iter()
        .map(|object| object.location.to_string())
        .filter(|path| path.ends_with(".json"))
        .min();
    let Some(path) = newest else {
        return Ok(Published::default());
    };
    let body = block_on(store.get(&path))?;
    serde_json::from_slice(&body)
        .map_err(|error| ColdError::Corrupt(format!("published manifest {path}: {error}")))
}

/// Commits a change where the published manifest is the only one (a cluster's process nodes):
/// creates the object of the number after `previous`'s only if no other writer did. Returns
/// the state after the change, or `None` when another writer published that number first
/// (nothing is committed; the caller reads the newest state again). Blocking.
pub fn publish_next(
    store: &ColdStore,
    tenant: TenantId,
    previous: &Published,
    change: &Change,
) -> Result<Option<Published>, ColdError> {
    let removed: std::collections::HashSet<(u64, Micros)> = (change.removed.iter())
        .map(|segment| (segment.flush_first, segment.hour))
        .collect();
    let mut current: Vec<Segment> = (previous.segments.iter())
        .filter(|segment| !removed.contains(&(segment.flush_first, segment.hour)))
        .cloned()
        .collect();
    current.extend(change.added.iter().cloned());
    current.sort_by_key(|segment| (segment.flush_first, segment.hour));
    let number = previous.number + 1;
    let watermark = change.watermark.unwrap_or(previous.cold_watermark);
    let (path, body) = published_object(tenant, number, watermark, change, &current);
    if !block_on(store.put_new(&path, body))? {
        return Ok(None);
    }
    Ok(Some(Published {
        number,
        cold_watermark: watermark,
        segments: current,
    }))
}

/// Deletes the objects of `written` that the tenant's newest published manifest does not name
/// (those of a [`publish_next`] that did not commit). Blocking.
pub fn discard_unpublished(
    store: &ColdStore,
    tenant: TenantId,
    written: &[Segment],
) -> Result<(), ColdError> {
    let newest = newest_published(store, tenant)?;
    let named: std::collections::HashSet<&str> =
        (newest.segments.iter()).map(|s| s.path.as_str()).collect();
    for segment in written {
        if !named.contains(segment.path.as_str()) {
            block_on(store.delete(&segment.path))?;
        }
    }
    Ok(())
}

/// Where the tenant's published manifest lives.
pub fn prefix(tenant: TenantId) -> String {
    format!("manifest/tenant={tenant}/")
}

/// Published manifests kept besides the newest (older ones are deleted once they are older
/// than the grace period).
const PUBLISHED_KEPT: usize = 16;

/// Deletes published manifests beyond the newest [`PUBLISHED_KEPT`] that are older than
/// `grace`. Blocking.
pub fn prune_published(
    store: &ColdStore,
    tenant: TenantId,
    grace: Micros,
) -> Result<usize, ColdError> {
    let mut objects = block_on(store.list(&prefix(tenant)))?;
    objects.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
    let cutoff = now_micros().saturating_sub(grace);
    let mut removed = 0;
    for object in objects.iter().skip(PUBLISHED_KEPT) {
        if object.last_modified.timestamp_micros() < cutoff {
            block_on(store.delete(object.location.as_ref()))?;
            removed += 1;
        }
    }
    Ok(removed)
}
