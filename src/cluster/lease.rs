//! Partition ownership by fenced leases in Redis.
//!
//! Each partition `p` has two keys: `<prefix>:lease:<p>` holds `<node>:<token>` and expires
//! after the lease timeout unless its owner renews it, and `<prefix>:fence:<p>` holds the last
//! token handed out. A node acquires a free partition with a script that increments the fence
//! and sets the lease in one step, so tokens only grow and each acquisition has its own. Every
//! write a partition's owner makes to shared state checks, in the same Redis script, that the
//! fence still holds its token ([`FENCE_CHECK`]): a node that lost its lease (paused, cut off,
//! slow) cannot commit anything for the partition once another node has acquired it, even if
//! it has not noticed yet.
//!
//! Which partitions a node tries to hold: live nodes heartbeat into a sorted set; each takes a
//! fair share (the partitions divided evenly, the remainder to the first nodes by name),
//! preferring the partitions that rank highest for
//! it by rendezvous hashing, so that ownership is stable and spreads evenly. A node above its
//! share releases the partitions it ranks lowest, so a new node gets its share; a node below it
//! acquires free partitions it ranks highest.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

/// Lua that a fenced write starts with: `KEYS[1]` is the partition's fence, `ARGV[1]` the
/// writer's token. Ends the script with `0` when the token is stale.
pub const FENCE_CHECK: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
";

const ACQUIRE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local owner, token = string.match(current, '^(.*):(%d+)$')
  if owner == ARGV[1] and redis.call('GET', KEYS[2]) == token then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// How one [`Leases::balance`] round changed this node's partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub acquired: Vec<u16>,
    /// Held before, not renewed: expired (and maybe taken by another node).
    pub lost: Vec<u16>,
    /// Given up: above this node's fair share.
    pub released: Vec<u16>,
}

/// A partition's lease held by this node: the token fences its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub partition: u16,
    pub token: u64,
}

/// A partition's fence, checked before a write that no Redis script can fence (a commit to the
/// object store): a check, not a guarantee, so such writes have their own conflict detection.
#[derive(Clone)]
pub struct Fence {
    redis: ConnectionManager,
    key: String,
}

impl Fence {
    pub fn new(redis: ConnectionManager, key: String) -> Fence {
        Fence { redis, key }
    }

    /// The fence's key, for scripts that check it ([`FENCE_CHECK`]).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether `lease` still holds the fence: no other node acquired the partition since.
    pub async fn holds(&self, lease: Lease) -> redis::RedisResult<bool> {
        let current: Option<u64> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(current == Some(lease.token))
    }
}

