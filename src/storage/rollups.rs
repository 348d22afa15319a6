//! Persisted rollups.
//!
//! - `rollup_counts`: key `tenant ‖ resolution ‖ xxh3-64(name) ‖ bucket start`, value the count
//!   (big-endian u64). A series for one event is one contiguous range scan.
//! - `rollup_users`: same key, value the encoded distinct-user sketch.
//! - in `meta`: `n ‖ tenant ‖ name hash` → the name (to list events), and `w ‖ tenant` → the
//!   watermark: the last log sequence whose events are in the stored rollups.
//!
//! [`flush`] merges a set of deltas into the stored buckets and moves the watermark **in the
//! same atomic write batch**, so after a crash the stored rollups and the watermark agree, and
//! replaying the log after the watermark neither misses nor double-counts an event. A flush is
//! fenced: it commits only if the stored watermark is still the one its writer started from
//! (checked under a per-tenant lock), so a replaced rollup actor whose flush was still running
//! can never add the same events a second time.

use std::collections::HashSet;

use crate::event::Micros;
use crate::rollup::{BucketAgg, Deltas, Resolution, Retention, Sketch};
use crate::storage::{codec, Storage, StorageError};
use crate::tenant::TenantId;

const NAME: u8 = b'n';
const WATERMARK: u8 = b'w';

pub fn name_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// Order-preserving encoding of a signed time.
fn time_bytes(at: Micros) -> [u8; 8] {
    ((at as u64) ^ (1 << 63)).to_be_bytes()
}

fn series_prefix(tenant: TenantId, resolution: Resolution, name: &str) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[..8].copy_from_slice(&tenant.0.to_be_bytes());
    key[8] = resolution.code();
    key[9..].copy_from_slice(&name_hash(name).to_be_bytes());
    key
}

pub fn bucket_key(tenant: TenantId, resolution: Resolution, name: &str, start: Micros) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[..17].copy_from_slice(&series_prefix(tenant, resolution, name));
    key[17..].copy_from_slice(&time_bytes(start));
    key
}

fn meta_key(kind: u8, tenant: TenantId, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + rest.len());
    key.push(kind);
    key.extend_from_slice(&tenant.0.to_be_bytes());
    key.extend_from_slice(rest);
    key
}

fn codec_error(keyspace: &'static str) -> impl Fn(codec::CodecError) -> StorageError {
    move |source| StorageError::Codec { keyspace, source }
}

/// The last log sequence included in the stored rollups (0 = none).
pub fn watermark(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let value = storage
        .meta
        .get(meta_key(WATERMARK, tenant, &[]))
        .map_err(StorageError::engine("reading the rollup watermark"))?;
    Ok(value.as_deref().map_or(0, u64_value))
}

/// A big-endian u64 value (counts, watermarks); anything else reads as 0.
fn u64_value(value: &[u8]) -> u64 {
    <[u8; 8]>::try_from(value).map_or(0, u64::from_be_bytes)
}

fn read_count(storage: &Storage, key: &[u8]) -> Result<u64, StorageError> {
    let value = storage
        .rollup_counts
        .get(key)
        .map_err(StorageError::engine("reading a rollup count"))?;
    Ok(value.as_deref().map_or(0, u64_value))
}

fn read_sketch(storage: &Storage, key: &[u8]) -> Result<Option<Sketch>, StorageError> {
    let value = storage
        .rollup_users
        .get(key)
        .map_err(StorageError::engine("reading a rollup sketch"))?;
    value
        .map(|v| codec::decode(&v).map_err(codec_error("rollup_users")))
        .transpose()
}

/// What a fenced flush found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    Stored,
    /// The stored watermark is not the one the caller started from: someone else flushed or
    /// rebuilt meanwhile. Nothing was written; the caller must reload from storage.
    Conflict {
        stored: u64,
    },
}

