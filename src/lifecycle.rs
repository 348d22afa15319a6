//! Tenant lifecycle: the domain operations on a tenant as a whole, used by the admin API and at
//! start-up. Each keeps the directory (keys, settings), the running pipeline and the stored data
//! consistent with one another.
//!
//! Deleting a tenant is ordered so that a crash at any step leaves nothing half done for good:
//! the record is replaced by a tombstone first (its keys stop working at once), then its
//! pipeline, rate limiter and cached answers are dropped, the log writer seals it (nothing more
//! is written for it), and only then is its data purged, off the writer thread. If the purge
//! fails or the process dies first, [`resume_purges`] finishes it at the next start.

use std::sync::Arc;

use crate::actors::Pipelines;
use crate::blocking::{self, BlockingError};
use crate::ids::TenantId;
use crate::query::QueryCache;
use crate::ratelimit::RateLimits;
use crate::storage::cold::ColdStore;
use crate::storage::writer::LogWriter;
use crate::storage::{self, meta, Storage, StorageError};
use crate::tenant::{
    DirectoryError, IssuedKeys, RotateWhich, SettingsPatch, TenantDirectory, TenantRecord,
};

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The tenant is gone (its keys no longer work), but its data is still there; the purge is
    /// retried at the next start.
    #[error("tenant removed; purging its data failed and is retried at the next start: {0}")]
    Purge(StorageError),
    #[error(transparent)]
    Task(#[from] BlockingError),
}

/// Everything a tenant's lifecycle touches.
pub struct TenantLifecycle {
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    pub directory: Arc<TenantDirectory>,
    pub pipelines: Arc<Pipelines>,
    pub rate_limits: Arc<RateLimits>,
    pub query_cache: Arc<QueryCache>,
    pub cold: ColdStore,
}

impl TenantLifecycle {
    /// Creates a tenant with its keys, and applies `settings`; on an invalid patch nothing is
    /// left behind.
    pub async fn create(
        &self,
        name: String,
        settings: Option<SettingsPatch>,
    ) -> Result<(Arc<TenantRecord>, IssuedKeys), LifecycleError> {
        let directory = Arc::clone(&self.directory);
        let created = blocking::run(move || {
            let (record, keys) = directory.create(&name)?;
            let Some(patch) = settings else {
                return Ok((record, keys));
            };
            match directory.update(record.id, None, &patch) {
                Ok(updated) => Ok((updated, keys)),
                Err(error) => {
                    let _ = directory.remove(record.id);
                    Err(error)
                }
            }
        })
        .await??;
        tracing::info!(tenant = %created.0.id, name = %created.0.name, "tenant created");
        Ok(created)
    }

    /// Renames a tenant and/or changes its settings.
    pub async fn update(
        &self,
        id: TenantId,
        name: Option<String>,
        patch: SettingsPatch,
    ) -> Result<Arc<TenantRecord>, LifecycleError> {
        let directory = Arc::clone(&self.directory);
        let record = blocking::run(move || directory.update(id, name.as_deref(), &patch)).await??;
        tracing::info!(tenant = %id, "tenant updated");
        Ok(record)
    }

    /// Issues new keys; the old ones stop working at once.
    pub async fn rotate(
        &self,
        id: TenantId,
        which: RotateWhich,
    ) -> Result<(Arc<TenantRecord>, IssuedKeys), LifecycleError> {
        let directory = Arc::clone(&self.directory);
        let rotated = blocking::run(move || directory.rotate(id, which)).await??;
        tracing::info!(tenant = %id, ?which, "tenant keys rotated");
        Ok(rotated)
    }

