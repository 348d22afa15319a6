//! Per-user erasure jobs (GDPR): the job record, which is also the audit record, kept in `meta`
//! for good (who asked, when, for which tenant and user, what was removed, when the superseded
//! copies are purged).
//!
//! A job runs in the background ([`crate::lifecycle::TenantLifecycle::erase_user`]): the
//! tenant's rollup and dedup watermarks are brought up to date, its hot log is flushed to the
//! cold tier up to the log head of the request's time, and the tenant's flusher rewrites each
//! segment that holds the user without the user's events. A job still `running` when the
//! server stops runs again from the start at the next start (every step is idempotent).

use serde::{Deserialize, Serialize};

use crate::event::Micros;
use crate::ids::TenantId;
use crate::storage::{meta, Storage, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Done,
    Failed,
}

/// Who asked for a job, as far as the server can tell (one admin token serves all admins).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Requester {
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// The first 8 bytes of the SHA-256 of the admin token used, in hex.
    pub token_fingerprint: String,
}

/// An erasure job and its audit record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErasureJob {
    pub id: uuid::Uuid,
    pub tenant: TenantId,
    pub user_id: String,
    pub status: JobStatus,
    pub requested_at: Micros,
    /// The tenant's log head when the request came: the job erases the events up to it.
    #[serde(default)]
    pub through_seq: u64,
    pub requested_by: Requester,
    pub finished_at: Option<Micros>,
    pub removed_events: u64,
    pub rewritten_segments: u64,
    /// Segments that held only the user's events and were removed.
    pub removed_segments: u64,
    /// Identity links that named the user, removed (see `crate::storage::identity::forget`).
    #[serde(default)]
    pub removed_identity_links: u64,
    /// Dead letters of the user's events, removed.
    #[serde(default)]
    pub removed_dead_letters: u64,
    /// When the superseded copies (in `trash/`) will have been deleted.
    pub superseded_purged_by: Option<Micros>,
    pub error: Option<String>,
}

impl Requester {
    /// For a record made without the request (the cluster's owner, when the record the ingest
    /// node wrote is missing).
    pub fn unknown() -> Requester {
        Requester {
            client_ip: None,
            user_agent: None,
            token_fingerprint: String::new(),
        }
    }
}

impl ErasureJob {
    /// A job just requested, running, erasing nothing yet.
    pub fn new(
        id: uuid::Uuid,
        tenant: TenantId,
        user_id: String,
        requested_by: Requester,
    ) -> ErasureJob {
        ErasureJob {
            id,
            tenant,
            user_id,
            status: JobStatus::Running,
            requested_at: crate::event::now_micros(),
            through_seq: 0,
            requested_by,
            finished_at: None,
            removed_events: 0,
            rewritten_segments: 0,
            removed_segments: 0,
            removed_identity_links: 0,
            removed_dead_letters: 0,
            superseded_purged_by: None,
            error: None,
        }
    }

    /// Logs the request, for the server's own audit trail.
    pub fn log_requested(&self) {
        tracing::info!(
            job = %self.id,
            tenant = %self.tenant,
            client_ip = self.requested_by.client_ip.as_deref().unwrap_or("-"),
            token = self.requested_by.token_fingerprint,
            "per-user erasure requested"
        );
    }
}

fn codec_error(error: serde_json::Error) -> StorageError {
    StorageError::NotDurable(format!("erasure job record: {error}"))
}

/// Writes the job record, durably. Blocking.
pub fn save(storage: &Storage, job: &ErasureJob) -> Result<(), StorageError> {
    let value = serde_json::to_vec(job).map_err(codec_error)?;
    meta::put_erasure_job(storage, job.id.as_bytes(), &value)
}

/// The job, if there is one with this id. Blocking.
pub fn load(storage: &Storage, id: uuid::Uuid) -> Result<Option<ErasureJob>, StorageError> {
    meta::erasure_job(storage, id.as_bytes())?
        .map(|value| serde_json::from_slice(&value).map_err(codec_error))
        .transpose()
}

/// Every job still running (to resume at start). Blocking.
pub fn running(storage: &Storage) -> Result<Vec<ErasureJob>, StorageError> {
    let mut jobs = Vec::new();
    for value in meta::erasure_jobs(storage)? {
        let job: ErasureJob = serde_json::from_slice(&value).map_err(codec_error)?;
        if job.status == JobStatus::Running {
            jobs.push(job);
        }
    }
    Ok(jobs)
}