/// Merges `deltas` (users rolled up: [`Deltas::roll_up_users`]) into the stored buckets and moves
/// the watermark from `expected_watermark` to `through_seq`, atomically, if the stored watermark
/// still is `expected_watermark`. Blocking.
pub fn flush(
    storage: &Storage,
    tenant: TenantId,
    deltas: &Deltas,
    expected_watermark: u64,
    through_seq: u64,
) -> Result<FlushOutcome, StorageError> {
    let lock = storage.rollup_lock(tenant);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let stored = watermark(storage, tenant)?;
    if stored != expected_watermark {
        return Ok(FlushOutcome::Conflict { stored });
    }
    let mut batch = storage.batch();
    let mut names = HashSet::new();
    for (resolution, name, start, delta) in deltas.buckets() {
        let key = bucket_key(tenant, resolution, name, start);
        let count = read_count(storage, &key)? + delta.count;
        let mut users = read_sketch(storage, &key)?.unwrap_or_default();
        delta.users.add_to(&mut users);
        batch.insert(
            &storage.rollup_counts,
            key.to_vec(),
            count.to_be_bytes().to_vec(),
        );
        let sketch = codec::encode_fixed(&users).map_err(codec_error("rollup_users"))?;
        batch.insert(&storage.rollup_users, key.to_vec(), sketch);
        names.insert(name);
    }
    for name in names {
        batch.insert(
            &storage.meta,
            meta_key(NAME, tenant, &name_hash(name).to_be_bytes()),
            name.as_bytes().to_vec(),
        );
    }
    batch.insert(
        &storage.meta,
        meta_key(WATERMARK, tenant, &[]),
        through_seq.to_be_bytes().to_vec(),
    );
    batch
        .commit()
        .map_err(StorageError::engine("writing rollups"))?;
    Ok(FlushOutcome::Stored)
}

/// Reads every stored bucket of one series in `[from, to)` from `keyspace`, decoding values.
#[allow(clippy::too_many_arguments)]
fn scan_series<T>(
    keyspace: &fjall::Keyspace,
    tenant: TenantId,
    resolution: Resolution,
    name: &str,
    from: Micros,
    to: Micros,
    decode: impl Fn(&[u8]) -> Result<T, StorageError>,
) -> Result<Vec<(Micros, T)>, StorageError> {
    let start = bucket_key(tenant, resolution, name, from);
    let end = bucket_key(tenant, resolution, name, to);
    let mut out = Vec::new();
    for guard in keyspace.range(start..end) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading rollups"))?;
        let Some(time) = key.get(17..25).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            continue;
        };
        let at = (u64::from_be_bytes(time) ^ (1 << 63)) as i64;
        out.push((at, decode(&value)?));
    }
    Ok(out)
}

/// Counts of every bucket of one series in `[from, to)` (missing buckets are absent).
pub fn read_counts(
    storage: &Storage,
    tenant: TenantId,
    resolution: Resolution,
    name: &str,
    from: Micros,
    to: Micros,
) -> Result<Vec<(Micros, u64)>, StorageError> {
    scan_series(
        &storage.rollup_counts,
        tenant,
        resolution,
        name,
        from,
        to,
        |value| Ok(u64_value(value)),
    )
}

/// Distinct-user sketches of one series in `[from, to)`, one per stored bucket.
pub fn read_sketches(
    storage: &Storage,
    tenant: TenantId,
    resolution: Resolution,
    name: &str,
    from: Micros,
    to: Micros,
) -> Result<Vec<(Micros, Sketch)>, StorageError> {
    scan_series(
        &storage.rollup_users,
        tenant,
        resolution,
        name,
        from,
        to,
        |value| codec::decode(value).map_err(codec_error("rollup_users")),
    )
}

/// Count and merged users of a series over whole buckets (see [`crate::rollup::cover`]).
pub fn total_over(
    storage: &Storage,
    tenant: TenantId,
    name: &str,
    parts: &[(Resolution, Micros)],
) -> Result<BucketAgg, StorageError> {
    let mut total = BucketAgg::default();
    for (resolution, start) in parts {
        let key = bucket_key(tenant, *resolution, name, *start);
        total.count += read_count(storage, &key)?;
        if let Some(sketch) = read_sketch(storage, &key)? {
            total.users.merge(&sketch);
        }
    }
    Ok(total)
}

