//! Cold segments of the partitions a process node owns, in the object store the nodes share.
//!
//! Before a partition's checkpoint is written, its owner flushes each tenant's local log up to
//! the checkpoint's head ([`ColdFlush::flush_partition`]), so every checkpoint's state is cold
//! up to its heads: a new owner, whose local log starts at the checkpoint (it carries no
//! events), misses nothing, and the stream may drop what a checkpoint covers. Sequences are the
//! same whoever applies the stream, so a new owner continues each tenant's cold tier where the
//! last commit ended. Paths and published manifests are the single node's, under the tenants'
//! own ids (a process node's local ids differ), so warehouses and exports read them alike.
//!
//! Process nodes keep no manifest of their own: the newest published one is authoritative. A
//! flush writes its segments, checks the partition's fence, then creates the next manifest
//! object only if no other writer has ([`publish_next`]): of an owner that lost the partition
//! and the one that took it over, only one commits a number. The other deletes the segments it
//! wrote that the winner's manifest does not name. Before an owner's first flush of a tenant,
//! what a crashed flush left under `events/` moves to the trash, so `events/` holds exactly the
//! committed segments.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::lease::{Fence, Lease};
use crate::event::{duration_micros, now_micros};
use crate::ids::TenantId;
use crate::storage::cold::manifest::{Change, ChangeKind};
use crate::storage::cold::{
    discard_unpublished, erase_user, newest_published, publish_next, purge_trash,
    retain_and_compact, trash_uncommitted, write_segments, ColdError, ColdStore, CompactionPolicy,
    Ledger, MaintenanceReport, Published, Written,
};
use crate::storage::Storage;

/// What a process node flushes and maintains with.
#[derive(Clone)]
pub struct ColdFlush {
    pub store: ColdStore,
    /// `max_flush_events` (a longer range commits in steps), `grace_period` (how long trashed
    /// objects wait) and the compaction settings.
    pub settings: crate::config::ColdConfig,
    /// Hours that ended longer ago than this are compacted (later ones still get flushes).
    pub settle: Duration,
}

/// A tenant of a partition to maintain, and its raw-data retention (zero: forever).
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    pub tenant: TenantId,
    pub raw_retention: Duration,
}

/// How often a tenant's trash is emptied of what waited out the grace period.
pub const PURGE_EVERY: Duration = Duration::from_secs(600);

/// A tenant of a partition to flush: its id, its local log's id, and the head to flush to.
#[derive(Debug, Clone, Copy)]
pub struct FlushTarget {
    pub tenant: TenantId,
    pub local: TenantId,
    pub head: u64,
}

/// The newest manifest of each tenant this owner flushed, as of its last commit, and when its
/// trash was last emptied. One per partition task: a new task (a new lease) reads the
/// manifests again and recovers first.
pub type Manifests = Arc<Mutex<HashMap<TenantId, Known>>>;

pub struct Known {
    published: Published,
    purged_at: Instant,
}

/// What a partition's flush moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub events: u64,
    pub segments: u64,
    /// Sequences the local log lacked between a tenant's cold watermark and its next entry.
    pub missing: u64,
}

fn failed(error: impl std::fmt::Display) -> String {
    error.to_string()
}

