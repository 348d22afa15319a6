//! A JetStream key-value bucket that every node follows: the shared directory and the shared
//! tracking plans are each one.
//!
//! A bucket keeps the latest value of each key (file storage). A node [`Bucket::follow`]s it:
//! it gets every current value first, then each change as it is written, within milliseconds,
//! and after a disconnection the watch resumes where it stopped. JetStream rather than Redis
//! pub/sub: a watch cannot miss a change made while a node was disconnected, and a new node
//! reads the whole bucket from the same watch.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use crate::cluster::stream::{failed, StreamError};

/// One change to a bucket, as a follower sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketChange {
    /// A key written: key, value, revision.
    Put(String, Bytes, u64),
    /// A key deleted (it stays as a delete marker): key, revision.
    Deleted(String, u64),
    /// Every value that existed when the follow began has been delivered.
    CaughtUp,
}

/// Why a conditional write did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// The key changed since the revision the write was made against.
    Changed,
    Failed(StreamError),
}

/// A node's handle on one bucket.
#[derive(Clone)]
pub struct Bucket {
    kv: kv::Store,
    what: &'static str,
}

impl Bucket {
    /// Opens `<PREFIX>_<suffix>`, creating it if this is the cluster's first node. `what`
    /// names the bucket in errors and logs.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        suffix: &str,
        replicas: usize,
        what: &'static str,
    ) -> Result<Bucket, StreamError> {
        let bucket = format!("{}_{suffix}", prefix.to_ascii_uppercase());
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
        .map_err(|e| failed("creating a shared bucket")(format!("{what}: {e}")))?;
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| failed("opening a shared bucket")(format!("{what}: {e}")))?;
        Ok(Bucket { kv, what })
    }

    /// Writes `key`.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, StreamError> {
        (self.kv.put(key, value).await).map_err(|e| self.error("writing to a shared bucket", e))
    }

    /// Writes `key` only if its revision is still `revision` (`None`: only if it has no value).
    pub async fn put_if(
        &self,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        match revision {
            Some(revision) => {
                self.kv
                    .update(key, value, revision)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => WriteError::Changed,
                        _ => WriteError::Failed(self.error("writing to a shared bucket", e)),
                    })
            }
            None => self
                .kv
                .create(key, value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => WriteError::Changed,
                    _ => WriteError::Failed(self.error("writing to a shared bucket", e)),
                }),
        }
    }

    /// Deletes `key` (a delete marker stays).
    pub async fn delete(&self, key: &str) -> Result<(), StreamError> {
        (self.kv.delete(key).await).map_err(|e| self.error("deleting from a shared bucket", e))
    }

    /// The value of `key` and its revision; `None` if it has none or was deleted.
    pub async fn get(&self, key: &str) -> Result<Option<(u64, Bytes)>, StreamError> {
        let entry = (self.kv.entry(key).await)
            .map_err(|e| self.error("reading from a shared bucket", e))?;
        Ok(entry.and_then(|entry| match entry.operation {
            kv::Operation::Put => Some((entry.revision, entry.value)),
            kv::Operation::Delete | kv::Operation::Purge => None,
        }))
    }

    /// Whether `key` was ever written (a value or a delete marker).
    pub async fn ever_used(&self, key: &str) -> Result<bool, StreamError> {
        let entry = (self.kv.entry(key).await)
            .map_err(|e| self.error("reading from a shared bucket", e))?;
        Ok(entry.is_some())
    }

    /// Every key that has a value and starts with `prefix`.
    pub async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StreamError> {
        let mut keys =
            (self.kv.keys().await).map_err(|e| self.error("listing a shared bucket", e))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.error("listing a shared bucket", e))?;
            if key.starts_with(prefix) {
                found.push(key);
            }
        }
        Ok(found)
    }

    fn error(&self, what: &'static str, error: impl std::fmt::Display) -> StreamError {
        failed(what)(format!("{}: {error}", self.what))
    }

    /// Every value, then every change, in the order they were written, with
    /// [`BucketChange::CaughtUp`] once after the values that existed when the follow began.
    /// Never ends: when the connection to NATS fails, the watch starts again after the last
    /// change delivered.
    pub fn follow(&self) -> impl Stream<Item = BucketChange> + '_ {
        let state = Follow {
            bucket: self,
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
}

/// Where a [`Bucket::follow`] is.
struct Follow<'a> {
    bucket: &'a Bucket,
    watch: Option<kv::Watch>,
    /// The revision after the last change delivered (0: none yet).
    next_revision: u64,
    caught_up: bool,
    queued: VecDeque<BucketChange>,
}

impl Follow<'_> {
    /// Pause before watching again after a failure.
    const RETRY: Duration = Duration::from_millis(200);

    async fn next(&mut self) -> BucketChange {
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
                    let last_of_history = entry.delta == 0;
                    self.queued.push_back(match entry.operation {
                        kv::Operation::Put => {
                            BucketChange::Put(entry.key, entry.value, entry.revision)
                        }
                        kv::Operation::Delete | kv::Operation::Purge => {
                            BucketChange::Deleted(entry.key, entry.revision)
                        }
                    });
                    if last_of_history && !self.caught_up {
                        self.caught_up = true;
                        self.queued.push_back(BucketChange::CaughtUp);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(bucket = self.bucket.what, %error, "watch failed; watching again");
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
        let kv = &self.bucket.kv;
        let watch = if self.next_revision == 0 {
            kv.watch_with_history(">").await
        } else {
            kv.watch_all_from_revision(self.next_revision).await
        };
        match watch {
            Ok(watch) => self.watch = Some(watch),
            Err(error) => {
                tracing::warn!(bucket = self.bucket.what, %error, "cannot watch yet");
                tokio::time::sleep(Self::RETRY).await;
                return;
            }
        }
        if !self.caught_up {
            // An empty bucket delivers nothing first: caught up at once.
            if let Ok(status) = kv.status().await {
                if status.values() == 0 {
                    self.caught_up = true;
                    self.queued.push_back(BucketChange::CaughtUp);
                }
            }
        }
    }
}