/// The leases of one node, over one Redis.
pub struct Leases {
    redis: ConnectionManager,
    prefix: String,
    node: String,
    partitions: u16,
    timeout: Duration,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Leases {
    pub fn new(
        redis: ConnectionManager,
        prefix: &str,
        node: &str,
        partitions: u16,
        timeout: Duration,
    ) -> Leases {
        Leases {
            redis,
            prefix: prefix.to_string(),
            node: node.to_string(),
            partitions,
            timeout,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }

    pub fn lease_key(&self, partition: u16) -> String {
        format!("{}:lease:{partition}", self.prefix)
    }

    /// The key a fenced write checks (see [`FENCE_CHECK`]).
    pub fn fence_key(&self, partition: u16) -> String {
        format!("{}:fence:{partition}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Takes `partition` if it is free (or already this node's), with a new token.
    pub async fn acquire(&mut self, partition: u16) -> redis::RedisResult<Option<Lease>> {
        let token: u64 = (self.acquire)
            .key(self.lease_key(partition))
            .key(self.fence_key(partition))
            .arg(&self.node)
            .arg(self.millis())
            .invoke_async(&mut self.redis)
            .await?;
        Ok((token > 0).then_some(Lease { partition, token }))
    }

    /// Extends a held lease; `false`: it was lost (expired, and maybe taken by another node).
    pub async fn renew(&mut self, lease: Lease) -> redis::RedisResult<bool> {
        let renewed: u64 = (self.renew)
            .key(self.lease_key(lease.partition))
            .arg(format!("{}:{}", self.node, lease.token))
            .arg(self.millis())
            .invoke_async(&mut self.redis)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives a lease up at once, so another node need not wait for it to expire.
    pub async fn release(&mut self, lease: Lease) -> redis::RedisResult<bool> {
        let released: u64 = (self.release)
            .key(self.lease_key(lease.partition))
            .arg(format!("{}:{}", self.node, lease.token))
            .invoke_async(&mut self.redis)
            .await?;
        Ok(released == 1)
    }

    /// Records this node as live (at `now_ms`, a wall clock in milliseconds) and returns the
    /// live nodes (those seen within the lease timeout), by name.
    pub async fn heartbeat(&mut self, now_ms: u64) -> redis::RedisResult<Vec<String>> {
        let oldest = now_ms.saturating_sub(self.millis());
        let key = self.nodes_key();
        let (_, _, mut live): (u64, u64, Vec<String>) = redis::pipe()
            .atomic()
            .zadd(&key, &self.node, now_ms)
            .zrembyscore(&key, 0, oldest.saturating_sub(1))
            .zrange(&key, 0, -1)
            .query_async(&mut self.redis)
            .await?;
        live.sort_unstable();
        Ok(live)
    }

    /// This node's fair share of the partitions among `live` nodes (sorted names): the
    /// partitions divided evenly, the remainder going to the first nodes by name, so the
    /// shares add up to the partitions.
    fn share(&self, live: &[String]) -> usize {
        let nodes = live.len().max(1);
        let partitions = usize::from(self.partitions);
        let position = live
            .iter()
            .position(|n| *n == self.node)
            .unwrap_or(nodes - 1);
        partitions / nodes + usize::from(position < partitions % nodes)
    }

    /// Leaves the live set (on a clean stop).
    pub async fn leave(&mut self) -> redis::RedisResult<()> {
        let key = self.nodes_key();
        let _: u64 = redis::cmd("ZREM")
            .arg(&key)
            .arg(&self.node)
            .query_async(&mut self.redis)
            .await?;
        Ok(())
    }

    /// One round of ownership: renews the held leases (dropping lost ones), releases those
    /// above this node's fair share and acquires free ones up to it; `held` is left holding
    /// the leases this node owns. Returns how ownership changed.
    pub async fn balance(
        &mut self,
        held: &mut BTreeMap<u16, Lease>,
        now_ms: u64,
    ) -> redis::RedisResult<Round> {
        let mut round = Round::default();
        let live = self.heartbeat(now_ms).await?;
        let share = self.share(&live);
        for lease in held.values().copied().collect::<Vec<_>>() {
            if !self.renew(lease).await? {
                held.remove(&lease.partition);
                round.lost.push(lease.partition);
            }
        }
        let ranked = rank(&self.node, self.partitions);
        // Above the share: give up the partitions this node ranks lowest.
        while held.len() > share {
            let Some(lowest) = ranked.iter().rev().find(|p| held.contains_key(p)).copied() else {
                break;
            };
            if let Some(lease) = held.remove(&lowest) {
                self.release(lease).await?;
                round.released.push(lowest);
            }
        }
        for partition in ranked {
            if held.len() >= share {
                break;
            }
            if held.contains_key(&partition) {
                continue;
            }
            if let Some(lease) = self.acquire(partition).await? {
                held.insert(partition, lease);
                round.acquired.push(partition);
            }
        }
        Ok(round)
    }
}

/// The partitions by how much `node` prefers them (rendezvous hashing), most preferred first.
pub fn rank(node: &str, partitions: u16) -> Vec<u16> {
    let mut scored: Vec<(u64, u16)> = (0..partitions)
        .map(|partition| {
            let mut key = node.as_bytes().to_vec();
            key.extend_from_slice(&partition.to_be_bytes());
            (xxhash_rust::xxh3::xxh3_64(&key), partition)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, partition)| partition).collect()
}
