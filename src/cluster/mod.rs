//! Cluster mode: more than one node of the same binary on engines the operator already runs:
//! NATS JetStream between ingest and process nodes, Redis for shared hot state and partition
//! leases, object storage for segments and checkpoints (see `../shared/DESIGN.md`).
//!
//! Tenants are spread over a fixed number of partitions ([`partition_of`]); a process node owns
//! a set of partitions at a time by fenced leases ([`lease`]).

pub mod bucket;
pub mod checkpoint;
pub mod cold;
pub mod commands;
pub mod deadletters;
pub mod directory;
pub mod lease;
pub mod live;
pub mod node;
pub mod plans;
pub mod process;
pub mod publish;
pub mod query;
pub mod ratelimit;
pub mod rollups;
pub mod runner;
pub mod stream;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::TenantId;

/// `[cluster]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// What this node does: `all` (the single node), `ingest` or `process`.
    pub role: Role,
    /// NATS server(s), e.g. `nats://127.0.0.1:4222`; empty in single-node mode.
    pub nats_url: String,
    /// Redis, e.g. `redis://127.0.0.1:6379`; empty in single-node mode.
    pub redis_url: String,
    /// This node's name, unique in the cluster; empty: host name and process id.
    pub node_id: String,
    /// Tenant partitions. Fixed for the life of a cluster: a tenant's partition is a hash of
    /// its id modulo this number.
    pub partitions: u16,
    /// A process node that stops renewing its leases loses them after this long; another node
    /// takes its partitions over within this time plus one renewal interval.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
    /// How often a process node renews its leases and rebalances.
    #[serde(with = "humantime_serde")]
    pub lease_renew_every: Duration,
    /// Prefix of every Redis key and NATS name the cluster uses, so that clusters can share
    /// the engines.
    pub prefix: String,
    /// Replicas of the event stream and the directory bucket: 1 on a single NATS server, 3 in
    /// production (a publish is acknowledged once a majority stored it).
    pub replicas: usize,
    /// An ingest node answers 503 when JetStream has not acknowledged a publish within this.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// How often a partition's owner writes its rollups to Redis (also the most a query on
    /// another node lags behind the owner, besides the stream).
    #[serde(with = "humantime_serde")]
    pub flush_every: Duration,
    /// How often a partition's owner writes its state as a checkpoint to the object store
    /// (then the stream drops what the checkpoint before covers).
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
}

impl ClusterConfig {
    /// Why the settings cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.role != Role::All
            && (self.nats_url.trim().is_empty() || self.redis_url.trim().is_empty())
        {
            return Err(format!(
                "cluster.role = {} needs cluster.nats_url and cluster.redis_url",
                self.role
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("cluster.replicas must be between 1 and 5".into());
        }
        if self.publish_timeout.is_zero()
            || self.flush_every.is_zero()
            || self.checkpoint_every.is_zero()
        {
            return Err(
                "cluster.publish_timeout, flush_every and checkpoint_every must be positive".into(),
            );
        }
        if self.partitions == 0 {
            return Err("cluster.partitions must be at least 1".into());
        }
        if self.lease_renew_every.is_zero() || self.lease_renew_every * 2 > self.lease_timeout {
            return Err(
                "cluster.lease_renew_every must be positive and at most half of cluster.lease_timeout"
                    .into(),
            );
        }
        // NATS subjects forbid dots, spaces, `*` and `>`; Redis key patterns treat `?`, `[`,
        // `]` and `\` as globs.
        if self.prefix.is_empty()
            || self
                .prefix
                .contains(['.', ' ', '*', '>', '?', '[', ']', '\\'])
        {
            return Err(
                "cluster.prefix must be non-empty, without dots, spaces, `*`, `>`, `?`, `[`, `]` or `\\`"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What a node of the one binary does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The single node: ingestion, processing and queries over the embedded store.
    #[default]
    All,
    /// Stateless HTTP: publishes batches to the event stream, answers queries from Redis.
    Ingest,
    /// Owns partitions: consumes the stream, deduplicates, sequences and rolls up.
    Process,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::All => "all",
            Role::Ingest => "ingest",
            Role::Process => "process",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "all" => Ok(Role::All),
            "ingest" => Ok(Role::Ingest),
            "process" => Ok(Role::Process),
            other => Err(format!(
                "role must be `all`, `ingest` or `process`, not {other:?}"
            )),
        }
    }
}

/// A Redis connection that reconnects by itself. `response_timeout` bounds every request: a
/// partition owner's flushes need it above their largest flush (a flush is one script).
pub async fn connect_redis(
    url: &str,
    response_timeout: Duration,
) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout));
    redis::aio::ConnectionManager::new_with_config(client, config).await
}

/// Whether a dependency answers, for `/readyz`: `Err` says why not.
pub type Readiness = Result<(), String>;

/// How long a readiness check waits for an answer.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether Redis answers a `PING` in time.
pub async fn redis_ready(redis: &redis::aio::ConnectionManager) -> Readiness {
    let mut redis = redis.clone();
    let command = redis::cmd("PING");
    let ping = command.query_async::<String>(&mut redis);
    match tokio::time::timeout(READY_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("redis: {error}")),
        Err(_) => Err(format!("redis: no answer within {READY_TIMEOUT:?}")),
    }
}

/// Whether NATS is connected and JetStream answers about `stream` in time.
pub async fn nats_ready(js: &async_nats::jetstream::Context, stream: &str) -> Readiness {
    if js.client().connection_state() != async_nats::connection::State::Connected {
        return Err("nats: not connected".into());
    }
    match tokio::time::timeout(READY_TIMEOUT, js.get_stream(stream)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("nats: {error}")),
        Err(_) => Err(format!("nats: no answer within {READY_TIMEOUT:?}")),
    }
}

impl ClusterConfig {
    /// This node's name: `node_id`, else the host name and process id.
    pub fn node_name(&self) -> String {
        if !self.node_id.trim().is_empty() {
            return self.node_id.trim().to_string();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "node".into());
        format!("{host}-{}", std::process::id())
    }
}

/// The partition of a tenant: stable across nodes, versions and restarts.
pub fn partition_of(tenant: TenantId, partitions: u16) -> u16 {
    let hash = xxhash_rust::xxh3::xxh3_64(&tenant.0.to_be_bytes());
    u16::try_from(hash % u64::from(partitions.max(1))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_spread_over_partitions_and_stay_put() {
        let mut counts = [0usize; 64];
        for id in 0..64_000u64 {
            let tenant = TenantId(id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let partition = partition_of(tenant, 64);
            assert_eq!(partition, partition_of(tenant, 64));
            counts[usize::from(partition)] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(partition_of(TenantId(7), 1), 0);
    }

    #[test]
    fn rendezvous_ranks_every_partition_once_and_differs_by_node() {
        let a = lease::rank("node-a", 64);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).collect::<Vec<u16>>());
        assert_ne!(a, lease::rank("node-b", 64));
        assert_eq!(a, lease::rank("node-a", 64));
    }
}
