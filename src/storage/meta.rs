//! The `meta` keyspace: small records that several parts of the server keep, and the one
//! registry of its keys ([`kind`]), so that no two concerns can share a prefix by accident.
//!
//! Per-tenant records are keyed `kind ‖ tenant` (big-endian), optionally followed by more bytes;
//! the few global records have names of their own. Metadata changes are rare, so the writes here
//! persist before they return, except where a caller commits them with other writes.

use crate::event::now_micros;
use crate::ids::TenantId;
use crate::storage::{Storage, StorageError};

/// The kinds of `meta` key. A kind is the first byte of a per-tenant key; named records start
/// with a byte none of the kinds scans for (a prefix scan over a kind would otherwise see them:
/// `dedup_keys_ingested` starts with the dedup watermark's `d`, which is only ever read by
/// exact key).
pub(crate) mod kind {
    /// `t ‖ tenant` → the tenant's record (encoded by `crate::tenant`).
    pub(crate) const TENANT: u8 = b't';
    /// `x ‖ tenant` → deletion time: a tombstone, so a deleted tenant's id is never reused and
    /// late writes for it are refused.
    pub(crate) const TOMBSTONE: u8 = b'x';
    /// `h ‖ tenant` → the last log sequence assigned to the tenant, committed with the log.
    pub(crate) const LOG_HEAD: u8 = b'h';
    /// `w ‖ tenant` → the last log sequence the stored rollups include.
    pub(crate) const ROLLUP_WATERMARK: u8 = b'w';
    /// `n ‖ tenant ‖ xxh3(name)` → an event name the tenant's rollups hold.
    pub(crate) const EVENT_NAME: u8 = b'n';
    /// `q ‖ tenant ‖ xxh3(series)` → a series of sampled users the tenant's rollups hold
    /// (`crate::sampling::sampled_series`), apart so that tenants without sampling find none
    /// at the cost of one empty prefix scan.
    pub(crate) const SAMPLED_SERIES: u8 = b'q';
    /// `s ‖ tenant ‖ flush first sequence ‖ hour` → a committed cold segment.
    pub(crate) const SEGMENT: u8 = b's';
    /// `c ‖ tenant` → the last log sequence moved to cold segments.
    pub(crate) const COLD_WATERMARK: u8 = b'c';
    /// `v ‖ tenant` → the number of the last change committed to the tenant's cold manifest.
    pub(crate) const MANIFEST_NUMBER: u8 = b'v';
    /// `e ‖ job id` → a per-user erasure job and its audit record (JSON).
    pub(crate) const ERASURE_JOB: u8 = b'e';
    /// `i ‖ tenant ‖ id hash` → the name of the id's parent in its person (`storage::identity`).
    pub(crate) const IDENTITY: u8 = b'i';
    /// `r ‖ tenant ‖ xxh3(event name) ‖ version` → a schema version (`storage::schemas`).
    pub(crate) const SCHEMA: u8 = b'r';
    /// `d ‖ tenant` → the last log sequence whose dedup keys the dedup tables hold.
    pub(crate) const DEDUP_WATERMARK: u8 = b'd';
    /// The digest of the admin token in force when none is configured.
    pub(crate) const ADMIN_TOKEN_DIGEST: &[u8] = b"admin_token_digest";
    /// Present in a data dir whose dedup keys the ingest thread writes. A data dir without it
    /// is of the layout before that thread, where the log writer wrote each key with its entry:
    /// its dedup keyspace holds every key of the log.
    pub(crate) const DEDUP_LAYOUT: &[u8] = b"dedup_keys_ingested";
}

/// `kind ‖ tenant`: the key of a per-tenant record in `meta`.
pub(crate) fn tenant_key(kind: u8, tenant: TenantId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = kind;
    key[1..].copy_from_slice(&tenant.0.to_be_bytes());
    key
}

/// The tenant in a `kind ‖ tenant ‖ …` key.
pub(crate) fn key_tenant(key: &[u8]) -> Option<TenantId> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|id| TenantId(u64::from_be_bytes(id)))
}

/// A big-endian `u64` record of a tenant (0 when there is none).
pub(crate) fn get_u64(storage: &Storage, kind: u8, tenant: TenantId) -> Result<u64, StorageError> {
    get_u64_in(&storage.meta, kind, tenant)
}

