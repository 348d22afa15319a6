//! Tenants, their settings and their keys.
//!
//! A key is `sr_<kind>_` followed by 160 random bits in hex, so a leaked key is recognisable in
//! logs and secret scanners. Only SHA-256 digests of keys are stored (the keys are random, so a
//! slow password hash buys nothing); comparisons of digests are constant time.
//!
//! [`TenantDirectory`] is the in-memory, authoritative view of tenants and key digests, loaded
//! from `storage::meta` at start and written through to it on every change.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use bytesize::ByteSize;

use crate::config::TenantDefaults;
use crate::event::{now_micros, Micros};
use crate::sampling::Sampling;
use crate::schema::{Enforcement, Unplanned};
use crate::storage::{codec, meta, Storage, StorageError};

pub use crate::ids::TenantId;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    /// Send events.
    Write,
    /// Query and export.
    Read,
}

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            KeyKind::Write => "sr_write_",
            KeyKind::Read => "sr_read_",
        }
    }
}

/// SHA-256 of a key or token.
pub type KeyDigest = [u8; 32];

pub fn digest(secret: &str) -> KeyDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time equality of two digests.
pub fn digests_equal(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.ct_eq(b).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random key of the given kind.
pub fn generate_key(kind: KeyKind) -> String {
    format!("{}{}", kind.prefix(), random_hex(20))
}

/// A new random admin token.
pub fn generate_admin_token() -> String {
    format!("sr_admin_{}", random_hex(20))
}

/// Per-tenant settings, changeable at run time through the admin API. Stored in `meta` as part
/// of the tenant's record ([`encode_record`]), whose layout keeps older records readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSettings {
    pub rate_limit_events_per_second: u32,
    pub rate_limit_burst: u32,
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Distinct event names rolled up; events of further names are rolled up as `$other`.
    pub max_event_names: u32,
    /// Cold segments whose hour ended longer ago than this are deleted (0: kept forever).
    #[serde(with = "humantime_serde")]
    pub raw_retention: Duration,
    /// What happens to events that do not match their schema (an event's own enforcement wins).
    pub schema_enforcement: Enforcement,
    /// What happens to events whose name has no schema in force.
    pub unplanned_events: Unplanned,
    /// Dead letters received longer ago than this are deleted.
    #[serde(with = "humantime_serde")]
    pub deadletter_retention: Duration,
    /// Most bytes the tenant's dead letters may take; the oldest go first beyond it.
    pub deadletter_max_bytes: ByteSize,
    /// Sampling rates by event name (see [`crate::sampling`]); none by default.
    pub sampling: Sampling,
}

impl TenantSettings {
    pub fn from_defaults(defaults: &TenantDefaults) -> TenantSettings {
        TenantSettings {
            rate_limit_events_per_second: defaults.rate_limit_events_per_second,
            rate_limit_burst: defaults.rate_limit_burst,
            dedup_window: defaults.dedup_window,
            max_event_names: defaults.max_event_names,
            raw_retention: defaults.raw_retention,
            schema_enforcement: defaults.schema_enforcement,
            unplanned_events: defaults.unplanned_events,
            deadletter_retention: defaults.deadletter_retention,
            deadletter_max_bytes: defaults.deadletter_max_bytes,
            sampling: Sampling::default(),
        }
    }
}

/// A change to settings: absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub rate_limit_events_per_second: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub dedup_window: Option<Duration>,
    pub max_event_names: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub raw_retention: Option<Duration>,
    pub schema_enforcement: Option<Enforcement>,
    pub unplanned_events: Option<Unplanned>,
    #[serde(default, with = "humantime_serde")]
    pub deadletter_retention: Option<Duration>,
    pub deadletter_max_bytes: Option<ByteSize>,
    /// Replaces the whole sampling setting.
    pub sampling: Option<Sampling>,
}

