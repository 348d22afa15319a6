//! Per-user erasure in cluster mode.
//!
//! Only a partition's owner may change its tenants' cold tier, and only it knows which events
//! came before a request. So an ingest node that gets a request writes the job record to the
//! shared object store (`erasures/<job id>.json`, the audit record, kept for good), then
//! publishes an [`EraseRequest`] to the tenant's partition of the event stream, in order with
//! the tenant's events. The owner that applies it notes the tenant's log head then, and at its
//! next checkpoint, once the cold tier holds everything through that head, rewrites the
//! tenant's segments without the user's events and removes the user's dead letters, records
//! the outcome in the job record, and only then writes the checkpoint. An owner that dies
//! before leaves the request in the stream above the last checkpoint: the next owner applies
//! it again (every step is idempotent).

use serde::{Deserialize, Serialize};

use crate::erasure::ErasureJob;
use crate::ids::TenantId;
use crate::storage::cold::{ColdError, ColdStore};
use crate::storage::StorageError;

/// The first byte of a stream message that is an erasure request, not a batch (whose first
/// byte is the batch layout's version).
const MARK: u8 = 0xE5;

/// An erasure request, as it travels in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EraseRequest {
    pub tenant: TenantId,
    pub job: uuid::Uuid,
    pub user: String,
}

impl EraseRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MARK];
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// The request `payload` holds, if it is one (`None`: a batch); bytes of another layout
    /// are an error, never a panic.
    pub fn decode(payload: &[u8]) -> Option<Result<EraseRequest, StorageError>> {
        let body = payload.strip_prefix(&[MARK])?;
        Some(serde_json::from_slice(body).map_err(|e| {
            StorageError::NotDurable(format!("unreadable erasure request in the stream: {e}"))
        }))
    }
}

fn job_path(id: uuid::Uuid) -> String {
    format!("erasures/{id}.json")
}

/// Writes a job record.
pub async fn save_job(store: &ColdStore, job: &ErasureJob) -> Result<(), ColdError> {
    let body = serde_json::to_vec(job)
        .map_err(|e| ColdError::Corrupt(format!("encoding an erasure job: {e}")))?;
    store.put(&job_path(job.id), body.into()).await
}

/// The job record `id`, if there is one.
pub async fn load_job(store: &ColdStore, id: uuid::Uuid) -> Result<Option<ErasureJob>, ColdError> {
    match store.get(&job_path(id)).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ColdError::Corrupt(format!("erasure job {id}: {e}"))),
        Err(ColdError::Store(object_store::Error::NotFound { .. })) => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_from_batches_and_round_trip() {
        let request = EraseRequest {
            tenant: TenantId(7),
            job: uuid::Uuid::now_v7(),
            user: "user-\u{e9}".into(),
        };
        let decoded = EraseRequest::decode(&request.encode()).map(|r| r.ok());
        assert_eq!(decoded, Some(Some(request)));
        assert!(EraseRequest::decode(&[1, 2, 3]).is_none());
        assert!(matches!(EraseRequest::decode(&[MARK, b'{']), Some(Err(_))));
    }
}
