//! Admin requests that only a partition's owner may carry out, sent to it through the
//! partition's stream, in order with the tenants' events: per-user erasure, a flush of the
//! cold tier, a rollup rebuild.
//!
//! - **Erasure.** The ingest node writes the job record to the shared object store
//!   (`erasures/<job id>.json`, the audit record, kept for good), then publishes the request.
//!   The owner that applies it notes the tenant's log head then, and at its next checkpoint,
//!   once the cold tier holds everything through that head, rewrites the tenant's segments
//!   without the user's events and removes the user's dead letters, records the outcome in the
//!   job record, and only then writes the checkpoint.
//! - **Flush.** The owner writes a checkpoint at once (which flushes every tenant's log to the
//!   cold tier first) and, once it is stored, marks the request done.
//! - **Rollup rebuild.** The owner, the only writer of the tenant's shared rollups, deletes
//!   them and rolls the tenant up again from its log and the cold tier, as after a Redis loss,
//!   and marks the request done once the old rollups are gone.
//!
//! An owner that dies first leaves the request in the stream above the last checkpoint: the
//! next owner applies it again (every step is idempotent). Ingest nodes wait for a request to
//! be marked done ([`Markers`]) in Redis.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::erasure::ErasureJob;
use crate::ids::TenantId;
use crate::storage::cold::{ColdError, ColdStore};
use crate::storage::StorageError;

/// The first byte of a stream message that is a command, not a batch (whose first byte is the
/// batch layout's version).
const MARK: u8 = 0xE5;

/// A command, as it travels in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    EraseUser {
        tenant: TenantId,
        job: uuid::Uuid,
        user: String,
    },
    /// Every tenant of the partition.
    Flush {
        id: uuid::Uuid,
    },
    RebuildRollups {
        tenant: TenantId,
        id: uuid::Uuid,
    },
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MARK];
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// The command `payload` holds, if it is one (`None`: a batch); bytes of another layout
    /// are an error, never a panic.
    pub fn decode(payload: &[u8]) -> Option<Result<Command, StorageError>> {
        let body = payload.strip_prefix(&[MARK])?;
        Some(serde_json::from_slice(body).map_err(|e| {
            StorageError::NotDurable(format!("unreadable command in the stream: {e}"))
        }))
    }

    /// The tenant it is about (`None`: the whole partition).
    pub fn tenant(&self) -> Option<TenantId> {
        match self {
            Command::EraseUser { tenant, .. } | Command::RebuildRollups { tenant, .. } => {
                Some(*tenant)
            }
            Command::Flush { .. } => None,
        }
    }

    /// Its id: what it is published and marked done under.
    pub fn id(&self) -> uuid::Uuid {
        match self {
            Command::EraseUser { job, .. } => *job,
            Command::Flush { id } | Command::RebuildRollups { id, .. } => *id,
        }
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

/// Commands done, in Redis for an hour: owners mark, ingest nodes wait.
#[derive(Clone)]
pub struct Markers {
    redis: ConnectionManager,
    prefix: String,
}

/// How long a mark stays.
const MARK_TTL_SECS: u64 = 3600;
/// How often a waiting node looks.
const POLL: Duration = Duration::from_millis(50);

impl Markers {
    pub fn new(redis: ConnectionManager, prefix: &str) -> Markers {
        Markers {
            redis,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, id: uuid::Uuid) -> String {
        format!("{}:done:{id}", self.prefix)
    }

    pub async fn mark_done(&self, id: uuid::Uuid) -> redis::RedisResult<()> {
        redis::cmd("SET")
            .arg(self.key(id))
            .arg(1)
            .arg("EX")
            .arg(MARK_TTL_SECS)
            .query_async(&mut self.redis.clone())
            .await
    }

    /// Waits until every command of `ids` is done; false if one was not within `timeout`.
    pub async fn wait(&self, ids: &[uuid::Uuid], timeout: Duration) -> bool {
        let started = tokio::time::Instant::now();
        let mut left: Vec<String> = ids.iter().map(|id| self.key(*id)).collect();
        while !left.is_empty() {
            let found: redis::RedisResult<Vec<Option<u8>>> = redis::cmd("MGET")
                .arg(&left)
                .query_async(&mut self.redis.clone())
                .await;
            if let Ok(found) = found {
                let mut found = found.into_iter();
                left.retain(|_| found.next().flatten().is_none());
            }
            if left.is_empty() {
                break;
            }
            if started.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_told_from_batches_and_round_trip() {
        let commands = [
            Command::EraseUser {
                tenant: TenantId(7),
                job: uuid::Uuid::now_v7(),
                user: "user-\u{e9}".into(),
            },
            Command::Flush {
                id: uuid::Uuid::now_v7(),
            },
            Command::RebuildRollups {
                tenant: TenantId(8),
                id: uuid::Uuid::now_v7(),
            },
        ];
        for command in commands {
            let decoded = Command::decode(&command.encode()).map(|r| r.ok());
            assert_eq!(decoded, Some(Some(command)));
        }
        assert!(Command::decode(&[crate::storage::writer::WIRE_VERSION, 2, 3]).is_none());
        assert!(matches!(Command::decode(&[MARK, b'{']), Some(Err(_))));
    }
}
