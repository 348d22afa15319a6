//! The shared tracking plans: every tenant's schema versions, seen by every node.
//!
//! One [`Bucket`], `<PREFIX>_SCHEMAS`, holds one key per tenant and event,
//! `<tenant id>.<event name in unpadded URL-safe base64>`, whose value is the event's versions as JSON, oldest
//! first. A change is a read, the single node's rules applied to what was read
//! ([`SchemaRegistry::prepare_register`], [`crate::schema::prepare_retire`]), and a write made
//! only if the key is still at the revision read: two nodes changing one event's schema at once
//! cannot both number a version 3, and the loser tries again on what the winner wrote. Every
//! node follows the bucket into its in-memory registry ([`SchemaRegistry::mirror`]), so an
//! ingest node checks events against a version registered on any node within milliseconds.

use std::collections::HashMap;

use async_nats::jetstream;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::cluster::bucket::{Bucket, BucketChange, WriteError};
use crate::cluster::stream::StreamError;
use crate::ids::TenantId;
use crate::schema::{EventChange, RegistryError, SchemaRegistry, SchemaVersion};

/// Tries of one change when other nodes keep changing the same event first.
const TRIES: usize = 5;

/// A node's handle on the shared plans.
pub struct SharedPlans {
    bucket: Bucket,
    /// Per key, the revision this node's registry holds. A node mirrors its own write and
    /// then gets it (and perhaps later ones) from its watch too, in either order: an older
    /// revision than the one held is never applied. Held while mirroring, so a check and its
    /// mirror are one step.
    applied: std::sync::Mutex<HashMap<String, u64>>,
}

fn key(tenant: TenantId, event: &str) -> String {
    format!("{tenant}.{}", URL_SAFE_NO_PAD.encode(event))
}

/// The tenant and event a key names.
fn parse_key(key: &str) -> Option<(TenantId, String)> {
    let (tenant, event) = key.split_once('.')?;
    let event = String::from_utf8(URL_SAFE_NO_PAD.decode(event).ok()?).ok()?;
    Some((tenant.parse().ok()?, event))
}

fn unavailable(error: StreamError) -> RegistryError {
    RegistryError::Unavailable(format!("the shared tracking plans: {error}"))
}

impl SharedPlans {
    /// Opens the bucket, creating it if this is the cluster's first node.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        replicas: usize,
    ) -> Result<SharedPlans, StreamError> {
        let bucket = Bucket::open(js, prefix, "SCHEMAS", replicas, "tracking plans").await?;
        Ok(SharedPlans {
            bucket,
            applied: Default::default(),
        })
    }

    /// Applies `change` (made from the event's shared versions) and commits it, then mirrors it
    /// into `registry` at once, so this node reads its own write; returns the version changed.
    pub async fn change(
        &self,
        registry: &SchemaRegistry,
        tenant: TenantId,
        event: &str,
        change: impl Fn(&[SchemaVersion]) -> Result<EventChange, RegistryError>,
    ) -> Result<SchemaVersion, RegistryError> {
        let key = key(tenant, event);
        for _ in 0..TRIES {
            let stored = self.bucket.get(&key).await.map_err(unavailable)?;
            let (revision, current) = match stored {
                Some((revision, value)) => (Some(revision), decode(&value)?),
                None => (None, Vec::new()),
            };
            let EventChange { changed, versions } = change(&current)?;
            let value = serde_json::to_vec(&versions)
                .map_err(|e| RegistryError::Invalid(format!("cannot encode the versions: {e}")))?;
            match self.bucket.put_if(&key, Bytes::from(value), revision).await {
                Ok(written) => {
                    self.mirror_revision(registry, &key, written, (tenant, event), versions);
                    return Ok(changed);
                }
                Err(WriteError::Changed) => continue,
                Err(WriteError::Failed(error)) => return Err(unavailable(error)),
            }
        }
        Err(RegistryError::Unavailable(format!(
            "event {event:?}'s schema kept changing on other nodes; try again"
        )))
    }

    /// Deletes a deleted tenant's plan.
    pub async fn forget(&self, tenant: TenantId) -> Result<(), StreamError> {
        for key in self.bucket.keys_under(&format!("{tenant}.")).await? {
            self.bucket.delete(&key).await?;
        }
        Ok(())
    }

    /// Applies the shared plans to `registry`, and keeps applying their changes for as long as
    /// the node runs. Resolves once every plan that existed at start is applied.
    pub async fn mirror(
        &self,
        registry: &SchemaRegistry,
        caught_up: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut caught_up = Some(caught_up);
        let changes = self.bucket.follow();
        futures_util::pin_mut!(changes);
        while let Some(change) = changes.next().await {
            let (key, versions, revision) = match change {
                BucketChange::CaughtUp => {
                    if let Some(caught_up) = caught_up.take() {
                        let _ = caught_up.send(());
                    }
                    continue;
                }
                BucketChange::Deleted(key, revision) => (key, Ok(Vec::new()), revision),
                BucketChange::Put(key, value, revision) => {
                    let versions = decode(&value);
                    (key, versions, revision)
                }
            };
            match (parse_key(&key), versions) {
                (Some((tenant, event)), Ok(versions)) => {
                    self.mirror_revision(registry, &key, revision, (tenant, &event), versions)
                }
                (None, _) => tracing::error!(%key, "skipping a tracking plan: bad key"),
                (_, Err(error)) => tracing::error!(%key, %error, "skipping a tracking plan"),
            }
        }
    }
}

impl SharedPlans {
    /// Mirrors `versions` (the key's value at `revision`) into `registry`, unless it already
    /// holds a later revision of the key.
    fn mirror_revision(
        &self,
        registry: &SchemaRegistry,
        key: &str,
        revision: u64,
        (tenant, event): (TenantId, &str),
        versions: Vec<SchemaVersion>,
    ) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.get(key).is_some_and(|held| *held >= revision) {
            return;
        }
        applied.insert(key.to_string(), revision);
        registry.mirror(tenant, event, versions);
    }
}

fn decode(value: &[u8]) -> Result<Vec<SchemaVersion>, RegistryError> {
    serde_json::from_slice(value).map_err(|e| {
        RegistryError::Unavailable(format!("a shared tracking plan is unreadable: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_tenant_and_event() {
        let tenant: TenantId = "00000000000000ab".parse().unwrap_or_else(|()| panic!());
        for event in ["Order Completed", "$page", "a.b>*c", "é"] {
            let key = key(tenant, event);
            assert!(key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
            assert_eq!(parse_key(&key), Some((tenant, event.to_string())));
        }
        assert_eq!(parse_key("nonsense"), None);
    }
}
