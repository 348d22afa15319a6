//! The `dedup` keyspace: which messageIds a tenant has already stored.
//!
//! Key `tenant ‖ xxh3-128(messageId)` (24 bytes), value the first-seen time (big-endian i64
//! microseconds). An id seen within the tenant's window is a duplicate; an older entry is
//! overwritten and the event counts as new. One point read per event: the keyspace's bloom
//! filters make the common "never seen" answer cheap.
//!
//! Entries older than their tenant's window are dropped during compaction ([`DedupExpiry`]).
//! (DESIGN.md sketches `tenant ‖ day ‖ hash` keys; one key per id plus a compaction filter gives
//! a single point read per event instead of one per day of the window, and the same expiry.)
//!
//! Only the log writer reads and writes this keyspace, in the same write batch as the log entry,
//! so an event and its dedup entry are durable together (exactly-once across crashes).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};

use crate::event::{now_micros, Micros};
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

/// Each tenant's dedup window in microseconds, shared with the compaction filter. Kept up to
/// date by the tenant directory; a tenant missing here keeps its entries (the safe side).
#[derive(Clone, Default)]
pub struct DedupWindows(Arc<RwLock<HashMap<u64, i64>>>);

impl DedupWindows {
    pub fn set(&self, tenant: TenantId, window: Duration) {
        let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        let mut windows = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.insert(tenant.0, micros);
    }

    pub fn remove(&self, tenant: TenantId) {
        let mut windows = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.remove(&tenant.0);
    }

    /// A copy for one compaction run, so items are filtered without locking.
    fn snapshot(&self) -> HashMap<u64, i64> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Whether an entry first seen at `first_seen` has left a window of `window` micros at `now`.
fn expired(value: &[u8], now: Micros, window: i64) -> bool {
    match <[u8; 8]>::try_from(value) {
        Ok(bytes) => now.saturating_sub(i64::from_be_bytes(bytes)) >= window,
        Err(_) => true,
    }
}

/// Compaction filter factory that drops dedup entries older than their tenant's window, so the
/// keyspace holds about one window of ids instead of every id ever seen.
pub struct DedupExpiry {
    pub windows: DedupWindows,
}

impl Factory for DedupExpiry {
    fn name(&self) -> &str {
        "dedup-expiry"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpiryFilter {
            windows: self.windows.snapshot(),
            now: now_micros(),
        })
    }
}

struct ExpiryFilter {
    windows: HashMap<u64, i64>,
    now: Micros,
}

impl ExpiryFilter {
    fn window_of(&self, key: &[u8]) -> Option<i64> {
        let tenant = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
        self.windows.get(&tenant).copied()
    }
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _ctx: &Context) -> CompactionFilterResult {
        let Some(window) = self.window_of(item.key()) else {
            return Ok(Verdict::Keep);
        };
        let value = item.value()?;
        if expired(&value, self.now, window) {
            return Ok(Verdict::Remove);
        }
        Ok(Verdict::Keep)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn compaction_drops_entries_older_than_the_tenant_window() {
        let dir = tempfile::tempdir().unwrap();
        let windows = DedupWindows::default();
        let storage = Storage::open(dir.path(), 1 << 20, windows.clone()).unwrap();
        let short = TenantId(1);
        let long = TenantId(2);
        let unknown = TenantId(3);
        windows.set(short, Duration::from_secs(60));
        windows.set(long, Duration::from_secs(86_400));
        let now = now_micros();
        let two_hours_ago = now - 7_200_000_000;
        for tenant in [short, long, unknown] {
            storage
                .dedup
                .insert(key(tenant, "old"), value(two_hours_ago).to_vec())
                .unwrap();
            storage
                .dedup
                .insert(key(tenant, "new"), value(now).to_vec())
                .unwrap();
        }
        storage.dedup.rotate_memtable_and_wait().unwrap();
        storage.dedup.major_compact().unwrap();
        let present = |tenant, id| storage.dedup.contains_key(key(tenant, id)).unwrap();
        assert!(!present(short, "old"), "expired entry survived compaction");
        assert!(present(short, "new"));
        assert!(present(long, "old"));
        assert!(
            present(unknown, "old"),
            "entries of unknown tenants are kept"
        );
        assert!(seen_within(&storage, &key(short, "new"), now, Duration::from_secs(60)).unwrap());
    }
}
