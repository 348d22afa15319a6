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
use crate::cluster::commands::Command;
use crate::cluster::partition_of;
use crate::erasure::{self, ErasureJob, JobStatus, Requester};
use crate::event::{duration_micros, Micros};
use crate::ids::TenantId;
use crate::query::QueryCache;
use crate::ratelimit::RateLimits;
use crate::storage::cold::{ColdStore, Due, MaintenanceReport};
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
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The cold tier could not do what was asked (object storage down, a watermark that did
    /// not catch up in time); nothing was lost, and the request can be repeated.
    #[error("{0}")]
    Cold(String),
    /// Cluster mode: the shared directory could not be written, so other nodes do not see the
    /// change yet; repeating the request writes it again.
    #[error("the shared tenant directory (NATS) could not be written; repeat the request: {0}")]
    Shared(String),
}

/// How long an admin flush or erasure waits for the rollups to cover the log.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Cluster mode: how long a flush or a rollup rebuild waits for the partitions' owners (a
/// takeover included).
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything a tenant's lifecycle touches.
#[derive(Clone)]
pub struct TenantLifecycle {
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    pub directory: Arc<TenantDirectory>,
    pub schemas: Arc<crate::schema::SchemaRegistry>,
    pub pipelines: Arc<Pipelines>,
    pub rate_limits: Arc<RateLimits>,
    pub query_cache: Arc<QueryCache>,
    pub cold: ColdStore,
    /// Longest a superseded cold object waits before deletion: the grace period, then up to
    /// one flusher pass.
    pub cold_purge_delay: std::time::Duration,
    /// Cluster mode: the node whose shared directory every change is written to.
    pub cluster: Option<Arc<crate::cluster::node::ClusterNode>>,
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
        self.share(&created.0).await?;
        tracing::info!(tenant = %created.0.id, name = %created.0.name, "tenant created");
        Ok(created)
    }

    /// Cluster mode: writes a changed record to the shared directory, where every node sees it.
    async fn share(&self, record: &Arc<TenantRecord>) -> Result<(), LifecycleError> {
        let Some(node) = self.cluster.clone() else {
            return Ok(());
        };
        let (record, engines) = (Arc::clone(record), Arc::clone(&node));
        (node
            .on_engines(async move { engines.directory.put(&record).await })
            .await)
            .map_err(LifecycleError::Shared)?
            .map_err(|e| LifecycleError::Shared(e.to_string()))?;
        Ok(())
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
        self.share(&record).await?;
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
        self.share(&rotated.0).await?;
        tracing::info!(tenant = %id, ?which, "tenant keys rotated");
        Ok(rotated)
    }

    /// Deletes a tenant and purges its data (see the module docs); returns the number of log
    /// entries purged.
    pub async fn delete(&self, id: TenantId) -> Result<u64, LifecycleError> {
        let directory = Arc::clone(&self.directory);
        if let Some(node) = self.cluster.clone() {
            // Shared first: if it fails, the tenant is still here and the request can be
            // repeated.
            if self.directory.get(id).is_none() {
                return Err(DirectoryError::NotFound(id).into());
            }
            let engines = Arc::clone(&node);
            (node
                .on_engines(async move { engines.directory.remove(id).await })
                .await)
                .map_err(LifecycleError::Shared)?
                .map_err(|e| LifecycleError::Shared(e.to_string()))?;
            // The tenant's id is never used again, so what is left behind is only clutter.
            let engines = Arc::clone(&node);
            let forgotten = node
                .on_engines(async move {
                    let plans = engines.plans.forget(id).await.map_err(|e| e.to_string());
                    let letters =
                        (engines.dead_letters.delete_all(id).await).map_err(|e| e.to_string());
                    plans.and(letters)
                })
                .await;
            if let Err(error) = forgotten.and_then(|r| r) {
                tracing::warn!(tenant = %id, %error, "the deleted tenant's shared plan or dead letters stay");
            }
        }
        match blocking::run(move || directory.remove(id)).await? {
            // The shared directory's change came back to this node first.
            Err(DirectoryError::NotFound(_)) if self.cluster.is_some() => {}
            removed => {
                removed?;
            }
        }
        self.pipelines.stop(id);
        self.rate_limits.forget(id);
        self.query_cache.forget(id);
        self.schemas.forget(id);
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
        if let Some(node) = &self.cluster {
            // The owner, the shared rollups' only writer, drops and rebuilds them.
            let command = Command::RebuildRollups {
                tenant: id,
                id: uuid::Uuid::new_v4(),
            };
            let (command_id, partition) = (command.id(), partition_of(id, node.config.partitions));
            if let Err(error) = node.send(partition, command).await {
                tracing::warn!(tenant = %id, %error, "rollup rebuild not sent");
                return false;
            }
            if !node.wait_done(vec![command_id], OWNER_WAIT).await {
                return false;
            }
        } else if !self.pipelines.pipeline(id).rebuild_rollups().await {
            return false;
        }
        self.query_cache.forget(id);
        tracing::info!(tenant = %id, "rollup rebuild requested");
        true
    }
}

