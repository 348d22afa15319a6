//! Partition checkpoints in object storage: what a partition's new owner starts from before it
//! reads the stream's tail.
//!
//! A checkpoint is the state of a partition after its runner processed every stream message up
//! to `covered` (see [`crate::cluster::runner`]); its body is the runner's business. It is
//! stored at `checkpoints/partition=<p>/<covered>-<token>.ckpt` (both numbers zero-padded, so
//! names sort by them), written once and never changed, with a header (format version, body
//! length, BLAKE3 of the body) so that a damaged object is refused rather than trusted.
//!
//! Processing is deterministic, so any two checkpoints of the same `covered` describe the same
//! state, whoever wrote them: one written late by a node that had lost its lease is as good as
//! the new owner's, and the latest checkpoint is simply the one with the highest `covered`.
//! Older ones are pruned, keeping the newest two, so a reader that listed just before a prune
//! still finds what it chose, or the next one.

use std::time::Duration;

use bytes::Bytes;

use crate::event::{duration_micros, flags, Micros};
use crate::ids::TenantId;
use crate::storage::cold::{ColdError, ColdStore};
use crate::storage::dedup;
use crate::storage::event_log::first_seq_received_since;
use crate::storage::writer::KeysSeenAt;
use crate::storage::{codec, Storage, StorageError};

const MAGIC: &[u8; 4] = b"SRCK";
/// 2: a tenant's dedup keys are read from the cold tier ([`cold_keys`]); 1: they were in the
/// checkpoint (still read).
const VERSION: u8 = 2;
const HEADER: usize = 4 + 1 + 8 + 32;

/// A checkpoint as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub partition: u16,
    /// The last stream sequence whose message the state includes.
    pub covered: u64,
    /// The lease token of the node that wrote it.
    pub token: u64,
    /// The body's format (see [`Snapshot::decode`]).
    pub version: u8,
    pub body: Bytes,
}

/// The checkpoints of a cluster, in its object store.
#[derive(Clone)]
pub struct Checkpoints {
    store: ColdStore,
}

fn folder(partition: u16) -> String {
    format!("checkpoints/partition={partition}/")
}

fn name(partition: u16, covered: u64, token: u64) -> String {
    format!("{}{covered:020}-{token:020}.ckpt", folder(partition))
}

/// `(covered, token)` of a checkpoint's object name, if it is one.
fn parse(location: &str) -> Option<(u64, u64)> {
    let file = location.rsplit('/').next()?.strip_suffix(".ckpt")?;
    let (covered, token) = file.split_once('-')?;
    Some((covered.parse().ok()?, token.parse().ok()?))
}

impl Checkpoints {
    pub fn new(store: ColdStore) -> Checkpoints {
        Checkpoints { store }
    }

    /// Stores a checkpoint. Writing the same one twice (a retry) is harmless.
    pub async fn write(
        &self,
        partition: u16,
        covered: u64,
        token: u64,
        body: &[u8],
    ) -> Result<(), ColdError> {
        let mut object = Vec::with_capacity(HEADER + body.len());
        object.extend_from_slice(MAGIC);
        object.push(VERSION);
        object.extend_from_slice(&(body.len() as u64).to_be_bytes());
        object.extend_from_slice(blake3::hash(body).as_bytes());
        object.extend_from_slice(body);
        let path = name(partition, covered, token);
        self.store.put_new(&path, Bytes::from(object)).await?;
        Ok(())
    }

    /// The checkpoint with the highest `covered` (the highest token among equals), if any; a
    /// damaged one is skipped for the one before it (the stream is never trimmed below an
    /// owner's own checkpoints, so the one before is still good to start from).
    pub async fn latest(&self, partition: u16) -> Result<Option<Checkpoint>, ColdError> {
        let listed = self.listed(partition).await?;
        let mut damaged = None;
        for (covered, token) in listed.iter().rev().copied() {
            let object = self.store.get(&name(partition, covered, token)).await?;
            match check(&object) {
                Ok((version, body)) => {
                    return Ok(Some(Checkpoint {
                        partition,
                        covered,
                        token,
                        version,
                        body,
                    }))
                }
                Err(error) => {
                    tracing::error!(partition, covered, %error, "skipping a damaged checkpoint");
                    damaged = Some(error);
                }
            }
        }
        match damaged {
            Some(error) => Err(error),
            None => Ok(None),
        }
    }

