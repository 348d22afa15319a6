//! Rollups in a private Redis (`testkit::services`): a flush writes counts, users and the
//! watermark together; a node whose lease was taken over, and a flush replayed after a crash,
//! change nothing; any node reads the same numbers; Redis's HyperLogLog error on 100,000
//! users and on the union of a range.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::runtime;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use statsremote::cluster::connect_redis;
use statsremote::cluster::lease::{Lease, Leases};
use statsremote::cluster::rollups::{FlushOutcome, SharedRollups};
use statsremote::enrich::user_hash;
use statsremote::ids::TenantId;
use statsremote::rollup::{cover, Deltas, Resolution, Retention, RollupItems, ALL_EVENTS};
use testkit::services::Service;

const TENANT: TenantId = TenantId(0xab);
const MINUTE: i64 = 60_000_000;
/// A whole UTC day, far enough from now that retention never matters here.
const DAY: i64 = 1_767_225_600_000_000;

async fn connect(redis: &Service) -> ConnectionManager {
    connect_redis(&redis.url(), Duration::from_secs(60))
        .await
        .unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const FOREVER: Retention = Retention {
    minute: Duration::from_secs(u32::MAX as u64),
    hour: Duration::from_secs(u32::MAX as u64),
    day: None,
};

/// Deltas of `(name, minute, user)` events, users rolled up, as an owner flushes them.
fn deltas(events: &[(&str, i64, u64)]) -> Deltas {
    let items = RollupItems::collect(events.iter().map(|(name, minute, user)| {
        (
            *name,
            DAY + minute * MINUTE,
            user_hash(&[9; 32], &user.to_string()),
        )
    }));
    let mut deltas = Deltas::keeping_every_user();
    deltas.apply(&items, &FOREVER, DAY);
    deltas.roll_up_users();
    deltas
}

/// Takes `partition` (of `partitions`) as the only node: its lease and the fence it guards.
async fn own(redis: &Service, partitions: u16, partition: u16) -> (Lease, String) {
    let mut leases = Leases::new(
        connect(redis).await,
        "test",
        "owner",
        partitions,
        Duration::from_secs(5),
    );
    let mut held = BTreeMap::new();
    leases.balance(&mut held, now_ms()).await.unwrap();
    (held[&partition], leases.fence_key(partition))
}

#[test]
fn flushes_are_atomic_fenced_and_read_the_same_from_any_node() {
    let redis = Service::redis().unwrap();
    runtime().block_on(async {
        let (lease, fence) = own(&redis, 4, 1).await;
        let owner = SharedRollups::new(connect(&redis).await, "test");
        let reader = SharedRollups::new(connect(&redis).await, "test");

        let first = deltas(&[("a", 0, 1), ("a", 0, 2), ("b", 1, 1), ("a", 61, 3)]);
        let stored = owner
            .flush(TENANT, lease, &fence, (&first, &[]), 0, 4)
            .await
            .unwrap();
        assert_eq!(stored, FlushOutcome::Stored);
        // The same flush again (a crash after it committed, replayed from the stream): refused.
        let again = owner
            .flush(TENANT, lease, &fence, (&first, &[]), 0, 4)
            .await
            .unwrap();
        assert_eq!(again, FlushOutcome::Conflict { stored: 4 });

        // Another node reads the same numbers.
        assert_eq!(reader.watermark(TENANT).await.unwrap(), 4);
        let minutes = reader
            .counts(TENANT, Resolution::Minute, "a", DAY, DAY + 3 * MINUTE)
            .await
            .unwrap();
        assert_eq!(
            minutes.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            vec![2, 0, 0]
        );
        let hours = reader
            .counts(
                TENANT,
                Resolution::Hour,
                ALL_EVENTS,
                DAY,
                DAY + 120 * MINUTE,
            )
            .await
            .unwrap();
        assert_eq!(
            hours.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            vec![3, 1]
        );
        let day = cover(DAY, DAY + 1440 * MINUTE);
        assert_eq!(reader.uniques(TENANT, "a", &day).await.unwrap(), 3);
        assert_eq!(reader.uniques(TENANT, ALL_EVENTS, &day).await.unwrap(), 3);
        let hour = cover(DAY, DAY + 60 * MINUTE);
        assert_eq!(reader.uniques(TENANT, "a", &hour).await.unwrap(), 2);
        assert_eq!(reader.names(TENANT).await.unwrap(), vec!["", "a", "b"]);

        // Another node takes the partition over: the old owner's next flush changes nothing.
        let _: u64 = redis::cmd("INCR")
            .arg(&fence)
            .query_async(&mut connect(&redis).await)
            .await
            .unwrap();
        let late = deltas(&[("a", 0, 9)]);
        let fenced = owner
            .flush(TENANT, lease, &fence, (&late, &[]), 4, 5)
            .await
            .unwrap();
        assert_eq!(fenced, FlushOutcome::Fenced);
        assert_eq!(reader.watermark(TENANT).await.unwrap(), 4);
        assert_eq!(reader.uniques(TENANT, "a", &day).await.unwrap(), 3);
    });
}

/// Redis's HyperLogLog against the truth: one bucket of 100,000 users, and the union of 24
/// hourly buckets whose users overlap. Its standard error is 0.81%; the bound is 4%, about five
/// standard errors, since each run hashes the same users the same way but the test must never
/// flake.
#[test]
fn distinct_users_are_within_the_stated_error() {
    let redis = Service::redis().unwrap();
    runtime().block_on(async {
        let (lease, fence) = own(&redis, 1, 0).await;
        let owner = SharedRollups::new(connect(&redis).await, "test");
        // 100,000 users in minute 0; then 24 hours with 5,000 users each, half of them new.
        let mut events: Vec<(&str, i64, u64)> = (0..100_000).map(|u| ("e", 0, u)).collect();
        for hour in 0..24 {
            let first = 200_000 + hour * 2_500;
            events.extend((first..first + 5_000).map(|u| ("h", hour as i64 * 60, u)));
        }
        let all = deltas(&events);
        let stored = owner
            .flush(TENANT, lease, &fence, (&all, &[]), 0, 1)
            .await
            .unwrap();
        assert_eq!(stored, FlushOutcome::Stored);
        let check = |what: &str, got: u64, truth: f64| {
            let error = (got as f64 - truth).abs() / truth;
            eprintln!("{what}: {got} for {truth}, error {:.3}%", error * 100.0);
            assert!(error < 0.04, "{what}: {got} for {truth}");
        };
        let minute = [(Resolution::Minute, DAY)];
        check(
            "one bucket",
            owner.uniques(TENANT, "e", &minute).await.unwrap(),
            100_000.0,
        );
        let day = cover(DAY, DAY + 1440 * MINUTE);
        let union = owner.uniques(TENANT, "h", &day).await.unwrap();
        check("a day of hours", union, 2_500.0 * 24.0 + 2_500.0);
        let hours: Vec<(Resolution, i64)> = (0..24)
            .map(|h| (Resolution::Hour, DAY + h * 60 * MINUTE))
            .collect();
        check(
            "the union of 24 hour buckets",
            owner.uniques(TENANT, "h", &hours).await.unwrap(),
            62_500.0,
        );
    });
}
