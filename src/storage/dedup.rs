//! The `dedup` keyspace: which messageIds a tenant has already stored.
//!
//! Key `xxh3-128(messageId, seeded with the tenant id)` (16 bytes), value the first-seen time
//! (big-endian i64 microseconds) followed by the tenant id. An id seen within the tenant's window
//! is a duplicate; an older entry is overwritten and the event counts as new. One point read and
//! one insert per event: the keyspace's bloom filters make the common "never seen" answer cheap.
//!
//! Why this key: the writer thread's largest cost was searching the memtable skiplist, twice per
//! event. A 16-byte key is stored inline by the engine (no pointer to chase per comparison), and
//! starting with random hash bits, most comparisons end at the first word instead of running
//! `memcmp` over a tenant prefix that every key of a busy tenant shares.
//!
//! Entries older than their tenant's window, and all entries of a deleted tenant, are dropped
//! during compaction ([`DedupExpiry`]); the tenant id in the value tells whose an entry is.
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

pub type DedupKey = [u8; 16];

pub fn key(tenant: TenantId, message_id: &str) -> DedupKey {
    xxhash_rust::xxh3::xxh3_128_with_seed(message_id.as_bytes(), tenant.0).to_be_bytes()
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
    let Some((first_seen, _tenant)) = parse_value(&value) else {
        return Ok(false);
    };
    let window_micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
    Ok(now.saturating_sub(first_seen) < window_micros)
}

/// `first seen ‖ tenant`.
pub fn value(tenant: TenantId, now: Micros) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&now.to_be_bytes());
    value[8..].copy_from_slice(&tenant.0.to_be_bytes());
    value
}

fn parse_value(value: &[u8]) -> Option<(Micros, u64)> {
    let first_seen = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let tenant = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((first_seen, tenant))
}

/// What the compaction filter needs to know of each tenant: its window in microseconds, or that
/// it was deleted. Kept up to date by the tenant directory (and, for deletions before this start,
/// from the tombstones); a tenant missing here keeps its entries (the safe side).
#[derive(Clone, Default)]
pub struct DedupWindows(Arc<RwLock<HashMap<u64, TenantWindow>>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TenantWindow {
    Micros(i64),
    Deleted,
}

impl DedupWindows {
    pub fn set(&self, tenant: TenantId, window: Duration) {
        let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        self.put(tenant, TenantWindow::Micros(micros));
    }

    /// The tenant was deleted: compaction drops its entries.
    pub fn deleted(&self, tenant: TenantId) {
        self.put(tenant, TenantWindow::Deleted);
    }

    fn put(&self, tenant: TenantId, window: TenantWindow) {
        let mut windows = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.insert(tenant.0, window);
    }

    /// A copy for one compaction run, so items are filtered without locking.
    fn snapshot(&self) -> HashMap<u64, TenantWindow> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Compaction filter factory that drops dedup entries older than their tenant's window (so the
/// keyspace holds about one window of ids instead of every id ever seen) and those of deleted
/// tenants.
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
    windows: HashMap<u64, TenantWindow>,
    now: Micros,
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _ctx: &Context) -> CompactionFilterResult {
        let value = item.value()?;
        let Some((first_seen, tenant)) = parse_value(&value) else {
            return Ok(Verdict::Remove); // Not ours (an older layout): useless for lookups.
        };
        let expired = match self.windows.get(&tenant) {
            None => false,
            Some(TenantWindow::Deleted) => true,
            Some(TenantWindow::Micros(window)) => self.now.saturating_sub(first_seen) >= *window,
        };
        Ok(if expired {
            Verdict::Remove
        } else {
            Verdict::Keep
        })
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
        let deleted = TenantId(4);
        windows.set(short, Duration::from_secs(60));
        windows.set(long, Duration::from_secs(86_400));
        windows.set(deleted, Duration::from_secs(86_400));
        let now = now_micros();
        let two_hours_ago = now - 7_200_000_000;
        for tenant in [short, long, unknown, deleted] {
            storage
                .dedup
                .insert(key(tenant, "old"), value(tenant, two_hours_ago).to_vec())
                .unwrap();
            storage
                .dedup
                .insert(key(tenant, "new"), value(tenant, now).to_vec())
                .unwrap();
        }
        windows.deleted(deleted);
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
        assert!(
            !present(deleted, "new"),
            "a deleted tenant's entries are dropped"
        );
        assert_ne!(key(short, "new"), key(long, "new"), "keys are per tenant");
        assert!(seen_within(&storage, &key(short, "new"), now, Duration::from_secs(60)).unwrap());
    }
}
