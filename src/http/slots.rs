//! Per-tenant caps on long-running reads: exports, funnels and live WebSockets running at once
//! (`[reads]` settings). A read key ships in dashboards and browsers, so "has a read key" can
//! mean "anyone": without a cap, one key could hold every blocking thread with exports, or
//! every descriptor with WebSockets. Over its cap a tenant gets 429 with the reason; other
//! tenants are not affected.

use std::sync::Arc;

use dashmap::DashMap;

use crate::config::ReadsConfig;
use crate::http::errors::ApiError;
use crate::tenant::TenantId;

/// A kind of capped read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadKind {
    Export,
    Funnel,
    Live,
}

impl ReadKind {
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            ReadKind::Export => ("exports", "reads.max_concurrent_exports"),
            ReadKind::Funnel => ("funnels", "reads.max_concurrent_funnels"),
            ReadKind::Live => ("live connections", "reads.max_live_connections"),
        }
    }
}

/// The reads each tenant has running. An entry exists only while its count is above zero.
#[derive(Clone)]
pub struct ReadSlots {
    running: Arc<DashMap<(TenantId, ReadKind), usize>>,
    config: ReadsConfig,
}

/// One running read; its place is given back when this is dropped.
pub struct ReadSlot {
    running: Arc<DashMap<(TenantId, ReadKind), usize>>,
    key: (TenantId, ReadKind),
}

impl ReadSlots {
    pub fn new(config: ReadsConfig) -> ReadSlots {
        ReadSlots {
            running: Arc::new(DashMap::new()),
            config,
        }
    }

    fn cap(&self, kind: ReadKind) -> usize {
        match kind {
            ReadKind::Export => self.config.max_concurrent_exports,
            ReadKind::Funnel => self.config.max_concurrent_funnels,
            ReadKind::Live => self.config.max_live_connections,
        }
    }

    /// A place for a read of `kind`, or 429 if the tenant has its cap running.
    pub fn take(&self, tenant: TenantId, kind: ReadKind) -> Result<ReadSlot, ApiError> {
        let cap = self.cap(kind);
        let key = (tenant, kind);
        let mut count = self.running.entry(key).or_insert(0);
        if *count >= cap {
            drop(count);
            let (what, setting) = kind.describe();
            return Err(ApiError::RateLimited {
                detail: format!(
                    "the tenant already has {cap} {what} running, its cap ({setting}); retry when one ends"
                ),
                retry_after: std::time::Duration::from_secs(1),
                limit: u32::try_from(cap).unwrap_or(u32::MAX),
                remaining: 0,
            });
        }
        *count += 1;
        Ok(ReadSlot {
            running: Arc::clone(&self.running),
            key,
        })
    }

    /// Reads of `kind` the tenant has running.
    pub fn running(&self, tenant: TenantId, kind: ReadKind) -> usize {
        self.running.get(&(tenant, kind)).map_or(0, |count| *count)
    }
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        self.running.remove_if_mut(&self.key, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn slots() -> ReadSlots {
        ReadSlots::new(ReadsConfig {
            max_concurrent_exports: 2,
            max_concurrent_funnels: 1,
            max_live_connections: 3,
            export_stall_timeout: std::time::Duration::from_secs(30),
            funnel_late_arrival: std::time::Duration::from_secs(60),
        })
    }

    #[test]
    fn each_tenant_has_its_own_cap_and_places_come_back() {
        let slots = slots();
        let (a, b) = (TenantId(1), TenantId(2));
        let first = slots.take(a, ReadKind::Export).unwrap();
        let _second = slots.take(a, ReadKind::Export).unwrap();
        let refused = slots.take(a, ReadKind::Export).err().unwrap();
        assert!(
            refused.to_string().contains("reads.max_concurrent_exports"),
            "{refused}"
        );
        // Another tenant, another kind: unaffected.
        let _other = slots.take(b, ReadKind::Export).unwrap();
        let _funnel = slots.take(a, ReadKind::Funnel).unwrap();
        drop(first);
        assert_eq!(slots.running(a, ReadKind::Export), 1);
        let _again = slots.take(a, ReadKind::Export).unwrap();
        drop(_again);
        drop(_second);
        // Nothing is kept for a tenant with nothing running.
        assert_eq!(slots.running(a, ReadKind::Export), 0);
        assert!(!slots.running.contains_key(&(a, ReadKind::Export)));
    }
}
