//! The `dedup` keyspace: which messageIds a tenant has already stored.
//!
//! Key `tenant ‖ xxh3-128(messageId)` (24 bytes), value the first-seen time (big-endian i64
//! microseconds). An id seen within the tenant's window is a duplicate; an older entry is
//! overwritten and the event counts as new. One point read per event: the keyspace's bloom
//! filters make the common "never seen" answer cheap.
//!
//! Only the log writer reads and writes this keyspace, in the same write batch as the log entry,
//! so an event and its dedup entry are durable together (exactly-once across crashes).

use std::time::Duration;

use crate::event::Micros;
use crate::storage::{Storage, StorageError};
use crate::tenant::TenantId;

pub type DedupKey = [u8; 24];

pub fn key(tenant: TenantId, message_id: &str) -> DedupKey {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&tenant.0.to_be_bytes());
    let hash = xxhash_rust::xxh3::xxh3_128(message_id.as_bytes());
    key[8..].copy_from_slice(&hash.to_be_bytes());
    key
}

/// Whether `key` was first seen within `window` before `now`.
pub fn seen_within(
    storage: &Storage,
    key: &DedupKey,
    now: Micros,
    window: Duration,
) -> Result<bool, StorageError> {
    let Some(value) = storage
        .dedup
        .get(key)
        .map_err(StorageError::engine("reading dedup"))?
    else {
        return Ok(false);
    };
    let Ok(bytes) = <[u8; 8]>::try_from(&value[..]) else {
        return Ok(false);
    };
    let first_seen = i64::from_be_bytes(bytes);
    let window_micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
    Ok(now.saturating_sub(first_seen) < window_micros)
}

pub fn value(now: Micros) -> [u8; 8] {
    now.to_be_bytes()
}
