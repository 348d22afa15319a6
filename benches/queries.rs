//! Query latency over stored rollups, and the rollup update of one batch.
//!
//! `cargo bench --bench queries`. The store holds one event (plus the all-events series) with
//! minute buckets for 30 days and hour buckets for 90 days, a few users per minute; the benches
//! time the series read paths the query API uses (storage scan + zero filling), without HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use statsremote::query::{self, Metric};
use statsremote::rollup::{Deltas, Resolution, Retention, RollupItem};
use statsremote::storage::{rollups, Storage};
use statsremote::tenant::TenantId;

const MINUTE: i64 = 60_000_000;
const DAY: i64 = 1440 * MINUTE;

const FOREVER: Retention = Retention {
    minute: Duration::from_secs(1 << 40),
    hour: Duration::from_secs(1 << 40),
    day: None,
};

fn item(at: i64, user: u64) -> RollupItem {
    RollupItem {
        name: "Signed Up".into(),
        timestamp: at,
        user_hash: user.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        weight: 1,
    }
}

/// 90 days of events, 3 per minute (from 50 users), flushed in daily chunks like the actor does.
fn populate(storage: &Storage, tenant: TenantId, end: i64) {
    let start = end - 90 * DAY;
    let mut seq = 0;
    for day in 0..90 {
        let mut deltas = Deltas::default();
        let items: Vec<RollupItem> = (0..1440 * 3)
            .map(|i| {
                item(
                    start + day * DAY + (i / 3) * MINUTE + i % 3,
                    (i % 50) as u64,
                )
            })
            .collect();
        deltas.apply(&items, &FOREVER, end);
        deltas.roll_up_users();
        let previous = seq;
        seq += items.len() as u64;
        // Every day has ended: the actor folds it once it has (see `rollups::FoldPlan`).
        let fold = rollups::FoldPlan {
            all: true,
            ..Default::default()
        };
        rollups::flush(storage, tenant, &deltas, previous, seq, &fold).unwrap();
    }
    // Old buckets live in on-disk tables on a running server, not in the memtable.
    for keyspace in [&storage.rollup_counts, &storage.rollup_users] {
        keyspace.rotate_memtable_and_wait().unwrap();
        keyspace.major_compact().unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), 64 << 20, Default::default()).unwrap();
    let tenant = TenantId(7);
    let end = Resolution::Day.bucket(statsremote::event::now_micros());
    populate(&storage, tenant, end);

    c.bench_function("series 30 days by minute, count (43,200 points)", |b| {
        b.iter(|| {
            let points = query::series(
                &storage,
                tenant,
                Some("Signed Up"),
                Metric::Count,
                Resolution::Minute,
                end - 30 * DAY,
                end,
            )
            .unwrap();
            assert_eq!(points.len(), 43_200);
        })
    });
    c.bench_function("series 90 days by hour, count (2,160 points)", |b| {
        b.iter(|| {
            let points = query::series(
                &storage,
                tenant,
                Some("Signed Up"),
                Metric::Count,
                Resolution::Hour,
                end - 90 * DAY,
                end,
            )
            .unwrap();
            assert_eq!(points.len(), 2_160);
        })
    });
    c.bench_function("series 90 days by hour, uniques (2,160 points)", |b| {
        b.iter(|| {
            query::series(
                &storage,
                tenant,
                None,
                Metric::Uniques,
                Resolution::Hour,
                end - 90 * DAY,
                end,
            )
            .unwrap()
        })
    });
    c.bench_function("uniques over 90 days (merged day sketches)", |b| {
        b.iter(|| query::uniques(&storage, tenant, Some("Signed Up"), end - 90 * DAY, end).unwrap())
    });
    c.bench_function("rollup update of a 100-event batch", |b| {
        let items: Vec<RollupItem> = (0..100)
            .map(|i| item(end - DAY + i * 1_000_000, i as u64))
            .collect();
        b.iter_batched(
            Deltas::default,
            |mut deltas| deltas.apply(&items, &FOREVER, end),
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = queries;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(queries);
