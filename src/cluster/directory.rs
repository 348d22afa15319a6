//! The shared directory: tenants, their key digests and settings, seen by every node.
//!
//! Records live in a JetStream key-value bucket, `<PREFIX>_TENANTS` (file storage, latest value
//! only), keyed by tenant id, each value the tenant record as the single node stores it
//! ([`crate::tenant::encode_record`]). A node [`SharedDirectory::follow`]s the bucket: it gets
//! every current record first, then each change as it is written, within milliseconds, and
//! after a disconnection the watch resumes where it stopped. A deleted tenant stays as a
//! delete marker, so its id is never reused. JetStream rather than Redis pub/sub: a watch
//! cannot miss a change made while a node was disconnected, and a new node reads the whole
//! directory from the same watch.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

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
    kv: kv::Store,
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
        let bucket = format!("{}_TENANTS", prefix.to_ascii_uppercase());
        // The bucket's stream is created here with the key-value layout (ADR-8) rather than
        // by `create_key_value`, which first reads the account's limits in a form servers
        // before 2.10 do not send.
        js.get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| failed("creating the tenant directory")(e.to_string()))?;
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| failed("opening the tenant directory")(e.to_string()))?;
        Ok(SharedDirectory { kv, defaults })
    }

    fn key(id: TenantId) -> String {
        id.to_string()
    }

    /// Writes a tenant's record (created or changed).
    pub async fn put(&self, record: &TenantRecord) -> Result<u64, StreamError> {
        let value =
            encode_record(record).map_err(|e| failed("encoding a tenant record")(e.to_string()))?;
        self.kv
            .put(Self::key(record.id), Bytes::from(value))
            .await
            .map_err(|e| failed("writing a tenant record")(e.to_string()))
    }

    /// Marks a tenant deleted.
    pub async fn remove(&self, id: TenantId) -> Result<(), StreamError> {
        self.kv
            .delete(Self::key(id))
            .await
            .map_err(|e| failed("deleting a tenant record")(e.to_string()))
    }

    /// Whether `id` was ever used (a record or a delete marker).
    pub async fn ever_used(&self, id: TenantId) -> Result<bool, StreamError> {
        let entry = self
            .kv
            .entry(Self::key(id))
            .await
            .map_err(|e| failed("reading a tenant record")(e.to_string()))?;
        Ok(entry.is_some())
    }

    /// Every record, then every change, in the order they were written, with
    /// [`DirectoryChange::CaughtUp`] once after the records that existed when the follow began.
    /// Never ends: when the connection to NATS fails, the watch starts again after the last
    /// change delivered (a record that cannot be decoded is logged and skipped).
    pub fn follow(&self) -> impl Stream<Item = DirectoryChange> + '_ {
        let state = Follow {
            directory: self,
            watch: None,
            next_revision: 0,
            caught_up: false,
            queued: VecDeque::new(),
        };
        futures_util::stream::unfold(state, |mut state| async move {
            let change = state.next().await;
            Some((change, state))
        })
    }

    fn change(&self, entry: &kv::Entry) -> Result<DirectoryChange, StreamError> {
        let id: TenantId = entry.key.parse().map_err(|()| {
            failed("reading the tenant directory")(format!("bad key {:?}", entry.key))
        })?;
        match entry.operation {
            kv::Operation::Delete | kv::Operation::Purge => Ok(DirectoryChange::Removed(id)),
            kv::Operation::Put => decode_record(&entry.value, &self.defaults)
                .map(|record| DirectoryChange::Upsert(Box::new(record)))
                .map_err(|e| failed("decoding a tenant record")(e.to_string())),
        }
    }
}

/// Where a [`SharedDirectory::follow`] is.
struct Follow<'a> {
    directory: &'a SharedDirectory,
    watch: Option<kv::Watch>,
    /// The revision after the last change delivered (0: none yet).
    next_revision: u64,
    caught_up: bool,
    queued: VecDeque<DirectoryChange>,
}

impl Follow<'_> {
    /// Pause before watching again after a failure.
    const RETRY: Duration = Duration::from_millis(200);

    async fn next(&mut self) -> DirectoryChange {
        loop {
            if let Some(change) = self.queued.pop_front() {
                return change;
            }
            let Some(watch) = self.watch.as_mut() else {
                self.start().await;
                continue;
            };
            match watch.next().await {
                Some(Ok(entry)) => {
                    self.next_revision = entry.revision + 1;
                    match self.directory.change(&entry) {
                        Ok(change) => self.queued.push_back(change),
                        Err(error) => tracing::error!(%error, "skipping a tenant record"),
                    }
                    if entry.delta == 0 && !self.caught_up {
                        self.caught_up = true;
                        self.queued.push_back(DirectoryChange::CaughtUp);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "tenant directory watch failed; watching again");
                    self.watch = None;
                    tokio::time::sleep(Self::RETRY).await;
                }
                None => {
                    self.watch = None;
                    tokio::time::sleep(Self::RETRY).await;
                }
            }
        }
    }

    /// Starts (or restarts) the watch after the last change delivered.
    async fn start(&mut self) {
        let kv = &self.directory.kv;
        let watch = if self.next_revision == 0 {
            kv.watch_with_history(">").await
        } else {
            kv.watch_all_from_revision(self.next_revision).await
        };
        match watch {
            Ok(watch) => self.watch = Some(watch),
            Err(error) => {
                tracing::warn!(%error, "cannot watch the tenant directory yet");
                tokio::time::sleep(Self::RETRY).await;
                return;
            }
        }
        if !self.caught_up {
            // An empty bucket delivers nothing first: caught up at once.
            if let Ok(status) = kv.status().await {
                if status.values() == 0 {
                    self.caught_up = true;
                    self.queued.push_back(DirectoryChange::CaughtUp);
                }
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