impl TenantLifecycle {
    /// Brings the tenant's dedup and rollup watermarks up to what its log held at the call:
    /// the dedup keys are written now, and the rollups, which flush every second, are waited
    /// for. Returns that log head.
    async fn settle_watermarks(&self, id: TenantId) -> Result<u64, LifecycleError> {
        // The pipeline rolls the log up; it must be running (and is never started again for a
        // deleted tenant).
        self.live_tenant(id)?;
        let _pipeline = self.pipelines.pipeline(id);
        self.writer.ingest_dedup_keys_now().await?;
        let storage = self.storage.clone();
        let head = blocking::run(move || storage.log().head(id)).await??;
        let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let storage = self.storage.clone();
            let rolled = blocking::run(move || storage::rollups::watermark(&storage, id)).await??;
            if rolled >= head {
                return Ok(head);
            }
            if std::time::Instant::now() > deadline {
                return Err(LifecycleError::Cold(format!(
                    "the rollups reached sequence {rolled} of {head} within {SETTLE_TIMEOUT:?}; try again"
                )));
            }
            actix_rt::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn live_tenant(&self, id: TenantId) -> Result<(), LifecycleError> {
        match self.directory.get(id) {
            Some(_) => Ok(()),
            None => Err(DirectoryError::NotFound(id).into()),
        }
    }

    /// The admin flush: brings the watermarks up to date, then has the tenant's flusher move
    /// everything received more than `hot_retention` before now to the cold tier. Resolves
    /// with the cold watermark once that is committed.
    /// Cluster mode: has the owners of the tenants' partitions write a checkpoint now, which
    /// flushes each of their tenants' logs to the cold tier first; returns each tenant's cold
    /// watermark after it.
    pub async fn flush_shared(
        &self,
        node: &Arc<crate::cluster::node::ClusterNode>,
        tenants: &[TenantId],
    ) -> Result<Vec<(TenantId, u64)>, LifecycleError> {
        let partitions: std::collections::BTreeSet<u16> = (tenants.iter())
            .map(|id| partition_of(*id, node.config.partitions))
            .collect();
        let mut ids = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let id = uuid::Uuid::new_v4();
            (node.send(partition, Command::Flush { id }).await).map_err(LifecycleError::Shared)?;
            ids.push(id);
        }
        if !node.wait_done(ids, OWNER_WAIT).await {
            return Err(LifecycleError::Cold(format!(
                "the partitions' owners did not flush within {OWNER_WAIT:?}"
            )));
        }
        let mut watermarks = Vec::with_capacity(tenants.len());
        for id in tenants {
            let (cold, id) = (self.cold.clone(), *id);
            let published =
                blocking::run(move || crate::storage::cold::newest_published(&cold, id)).await?;
            let published = published.map_err(|e| LifecycleError::Cold(e.to_string()))?;
            watermarks.push((id, published.cold_watermark));
        }
        Ok(watermarks)
    }

    pub async fn flush_cold(
        &self,
        id: TenantId,
        hot_retention: std::time::Duration,
    ) -> Result<u64, LifecycleError> {
        let started = crate::event::now_micros();
        self.settle_watermarks(id).await?;
        let retention = duration_micros(hot_retention);
        self.live_tenant(id)?;
        let due = Due::received_before(started.saturating_sub(retention));
        (self.pipelines.pipeline(id).flush_cold(due).await).map_err(LifecycleError::Cold)
    }

    /// Starts erasing a user's raw events (see [`crate::erasure`]); returns the job, running.
    pub async fn erase_user(
        &self,
        id: TenantId,
        user_id: String,
        requested_by: Requester,
    ) -> Result<ErasureJob, LifecycleError> {
        self.live_tenant(id)?;
        if let Some(node) = self.cluster.clone() {
            return self.request_erasure(&node, id, user_id, requested_by).await;
        }
        let storage = self.storage.clone();
        let through_seq = blocking::run(move || storage.log().head(id)).await??;
        let job = ErasureJob {
            through_seq,
            ..ErasureJob::new(uuid::Uuid::new_v4(), id, user_id, requested_by)
        };
        let (storage, record) = (self.storage.clone(), job.clone());
        blocking::run(move || erasure::save(&storage, &record)).await??;
        job.log_requested();
        self.spawn_erasure(job.clone());
        Ok(job)
    }