impl ColdFlush {
    /// Flushes each target's local log, from its tenant's cold watermark through its head, in
    /// commits of at most `max_flush_events` events. Stops at the first failure (the next
    /// attempt continues from the last commit, after a recovery of the tenant's objects).
    pub async fn flush_partition(
        &self,
        storage: &Storage,
        targets: Vec<FlushTarget>,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<Flushed, String> {
        let mut flushed = Flushed::default();
        for target in targets {
            let done = self
                .flush_tenant(storage, target, manifests, lease, fence)
                .await;
            match done {
                Ok(done) => {
                    flushed.events += done.events;
                    flushed.segments += done.segments;
                    flushed.missing += done.missing;
                }
                Err(error) => {
                    // What a failed step wrote is moved out of `events/` by the recovery
                    // the next read of the manifest starts with.
                    lock(manifests).remove(&target.tenant);
                    return Err(error);
                }
            }
        }
        Ok(flushed)
    }

    async fn flush_tenant(
        &self,
        storage: &Storage,
        target: FlushTarget,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<Flushed, String> {
        let mut flushed = Flushed::default();
        loop {
            let manifest = self
                .manifest(target.tenant, manifests, lease, fence)
                .await?;
            if manifest.cold_watermark >= target.head {
                return Ok(flushed);
            }
            let after = manifest.cold_watermark;
            let written = {
                let (this, storage) = (self.clone(), storage.clone());
                crate::blocking::run(move || this.write(&storage, target, after, lease))
                    .await
                    .map_err(failed)?
                    .map_err(failed)?
            };
            let Some(written) = written else {
                // Nothing through the head: the log lacks the whole range.
                flushed.missing += target.head - after;
                missing(target.tenant, after, target.head - after);
                return Ok(flushed);
            };
            if written.first > after + 1 {
                flushed.missing += written.first - after - 1;
                missing(target.tenant, after, written.first - after - 1);
            }
            let (events, segments) = (written.events, written.segments.len() as u64);
            self.commit(target.tenant, manifest, written, manifests, lease, fence)
                .await?;
            flushed.events += events;
            flushed.segments += segments;
        }
    }

    /// The tenant's manifest as this task last committed it; read again, with a recovery
    /// ([`ColdFlush::recover`]), the first time the task needs it and after a failure.
    async fn manifest(
        &self,
        tenant: TenantId,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<Published, String> {
        if let Some(known) = lock(manifests).get(&tenant) {
            return Ok(known.published.clone());
        }
        // A recovery moves what the manifest does not name: never by an owner that lost the
        // partition, whose manifest may be older than the new owner's objects.
        if !fence.holds(lease).await.map_err(failed)? {
            return Err("lost the partition".into());
        }
        let this = self.clone();
        let published = crate::blocking::run(move || this.recover(tenant))
            .await
            .map_err(failed)?
            .map_err(failed)?;
        let known = Known {
            published: published.clone(),
            purged_at: Instant::now(),
        };
        lock(manifests).insert(tenant, known);
        Ok(published)
    }

    /// Reads the tenant's newest manifest, moves the objects under `events/` that it does not
    /// name to the trash (and those it names back from there), and deletes what waited in the
    /// trash longer than the grace period. A committed object trashed by mistake (a commit
    /// that landed just after another recovery read the manifest) is back before then: the
    /// owner recovers every [`PURGE_EVERY`], well within `cold.grace_period`. Blocking.
    fn recover(&self, tenant: TenantId) -> Result<Published, ColdError> {
        let published = newest_published(&self.store, tenant)?;
        let committed: HashSet<String> = (published.segments.iter())
            .map(|s| s.path.clone())
            .collect();
        trash_uncommitted(&self.store, tenant, &committed)?;
        purge_trash(&self.store, tenant, self.settings.grace_period)?;
        Ok(published)
    }

    /// Applies each tenant's raw-data retention and compacts small segments of settled hours,
    /// as a single node's flusher does, committing to the published manifests (after a fence
    /// check, like a flush); every [`PURGE_EVERY`], recovers the tenant's objects first (what
    /// a failed or late writer left, and the trash).
    pub async fn maintain_partition(
        &self,
        tenants: Vec<Upkeep>,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<(), String> {
        if !fence.holds(lease).await.map_err(failed)? {
            return Err("lost the partition".into());
        }
        for upkeep in tenants {
            let tenant = upkeep.tenant;
            let due = lock(manifests)
                .get(&tenant)
                .is_some_and(|known| known.purged_at.elapsed() >= PURGE_EVERY);
            if due {
                lock(manifests).remove(&tenant);
            }
            let published = self.manifest(tenant, manifests, lease, fence).await?;
            let this = self.clone();
            let maintained = crate::blocking::run(move || {
                let mut published = published;
                (this.maintain(&mut published, upkeep, lease.token)).map(|()| published)
            })
            .await
            .map_err(failed)?;
            let mut known = lock(manifests);
            match (maintained, known.get_mut(&tenant)) {
                (Ok(published), Some(known)) => known.published = published,
                (Ok(_), None) => {}
                (Err(error), _) => {
                    known.remove(&tenant);
                    return Err(error.to_string());
                }
            }
        }
        Ok(())
    }

    /// Rewrites the tenant's committed segments without `user`'s events (as a single node's
    /// erasure does), committing to the published manifest after a fence check, like a flush.
    pub async fn erase_user(
        &self,
        tenant: TenantId,
        user: String,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<MaintenanceReport, String> {
        if !fence.holds(lease).await.map_err(failed)? {
            return Err("lost the partition".into());
        }
        let published = self.manifest(tenant, manifests, lease, fence).await?;
        let this = self.clone();
        let erased = crate::blocking::run(move || {
            let mut published = published;
            let mut ledger = Ledger::Published {
                state: &mut published,
                writer: lease.token,
            };
            let report = erase_user(&mut ledger, &this.store, tenant, &user);
            report.map(|report| (report, published))
        })
        .await
        .map_err(failed)?;
        let mut known = lock(manifests);
        match erased {
            Ok((report, published)) => {
                if let Some(known) = known.get_mut(&tenant) {
                    known.published = published;
                }
                Ok(report)
            }
            Err(error) => {
                known.remove(&tenant);
                Err(error.to_string())
            }
        }
    }

    /// One tenant's maintenance on `published`, which moves on with each commit, its objects
    /// tagged with `writer`. Blocking.
    fn maintain(
        &self,
        published: &mut Published,
        upkeep: Upkeep,
        writer: u64,
    ) -> Result<(), ColdError> {
        let now = now_micros();
        let settle = duration_micros(self.settle);
        let policy = CompactionPolicy::new(&self.settings, now.saturating_sub(settle));
        let mut ledger = Ledger::Published {
            state: published,
            writer,
        };
        let (tenant, keep) = (upkeep.tenant, upkeep.raw_retention);
        retain_and_compact(&mut ledger, &self.store, tenant, keep, policy, now)
    }

    /// Writes the segments of the target's next range after `after`, their names tagged with
    /// the lease's token, so no other owner writes the same names. Blocking.
    fn write(
        &self,
        storage: &Storage,
        target: FlushTarget,
        after: u64,
        lease: Lease,
    ) -> Result<Option<Written>, ColdError> {
        let tag = format!("w{}", lease.token);
        write_segments(
            storage,
            &self.store,
            (target.local, target.tenant, Some(&tag)),
            after,
            self.settings.max_flush_events,
            |_, last| last <= target.head,
        )
    }

    /// Commits written segments after `manifest`, unless the lease lost the partition or
    /// another writer committed first; then they are deleted (their names are this owner's).
    async fn commit(
        &self,
        tenant: TenantId,
        manifest: Published,
        written: Written,
        manifests: &Manifests,
        lease: Lease,
        fence: &Fence,
    ) -> Result<(), String> {
        let change = Change {
            kind: ChangeKind::Flush,
            added: written.segments,
            removed: Vec::new(),
            watermark: Some(written.through),
        };
        let owner = fence.holds(lease).await.map_err(failed)?;
        let this = self.clone();
        let (committed, change) = crate::blocking::run(move || {
            let committed = if owner {
                publish_next(&this.store, tenant, &manifest, &change)?
            } else {
                None
            };
            if committed.is_none() {
                discard_unpublished(&this.store, tenant, &change.added)?;
            }
            Ok::<_, ColdError>((committed, change))
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        let Some(published) = committed else {
            return Err(format!(
                "tenant {tenant}: another owner committed to the cold tier first, or this one lost the partition"
            ));
        };
        if let Some(known) = lock(manifests).get_mut(&tenant) {
            known.published = published;
        }
        crate::telemetry::cluster_cold_flushed(
            change.added.len() as u64,
            change.added.iter().map(|s| s.rows).sum(),
        );
        Ok(())
    }
}

/// How far the tenant's cold tier goes as this owner last read or committed it (`None`: not
/// read yet).
pub fn cold_through(manifests: &Manifests, tenant: TenantId) -> Option<u64> {
    (lock(manifests).get(&tenant)).map(|known| known.published.cold_watermark)
}

fn lock(manifests: &Manifests) -> std::sync::MutexGuard<'_, HashMap<TenantId, Known>> {
    manifests.lock().unwrap_or_else(|p| p.into_inner())
}

fn missing(tenant: TenantId, after: u64, count: u64) {
    tracing::error!(
        %tenant,
        after,
        count,
        "the local log lacks events after the cold watermark; the cold tier skips them"
    );
    crate::telemetry::cluster_cold_missing(count);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cluster::lease::Leases;
    use crate::storage::cold::scan_published;
    use crate::storage::event_log::tests::batch;
    use crate::storage::writer::{AppendRequest, LogWriter, PreparedBatch};
    use std::ops::ControlFlow;

    async fn append(writer: &LogWriter, local: TenantId, ids: &[&str]) {
        let prepared = PreparedBatch::new(local, &batch(ids)).unwrap();
        let (request, answer) = AppendRequest::answered(local, Duration::from_secs(60), prepared);
        writer.submit(request);
        answer.await.unwrap().unwrap();
    }

    /// The sequences of the tenant's published cold tier, in order.
    async fn published_seqs(store: &ColdStore, tenant: TenantId) -> Vec<u64> {
        let store = store.clone();
        crate::blocking::run(move || {
            let mut seqs = Vec::new();
            let scanned = scan_published(&store, tenant, None, |seq, _| {
                seqs.push(seq);
                ControlFlow::Continue(())
            });
            assert!(scanned.unwrap().is_continue());
            seqs
        })
        .await
        .unwrap()
    }

    async fn newest(store: &ColdStore, tenant: TenantId) -> Published {
        let store = store.clone();
        crate::blocking::run(move || newest_published(&store, tenant).unwrap())
            .await
            .unwrap()
    }

    async fn objects_under_events(store: &ColdStore, tenant: TenantId) -> HashSet<String> {
        (store
            .list(&format!("events/tenant={tenant}/"))
            .await
            .unwrap())
        .into_iter()
        .map(|object| object.location.to_string())
        .collect()
    }

    /// Owner A flushes; B takes the partition over with its own copy of the log (local id),
    /// trashes what a crashed flush left and continues where A's commit ended; A, fenced out,
    /// commits nothing and leaves no object behind. `events/` holds exactly the committed
    /// segments, and the published tier each sequence once.
    #[actix_rt::test]
    async fn owners_continue_the_cold_tier_and_a_fenced_owner_commits_nothing() {
        let redis = testkit::services::Service::redis().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (storage, writer) = crate::cluster::runner::tests::writer(&dir.path().join("db"));
        let store = ColdStore::local(&dir.path().join("cold")).unwrap();
        let cold = ColdFlush {
            store: store.clone(),
            settings: crate::config::ColdConfig {
                max_flush_events: 3,
                compact_min_segments: 2,
                ..crate::config::Config::from_toml("").unwrap().cold
            },
            settle: Duration::ZERO,
        };
        let tenant = TenantId(0x5e);
        let (local_a, local_b) = (TenantId(0xa1), TenantId(0xb1));
        let entries: [&[&str]; 4] = [&["e1", "e2"], &["e3"], &["e4", "e5"], &["e6"]];
        // Both copies apply the same stream: the same sequences.
        for ids in entries {
            append(&writer, local_a, ids).await;
            append(&writer, local_b, ids).await;
        }
        let url = redis.url();
        let connect = || crate::cluster::connect_redis(&url, Duration::from_secs(5));
        let timeout = Duration::from_millis(300);
        let mut leases_a = Leases::new(connect().await.unwrap(), "cold", "a", 1, timeout);
        let mut leases_b = Leases::new(connect().await.unwrap(), "cold", "b", 1, timeout);
        let fence = Fence::new(connect().await.unwrap(), leases_a.fence_key(0));
        let lease_a = leases_a.acquire(0).await.unwrap().unwrap();
        let target = |local, head| FlushTarget {
            tenant,
            local,
            head,
        };

        // A flushes through sequence 3, in steps of at most 3 events.
        let manifests_a = Manifests::default();
        let flushed = (cold.flush_partition(
            &storage,
            vec![target(local_a, 3)],
            &manifests_a,
            lease_a,
            &fence,
        ))
        .await
        .unwrap();
        assert_eq!((flushed.events, flushed.missing), (3, 0));
        assert_eq!(published_seqs(&store, tenant).await, vec![1, 2, 3]);
        // Its objects carry its lease's token: no other owner writes the same names.
        let tag = format!("-w{}.parquet", lease_a.token);
        let published = newest(&store, tenant).await;
        assert!(
            published.segments.iter().all(|s| s.path.ends_with(&tag)),
            "{published:?}"
        );

        // A crashed flush left an object; B takes over after A's lease expired.
        let orphan = "events/tenant=000000000000005e/date=2026-01-01/hour=00/4-9.parquet";
        store
            .put(orphan, bytes::Bytes::from_static(b"partial"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lease_b = leases_b.acquire(0).await.unwrap().unwrap();
        let manifests_b = Manifests::default();
        let flushed = (cold.flush_partition(
            &storage,
            vec![target(local_b, 5)],
            &manifests_b,
            lease_b,
            &fence,
        ))
        .await
        .unwrap();
        assert_eq!(flushed.events, 2, "B continues after A's commit");
        assert!(!objects_under_events(&store, tenant).await.contains(orphan));

        // A, fenced out, tries to flush further: refused, and its segments are gone.
        let refused = (cold.flush_partition(
            &storage,
            vec![target(local_a, 6)],
            &manifests_a,
            lease_a,
            &fence,
        ))
        .await;
        assert!(refused.is_err(), "{refused:?}");
        let published = newest(&store, tenant).await;
        assert_eq!(published.cold_watermark, 5);
        let named: HashSet<String> = published.segments.iter().map(|s| s.path.clone()).collect();
        assert_eq!(objects_under_events(&store, tenant).await, named);

        // B goes on through the head.
        (cold.flush_partition(
            &storage,
            vec![target(local_b, 6)],
            &manifests_b,
            lease_b,
            &fence,
        ))
        .await
        .unwrap();
        assert_eq!(
            published_seqs(&store, tenant).await,
            (1..=6).collect::<Vec<_>>()
        );

        // A stale commit that landed after a recovery had trashed its segment: the next
        // owner's recovery moves it back.
        let published = newest(&store, tenant).await;
        let path = published.segments[0].path.clone();
        let trashed = format!("trash/tenant={tenant}/1/{path}");
        store.rename(&path, &trashed).await.unwrap();
        let manifests_c = Manifests::default();
        (cold.flush_partition(
            &storage,
            vec![target(local_b, 6)],
            &manifests_c,
            lease_b,
            &fence,
        ))
        .await
        .unwrap();
        let named: HashSet<String> = published.segments.iter().map(|s| s.path.clone()).collect();
        assert_eq!(objects_under_events(&store, tenant).await, named);

        // Maintenance merges the settled hour's small segments into one; the tier reads the same.
        let keep = |raw_retention| {
            vec![Upkeep {
                tenant,
                raw_retention,
            }]
        };
        let maintained =
            cold.maintain_partition(keep(Duration::ZERO), &manifests_c, lease_b, &fence);
        maintained.await.unwrap();
        let published = newest(&store, tenant).await;
        assert_eq!(published.segments.len(), 1, "{published:?}");
        assert_eq!(
            published_seqs(&store, tenant).await,
            (1..=6).collect::<Vec<_>>()
        );
        let named: HashSet<String> = published.segments.iter().map(|s| s.path.clone()).collect();
        assert_eq!(objects_under_events(&store, tenant).await, named);
        // A fenced-out owner maintains nothing.
        let stale =
            cold.maintain_partition(keep(Duration::from_secs(1)), &manifests_a, lease_a, &fence);
        assert!(stale.await.is_err());
        assert_eq!(newest(&store, tenant).await, published);
        // Raw-data retention removes the expired hour (its events are from 1970).
        let expired =
            cold.maintain_partition(keep(Duration::from_secs(1)), &manifests_c, lease_b, &fence);
        expired.await.unwrap();
        assert!(newest(&store, tenant).await.segments.is_empty());
        assert!(objects_under_events(&store, tenant).await.is_empty());
        writer.shutdown();
    }
}
