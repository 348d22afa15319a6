//! Query latency over stored rollups, and the rollup update of one batch.
//!
//! `cargo bench --bench queries`. The store holds one event (plus the all-events series) with
//! minute buckets for 30 days and hour buckets for 90 days, a few users per minute; the benches
//! time the series read paths the query API uses (storage scan + zero filling), without HTTP.
//! A second tenant has 100,000 events in its log, for a funnel (which reads the stored events).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use statsremote::event::{BatchSource, EventKind, LogBatch, StoredEvent};
use statsremote::query::{self, Metric};
use statsremote::rollup::{Deltas, Resolution, Retention, RollupItems};
use statsremote::storage::{codec, rollups, Storage};
use statsremote::tenant::TenantId;

const MINUTE: i64 = 60_000_000;
const DAY: i64 = 1440 * MINUTE;

const FOREVER: Retention = Retention {
    minute: Duration::from_secs(1 << 40),
    hour: Duration::from_secs(1 << 40),
    day: None,
};

/// A batch of "Signed Up" events at `(timestamp, user)`.
fn batch(events: impl IntoIterator<Item = (i64, u64)>) -> RollupItems {
    RollupItems::collect(
        events
            .into_iter()
            .map(|(at, user)| ("Signed Up", at, user.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
    )
}

/// 90 days of events, 3 per minute (from 50 users), flushed in daily chunks like the actor does.
fn populate(storage: &Storage, tenant: TenantId, end: i64) {
    let start = end - 90 * DAY;
    let mut seq = 0;
    for day in 0..90 {
        let mut deltas = Deltas::default();
        let items = batch((0..1440 * 3).map(|i| {
            (
                start + day * DAY + (i / 3) * MINUTE + i % 3,
                (i % 50) as u64,
            )
        }));
        deltas.apply(&items, &FOREVER, end);
        deltas.roll_up_users();
        let previous = seq;
        seq += items.len() as u64;
        // Every day has ended: the actor folds it once it has (see `rollups::FoldPlan`).
        let fold = rollups::FoldPlan {
            all: true,
            ..Default::default()
        };
        rollups::flush(
            storage,
            tenant,
            &deltas,
            &Default::default(),
            previous,
            seq,
            &fold,
        )
        .unwrap();
    }
    // Old buckets live in on-disk tables on a running server, not in the memtable.
    storage.settle().unwrap();
}

/// 1,000 log entries of 100 events (~550 bytes each: properties and context), one per second
/// before `end`, three event names, 5,000 users; stored as the log writer stores them.
fn populate_log(storage: &Storage, tenant: TenantId, end: i64) {
    let names = ["Page Viewed", "Button Clicked", "Signed Up"];
    for entry in 0..1_000u64 {
        let at = end - (1_000 - entry as i64) * 1_000_000;
        let events = (0..100u64)
            .map(|i| {
                let n = entry * 100 + i;
                let user = n * 7 % 5_000;
                StoredEvent {
                    kind: EventKind::Track,
                    message_id: format!("{n:032x}"),
                    name: Some(names[(n % 3) as usize].into()),
                    user_id: Some(format!("user-{user}")),
                    anonymous_id: None,
                    group_id: None,
                    previous_id: None,
                    timestamp: at + i as i64,
                    original_timestamp: Some(at),
                    sent_at: None,
                    received_at: at,
                    user_hash: user.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    library_name: Some("analytics.js".into()),
                    library_version: Some("4.1.0".into()),
                    flags: 0,
                    properties: Some(format!(
                        r#"{{"path":"/pricing/{n}","referrer":"https://example.com/","plan":"pro","amount":{n},"currency":"EUR"}}"#
                    )),
                    traits: None,
                    context: Some(
                        r#"{"ip":"10.0.0.0","locale":"en-GB","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","page":{"url":"https://example.com/pricing","title":"Pricing"}}"#.into(),
                    ),
                    integrations: None,
                    extra: vec![],
                }
            })
            .collect();
        let batch = LogBatch {
            batch_id: u128::from(entry),
            received_at: at,
            source: BatchSource {
                endpoint: "/v1/batch".into(),
                client_ip: Some("10.0.0.0".into()),
            },
            events,
            shared: Default::default(),
            extras: Vec::new(),
        };
        let value = codec::encode_compressed(&batch).unwrap();
        storage
            .log()
            .append(tenant, entry * 100 + 1, value.into())
            .unwrap();
    }
    storage.log().commit(&[], false).unwrap();
    storage.settle().unwrap();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), 64 << 20, Default::default()).unwrap();
    let tenant = TenantId(7);
    let end = Resolution::Day.bucket(statsremote::event::now_micros());
    populate(&storage, tenant, end);
    let log_tenant = TenantId(8);
    let now = statsremote::event::now_micros();
    populate_log(&storage, log_tenant, now);

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
    c.bench_function("funnel of 3 steps over 100,000 stored events", |b| {
        let steps: Vec<String> = ["Page Viewed", "Button Clicked", "Signed Up"]
            .map(String::from)
            .to_vec();
        let span = query::FunnelSpan {
            from: now - 3_600_000_000,
            to: now + 60_000_000,
            future_tolerance: Duration::from_secs(3600),
            late_arrival: Duration::from_secs(7 * 86_400),
        };
        b.iter(|| {
            let stored = query::Stored::Tiers {
                storage: &storage,
                cold: None,
            };
            let reached = query::funnel(
                stored,
                log_tenant,
                &steps,
                600_000_000,
                &span,
                &Default::default(),
            )
            .unwrap();
            assert!(reached.users[0] > 0);
        })
    });
    c.bench_function("rollup update of a 100-event batch", |b| {
        let items = batch((0..100).map(|i| (end - DAY + i * 1_000_000, i as u64)));
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