    /// Cluster mode: records the job in the shared store and sends the request to the owner of
    /// the tenant's partition, in order with the tenant's events (see
    /// `crate::cluster::commands`).
    async fn request_erasure(
        &self,
        node: &Arc<crate::cluster::node::ClusterNode>,
        id: TenantId,
        user_id: String,
        requested_by: Requester,
    ) -> Result<ErasureJob, LifecycleError> {
        use crate::cluster::commands::save_job;
        let mut job = ErasureJob::new(uuid::Uuid::new_v4(), id, user_id, requested_by);
        let cold_error = |e: crate::storage::cold::ColdError| LifecycleError::Cold(e.to_string());
        save_job(&self.cold, &job).await.map_err(cold_error)?;
        let request = Command::EraseUser {
            tenant: id,
            job: job.id,
            user: job.user_id.clone(),
        };
        let partition = crate::cluster::partition_of(id, node.config.partitions);
        if let Err(error) = node.send(partition, request).await {
            // A publish that timed out may have been stored all the same, and carried out
            // since: only a record still running is marked failed.
            let current = crate::cluster::commands::load_job(&self.cold, job.id).await;
            if !matches!(current, Ok(Some(ref recorded)) if recorded.status == JobStatus::Running) {
                return Err(LifecycleError::Shared(error));
            }
            job.status = JobStatus::Failed;
            job.finished_at = Some(crate::event::now_micros());
            job.error = Some(format!(
                "the request did not reach the event stream: {error}"
            ));
            save_job(&self.cold, &job).await.map_err(cold_error)?;
            return Err(LifecycleError::Shared(error));
        }
        job.log_requested();
        Ok(job)
    }

    /// Runs a job in the background and records how it ended.
    pub fn spawn_erasure(&self, mut job: ErasureJob) {
        let lifecycle = self.clone();
        actix_rt::spawn(async move {
            match lifecycle.run_erasure(&job).await {
                Ok((report, links, letters)) => {
                    let now = crate::event::now_micros();
                    job.status = JobStatus::Done;
                    job.removed_events = report.removed_events;
                    job.removed_identity_links = links;
                    job.removed_dead_letters = letters;
                    job.rewritten_segments = report.written_segments;
                    job.removed_segments = report.removed_segments - report.written_segments;
                    job.finished_at = Some(now);
                    let grace =
                        Micros::try_from(lifecycle.cold_purge_delay.as_micros()).unwrap_or(0);
                    job.superseded_purged_by = Some(now.saturating_add(grace));
                    tracing::info!(job = %job.id, tenant = %job.tenant, removed_events = job.removed_events, "per-user erasure done");
                }
                Err(error) => {
                    job.status = JobStatus::Failed;
                    job.finished_at = Some(crate::event::now_micros());
                    job.error = Some(error.to_string());
                    tracing::error!(job = %job.id, tenant = %job.tenant, %error, "per-user erasure failed");
                }
            }
            let storage = lifecycle.storage.clone();
            match blocking::run(move || erasure::save(&storage, &job)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "recording an erasure job failed"),
                Err(error) => tracing::error!(%error, "recording an erasure job failed"),
            }
        });
    }

    /// Runs an erasure; returns what it removed from the cold tier, and how many identity links
    /// and dead letters.
    async fn run_erasure(
        &self,
        job: &ErasureJob,
    ) -> Result<(MaintenanceReport, u64, u64), LifecycleError> {
        self.settle_watermarks(job.tenant).await?;
        self.live_tenant(job.tenant)?;
        let pipeline = self.pipelines.pipeline(job.tenant);
        // By sequence: everything the log held at the request, whenever it was received.
        let due = Due {
            received_before: 0,
            through_seq: job.through_seq,
        };
        let flushed = (pipeline.flush_cold(due).await).map_err(LifecycleError::Cold)?;
        if flushed < job.through_seq {
            return Err(LifecycleError::Cold(format!(
                "the hot log was flushed to sequence {flushed} of {}",
                job.through_seq
            )));
        }
        let report =
            (pipeline.erase_cold(job.user_id.clone()).await).map_err(LifecycleError::Cold)?;
        // The id in the identity links too (the rollups stored every link up to the request).
        let links = match self.directory.get(job.tenant) {
            Some(record) => {
                let (storage, tenant, user) =
                    (self.storage.clone(), job.tenant, job.user_id.clone());
                let key = record.user_hash_key;
                blocking::run(move || {
                    crate::storage::identity::forget(&storage, tenant, &key, &user)
                })
                .await??
            }
            None => 0,
        };
        let letters = {
            let (storage, tenant, user) = (self.storage.clone(), job.tenant, job.user_id.clone());
            blocking::run(move || crate::deadletter::erase_user(&storage, tenant, &user)).await??
        };
        self.query_cache.forget(job.tenant);
        Ok((report, links, letters))
    }

    /// An erasure job by id.
    pub async fn erasure(&self, id: uuid::Uuid) -> Result<Option<ErasureJob>, LifecycleError> {
        if self.cluster.is_some() {
            return (crate::cluster::commands::load_job(&self.cold, id).await)
                .map_err(|e| LifecycleError::Cold(e.to_string()));
        }
        let storage = self.storage.clone();
        Ok(blocking::run(move || erasure::load(&storage, id)).await??)
    }

    /// Starts again the erasure jobs a stop interrupted. At start-up.
    pub fn resume_erasures(&self) -> Result<(), StorageError> {
        for job in erasure::running(&self.storage)? {
            tracing::info!(job = %job.id, tenant = %job.tenant, "resuming an interrupted erasure");
            self.spawn_erasure(job);
        }
        Ok(())
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
    // After any cold-tier task of the tenant still running (see `ColdStore::tenant_lock`).
    let lock = cold.tenant_lock(id);
    let _changing = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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
