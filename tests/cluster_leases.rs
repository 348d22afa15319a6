//! Partition leases on a private Redis (`testkit::services`): one owner per partition, fair
//! shares between live nodes, takeover of a dead node's partitions within the lease timeout,
//! and fencing: a node whose lease was taken over cannot commit with its old token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use statsremote::cluster::connect_redis;
use statsremote::cluster::lease::{Lease, Leases, FENCE_CHECK};
use testkit::services::Service;

const PARTITIONS: u16 = 16;
const TIMEOUT: Duration = Duration::from_millis(1500);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn connect(redis: &Service) -> ConnectionManager {
    connect_redis(&redis.url(), Duration::from_secs(60))
        .await
        .unwrap()
}

async fn node(redis: &Service, name: &str) -> Leases {
    Leases::new(connect(redis).await, "test", name, PARTITIONS, TIMEOUT)
}

/// A write fenced by `lease`'s token: sets `key` to `value` only if the token is current.
async fn fenced_set(
    redis: &mut ConnectionManager,
    leases: &Leases,
    lease: Lease,
    key: &str,
    value: &str,
) -> bool {
    let script = redis::Script::new(&format!(
        "{FENCE_CHECK}\nredis.call('SET', KEYS[2], ARGV[2])\nreturn 1"
    ));
    let done: u64 = script
        .key(leases.fence_key(lease.partition))
        .key(key)
        .arg(lease.token)
        .arg(value)
        .invoke_async(redis)
        .await
        .unwrap();
    done == 1
}

fn partitions(held: &BTreeMap<u16, Lease>) -> BTreeSet<u16> {
    held.keys().copied().collect()
}

#[test]
fn live_nodes_share_the_partitions_with_one_owner_each() {
    let redis = Service::redis().unwrap();
    runtime().block_on(async {
        let mut a = node(&redis, "node-a").await;
        let mut b = node(&redis, "node-b").await;
        let (mut held_a, mut held_b) = (BTreeMap::new(), BTreeMap::new());
        // A alone takes everything.
        a.balance(&mut held_a, now_ms()).await.unwrap();
        assert_eq!(held_a.len(), usize::from(PARTITIONS));
        // B joins: within a few rounds each holds half, and no partition has two owners.
        for _ in 0..4 {
            b.balance(&mut held_b, now_ms()).await.unwrap();
            a.balance(&mut held_a, now_ms()).await.unwrap();
        }
        assert_eq!((held_a.len(), held_b.len()), (8, 8));
        assert!(partitions(&held_a).is_disjoint(&partitions(&held_b)));
        // Tokens grow with each acquisition: B's are above the first round's.
        assert!(held_b.values().all(|lease| lease.token >= 2));
        // A third node gets a fair share too (6, 5, 5).
        let mut c = node(&redis, "node-c").await;
        let mut held_c = BTreeMap::new();
        for _ in 0..4 {
            c.balance(&mut held_c, now_ms()).await.unwrap();
            a.balance(&mut held_a, now_ms()).await.unwrap();
            b.balance(&mut held_b, now_ms()).await.unwrap();
        }
        let mut sizes = vec![held_a.len(), held_b.len(), held_c.len()];
        sizes.sort_unstable();
        assert_eq!(sizes, vec![5, 5, 6]);
        let all: BTreeSet<u16> = [&held_a, &held_b, &held_c]
            .into_iter()
            .flat_map(partitions)
            .collect();
        assert_eq!(all.len(), usize::from(PARTITIONS));
        // A clean stop releases at once: the others take over without waiting for expiry.
        for lease in held_c.values() {
            assert!(c.release(*lease).await.unwrap());
        }
        c.leave().await.unwrap();
        for _ in 0..3 {
            a.balance(&mut held_a, now_ms()).await.unwrap();
            b.balance(&mut held_b, now_ms()).await.unwrap();
        }
        assert_eq!(held_a.len() + held_b.len(), usize::from(PARTITIONS));
    });
}

#[test]
fn a_dead_node_is_taken_over_within_the_timeout_and_fenced_out() {
    let redis = Service::redis().unwrap();
    runtime().block_on(async {
        let mut a = node(&redis, "node-a").await;
        let mut b = node(&redis, "node-b").await;
        let mut writer = connect(&redis).await;
        let (mut held_a, mut held_b) = (BTreeMap::new(), BTreeMap::new());
        for _ in 0..4 {
            a.balance(&mut held_a, now_ms()).await.unwrap();
            b.balance(&mut held_b, now_ms()).await.unwrap();
        }
        let (&partition, &old) = held_a.iter().next().unwrap();
        assert!(fenced_set(&mut writer, &a, old, "state", "from-a").await);
        // A stops renewing (killed or paused): B holds every partition within the timeout
        // plus a renewal round.
        let stopped = Instant::now();
        while held_b.len() < usize::from(PARTITIONS) {
            assert!(
                stopped.elapsed() < TIMEOUT * 3,
                "B holds {} after {:?}",
                held_b.len(),
                stopped.elapsed()
            );
            tokio::time::sleep(TIMEOUT / 5).await;
            b.balance(&mut held_b, now_ms()).await.unwrap();
        }
        let took = stopped.elapsed();
        assert!(took >= TIMEOUT / 2, "taken over too early: {took:?}");
        let new = held_b[&partition];
        assert!(new.token > old.token);
        // A wakes up: its lease is gone, and its writes with the old token are refused.
        assert!(!a.renew(old).await.unwrap());
        assert!(!fenced_set(&mut writer, &a, old, "state", "late-a").await);
        assert!(fenced_set(&mut writer, &b, new, "state", "from-b").await);
        let state: String = redis::cmd("GET")
            .arg("state")
            .query_async(&mut writer)
            .await
            .unwrap();
        assert_eq!(state, "from-b");
        // A's next round finds nothing it held; with two live nodes again it gets half back.
        held_a.clear();
        for _ in 0..4 {
            a.balance(&mut held_a, now_ms()).await.unwrap();
            b.balance(&mut held_b, now_ms()).await.unwrap();
        }
        assert_eq!((held_a.len(), held_b.len()), (8, 8));
        assert!(partitions(&held_a).is_disjoint(&partitions(&held_b)));
    });
}