/// Every event name the tenant has rollups for.
pub fn event_names(storage: &Storage, tenant: TenantId) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    for guard in storage.meta.prefix(meta_key(NAME, tenant, &[])) {
        let (_key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading event names"))?;
        names.push(String::from_utf8_lossy(&value).into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes every stored rollup and the watermark of a tenant (purge, or rebuild). Blocking.
pub fn delete_all(storage: &Storage, tenant: TenantId) -> Result<(), StorageError> {
    let lock = storage.rollup_lock(tenant);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    super::purge_prefix(storage, &storage.rollup_counts, tenant)?;
    super::purge_prefix(storage, &storage.rollup_users, tenant)?;
    let mut batch = storage.batch();
    for guard in storage.meta.prefix(meta_key(NAME, tenant, &[])) {
        let (key, _value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading event names"))?;
        batch.remove(&storage.meta, key);
    }
    batch.remove(&storage.meta, meta_key(WATERMARK, tenant, &[]));
    batch
        .commit()
        .map_err(StorageError::engine("deleting rollups"))
}

/// Deletes buckets older than their resolution's retention. Blocking.
pub fn expire(
    storage: &Storage,
    tenant: TenantId,
    retention: &Retention,
    now: Micros,
) -> Result<u64, StorageError> {
    let names = event_names(storage, tenant)?;
    let mut removed = 0u64;
    for resolution in Resolution::ALL {
        let Some(oldest) = retention.oldest(resolution, now) else {
            continue;
        };
        for name in &names {
            let start = series_prefix(tenant, resolution, name).to_vec();
            let end = bucket_key(tenant, resolution, name, oldest).to_vec();
            let keys: Vec<_> = storage
                .rollup_counts
                .range(start..end)
                .filter_map(|guard| guard.into_inner().ok().map(|(key, _)| key))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let mut batch = storage.batch();
            for key in &keys {
                batch.remove(&storage.rollup_counts, key.clone());
                batch.remove(&storage.rollup_users, key.clone());
            }
            batch
                .commit()
                .map_err(StorageError::engine("expiring rollups"))?;
            removed += keys.len() as u64;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rollup::RollupItem;

    fn deltas(at: Micros) -> Deltas {
        let mut deltas = Deltas::default();
        let item = RollupItem {
            name: "e".into(),
            timestamp: at,
            user_hash: 1,
            weight: 1,
        };
        let forever = Retention {
            minute: std::time::Duration::from_secs(1 << 40),
            hour: std::time::Duration::from_secs(1 << 40),
            day: None,
        };
        deltas.apply(&[item], &forever, at);
        deltas.roll_up_users();
        deltas
    }

    #[test]
    fn flushes_are_fenced_by_the_watermark_they_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(3);
        let at = 1_000 * Resolution::Day.width();
        assert_eq!(
            flush(&storage, tenant, &deltas(at), 0, 1).unwrap(),
            FlushOutcome::Stored
        );
        // A second writer that also started from watermark 0 (a replaced actor) is refused.
        assert_eq!(
            flush(&storage, tenant, &deltas(at), 0, 1).unwrap(),
            FlushOutcome::Conflict { stored: 1 }
        );
        assert_eq!(
            flush(&storage, tenant, &deltas(at), 1, 2).unwrap(),
            FlushOutcome::Stored
        );
        let counts = read_counts(&storage, tenant, Resolution::Day, "e", at, at + 1).unwrap();
        assert_eq!(counts, vec![(at, 2)]);
        assert_eq!(watermark(&storage, tenant).unwrap(), 2);
        delete_all(&storage, tenant).unwrap();
        assert_eq!(watermark(&storage, tenant).unwrap(), 0);
        assert!(
            read_counts(&storage, tenant, Resolution::Day, "e", at, at + 1)
                .unwrap()
                .is_empty()
        );
    }
}
