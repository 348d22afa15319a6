//! The shared directory: tenants, their key digests and settings, seen by every node.
//!
//! Records live in a [`Bucket`], `<PREFIX>_TENANTS`, keyed by tenant id, each value the tenant
//! record as the single node stores it ([`crate::tenant::encode_record`]). A node follows the
//! bucket: every current record first, then each change within milliseconds (see
//! [`crate::cluster::bucket`]). A deleted tenant stays as a delete marker, so its id is never
//! reused.

use async_nats::jetstream;
use bytes::Bytes;

use futures_util::{Stream, StreamExt};

use crate::cluster::bucket::{Bucket, BucketChange};
use crate::cluster::stream::{failed, StreamError};
use crate::config::TenantDefaults;
use crate::ids::TenantId;
use crate::tenant::{decode_record, encode_record, TenantDirectory, TenantRecord};

/// One change to the directory, as a follower sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChange {
    /// A tenant created, or its record changed (renamed, settings, rotated keys).
    Upsert(Box<TenantRecord>),
    /// A tenant deleted.
    Removed(TenantId),
    /// Every record that existed when the follow began has been delivered.
    CaughtUp,
}

/// A node's handle on the shared directory.
pub struct SharedDirectory {
    bucket: Bucket,
    defaults: TenantDefaults,
}

impl SharedDirectory {
    /// Opens the bucket, creating it if this is the cluster's first node. `defaults` fill in
    /// settings older records lack, as for the single node's records.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        replicas: usize,
        defaults: TenantDefaults,
    ) -> Result<SharedDirectory, StreamError> {
        let bucket = Bucket::open(js, prefix, "TENANTS", replicas, "tenant directory").await?;
        Ok(SharedDirectory { bucket, defaults })
    }

    /// Writes a tenant's record (created or changed).
    pub async fn put(&self, record: &TenantRecord) -> Result<u64, StreamError> {
        let value =
            encode_record(record).map_err(|e| failed("encoding a tenant record")(e.to_string()))?;
        self.bucket
            .put(&record.id.to_string(), Bytes::from(value))
            .await
    }

    /// Marks a tenant deleted.
    pub async fn remove(&self, id: TenantId) -> Result<(), StreamError> {
        self.bucket.delete(&id.to_string()).await
    }

    /// Whether `id` was ever used (a record or a delete marker).
    pub async fn ever_used(&self, id: TenantId) -> Result<bool, StreamError> {
        self.bucket.ever_used(&id.to_string()).await
    }

    /// Every record, then every change, in the order they were written, with
    /// [`DirectoryChange::CaughtUp`] once after the records that existed when the follow began.
    /// Never ends (a record that cannot be decoded is logged and skipped).
    pub fn follow(&self) -> impl Stream<Item = DirectoryChange> + '_ {
        self.bucket.follow().filter_map(|change| {
            let decoded = self.change(change);
            async move {
                decoded
                    .map_err(|error| tracing::error!(%error, "skipping a tenant record"))
                    .ok()
            }
        })
    }

    fn change(&self, change: BucketChange) -> Result<DirectoryChange, StreamError> {
        let id = |key: &str| {
            key.parse::<TenantId>()
                .map_err(|()| failed("reading the tenant directory")(format!("bad key {key:?}")))
        };
        match change {
            BucketChange::CaughtUp => Ok(DirectoryChange::CaughtUp),
            BucketChange::Deleted(key, _) => Ok(DirectoryChange::Removed(id(&key)?)),
            BucketChange::Put(key, value, _) => {
                id(&key)?;
                decode_record(&value, &self.defaults)
                    .map(|record| DirectoryChange::Upsert(Box::new(record)))
                    .map_err(|e| failed("decoding a tenant record")(e.to_string()))
            }
        }
    }
}

/// Applies a change to a node's in-memory directory (see [`TenantDirectory::mirror`]);
/// returns whether the node's view is complete (every record that existed when the follow
/// began has been applied).
pub fn apply(directory: &TenantDirectory, change: DirectoryChange) -> bool {
    match change {
        DirectoryChange::Upsert(record) => directory.mirror(*record),
        DirectoryChange::Removed(id) => directory.mirror_removed(id),
        DirectoryChange::CaughtUp => return true,
    }
    false
}
