//! The object store behind the cold tier, through the `object_store` crate. The local default
//! is a folder under the data dir; every object written there is fsync'd, with the directories
//! that lead to it, before the write returns, so a committed manifest never names an object a
//! power failure could lose.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::ColdError;

/// A cold store: where segments, the published manifest and superseded objects live.
#[derive(Clone)]
pub struct ColdStore {
    store: Arc<dyn ObjectStore>,
    /// The folder of a local store (for fsync).
    local_root: Option<PathBuf>,
}

impl ColdStore {
    /// A store in the folder `root`, created if needed.
    pub fn local(root: &Path) -> Result<ColdStore, ColdError> {
        std::fs::create_dir_all(root)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(root)?;
        Ok(ColdStore {
            store: Arc::new(store),
            local_root: Some(root.to_path_buf()),
        })
    }

    /// Writes (or overwrites) an object, durably.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<(), ColdError> {
        let location = ObjectPath::from(path);
        self.store
            .put(&location, PutPayload::from_bytes(bytes))
            .await?;
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
