//! Stored schema versions (see `crate::schema`): `r ‖ tenant ‖ xxh3(event name) ‖ version` →
//! the version's record as JSON, in `meta`. Registrations and retirements are rare admin
//! writes and persist before they return.

use crate::ids::TenantId;
use crate::storage::{meta, Storage, StorageError};

fn key(tenant: TenantId, event: &str, version: u32) -> Vec<u8> {
    [
        &meta::tenant_key(meta::kind::SCHEMA, tenant)[..],
        &xxhash_rust::xxh3::xxh3_64(event.as_bytes()).to_be_bytes(),
        &version.to_be_bytes(),
    ]
    .concat()
}

/// Writes (creates or replaces) one version's record, durably.
pub fn put(
    storage: &Storage,
    tenant: TenantId,
    event: &str,
    version: u32,
    record: &[u8],
) -> Result<(), StorageError> {
    storage
        .meta
        .insert(key(tenant, event, version), record)
        .map_err(StorageError::engine("writing a schema version"))?;
    storage.persist(true)
}

/// Every stored version of every tenant, as (tenant, record).
pub fn all(storage: &Storage) -> Result<Vec<(TenantId, fjall::Slice)>, StorageError> {
    let mut records = Vec::new();
    for guard in storage.meta.prefix([meta::kind::SCHEMA]) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("loading schemas"))?;
        if let Some(tenant) = meta::key_tenant(&key) {
            records.push((tenant, value));
        }
    }
    Ok(records)
}

/// Removes every version of the tenant. Blocking.
pub fn delete_all(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    let prefix = meta::tenant_key(meta::kind::SCHEMA, tenant);
    super::purge_keys(&storage.db, &storage.meta, || storage.meta.prefix(prefix))
}
