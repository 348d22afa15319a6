//! A process node's work: hold a fair share of the partitions by lease and, for each one held,
//! apply its stream to the local log ([`PartitionRunner`]: dedup, sequencing) and roll the
//! log up into Redis with the partition's fence ([`roll_up_tenant`]), publishing each applied
//! batch to the live fan-out.
//!
//! The local store is this node's copy of its partitions' state, rebuilt from the stream: a
//! process node starts with an empty one. It keeps a partition's state (and where it is in the
//! stream) while it runs, also after losing the partition, because any owner's state at a
//! stream position is the same: if it owns the partition again, it continues from there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::lease::{Lease, Leases};
use crate::cluster::node::ClusterNode;
use crate::cluster::rollups::{roll_up_tenant, RolledUp, SharedRollups};
use crate::cluster::runner::{PartitionRunner, RunError};
use crate::cluster::{connect_redis, partition_of};
use crate::event::last_seq_of;
use crate::ids::TenantId;
use crate::rollup::Retention;
use crate::storage::writer::LogWriter;
use crate::storage::Storage;
use crate::tenant::TenantDirectory;

/// Stream messages applied per read.
const READ_BATCH: usize = 256;
/// Pause between reads of a partition that had nothing new.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Pause after a failed read or roll-up before trying again.
const RETRY: Duration = Duration::from_millis(500);
/// How often an owner checks every tenant it has a log for against the shared rollups, so
/// what a Redis restart lost is written again without waiting for the tenant's next events.
const RECHECK: Duration = Duration::from_secs(5);
/// Bounds each owner request to Redis; a flush is one script, so this is above the largest.
const OWNER_REDIS_TIMEOUT: Duration = Duration::from_secs(30);

/// What a process node works with.
pub struct ProcessNode {
    pub node: Arc<ClusterNode>,
    pub storage: Storage,
    pub writer: Arc<LogWriter>,
    pub directory: Arc<TenantDirectory>,
    pub retention: Retention,
}

/// A partition being worked on.
struct Task {
    lease: Lease,
    stop: watch::Sender<bool>,
    handle: JoinHandle<u64>,
}

fn now_ms() -> u64 {
    u64::try_from(crate::event::now_micros() / 1000).unwrap_or(0)
}

