//! The `meta` keyspace: tenant records, tombstones of deleted tenants, the admin token digest.
//!
//! Keys: `t ‖ tenant` → [`TenantRecord`]; `x ‖ tenant` → deletion time (a tombstone, so a deleted
//! tenant's id is never reused and late writes for it are refused); `admin_token_digest` → 32
//! bytes. Metadata changes are rare, so every write is fsync'd before it returns.

use serde::{Deserialize, Serialize};

use crate::config::TenantDefaults;
use crate::event::now_micros;
use crate::storage::{codec, Storage, StorageError};
use crate::tenant::{KeyDigest, TenantId, TenantRecord, TenantSettings};

const TENANT: u8 = b't';
const TOMBSTONE: u8 = b'x';
const ADMIN_TOKEN_DIGEST: &[u8] = b"admin_token_digest";

/// `kind ‖ tenant`: the key of a per-tenant record in `meta`. Kinds in use: `t`, `x` (here),
/// `w`, `n` (rollup watermarks and event names), `d` (dedup watermarks).
pub(crate) fn tenant_key(kind: u8, tenant: TenantId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = kind;
    key[1..].copy_from_slice(&tenant.0.to_be_bytes());
    key
}

/// A tenant record as stored: the first version's layout (field order is the bincode layout),
/// then the settings added since, as a trailer that records written before lack.
#[derive(Serialize, Deserialize)]
struct StoredTenant {
    id: TenantId,
    name: String,
    created_at: crate::event::Micros,
    settings: StoredSettings,
    write_key_digest: KeyDigest,
    read_key_digest: KeyDigest,
    user_hash_key: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct StoredSettings {
    rate_limit_events_per_second: u32,
    rate_limit_burst: u32,
    #[serde(with = "humantime_serde")]
    dedup_window: std::time::Duration,
}

/// Settings added after the first layout; `None`: the server's default.
#[derive(Serialize, Deserialize, Default)]
struct LaterSettings {
    max_event_names: Option<u32>,
}

fn meta_codec_error(source: codec::CodecError) -> StorageError {
    StorageError::Codec {
        keyspace: "meta",
        source,
    }
}

/// Every tenant record; settings a record predates take their value from `defaults`.
pub fn load_tenants(
    storage: &Storage,
    defaults: &TenantDefaults,
) -> Result<Vec<TenantRecord>, StorageError> {
    let mut records = Vec::new();
    for guard in storage.meta.prefix([TENANT]) {
        let (_key, value) = guard
            .into_inner()
            .map_err(StorageError::engine("loading tenants"))?;
        let plain = codec::plain(&value).map_err(meta_codec_error)?;
        let (stored, later): (StoredTenant, LaterSettings) =
            plain.decode_with_trailer().map_err(meta_codec_error)?;
        records.push(TenantRecord {
            id: stored.id,
            name: stored.name,
            created_at: stored.created_at,
            settings: TenantSettings {
                rate_limit_events_per_second: stored.settings.rate_limit_events_per_second,
                rate_limit_burst: stored.settings.rate_limit_burst,
                dedup_window: stored.settings.dedup_window,
                max_event_names: later.max_event_names.unwrap_or(defaults.max_event_names),
            },
            write_key_digest: stored.write_key_digest,
            read_key_digest: stored.read_key_digest,
            user_hash_key: stored.user_hash_key,
        });
    }
    Ok(records)
}

/// Writes (creates or replaces) a tenant record, durably.
pub fn put_tenant(storage: &Storage, record: &TenantRecord) -> Result<(), StorageError> {
    let stored = StoredTenant {
        id: record.id,
        name: record.name.clone(),
        created_at: record.created_at,
        settings: StoredSettings {
            rate_limit_events_per_second: record.settings.rate_limit_events_per_second,
            rate_limit_burst: record.settings.rate_limit_burst,
            dedup_window: record.settings.dedup_window,
        },
        write_key_digest: record.write_key_digest,
        read_key_digest: record.read_key_digest,
        user_hash_key: record.user_hash_key,
    };
    let later = LaterSettings {
        max_event_names: Some(record.settings.max_event_names),
    };
    // bincode writes a tuple as its fields one after the other: the trailer follows the record.
    let value = codec::encode(&(stored, later)).map_err(meta_codec_error)?;
    storage
        .meta
        .insert(tenant_key(TENANT, record.id), value)
        .map_err(StorageError::engine("writing a tenant"))?;
    storage.persist(true)
}

/// Removes a tenant record and leaves a tombstone, durably.
pub fn delete_tenant(storage: &Storage, record: &TenantRecord) -> Result<(), StorageError> {
    let mut batch = storage.batch();
    batch.remove(&storage.meta, tenant_key(TENANT, record.id));
    batch.insert(
        &storage.meta,
        tenant_key(TOMBSTONE, record.id),
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
        .contains_key(tenant_key(TOMBSTONE, tenant))
        .map_err(StorageError::engine("reading a tombstone"))
}

/// Every deleted tenant (their data may still need purging after a crash).
pub fn tombstoned_tenants(storage: &Storage) -> Result<Vec<TenantId>, StorageError> {
    let mut tenants = Vec::new();
    for guard in storage.meta.prefix([TOMBSTONE]) {
        let (key, _value) = guard
            .into_inner()
            .map_err(StorageError::engine("loading tombstones"))?;
        if let Some(id) = key.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            tenants.push(TenantId(u64::from_be_bytes(id)));
        }
    }
    Ok(tenants)
}

pub fn admin_token_digest(storage: &Storage) -> Result<Option<KeyDigest>, StorageError> {
    let value = storage
        .meta
        .get(ADMIN_TOKEN_DIGEST)
        .map_err(StorageError::engine("reading the admin token digest"))?;
    Ok(value.and_then(|v| KeyDigest::try_from(&v[..]).ok()))
}

pub fn set_admin_token_digest(storage: &Storage, digest: &KeyDigest) -> Result<(), StorageError> {
    storage
        .meta
        .insert(ADMIN_TOKEN_DIGEST, digest.to_vec())
        .map_err(StorageError::engine("writing the admin token digest"))?;
    storage.persist(true)
}