    /// Deletes a tenant and purges its data (see the module docs); returns the number of log
    /// entries purged.
    pub async fn delete(&self, id: TenantId) -> Result<u64, LifecycleError> {
        let directory = Arc::clone(&self.directory);
        blocking::run(move || directory.remove(id)).await??;
        self.pipelines.stop(id);
        self.rate_limits.forget(id);
        self.query_cache.forget(id);
        let purge_failed = |error: StorageError| {
            tracing::error!(tenant = %id, %error, "purge failed; it is retried at the next start");
            LifecycleError::Purge(error)
        };
        self.writer.seal_tenant(id).await.map_err(purge_failed)?;
        let (storage, cold) = (self.storage.clone(), self.cold.clone());
        let purged = blocking::run(move || purge_both_tiers(&storage, &cold, id))
            .await?
            .map_err(purge_failed)?;
        tracing::info!(tenant = %id, purged_batches = purged, "tenant deleted and purged");
        Ok(purged)
    }

    /// Drops the tenant's rollups and recomputes them from the log; resolves once the old ones
    /// are deleted. False if its pipeline could not take the request (busy or restarting).
    pub async fn rebuild_rollups(&self, id: TenantId) -> bool {
        if !self.pipelines.pipeline(id).rebuild_rollups().await {
            return false;
        }
        self.query_cache.forget(id);
        tracing::info!(tenant = %id, "rollup rebuild requested");
        true
    }
}

/// Purges a deleted tenant's hot data, then its cold segments; returns the hot log entries
/// purged.
fn purge_both_tiers(
    storage: &Storage,
    cold: &ColdStore,
    id: TenantId,
) -> Result<u64, StorageError> {
    let purged = storage::purge_tenant(storage, id)?;
    storage::cold::purge_tenant(storage, cold, id)
        .map_err(|error| StorageError::NotDurable(format!("purging cold segments: {error}")))?;
    Ok(purged)
}

/// Deleted tenants whose data is still there.
fn pending_purges(storage: &Storage) -> Result<Vec<TenantId>, StorageError> {
    Ok(meta::tombstoned_tenants(storage)?
        .into_iter()
        .filter(|tenant| storage::has_tenant_data(storage, *tenant))
        .collect())
}

/// Finishes purges that a crash or failure interrupted (tenants with a tombstone whose data is
/// still there), on a thread of its own; their keys are gone, so nothing new arrives for them.
/// Runs at start-up.
pub fn resume_purges(storage: &Storage, cold: &ColdStore) -> Result<(), StorageError> {
    let pending = pending_purges(storage)?;
    if pending.is_empty() {
        return Ok(());
    }
    let (storage, cold) = (storage.clone(), cold.clone());
    std::thread::Builder::new()
        .name("purge-resume".into())
        .spawn(move || {
            let _watch = storage.health.watch("purge-resume", None);
            for tenant in pending {
                match purge_both_tiers(&storage, &cold, tenant) {
                    Ok(removed) => {
                        tracing::info!(%tenant, removed, "finished an interrupted purge")
                    }
                    Err(error) => tracing::error!(%tenant, %error, "resuming a purge failed"),
                }
            }
        })
        .map_err(|e| StorageError::NotDurable(format!("cannot start the purge thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Config, Overrides};

    #[test]
    fn an_interrupted_purge_is_found_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load_from(&Overrides::default(), &[]).unwrap();
        let storage = Storage::open(dir.path(), 1 << 20, Default::default()).unwrap();
        let directory =
            TenantDirectory::load(storage.clone(), config.tenant_defaults.clone(), [0; 32])
                .unwrap();
        let (gone, _) = directory.create("gone").unwrap();
        let (kept, _) = directory.create("kept").unwrap();
        for tenant in [gone.id, kept.id] {
            storage
                .log()
                .append(tenant, 1, b"x".to_vec().into())
                .unwrap();
        }
        // The tombstone is written, then the process "crashes" before the purge.
        directory.remove(gone.id).unwrap();
        assert_eq!(pending_purges(&storage).unwrap(), vec![gone.id]);
        storage::purge_tenant(&storage, gone.id).unwrap();
        assert!(pending_purges(&storage).unwrap().is_empty());
        assert!(storage::has_tenant_data(&storage, kept.id));
    }
}