    /// Deletes all but the newest two checkpoints; returns how many it deleted.
    pub async fn prune(&self, partition: u16) -> Result<usize, ColdError> {
        let listed = self.listed(partition).await?;
        let old = listed.len().saturating_sub(2);
        for (covered, token) in &listed[..old] {
            self.store
                .delete(&name(partition, *covered, *token))
                .await?;
        }
        Ok(old)
    }

    /// `(covered, token)` of the partition's checkpoints, ascending.
    async fn listed(&self, partition: u16) -> Result<Vec<(u64, u64)>, ColdError> {
        let mut found: Vec<(u64, u64)> = (self.store.list(&folder(partition)).await?)
            .iter()
            .filter_map(|meta| parse(meta.location.as_ref()))
            .collect();
        found.sort_unstable();
        Ok(found)
    }
}

/// How much longer than a tenant's window a checkpoint keeps dedup keys.
const KEEP_MORE: Duration = Duration::from_secs(3600);

/// The receive time from which a checkpoint keeps a tenant's dedup keys, at `now`. The
/// messages after the checkpoint were received before `now` (by as much as the owner is
/// behind), and their windows end earlier: an hour more than the window is kept.
pub fn keys_kept_since(window: Duration, now: Micros) -> Micros {
    let kept = duration_micros(window + KEEP_MORE);
    now.saturating_sub(kept)
}

/// What a partition's state at a stream position holds, for a new owner: per tenant, where
/// its log continues and from which sequence on the events within its dedup window lie. The
/// events themselves, and so their dedup keys, are not in it: a checkpoint is only written once
/// the shared rollups include them and the cold tier holds them ([`cold_keys`] reads the keys
/// back), so its size does not grow with the window.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub tenants: Vec<TenantSnapshot>,
}

/// One tenant of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantSnapshot {
    pub tenant: TenantId,
    /// The last log sequence.
    pub head: u64,
    /// No event received within the window (and an hour) has a lower sequence.
    pub window_from: u64,
    /// Dedup keys by the receive time of their batch, oldest first: only in checkpoints of
    /// version 1, which carried them.
    pub keys: Vec<KeysSeenAt>,
}

/// A version 1 checkpoint.
#[derive(serde::Deserialize)]
struct SnapshotV1 {
    tenants: Vec<TenantSnapshotV1>,
}

#[derive(serde::Deserialize)]
struct TenantSnapshotV1 {
    tenant: TenantId,
    head: u64,
    keys: Vec<KeysSeenAt>,
}

/// A tenant to read into a [`Snapshot`].
pub struct TenantInput {
    pub tenant: TenantId,
    /// The id its log has in the local store.
    pub local: TenantId,
    /// The longest dedup window its batches were applied with, or its current one.
    pub window: Duration,
    /// Its log's last sequence (the writer's, which an import sets).
    pub head: u64,
    /// When its state was imported from a checkpoint, and that checkpoint's `window_from`:
    /// its local log lacks the entries before the import, so until the window has passed the
    /// import, the window starts no later than that.
    pub imported: Option<(Micros, u64)>,
}

impl Snapshot {
    /// Reads the state of `tenants` from the local log at `now`: for each, its head and where
    /// its window starts. Blocking.
    pub fn read(
        storage: &Storage,
        tenants: &[TenantInput],
        now: Micros,
    ) -> Result<Snapshot, StorageError> {
        let mut out = Vec::with_capacity(tenants.len());
        for input in tenants {
            let since = keys_kept_since(input.window, now);
            let from = first_seq_received_since(storage.log(), input.local, since, Duration::ZERO)?;
            let window_from = match input.imported {
                Some((at, imported_from)) if at >= since => from.min(imported_from),
                _ => from,
            };
            out.push(TenantSnapshot {
                tenant: input.tenant,
                head: input.head,
                window_from,
                keys: Vec::new(),
            });
        }
        Ok(Snapshot { tenants: out })
    }

    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        codec::encode_compressed(self).map_err(|source| StorageError::Codec {
            keyspace: "checkpoint",
            source,
        })
    }

    /// The snapshot of a checkpoint's body, written with format `version`.
    pub fn decode(version: u8, body: &[u8]) -> Result<Snapshot, StorageError> {
        let failed = |source| StorageError::Codec {
            keyspace: "checkpoint",
            source,
        };
        if version == 1 {
            let old: SnapshotV1 = codec::decode(body).map_err(failed)?;
            let tenants = (old.tenants.into_iter())
                .map(|t| TenantSnapshot {
                    tenant: t.tenant,
                    head: t.head,
                    window_from: t.head + 1,
                    keys: t.keys,
                })
                .collect();
            return Ok(Snapshot { tenants });
        }
        codec::decode(body).map_err(failed)
    }
}