impl SettingsPatch {
    /// Applies the patch, or names the field whose value is invalid.
    pub fn apply(&self, settings: &TenantSettings) -> Result<TenantSettings, String> {
        let mut next = settings.clone();
        if let Some(value) = self.rate_limit_events_per_second {
            if value == 0 {
                return Err("settings.rate_limit_events_per_second must be at least 1".into());
            }
            next.rate_limit_events_per_second = value;
        }
        if let Some(value) = self.rate_limit_burst {
            if value == 0 {
                return Err("settings.rate_limit_burst must be at least 1".into());
            }
            next.rate_limit_burst = value;
        }
        if let Some(value) = self.dedup_window {
            if value.is_zero() {
                return Err("settings.dedup_window must be positive".into());
            }
            next.dedup_window = value;
        }
        if let Some(value) = self.max_event_names {
            if value == 0 {
                return Err("settings.max_event_names must be at least 1".into());
            }
            next.max_event_names = value;
        }
        if let Some(value) = self.raw_retention {
            next.raw_retention = value;
        }
        if let Some(value) = self.schema_enforcement {
            next.schema_enforcement = value;
        }
        if let Some(value) = self.unplanned_events {
            next.unplanned_events = value;
        }
        if let Some(value) = self.deadletter_retention {
            if value.is_zero() {
                return Err("settings.deadletter_retention must be positive".into());
            }
            next.deadletter_retention = value;
        }
        if let Some(value) = self.deadletter_max_bytes {
            if value.as_u64() < 1 << 20 {
                return Err("settings.deadletter_max_bytes must be at least 1 MiB".into());
            }
            next.deadletter_max_bytes = value;
        }
        if let Some(value) = &self.sampling {
            next.sampling = value.clone();
        }
        Ok(next)
    }
}

/// A tenant as stored in `meta`. Field order is the bincode layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: TenantId,
    pub name: String,
    pub created_at: Micros,
    pub settings: TenantSettings,
    pub write_key_digest: KeyDigest,
    pub read_key_digest: KeyDigest,
    /// Secret for the keyed user hash; never leaves the server.
    pub user_hash_key: [u8; 32],
}

impl TenantRecord {
    fn digest_for(&self, kind: KeyKind) -> &KeyDigest {
        match kind {
            KeyKind::Write => &self.write_key_digest,
            KeyKind::Read => &self.read_key_digest,
        }
    }
}

/// Which keys to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotateWhich {
    Write,
    Read,
    Both,
}

/// Keys handed out once, on create or rotate.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_key: Option<String>,
}

