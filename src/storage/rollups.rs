//! Persisted rollups.
//!
//! - `rollup_counts`: key `tenant ‖ resolution ‖ xxh3-64(name) ‖ bucket start`, value the count
//!   (big-endian u64). A series for one event is one contiguous range scan.
//! - `rollup_users`: same key, value the encoded distinct-user sketch (the bucket's *base*), and
//!   after it *delta records* at `key ‖ sequence` (the watermark of the flush that wrote them),
//!   each holding the users one flush added ([`PendingUsers`]). A bucket's users are its base
//!   merged with its deltas. A flush does not rewrite a dense sketch (48 KiB at precision 16)
//!   per bucket it touches: with many tenants that would be most of the rollups' CPU and
//!   memtable memory, where a delta is 8 bytes per user added (docs/decisions/0017). Every
//!   [`FOLD_EVERY`]th flush of a tenant folds the deltas of the buckets it touches into their
//!   base, and a bucket's deltas are folded once it has ended (see [`FoldPlan`]), so stored
//!   buckets are read as one record.
//!   Both are stored compressed (codec format 4): a base of a few hundred users is a dense
//!   sketch of mostly zero registers, and compressed it takes a small fraction of the memtable
//!   and disk (docs/decisions/0016).
//! - in `meta`: `n ‖ tenant ‖ name hash` → the series name (to list events), `q ‖ tenant ‖ name
//!   hash` → a series of sampled users (see [`crate::sampling`]), and `w ‖ tenant` → the
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
use crate::ids::TenantId;
use crate::rollup::{BucketAgg, Deltas, PendingUsers, Resolution, Retention, Sketch};
use crate::sampling;
use crate::storage::{codec, meta, Storage, StorageError};

/// A tenant's rollup actor folds sketch deltas into their bases on every this many flushes.
pub const FOLD_EVERY: u64 = 8;

/// A bucket of a series: resolution, series name, start.
pub type BucketId = (Resolution, String, Micros);

/// Which buckets a flush folds (merges base and deltas into one base record).
#[derive(Debug, Default)]
pub struct FoldPlan {
    /// Every bucket the flush touches.
    pub all: bool,
    /// These buckets, whether the flush touches them or not (buckets that have ended).
    pub buckets: rustc_hash::FxHashSet<BucketId>,
}

impl FoldPlan {
    fn folds(&self, resolution: Resolution, name: &str, start: Micros) -> bool {
        self.all
            || self
                .buckets
                .contains(&(resolution, name.to_string(), start))
    }
}
/// Length of a bucket key; longer keys in `rollup_users` are delta records.
const BUCKET_KEY_LEN: usize = 25;

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

/// [`meta::tenant_key`] followed by `rest`.
fn meta_key(kind: u8, tenant: TenantId, rest: &[u8]) -> Vec<u8> {
    [&meta::tenant_key(kind, tenant)[..], rest].concat()
}

fn codec_error(keyspace: &'static str) -> impl Fn(codec::CodecError) -> StorageError {
    move |source| StorageError::Codec { keyspace, source }
}