impl ProcessNode {
    /// Holds and works on partitions until `stop` turns true; then finishes each partition's
    /// roll-up and releases its lease, so other nodes take over at once.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let config = &self.node.config;
        let redis = loop {
            match connect_redis(&config.redis_url, OWNER_REDIS_TIMEOUT).await {
                Ok(redis) => break redis,
                Err(error) => {
                    tracing::warn!(%error, "process node cannot reach Redis; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let mut leases = Leases::new(
            redis.clone(),
            &config.prefix,
            &self.node.name,
            config.partitions,
            config.lease_timeout,
        );
        let shared = Arc::new(SharedRollups::new(redis, &config.prefix));
        let mut held: BTreeMap<u16, Lease> = BTreeMap::new();
        let mut tasks: HashMap<u16, Task> = HashMap::new();
        // Where this node's local state of each partition it has worked on stands.
        let mut covered: HashMap<u16, u64> = HashMap::new();
        let mut rounds = tokio::time::interval(config.lease_renew_every);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let before: Vec<u16> = held.keys().copied().collect();
            if let Err(error) = leases.balance(&mut held, now_ms()).await {
                // Leases not renewed expire; their partitions' writes are then fenced out.
                tracing::warn!(%error, "lease round failed");
            }
            let (mut lost, mut released) = (0, 0);
            for partition in tasks.keys().copied().collect::<Vec<_>>() {
                let still = tasks.get(&partition).is_some_and(|t| {
                    held.get(&partition) == Some(&t.lease) && !t.handle.is_finished()
                });
                if still {
                    continue;
                }
                if let Some(task) = tasks.remove(&partition) {
                    if held.contains_key(&partition) {
                        // Ended by itself (fenced out, then re-acquired): start again below.
                    } else if before.contains(&partition) {
                        lost += 1;
                    }
                    let _ = task.stop.send(true);
                    if let Ok(at) = task.handle.await {
                        covered.insert(partition, at);
                    }
                }
            }
            let mut acquired = 0;
            for (partition, lease) in &held {
                if tasks.contains_key(partition) {
                    continue;
                }
                if !before.contains(partition) {
                    acquired += 1;
                }
                let at = covered.get(partition).copied().unwrap_or(0);
                tracing::info!(
                    partition,
                    token = lease.token,
                    from = at + 1,
                    "working on partition"
                );
                let (stop_task, stopped) = watch::channel(false);
                let handle = tokio::spawn(Arc::clone(&self).work(
                    Arc::clone(&shared),
                    *lease,
                    leases.fence_key(*partition),
                    at,
                    stopped,
                ));
                tasks.insert(
                    *partition,
                    Task {
                        lease: *lease,
                        stop: stop_task,
                        handle,
                    },
                );
            }
            released += before.iter().filter(|p| !held.contains_key(p)).count();
            released = released.saturating_sub(lost);
            crate::telemetry::cluster_leases(held.len(), acquired, lost, released);
        }
        for (_, task) in tasks.drain() {
            let _ = task.stop.send(true);
            let _ = task.handle.await;
        }
        for lease in held.into_values() {
            let _ = leases.release(lease).await;
        }
        let _ = leases.leave().await;
        tracing::info!("process node released its partitions");
    }

    /// Works on one partition from stream position `covered` until told to stop or fenced
    /// out; returns the position reached.
    async fn work(
        self: Arc<Self>,
        shared: Arc<SharedRollups>,
        lease: Lease,
        fence_key: String,
        covered: u64,
        mut stop: watch::Receiver<bool>,
    ) -> u64 {
        let partition = lease.partition;
        let partitions = self.node.config.partitions;
        let mut runner = PartitionRunner::new(partition, covered);
        // Tenants whose local log may be ahead of the shared rollups: at first, every tenant
        // of the partition this node has a log for (a previous task may have stopped before
        // its last roll-up).
        let mut pending: HashMap<TenantId, u64> = HashMap::new();
        let storage = self.storage.clone();
        let local = crate::blocking::run(move || storage.log().tenants())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        for tenant in local {
            if partition_of(tenant, partitions) == partition {
                if let Some(head) = self.writer.heads().get(tenant) {
                    pending.insert(tenant, head);
                }
            }
        }
        // Per tenant, the log sequence through which live ticks were published (those at or
        // below the shared watermark at first sight were published by an earlier owner).
        let mut live_through: HashMap<TenantId, u64> = HashMap::new();
        // Every tenant of the partition with a local log, and its head.
        let mut known = pending.clone();
        let mut last_roll_up = Instant::now();
        let mut last_recheck = Instant::now();
        loop {
            if last_recheck.elapsed() >= RECHECK {
                last_recheck = Instant::now();
                pending.extend(known.iter().map(|(tenant, head)| (*tenant, *head)));
            }
            let stopping = *stop.borrow();
            let due = stopping || last_roll_up.elapsed() >= self.node.config.flush_every;
            if due && !pending.is_empty() {
                last_roll_up = Instant::now();
                if self.roll_up(&shared, lease, &fence_key, &mut pending).await {
                    tracing::info!(partition, "fenced out of the partition");
                    return runner.covered();
                }
            }
            if stopping {
                return runner.covered();
            }
            let directory = &self.directory;
            let window = |tenant| directory.get(tenant).map(|r| r.settings.dedup_window);
            let read = runner
                .run_once(&self.node.stream, &self.writer, READ_BATCH, window)
                .await;
            let pause = match read {
                Ok(done) => {
                    crate::telemetry::cluster_partition_progress(
                        partition,
                        done.len(),
                        runner.lag(),
                    );
                    for processed in &done {
                        let Some(first) = processed.outcome.first_seq else {
                            continue;
                        };
                        let last = last_seq_of(first, processed.outcome.accepted);
                        pending.insert(processed.tenant, last);
                        known.insert(processed.tenant, last);
                        self.publish_live(&shared, &mut live_through, processed, first)
                            .await;
                    }
                    done.is_empty().then_some(IDLE_POLL)
                }
                Err(RunError::UnknownTenant { tenant, seq }) => {
                    tracing::debug!(partition, %tenant, seq, "waiting for the directory to know a tenant");
                    Some(RETRY)
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "cannot apply the partition's stream; retrying");
                    Some(RETRY)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Rolls each pending tenant up to its local head; true when fenced out.
    async fn roll_up(
        &self,
        shared: &SharedRollups,
        lease: Lease,
        fence_key: &str,
        pending: &mut HashMap<TenantId, u64>,
    ) -> bool {
        for (tenant, head) in pending.clone() {
            match roll_up_tenant(
                shared,
                &self.storage,
                tenant,
                head,
                lease,
                fence_key,
                self.retention,
            )
            .await
            {
                Ok(RolledUp::Through(_)) => {
                    if pending.get(&tenant) == Some(&head) {
                        pending.remove(&tenant);
                    }
                }
                Ok(RolledUp::Fenced) => return true,
                Err(error) => {
                    tracing::warn!(%tenant, %error, "rolling up into Redis failed; retrying");
                }
            }
        }
        false
    }

    /// Publishes a batch's items to the live fan-out, unless an earlier owner did.
    async fn publish_live(
        &self,
        shared: &SharedRollups,
        live_through: &mut HashMap<TenantId, u64>,
        processed: &crate::cluster::runner::Processed,
        first: u64,
    ) {
        let through = match live_through.get(&processed.tenant) {
            Some(through) => *through,
            None => {
                let stored = shared.watermark(processed.tenant).await.unwrap_or(0);
                live_through.insert(processed.tenant, stored);
                stored
            }
        };
        let last = last_seq_of(first, processed.outcome.accepted);
        if last <= through || processed.items.is_empty() {
            return;
        }
        live_through.insert(processed.tenant, last);
        let (redis, prefix) = (self.node.redis.clone(), self.node.config.prefix.clone());
        let (tenant, items) = (processed.tenant, processed.items.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::cluster::live::publish(&redis, &prefix, tenant, &items).await
            {
                tracing::debug!(%tenant, %error, "live fan-out publish failed");
            }
        });
    }
}
