//! Stored identity links (see `crate::identity`): `i ‖ tenant ‖ id hash` → the name of the id's
//! parent (a root's own name) in `meta`. The rollup actor writes them in its flush batch, with
//! its rollups and watermark ([`write_into`]); [`map`] loads a tenant's links once and shares
//! them.

use std::sync::Arc;

use crate::identity::{IdentityMap, StoredLink};
use crate::ids::TenantId;
use crate::storage::{meta, Storage, StorageError};

fn key(tenant: TenantId, id: u64) -> Vec<u8> {
    [
        &meta::tenant_key(meta::kind::IDENTITY, tenant)[..],
        &id.to_be_bytes(),
    ]
    .concat()
}

/// The tenant's committed links, loaded from storage on first use. `hash_key` is the tenant's
/// user-hash key. Blocking on first use.
pub fn map(
    storage: &Storage,
    tenant: TenantId,
    hash_key: &[u8; 32],
) -> Result<Arc<IdentityMap>, StorageError> {
    if let Some(map) = storage.identities.get(&tenant) {
        return Ok(map.clone());
    }
    // Loaded under the entry's lock, so every user of the tenant shares one map.
    let entry = storage.identities.entry(tenant);
    if let dashmap::Entry::Occupied(map) = &entry {
        return Ok(map.get().clone());
    }
    let map = Arc::new(IdentityMap::from_stored(hash_key, load(storage, tenant)?));
    entry.insert(map.clone());
    Ok(map)
}

fn load(storage: &Storage, tenant: TenantId) -> Result<Vec<StoredLink>, StorageError> {
    let prefix = meta::tenant_key(meta::kind::IDENTITY, tenant);
    let mut links = Vec::new();
    for guard in storage.meta.prefix(prefix) {
        let (key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("reading identity links"))?;
        let Some(id) = key
            .get(9..17)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        let name = String::from_utf8_lossy(&value);
        links.push((id, Arc::from(&*name)));
    }
    Ok(links)
}

/// Adds `links` to a write batch.
pub(crate) fn write_into(
    storage: &Storage,
    batch: &mut fjall::OwnedWriteBatch,
    tenant: TenantId,
    links: &[StoredLink],
) {
    for (id, parent) in links {
        batch.insert(&storage.meta, key(tenant, *id), parent.as_bytes().to_vec());
    }
}

/// Forgets the id `id` (an erasure): removes its own link and the links of the ids whose parent
/// it is, which become persons of their own, from storage and from the shared map, so that no
/// copy of the id is left in the links. Returns how many links were removed. Blocking.
pub fn forget(
    storage: &Storage,
    tenant: TenantId,
    hash_key: &[u8; 32],
    id: &str,
) -> Result<u64, StorageError> {
    // Not while a rollup flush stores links.
    let lock = storage.rollup_lock(tenant);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let own = crate::enrich::user_hash(hash_key, id);
    let removed: Vec<u64> = load(storage, tenant)?
        .into_iter()
        .filter(|(hash, parent)| *hash == own || &**parent == id)
        .map(|(hash, _)| hash)
        .collect();
    if removed.is_empty() {
        return Ok(0);
    }
    let mut batch = storage.batch();
    for hash in &removed {
        batch.remove(&storage.meta, key(tenant, *hash));
    }
    batch
        .commit()
        .map_err(StorageError::engine("removing identity links"))?;
    storage.persist(true)?;
    if let Some(map) = storage.identities.get(&tenant) {
        map.remove(&removed, own);
    }
    Ok(removed.len() as u64)
}

/// Deletes the tenant's links (the tenant is being deleted). Blocking.
pub fn delete_all(storage: &Storage, tenant: TenantId) -> Result<u64, StorageError> {
    storage.identities.remove(&tenant);
    let prefix = meta::tenant_key(meta::kind::IDENTITY, tenant);
    super::purge_keys(&storage.db, &storage.meta, || storage.meta.prefix(prefix))
}