/// The last log sequence included in the stored rollups (0 = none).
pub fn watermark(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let value = storage
        .meta
        .get(meta_key(meta::kind::ROLLUP_WATERMARK, tenant, &[]))
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

fn delta_key(bucket: &[u8; BUCKET_KEY_LEN], seq: u64) -> [u8; BUCKET_KEY_LEN + 8] {
    let mut key = [0u8; BUCKET_KEY_LEN + 8];
    key[..BUCKET_KEY_LEN].copy_from_slice(bucket);
    key[BUCKET_KEY_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Adds one `rollup_users` record (a base sketch or a delta) to `sketch`.
/// (A base comes first, so it is usually taken as it is, without a merge.)
fn add_record(sketch: &mut Option<Sketch>, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
    if key.len() == BUCKET_KEY_LEN {
        let base: Sketch = codec::decode(value).map_err(codec_error("rollup_users"))?;
        match sketch {
            Some(sketch) => sketch.merge(&base),
            None => *sketch = Some(base),
        }
    } else {
        let delta: PendingUsers = codec::decode(value).map_err(codec_error("rollup_users"))?;
        delta.add_to(sketch.get_or_insert_with(Sketch::new));
    }
    Ok(())
}

/// A bucket's users (base merged with deltas; `None` if it has no record) and the keys of its
/// delta records.
fn read_users(
    storage: &Storage,
    key: &[u8; BUCKET_KEY_LEN],
) -> Result<(Option<Sketch>, Vec<fjall::Slice>), StorageError> {
    let mut sketch: Option<Sketch> = None;
    let mut deltas = Vec::new();
    for guard in storage.rollup_users.prefix(key) {
        let (record, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading a rollup sketch"))?;
        add_record(&mut sketch, &record, &value)?;
        if record.len() != BUCKET_KEY_LEN {
            deltas.push(record);
        }
    }
    Ok((sketch, deltas))
}

fn read_sketch(
    storage: &Storage,
    key: &[u8; BUCKET_KEY_LEN],
) -> Result<Option<Sketch>, StorageError> {
    Ok(read_users(storage, key)?.0)
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

/// What a rollup flush stores beside the buckets, derived from the same events.
#[derive(Debug, Default)]
pub struct FlushMeta<'a> {
    /// Event names admitted under the tenant's cap since the last flush.
    pub admitted: &'a [String],
    /// Identity links applied since the last flush (`crate::identity`).
    pub links: &'a [crate::identity::StoredLink],
}

/// Merges `deltas` (users rolled up: [`Deltas::roll_up_users`]) into the stored buckets and moves
/// the watermark from `expected_watermark` to `through_seq`, atomically, if the stored watermark
/// still is `expected_watermark`. Users are written as delta records, or for the buckets `fold`
/// names, merged with the bucket's base and deltas into a new base. Blocking.
pub fn flush(
    storage: &Storage,
    tenant: TenantId,
    deltas: &Deltas,
    meta_writes: &FlushMeta<'_>,
    expected_watermark: u64,
    through_seq: u64,
    fold: &FoldPlan,
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
        batch.insert(
            &storage.rollup_counts,
            key.to_vec(),
            count.to_be_bytes().to_vec(),
        );
        if fold.folds(resolution, name, start) {
            fold_users(storage, &mut batch, &key, &delta.users)?;
        } else if !delta.users.is_empty() {
            let users = codec::encode_fixed_compressed(&delta.users)
                .map_err(codec_error("rollup_users"))?;
            batch.insert(
                &storage.rollup_users,
                delta_key(&key, through_seq).to_vec(),
                users,
            );
        }
        names.insert(name);
    }
    for (resolution, name, start) in &fold.buckets {
        if deltas.get(*resolution, name, *start).is_none() {
            let key = bucket_key(tenant, *resolution, name, *start);
            fold_users(storage, &mut batch, &key, &PendingUsers::default())?;
        }
    }
    // Every name the deltas use, and the names admitted under the tenant's cap since the last
    // flush (some may have no delta: all their events were past every retention).
    let admitted = meta_writes.admitted.iter().map(String::as_str);
    for name in names.into_iter().chain(admitted) {
        batch.insert(
            &storage.meta,
            meta_key(series_kind(name), tenant, &name_hash(name).to_be_bytes()),
            name.as_bytes().to_vec(),
        );
    }
    super::identity::write_into(storage, &mut batch, tenant, meta_writes.links);
    batch.insert(
        &storage.meta,
        meta_key(meta::kind::ROLLUP_WATERMARK, tenant, &[]),
        through_seq.to_be_bytes().to_vec(),
    );
    batch
        .commit()
        .map_err(StorageError::engine("writing rollups"))?;
    Ok(FlushOutcome::Stored)
}

/// The bucket start in a bucket key (or a delta key).
fn bucket_time(key: &[u8]) -> Option<Micros> {
    let time = <[u8; 8]>::try_from(key.get(17..BUCKET_KEY_LEN)?).ok()?;
    Some((u64::from_be_bytes(time) ^ (1 << 63)) as i64)
}

/// Writes a bucket's base merged with its deltas and `added`, and removes the deltas.
fn fold_users(
    storage: &Storage,
    batch: &mut fjall::OwnedWriteBatch,
    key: &[u8; BUCKET_KEY_LEN],
    added: &PendingUsers,
) -> Result<(), StorageError> {
    let (users, old_deltas) = read_users(storage, key)?;
    if users.is_none() && added.is_empty() {
        return Ok(()); // Nothing stored (deleted meanwhile, say): nothing to fold.
    }
    let mut users = users.unwrap_or_default();
    added.add_to(&mut users);
    let sketch = codec::encode_fixed_compressed(&users).map_err(codec_error("rollup_users"))?;
    batch.insert(&storage.rollup_users, key.to_vec(), sketch);
    for old in old_deltas {
        batch.remove(&storage.rollup_users, old);
    }
    Ok(())
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
        let Some(at) = bucket_time(&key) else {
            continue;
        };
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

/// Distinct-user sketches of one series in `[from, to)`, one per stored bucket (its base merged
/// with its deltas).
pub fn read_sketches(
    storage: &Storage,
    tenant: TenantId,
    resolution: Resolution,
    name: &str,
    from: Micros,
    to: Micros,
) -> Result<Vec<(Micros, Sketch)>, StorageError> {
    let start = bucket_key(tenant, resolution, name, from);
    let end = bucket_key(tenant, resolution, name, to);
    let mut out: Vec<(Micros, Sketch)> = Vec::new();
    let mut current: Option<(Micros, Option<Sketch>)> = None;
    for guard in storage.rollup_users.range(start..end) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading rollups"))?;
        let Some(at) = bucket_time(&key) else {
            continue;
        };
        if current.as_ref().is_none_or(|(bucket, _)| *bucket != at) {
            if let Some((bucket, Some(sketch))) = current.take() {
                out.push((bucket, sketch));
            }
            current = Some((at, None));
        }
        if let Some((_, sketch)) = current.as_mut() {
            add_record(sketch, &key, &value)?;
        }
    }
    if let Some((bucket, Some(sketch))) = current {
        out.push((bucket, sketch));
    }
    Ok(out)
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

/// The `meta` kind that lists a series.
fn series_kind(name: &str) -> u8 {
    if sampling::is_sampled_series(name) {
        meta::kind::SAMPLED_SERIES
    } else {
        meta::kind::EVENT_NAME
    }
}

/// Every event name the tenant has rollups for (the all-events series included, the series
/// of sampled users not: see [`sampled_weights`]).
pub fn event_names(storage: &Storage, tenant: TenantId) -> Result<Vec<String>, StorageError> {
    listed(storage, tenant, meta::kind::EVENT_NAME)
}

/// The weights whose sampled users `name` has a series of (see [`crate::sampling`]),
/// ascending.
pub fn sampled_weights(
    storage: &Storage,
    tenant: TenantId,
    name: &str,
) -> Result<Vec<u32>, StorageError> {
    Ok(all_sampled_weights(storage, tenant)?
        .remove(name)
        .unwrap_or_default())
}

/// [`sampled_weights`] of every series name that has any, read in one scan.
pub fn all_sampled_weights(
    storage: &Storage,
    tenant: TenantId,
) -> Result<std::collections::HashMap<String, Vec<u32>>, StorageError> {
    let mut out: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for series in listed(storage, tenant, meta::kind::SAMPLED_SERIES)? {
        if let Some((name, weight)) = sampling::parse_sampled_series(&series) {
            out.entry(name.to_string()).or_default().push(weight);
        }
    }
    for weights in out.values_mut() {
        weights.sort_unstable();
    }
    Ok(out)
}

/// Every series the tenant has rollups for.
fn stored_series(storage: &Storage, tenant: TenantId) -> Result<Vec<String>, StorageError> {
    let mut names = listed(storage, tenant, meta::kind::EVENT_NAME)?;
    names.extend(listed(storage, tenant, meta::kind::SAMPLED_SERIES)?);
    Ok(names)
}

/// The series names listed under one `meta` kind, sorted.
fn listed(storage: &Storage, tenant: TenantId, kind: u8) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    for guard in storage.meta.prefix(meta_key(kind, tenant, &[])) {
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
    for kind in [meta::kind::EVENT_NAME, meta::kind::SAMPLED_SERIES] {
        for guard in storage.meta.prefix(meta_key(kind, tenant, &[])) {
            let (key, _value) = guard
                .into_inner()
                .map_err(StorageError::engine("reading event names"))?;
            batch.remove(&storage.meta, key);
        }
    }
    batch.remove(
        &storage.meta,
        meta_key(meta::kind::ROLLUP_WATERMARK, tenant, &[]),
    );
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
    let names = stored_series(storage, tenant)?;
    let mut removed = 0u64;
    for resolution in Resolution::ALL {
        let Some(oldest) = retention.oldest(resolution, now) else {
            continue;
        };
        for name in &names {
            let start = series_prefix(tenant, resolution, name).to_vec();
            let end = bucket_key(tenant, resolution, name, oldest).to_vec();
            let keys_in = |keyspace: &fjall::Keyspace| -> Vec<fjall::Slice> {
                keyspace
                    .range(start.clone()..end.clone())
                    .filter_map(|guard| guard.into_inner().ok().map(|(key, _)| key))
                    .collect()
            };
            let keys = keys_in(&storage.rollup_counts);
            let users = keys_in(&storage.rollup_users);
            if keys.is_empty() && users.is_empty() {
                continue;
            }
            let mut batch = storage.batch();
            for key in &keys {
                batch.remove(&storage.rollup_counts, key.clone());
            }
            for key in users {
                batch.remove(&storage.rollup_users, key);
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
    use crate::rollup::RollupItems;

    fn all() -> FoldPlan {
        FoldPlan {
            all: true,
            ..FoldPlan::default()
        }
    }

    fn deltas(at: Micros) -> Deltas {
        deltas_of_users(at, 1..2)
    }

    fn deltas_of_users(at: Micros, users: std::ops::Range<u64>) -> Deltas {
        let mut deltas = Deltas::default();
        let items = RollupItems::collect(users.map(|user| {
            (
                "e",
                at,
                crate::enrich::user_hash(&[5; 32], &user.to_string()),
            )
        }));
        let forever = Retention {
            minute: std::time::Duration::from_secs(1 << 40),
            hour: std::time::Duration::from_secs(1 << 40),
            day: None,
        };
        deltas.apply(&items, &forever, at);
        deltas.roll_up_users();
        deltas
    }

    #[test]
    fn sketch_deltas_read_like_a_base_and_fold_into_one() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(4);
        let at = 1_000 * Resolution::Day.width();
        // Users 0..3000 over four flushes (overlapping), the third one folding, then 3000..12000
        // (past the hash list limit: a pending sketch) as a delta again.
        let parts = [
            (0, 1000, false),
            (500, 2000, false),
            (1500, 2500, true),
            (2000, 3000, false),
            (3000, 12_000, false),
        ];
        for (seq, (from, to, fold)) in parts.into_iter().enumerate() {
            let seq = seq as u64;
            let outcome = flush(
                &storage,
                tenant,
                &deltas_of_users(at, from..to),
                &Default::default(),
                seq,
                seq + 1,
                &FoldPlan {
                    all: fold,
                    ..FoldPlan::default()
                },
            );
            assert_eq!(outcome.unwrap(), FlushOutcome::Stored);
        }
        let relative_error = |estimate: u64, users: f64| (estimate as f64 - users).abs() / users;
        for resolution in Resolution::ALL {
            let sketches = read_sketches(
                &storage,
                tenant,
                resolution,
                "e",
                at,
                at + resolution.width(),
            )
            .unwrap();
            assert_eq!(sketches.len(), 1, "one bucket, however many records");
            let users = crate::rollup::estimate(&sketches[0].1);
            assert!(
                relative_error(users, 12_000.0) < 0.01,
                "{resolution:?}: {users}"
            );
            let key = bucket_key(tenant, resolution, "e", at);
            let (_, deltas) = read_users(&storage, &key).unwrap();
            assert_eq!(
                deltas.len(),
                2,
                "deltas after the fold remain until the next fold"
            );
        }
        // Once the buckets have ended, a flush that does not touch them folds them.
        let ended = FoldPlan {
            all: false,
            buckets: Resolution::ALL
                .iter()
                .map(|r| (*r, "e".to_string(), at))
                .collect(),
        };
        let elsewhere = deltas_of_users(at + 10 * Resolution::Day.width(), 0..1);
        assert_eq!(
            flush(
                &storage,
                tenant,
                &elsewhere,
                &Default::default(),
                5,
                6,
                &ended
            )
            .unwrap(),
            FlushOutcome::Stored
        );
        for resolution in Resolution::ALL {
            let key = bucket_key(tenant, resolution, "e", at);
            let (users, deltas) = read_users(&storage, &key).unwrap();
            assert!(deltas.is_empty(), "{resolution:?}: folded");
            let users = crate::rollup::estimate(&users.unwrap());
            assert!(
                relative_error(users, 12_000.0) < 0.01,
                "{resolution:?}: {users}"
            );
        }
        let day = bucket_key(tenant, Resolution::Day, "e", at);
        let total = total_over(&storage, tenant, "e", &[(Resolution::Day, at)]).unwrap();
        assert_eq!(total.count, 12_000 + 500 + 500 + 500);
        assert_eq!(
            crate::rollup::estimate(&total.users),
            crate::rollup::estimate(&read_sketch(&storage, &day).unwrap().unwrap())
        );
        // Retention removes the deltas with the base.
        let gone = Retention {
            minute: std::time::Duration::from_secs(1),
            hour: std::time::Duration::from_secs(1),
            day: Some(std::time::Duration::from_secs(1)),
        };
        expire(&storage, tenant, &gone, at + 20 * Resolution::Day.width()).unwrap();
        assert!(storage
            .rollup_users
            .prefix(tenant.0.to_be_bytes())
            .next()
            .is_none());
    }

    #[test]
    fn flushes_are_fenced_by_the_watermark_they_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let tenant = TenantId(3);
        let at = 1_000 * Resolution::Day.width();
        assert_eq!(
            flush(
                &storage,
                tenant,
                &deltas(at),
                &Default::default(),
                0,
                1,
                &FoldPlan::default()
            )
            .unwrap(),
            FlushOutcome::Stored
        );
        // A second writer that also started from watermark 0 (a replaced actor) is refused.
        assert_eq!(
            flush(
                &storage,
                tenant,
                &deltas(at),
                &Default::default(),
                0,
                1,
                &FoldPlan::default()
            )
            .unwrap(),
            FlushOutcome::Conflict { stored: 1 }
        );
        assert_eq!(
            flush(
                &storage,
                tenant,
                &deltas(at),
                &Default::default(),
                1,
                2,
                &all()
            )
            .unwrap(),
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