/// The dedup keys of `tenant`'s events in the published cold tier with sequences in
/// `from..=through` received at `since` or later, by receive time (events with ids the server
/// generated have none). Blocking.
pub fn cold_keys(
    store: &ColdStore,
    tenant: TenantId,
    (from, through): (u64, u64),
    since: Micros,
) -> Result<Vec<KeysSeenAt>, ColdError> {
    let mut keys: Vec<KeysSeenAt> = Vec::new();
    if from > through {
        return Ok(keys);
    }
    let published = crate::storage::cold::newest_published(store, tenant)?;
    let visit = |_, batch: &crate::event::LogBatch| {
        if batch.received_at >= since {
            let seen = (batch.events.iter())
                .filter(|event| event.flags & flags::GENERATED_ID == 0)
                .map(|event| dedup::key(tenant, &event.message_id));
            match keys.last_mut() {
                Some((at, same)) if *at == batch.received_at => same.extend(seen),
                _ => keys.push((batch.received_at, seen.collect())),
            }
        }
        std::ops::ControlFlow::Continue(())
    };
    let segments = published.segments;
    let _read_all =
        crate::storage::cold::scan_segments(store, tenant, segments, from, through, None, visit)?;
    keys.sort_by_key(|(at, _)| *at);
    Ok(keys)
}

/// The format version and body of a stored checkpoint object, if its header vouches for it.
fn check(object: &Bytes) -> Result<(u8, Bytes), ColdError> {
    let corrupt = |why: &str| ColdError::Corrupt(format!("checkpoint: {why}"));
    if object.len() < HEADER || &object[..4] != MAGIC {
        return Err(corrupt("not a checkpoint"));
    }
    let version = object[4];
    if !(1..=VERSION).contains(&version) {
        return Err(corrupt("unknown version"));
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&object[5..13]);
    let body = object.slice(HEADER..);
    if u64::from_be_bytes(length) != body.len() as u64 {
        return Err(corrupt("cut short"));
    }
    if blake3::hash(&body).as_bytes()[..] != object[13..HEADER] {
        return Err(corrupt("checksum mismatch"));
    }
    Ok((version, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_sort_by_covered_then_token_and_parse_back() {
        let a = name(3, 9, 2);
        let b = name(3, 10, 1);
        assert!(a < b);
        assert_eq!(parse(&a), Some((9, 2)));
        assert_eq!(parse("checkpoints/partition=3/x.ckpt"), None);
    }

    /// Version 1 bodies (keys inside) still read; version 2 ones round-trip.
    #[test]
    fn both_body_formats_read() {
        #[derive(serde::Serialize)]
        struct OldTenant {
            tenant: TenantId,
            head: u64,
            keys: Vec<KeysSeenAt>,
        }
        #[derive(serde::Serialize)]
        struct Old {
            tenants: Vec<OldTenant>,
        }
        let keys = vec![(5, vec![dedup::key(TenantId(7), "m1")])];
        let old = Old {
            tenants: vec![OldTenant {
                tenant: TenantId(7),
                head: 40,
                keys: keys.clone(),
            }],
        };
        let body = codec::encode_compressed(&old).unwrap();
        let read = Snapshot::decode(1, &body).unwrap();
        assert_eq!(read.tenants[0].keys, keys);
        assert_eq!(
            (read.tenants[0].head, read.tenants[0].window_from),
            (40, 41)
        );
        let new = Snapshot {
            tenants: vec![TenantSnapshot {
                tenant: TenantId(7),
                head: 40,
                window_from: 12,
                keys: Vec::new(),
            }],
        };
        assert_eq!(
            Snapshot::decode(VERSION, &new.encode().unwrap()).unwrap(),
            new
        );
    }

    #[test]
    fn damaged_objects_are_refused() {
        let body = b"state";
        let mut object = Vec::new();
        object.extend_from_slice(MAGIC);
        object.push(VERSION);
        object.extend_from_slice(&(body.len() as u64).to_be_bytes());
        object.extend_from_slice(blake3::hash(body).as_bytes());
        object.extend_from_slice(body);
        assert_eq!(check(&Bytes::from(object.clone())).unwrap().1, &body[..]);
        let mut flipped = object.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(check(&Bytes::from(flipped)).is_err());
        assert!(check(&Bytes::from(object[..object.len() - 1].to_vec())).is_err());
        assert!(check(&Bytes::from_static(b"SRCK")).is_err());
    }
}
