//! Identifiers shared by every layer. A leaf module: it imports nothing from the crate, so
//! `storage`, `tenant` and the actors can all name a tenant without depending on each other.

use serde::{Deserialize, Serialize};

/// A tenant's id: random, never reused, shown as 16 hex digits. Big-endian in storage keys, so
/// a tenant's keys sort together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TenantId(pub u64);

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 16 {
            return Err(());
        }
        u64::from_str_radix(text, 16).map(TenantId).map_err(|_| ())
    }
}