/// [`get_u64`] from the keyspace itself.
pub(crate) fn get_u64_in(
    meta: &fjall::Keyspace,
    kind: u8,
    tenant: TenantId,
) -> Result<u64, StorageError> {
    let value = meta
        .get(tenant_key(kind, tenant))
        .map_err(StorageError::engine("reading a sequence record"))?;
    Ok(value
        .as_deref()
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Every tenant record, encoded (see `crate::tenant`).
pub fn tenant_records(storage: &Storage) -> Result<Vec<fjall::Slice>, StorageError> {
    let mut records = Vec::new();
    for guard in storage.meta.prefix([kind::TENANT]) {
        let (_key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("loading tenants"))?;
        records.push(value);
    }
    Ok(records)
}

/// Writes (creates or replaces) a tenant's encoded record, durably.
pub fn put_tenant(
    storage: &Storage,
    tenant: TenantId,
    record: Vec<u8>,
) -> Result<(), StorageError> {
    storage
        .meta
        .insert(tenant_key(kind::TENANT, tenant), record)
        .map_err(StorageError::engine("writing a tenant"))?;
    storage.persist(true)
}

/// Removes a tenant record and leaves a tombstone, durably.
pub fn delete_tenant(storage: &Storage, tenant: TenantId) -> Result<(), StorageError> {
    let mut batch = storage.batch();
    batch.remove(&storage.meta, tenant_key(kind::TENANT, tenant));
    batch.insert(
        &storage.meta,
        tenant_key(kind::TOMBSTONE, tenant),
        now_micros().to_be_bytes(),
    );
    batch
        .commit()
        .map_err(StorageError::engine("deleting a tenant"))?;
    storage.persist(true)
}

pub fn is_tombstoned(storage: &Storage, tenant: TenantId) -> Result<bool, StorageError> {
    storage
        .meta
        .contains_key(tenant_key(kind::TOMBSTONE, tenant))
        .map_err(StorageError::engine("reading a tombstone"))
}

/// Every deleted tenant (their data may still need purging after a crash).
pub fn tombstoned_tenants(storage: &Storage) -> Result<Vec<TenantId>, StorageError> {
    let mut tenants = Vec::new();
    for guard in storage.meta.prefix([kind::TOMBSTONE]) {
        let key = guard
            .key()
            .map_err(StorageError::engine("loading tombstones"))?;
        tenants.extend(key_tenant(&key));
    }
    Ok(tenants)
}

pub fn admin_token_digest(storage: &Storage) -> Result<Option<[u8; 32]>, StorageError> {
    let value = storage
        .meta
        .get(kind::ADMIN_TOKEN_DIGEST)
        .map_err(StorageError::engine("reading the admin token digest"))?;
    Ok(value.and_then(|v| <[u8; 32]>::try_from(&v[..]).ok()))
}

pub fn set_admin_token_digest(storage: &Storage, digest: &[u8; 32]) -> Result<(), StorageError> {
    storage
        .meta
        .insert(kind::ADMIN_TOKEN_DIGEST, digest.to_vec())
        .map_err(StorageError::engine("writing the admin token digest"))?;
    storage.persist(true)
}

/// Whether the keyspace answers a read (for readiness).
pub fn readable(storage: &Storage) -> bool {
    storage.meta.first_key_value().is_some() || storage.meta.is_empty().is_ok()
}

fn erasure_job_key(id: &[u8; 16]) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = kind::ERASURE_JOB;
    key[1..].copy_from_slice(id);
    key
}

/// Writes an erasure job's record (encoded by `crate::erasure`), durably.
pub fn put_erasure_job(storage: &Storage, id: &[u8; 16], value: &[u8]) -> Result<(), StorageError> {
    storage
        .meta
        .insert(erasure_job_key(id), value)
        .map_err(StorageError::engine("writing an erasure job"))?;
    storage.persist(true)
}

pub fn erasure_job(storage: &Storage, id: &[u8; 16]) -> Result<Option<fjall::Slice>, StorageError> {
    storage
        .meta
        .get(erasure_job_key(id))
        .map_err(StorageError::engine("reading an erasure job"))
}

/// Every erasure job record.
pub fn erasure_jobs(storage: &Storage) -> Result<Vec<fjall::Slice>, StorageError> {
    let mut jobs = Vec::new();
    for guard in storage.meta.prefix([kind::ERASURE_JOB]) {
        let (_key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading erasure jobs"))?;
        jobs.push(value);
    }
    Ok(jobs)
}
