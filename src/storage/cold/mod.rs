//! The cold tier: closed ranges of a tenant's log become Parquet segments on object storage.
//!
//! Layout under the store's root: `events/tenant=<id>/date=YYYY-MM-DD/hour=HH/<first seq>-<last
//! seq>.parquet` (Hive style, by corrected event time), `manifest/tenant=<id>/` (the published
//! manifest, newest first) and `trash/tenant=<id>/` (objects that left `events/`, deleted after
//! the grace period).
//!
//! A flush ([`flush_once`]) commits in this order, and a crash between any two steps loses and
//! duplicates nothing (compaction, retention and erasure follow the same protocol, see
//! [`maintenance`]):
//! 1. write the segments under `events/`, under names that depend only on the flushed range;
//! 2. record them in the manifest with the tenant's cold watermark (the last flushed sequence),
//!    in one atomic `meta` write, then publish that change to `manifest/`;
//! 3. delete the flushed range from the hot log.
//!
//! Before 2 the segments are not committed: [`recover`], which runs before the tenant's first
//! flush, moves every object under the tenant's `events/` that the manifest does not name to
//! `trash/`, so `events/` holds exactly the committed segments. After 2 the range is cold;
//! `recover` finishes 3. Readers ([`scan_tiers`]) see both tiers as one stream ([`read`]).

mod flush;
pub mod maintenance;
pub mod manifest;
mod read;
pub mod segment;
pub mod store;

use std::sync::OnceLock;

use crate::event::{format_timestamp, Micros};
use crate::ids::TenantId;
use crate::storage::StorageError;

pub use self::flush::{flush_due, flush_once, write_segments, Due, FlushReport, Written};
pub use self::maintenance::{
    compact, enforce_retention, erase_user, oldest_hot_received_at, purge_tenant, purge_trash,
    recover, retain_and_compact, trash_uncommitted, CompactionPolicy, Ledger, MaintenanceReport,
};
pub use self::manifest::{
    cold_watermark, discard_unpublished, newest_published, publish_next, segments, Published,
    Segment,
};
pub use self::read::{scan_cold, scan_published, scan_segments, scan_tiers, scan_tiers_from};
pub use self::store::ColdStore;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ColdError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("corrupt cold data: {0}")]
    Corrupt(String),
    /// Another writer committed to a published manifest first (a cluster's former owner).
    #[error("conflicting cold commit: {0}")]
    Conflict(String),
    /// A failure injected by a test at a step of the commit protocol.
    #[error("injected failure {0:?}")]
    Injected(FailPoint),
}

/// Where a test makes a flush fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// The segments are written, nothing is committed.
    AfterWrite,
    /// The manifest and watermark are committed, the log range is still there.
    AfterCommit,
}

/// A runtime for the object store's futures, driven by the blocking threads that flush and
/// read (the store's own work runs on its blocking pool).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("cold-io")
            .build()
            .unwrap_or_else(|error| panic!("cannot build the cold tier's runtime: {error}"))
    })
}

/// Runs an object-store future to completion. Blocking; never from async code.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

const HOUR: Micros = 3_600_000_000;

/// The path of a segment: `…/<first>-<last>.parquet`, or `…/<first>-<last>-<tag>.parquet` with
/// a tag: `r<n>` for a rewrite by change `n`, whose range may equal that of the object it
/// replaces, and `w<token>` for a cluster owner's objects (see [`Ledger::Published`]).
fn segment_path(
    tenant: TenantId,
    hour: Micros,
    first: u64,
    last: u64,
    tag: Option<&str>,
) -> String {
    let at = format_timestamp(hour);
    let (date, hour) = (
        at.get(..10).unwrap_or("0000-00-00"),
        at.get(11..13).unwrap_or("00"),
    );
    let tag = tag.map_or(String::new(), |tag| format!("-{tag}"));
    format!("events/tenant={tenant}/date={date}/hour={hour}/{first}-{last}{tag}.parquet")
}

#[cfg(test)]
mod tests;