/// Result of checking a presented key.
#[derive(Debug, Clone)]
pub enum KeyCheck {
    /// The key belongs to this tenant and has this kind.
    Valid(Arc<TenantRecord>, KeyKind),
    /// No tenant has this key.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    #[error("tenant {0} not found")]
    NotFound(TenantId),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// In-memory view of tenants and key digests, written through to `meta`.
pub struct TenantDirectory {
    storage: Storage,
    defaults: TenantDefaults,
    tenants: DashMap<TenantId, Arc<TenantRecord>>,
    /// Key digest → (tenant, kind): finds the tenant of a presented key without a scan.
    keys: DashMap<KeyDigest, (TenantId, KeyKind)>,
    admin_digest: KeyDigest,
    /// Serialises admin writes so that read-modify-write of a record is not interleaved.
    write_lock: std::sync::Mutex<()>,
    /// Bumped whenever a key stops working (rotation, tenant deletion), so that long-lived
    /// uses of a key (live WebSockets, exports) check theirs again ([`KeyWatch`]).
    revocations: tokio::sync::watch::Sender<u64>,
    /// Tenants deleted (here or, in cluster mode, elsewhere): their ids are never reused.
    removed: dashmap::DashSet<TenantId>,
}

/// Tells a long-lived use of a key (a live WebSocket, an export) when that key stops working.
pub struct KeyWatch {
    digest: KeyDigest,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl KeyWatch {
    /// Whether the key still works.
    pub fn in_force(&self, directory: &TenantDirectory) -> bool {
        matches!(directory.check_digest(&self.digest), KeyCheck::Valid(..))
    }

    /// Resolves once the key no longer works (at once if it already does not; never, if the
    /// directory is dropped first).
    pub async fn revoked(&mut self, directory: &TenantDirectory) {
        loop {
            if !self.in_force(directory) {
                return;
            }
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl TenantDirectory {
    /// Loads every tenant from storage. `admin_digest` is the digest of the admin token in force.
    pub fn load(
        storage: Storage,
        defaults: TenantDefaults,
        admin_digest: KeyDigest,
    ) -> Result<TenantDirectory, StorageError> {
        let records = meta::tenant_records(&storage)?
            .iter()
            .map(|value| decode_record(value, &defaults))
            .collect::<Result<Vec<_>, _>>()?;
        let directory = TenantDirectory {
            storage,
            defaults,
            tenants: DashMap::new(),
            keys: DashMap::new(),
            admin_digest,
            write_lock: std::sync::Mutex::new(()),
            revocations: tokio::sync::watch::Sender::new(0),
            removed: dashmap::DashSet::new(),
        };
        for record in records {
            directory.index(Arc::new(record));
        }
        for tenant in meta::tombstoned_tenants(&directory.storage)? {
            directory.storage.dedup_windows.deleted(tenant);
            directory.removed.insert(tenant);
        }
        Ok(directory)
    }

    fn index(&self, record: Arc<TenantRecord>) {
        self.storage
            .dedup_windows
            .set(record.id, record.settings.dedup_window);
        self.keys
            .insert(record.write_key_digest, (record.id, KeyKind::Write));
        self.keys
            .insert(record.read_key_digest, (record.id, KeyKind::Read));
        self.tenants.insert(record.id, record);
    }

    fn unindex(&self, record: &TenantRecord) {
        self.storage.dedup_windows.deleted(record.id);
        self.keys.remove(&record.write_key_digest);
        self.keys.remove(&record.read_key_digest);
        self.tenants.remove(&record.id);
    }

    /// Shows a record written elsewhere (cluster mode's shared directory), replacing this
    /// tenant's record if it has one; keys the new record no longer has stop working at once.
    /// In memory only: the shared directory is where the record is kept.
    pub fn mirror(&self, record: TenantRecord) {
        let _guard = self.lock();
        let replaced = self.tenants.get(&record.id).map(|r| Arc::clone(r.value()));
        if let Some(old) = &replaced {
            self.keys.remove(&old.write_key_digest);
            self.keys.remove(&old.read_key_digest);
        }
        let keys_changed = replaced.is_some_and(|old| {
            old.write_key_digest != record.write_key_digest
                || old.read_key_digest != record.read_key_digest
        });
        self.index(Arc::new(record));
        if keys_changed {
            self.revoked();
        }
    }

    /// Forgets a tenant deleted elsewhere (cluster mode's shared directory); its keys stop
    /// working at once.
    pub fn mirror_removed(&self, id: TenantId) {
        let _guard = self.lock();
        self.removed.insert(id);
        if let Some(record) = self.get(id) {
            self.unindex(&record);
            self.revoked();
        }
    }

    /// Whether the tenant was deleted (its data is to be dropped, not stored).
    pub fn was_removed(&self, id: TenantId) -> bool {
        self.removed.contains(&id)
    }

    /// True when `token` is the admin token.
    pub fn is_admin(&self, token: &str) -> bool {
        digests_equal(&digest(token), &self.admin_digest)
    }

    /// Finds the tenant and kind of a presented key.
    pub fn check_key(&self, key: &str) -> KeyCheck {
        self.check_digest(&digest(key))
    }

    /// A watch on `key`, for a use of it that outlives its request.
    pub fn watch_key(&self, key: &str) -> KeyWatch {
        KeyWatch {
            digest: digest(key),
            changes: self.revocations.subscribe(),
        }
    }

    fn revoked(&self) {
        self.revocations.send_modify(|generation| *generation += 1);
    }

    fn check_digest(&self, presented: &KeyDigest) -> KeyCheck {
        let presented = *presented;
        let Some(entry) = self.keys.get(&presented).map(|e| *e.value()) else {
            return KeyCheck::Unknown;
        };
        let (tenant_id, kind) = entry;
        let Some(record) = self.get(tenant_id) else {
            return KeyCheck::Unknown;
        };
        if !digests_equal(record.digest_for(kind), &presented) {
            return KeyCheck::Unknown;
        }
        KeyCheck::Valid(record, kind)
    }

    pub fn get(&self, id: TenantId) -> Option<Arc<TenantRecord>> {
        self.tenants.get(&id).map(|r| Arc::clone(r.value()))
    }

    /// All tenants, ordered by creation time.
    pub fn list(&self) -> Vec<Arc<TenantRecord>> {
        let mut all: Vec<_> = self.tenants.iter().map(|r| Arc::clone(r.value())).collect();
        all.sort_by_key(|r| (r.created_at, r.id));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding this lock leaves no partial state (writes go to storage first).
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates a tenant. Blocking: call from a blocking thread.
    pub fn create(&self, name: &str) -> Result<(Arc<TenantRecord>, IssuedKeys), DirectoryError> {
        let name = validate_name(name)?;
        let _guard = self.lock();
        let mut id = TenantId(rand::rng().next_u64());
        while id.0 == 0 || self.tenants.contains_key(&id) || meta::is_tombstoned(&self.storage, id)?
        {
            id = TenantId(rand::rng().next_u64());
        }
        let write_key = generate_key(KeyKind::Write);
        let read_key = generate_key(KeyKind::Read);
        let mut user_hash_key = [0u8; 32];
        rand::rng().fill_bytes(&mut user_hash_key);
        let record = TenantRecord {
            id,
            name,
            created_at: now_micros(),
            settings: TenantSettings::from_defaults(&self.defaults),
            write_key_digest: digest(&write_key),
            read_key_digest: digest(&read_key),
            user_hash_key,
        };
        meta::put_tenant(&self.storage, record.id, encode_record(&record)?)?;
        let record = Arc::new(record);
        self.index(Arc::clone(&record));
        Ok((
            record,
            IssuedKeys {
                write_key: Some(write_key),
                read_key: Some(read_key),
            },
        ))
    }

    /// Renames a tenant and/or changes its settings. Blocking.
    pub fn update(
        &self,
        id: TenantId,
        name: Option<&str>,
        patch: &SettingsPatch,
    ) -> Result<Arc<TenantRecord>, DirectoryError> {
        let _guard = self.lock();
        let current = self.get(id).ok_or(DirectoryError::NotFound(id))?;
        let mut next = (*current).clone();
        if let Some(name) = name {
            next.name = validate_name(name)?;
        }
        next.settings = patch
            .apply(&current.settings)
            .map_err(DirectoryError::Invalid)?;
        meta::put_tenant(&self.storage, next.id, encode_record(&next)?)?;
        let next = Arc::new(next);
        self.index(Arc::clone(&next));
        Ok(next)
    }

    /// Replaces keys; the old ones stop working at once. Blocking.
    pub fn rotate(
        &self,
        id: TenantId,
        which: RotateWhich,
    ) -> Result<(Arc<TenantRecord>, IssuedKeys), DirectoryError> {
        let _guard = self.lock();
        let current = self.get(id).ok_or(DirectoryError::NotFound(id))?;
        let mut next = (*current).clone();
        let mut issued = IssuedKeys {
            write_key: None,
            read_key: None,
        };
        if matches!(which, RotateWhich::Write | RotateWhich::Both) {
            let key = generate_key(KeyKind::Write);
            next.write_key_digest = digest(&key);
            issued.write_key = Some(key);
        }
        if matches!(which, RotateWhich::Read | RotateWhich::Both) {
            let key = generate_key(KeyKind::Read);
            next.read_key_digest = digest(&key);
            issued.read_key = Some(key);
        }
        meta::put_tenant(&self.storage, next.id, encode_record(&next)?)?;
        // Index the new record first, then drop only the replaced digests, so the key that was
        // not rotated never stops working, not even for an instant.
        let next = Arc::new(next);
        self.index(Arc::clone(&next));
        if current.write_key_digest != next.write_key_digest {
            self.keys.remove(&current.write_key_digest);
        }
        if current.read_key_digest != next.read_key_digest {
            self.keys.remove(&current.read_key_digest);
        }
        self.revoked();
        Ok((next, issued))
    }

    /// Removes a tenant from the directory and leaves a tombstone; its keys stop working at once.
    /// The caller purges its data. Blocking.
    pub fn remove(&self, id: TenantId) -> Result<Arc<TenantRecord>, DirectoryError> {
        let _guard = self.lock();
        let current = self.get(id).ok_or(DirectoryError::NotFound(id))?;
        meta::delete_tenant(&self.storage, current.id)?;
        self.removed.insert(current.id);
        self.unindex(&current);
        self.revoked();
        Ok(current)
    }
}

fn validate_name(name: &str) -> Result<String, DirectoryError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(DirectoryError::Invalid("name must not be empty".into()));
    }
    if trimmed.len() > 200 {
        return Err(DirectoryError::Invalid(
            "name must be at most 200 bytes".into(),
        ));
    }
    Ok(trimmed.to_string())
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

/// Settings added after [`LaterSettings`], as a second trailer; `None`: the server's default.
#[derive(Serialize, Deserialize, Default)]
struct ColdSettings {
    /// Microseconds.
    raw_retention: Option<u64>,
}

/// Settings added after [`ColdSettings`], as a third and last trailer: a JSON object, so that
/// settings added later need no new trailer. A missing member is the server's default.
#[derive(Serialize, Deserialize, Default)]
struct JsonSettings(String);

/// The members of [`JsonSettings`].
#[derive(Serialize, Deserialize, Default)]
struct LaterJsonSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema_enforcement: Option<Enforcement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unplanned_events: Option<Unplanned>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadletter_retention_micros: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadletter_max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sampling: Option<Sampling>,
}

fn meta_codec_error(source: codec::CodecError) -> StorageError {
    StorageError::Codec {
        keyspace: "meta",
        source,
    }
}

/// A stored tenant record; settings it predates take their value from `defaults`. Also the
/// record's form in cluster mode's shared directory (`crate::cluster::directory`).
pub fn decode_record(
    value: &[u8],
    defaults: &TenantDefaults,
) -> Result<TenantRecord, StorageError> {
    let plain = codec::plain(value).map_err(meta_codec_error)?;
    let (stored, later, cold, json): (StoredTenant, LaterSettings, ColdSettings, JsonSettings) =
        plain
            .decode_with_three_trailers()
            .map_err(meta_codec_error)?;
    let json: LaterJsonSettings = if json.0.is_empty() {
        LaterJsonSettings::default()
    } else {
        serde_json::from_str(&json.0).map_err(|e| {
            meta_codec_error(codec::CodecError::Invalid(format!("tenant settings: {e}")))
        })?
    };
    Ok(TenantRecord {
        id: stored.id,
        name: stored.name,
        created_at: stored.created_at,
        settings: TenantSettings {
            rate_limit_events_per_second: stored.settings.rate_limit_events_per_second,
            rate_limit_burst: stored.settings.rate_limit_burst,
            dedup_window: stored.settings.dedup_window,
            max_event_names: later.max_event_names.unwrap_or(defaults.max_event_names),
            raw_retention: cold
                .raw_retention
                .map_or(defaults.raw_retention, Duration::from_micros),
            schema_enforcement: json
                .schema_enforcement
                .unwrap_or(defaults.schema_enforcement),
            unplanned_events: json.unplanned_events.unwrap_or(defaults.unplanned_events),
            deadletter_retention: json
                .deadletter_retention_micros
                .map_or(defaults.deadletter_retention, Duration::from_micros),
            deadletter_max_bytes: json
                .deadletter_max_bytes
                .map_or(defaults.deadletter_max_bytes, ByteSize),
            sampling: json.sampling.unwrap_or_default(),
        },
        write_key_digest: stored.write_key_digest,
        read_key_digest: stored.read_key_digest,
        user_hash_key: stored.user_hash_key,
    })
}

/// A tenant record as stored (see [`StoredTenant`]).
pub fn encode_record(record: &TenantRecord) -> Result<Vec<u8>, StorageError> {
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
    let cold = ColdSettings {
        raw_retention: Some(
            u64::try_from(record.settings.raw_retention.as_micros()).unwrap_or(u64::MAX),
        ),
    };
    let json = LaterJsonSettings {
        schema_enforcement: Some(record.settings.schema_enforcement),
        unplanned_events: Some(record.settings.unplanned_events),
        deadletter_retention_micros: Some(
            u64::try_from(record.settings.deadletter_retention.as_micros()).unwrap_or(u64::MAX),
        ),
        deadletter_max_bytes: Some(record.settings.deadletter_max_bytes.as_u64()),
        sampling: (record.settings.sampling != Sampling::default())
            .then(|| record.settings.sampling.clone()),
    };
    let json = JsonSettings(serde_json::to_string(&json).unwrap_or_default());
    // bincode writes a tuple as its fields one after the other: the trailers follow the record.
    codec::encode(&(stored, later, cold, json)).map_err(meta_codec_error)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_long() {
        let a = generate_key(KeyKind::Write);
        let b = generate_key(KeyKind::Write);
        assert!(a.starts_with("sr_write_"));
        assert_eq!(a.len(), "sr_write_".len() + 40);
        assert_ne!(a, b);
        assert!(generate_key(KeyKind::Read).starts_with("sr_read_"));
        assert!(generate_admin_token().starts_with("sr_admin_"));
    }

    #[actix_rt::test]
    async fn a_key_watch_sees_revocations_before_and_after_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let config = crate::config::Config::load_from(&Default::default(), &[]).unwrap();
        let directory =
            TenantDirectory::load(storage, config.tenant_defaults.clone(), [0; 32]).unwrap();
        let (tenant, keys) = directory.create("watched").unwrap();
        let read_key = keys.read_key.unwrap();
        let mut early = directory.watch_key(&read_key);
        assert!(early.in_force(&directory));
        // Rotating the other key is no revocation of this one.
        directory.rotate(tenant.id, RotateWhich::Write).unwrap();
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            early.revoked(&directory),
        );
        assert!(pending.await.is_err());
        directory.rotate(tenant.id, RotateWhich::Read).unwrap();
        early.revoked(&directory).await;
        // A watch made after the rotation (a request that raced it) resolves at once.
        let mut late = directory.watch_key(&read_key);
        late.revoked(&directory).await;
    }

    #[test]
    fn tenant_ids_round_trip_as_hex() {
        let id = TenantId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<TenantId>(), Ok(id));
        assert!("xyz".parse::<TenantId>().is_err());
    }
}
