//! The object store behind the cold tier, through the `object_store` crate: a folder under the
//! data dir by default, an S3-compatible bucket by configuration. Every object written to the
//! folder is fsync'd, with the directories that lead to it, before the write returns, so a
//! committed manifest never names an object a power failure could lose (S3 acknowledges a put
//! once it is durable). Objects larger than [`PART_BYTES`] go up as multipart uploads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};

use super::ColdError;
use crate::config::S3Config;
use crate::ids::TenantId;

/// Part size of multipart uploads; smaller objects are put in one request. (S3 wants parts of
/// at least 5 MiB, all but the last.)
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// A cold store: where segments, the published manifest and superseded objects live.
#[derive(Clone)]
pub struct ColdStore {
    store: Arc<dyn ObjectStore>,
    /// The folder of a local store (for fsync).
    local_root: Option<PathBuf>,
    /// One lock per tenant, shared by every clone (see [`ColdStore::tenant_lock`]).
    locks: Arc<dashmap::DashMap<TenantId, Arc<Mutex<()>>>>,
}

impl ColdStore {
    /// A store in the folder `root`, created if needed.
    pub fn local(root: &Path) -> Result<ColdStore, ColdError> {
        std::fs::create_dir_all(root)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(root)?;
        Ok(ColdStore {
            store: Arc::new(store),
            local_root: Some(root.to_path_buf()),
            locks: Arc::default(),
        })
    }

    /// A store in an S3-compatible bucket. A request that fails is retried a few times within
    /// 30 s; the flusher's own backoff takes over after that, so a store that is down delays
    /// flushes rather than blocking them for minutes.
    pub fn s3(settings: &S3Config) -> Result<ColdStore, ColdError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(settings.virtual_hosted_style)
            .with_allow_http(settings.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
            });
        if !settings.endpoint.is_empty() {
            builder = builder.with_endpoint(&settings.endpoint);
        }
        let bucket = builder.build()?;
        let prefix = settings.prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(bucket)
        } else {
            Arc::new(PrefixStore::new(bucket, prefix))
        };
        Ok(ColdStore {
            store,
            local_root: None,
            locks: Arc::default(),
        })
    }

    /// The lock that serialises every change to a tenant's cold tier: each task that changes it
    /// (a flusher's pass or erasure, a tenant's purge) holds it while it runs, so a task left
    /// running by a restarted flusher never overlaps the next one.
    pub fn tenant_lock(&self, tenant: TenantId) -> Arc<Mutex<()>> {
        Arc::clone(self.locks.entry(tenant).or_default().value())
    }

    /// Writes (or overwrites) an object, durably; in parts when it is large.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<(), ColdError> {
        let location = ObjectPath::from(path);
        if bytes.len() <= PART_BYTES {
            self.store
                .put(&location, PutPayload::from_bytes(bytes))
                .await?;
        } else {
            let upload = self.store.put_multipart(&location).await?;
            let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            parts.put(bytes);
            parts.finish().await?;
        }
        self.sync(path)
    }

    /// Writes an object only if none exists at `path`; false if one did.
    pub async fn put_new(&self, path: &str, bytes: Bytes) -> Result<bool, ColdError> {
        let location = ObjectPath::from(path);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match (self.store)
            .put_opts(&location, PutPayload::from_bytes(bytes), options)
            .await
        {
            Ok(_) => self.sync(path).map(|()| true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Bytes, ColdError> {
        let location = ObjectPath::from(path);
        Ok(self.store.get(&location).await?.bytes().await?)
    }

    /// Deletes an object; one already gone is not an error.
    pub async fn delete(&self, path: &str) -> Result<(), ColdError> {
        match self.store.delete(&ObjectPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Moves an object (copy, then delete the original).
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ColdError> {
        let (from, to) = (ObjectPath::from(from), ObjectPath::from(to));
        self.store.copy(&from, &to).await?;
        self.sync(to.as_ref())?;
        match self.store.delete(&from).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ColdError> {
        let prefix = ObjectPath::from(prefix);
        Ok(self.store.list(Some(&prefix)).try_collect().await?)
    }

    /// fsyncs a local object and every directory from it up to the root.
    fn sync(&self, path: &str) -> Result<(), ColdError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(path);
        std::fs::File::open(&file)?.sync_all()?;
        let mut dir = file.parent();
        while let Some(current) = dir {
            std::fs::File::open(current)?.sync_all()?;
            if current == root {
                break;
            }
            dir = current.parent();
        }
        Ok(())
    }
}
