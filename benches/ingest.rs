//! The hot inner pieces of ingestion, per 100-event batch of realistic (~550-byte) events:
//! parsing the Segment JSON, enrichment, and the log encoding. `cargo bench --bench ingest`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use statsremote::enrich::{enrich_all, EnrichContext};
use statsremote::event::{BatchSource, LogBatch};
use statsremote::http::segment::{parse_json, ParseLimits, Route};
use statsremote::storage::codec;

/// `with_ip`: contexts carry the end user's address, as server-side SDKs forward it.
fn batch_body(events: usize, with_ip: bool) -> Vec<u8> {
    let batch: Vec<serde_json::Value> = (0..events)
        .map(|i| {
            let mut event = serde_json::json!({
                "type": "track",
                "event": format!("Event {}", i % 20),
                "userId": format!("user-{:08x}", i * 7919),
                "messageId": format!("{:016x}-{i:04}", 42),
                "timestamp": "2026-11-26T04:00:00.000Z",
                "properties": {
                    "path": "/pricing", "referrer": "https://news.ycombinator.com/",
                    "title": "StatsRemote - pricing", "plan": "team", "price": 129.5,
                    "currency": "EUR", "items": 3, "experiment": "exp-7"
                },
                "context": {
                    "library": {"name": "analytics-node", "version": "2.1.0"},
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
                    "locale": "en-GB",
                    "page": {"path": "/pricing", "url": "https://app.example.com/pricing"}
                }
            });
            if with_ip {
                event["context"]["ip"] = format!("203.0.113.{}", i % 250).into();
            }
            event
        })
        .collect();
    serde_json::json!({ "batch": batch, "sentAt": "2026-11-26T04:00:01.000Z" })
        .to_string()
        .into_bytes()
}

fn benches(c: &mut Criterion) {
    let body = batch_body(100, false);
    let body_with_ip = batch_body(100, true);
    let limits = ParseLimits {
        max_event_bytes: 64 * 1024,
        max_events: 10_000,
        max_event_members: 1000,
    };
    let key = [7u8; 32];
    let context = EnrichContext {
        received_at: 1_790_000_000_000_000,
        future_tolerance: Duration::from_secs(3600),
        user_hash_key: &key,
        batch_library: &(None, None),
    };
    let mut group = c.benchmark_group("ingest, 100-event batch");
    group.throughput(Throughput::Elements(100));
    group.bench_function("parse Segment JSON", |b| {
        b.iter(|| parse_json(Route::Batch, &body, &limits).unwrap())
    });
    group.bench_function("enrich", |b| {
        b.iter_batched(
            || parse_json(Route::Batch, &body, &limits).unwrap().events,
            |events| enrich_all(events, &context),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("enrich, contexts with the end user's ip", |b| {
        b.iter_batched(
            || {
                parse_json(Route::Batch, &body_with_ip, &limits)
                    .unwrap()
                    .events
            },
            |events| enrich_all(events, &context),
            BatchSize::SmallInput,
        )
    });
    let log_batch = LogBatch {
        batch_id: 1,
        received_at: context.received_at,
        source: BatchSource {
            endpoint: "/v1/batch".into(),
            client_ip: Some("127.0.0.0".into()),
        },
        events: enrich_all(
            parse_json(Route::Batch, &body, &limits).unwrap().events,
            &context,
        ),
        shared: Default::default(),
        extras: Vec::new(),
    };
    group.bench_function("encode log entry", |b| {
        b.iter(|| codec::encode_compressed(&log_batch).unwrap())
    });
    let encoded = codec::encode_compressed(&log_batch).unwrap();
    group.bench_function("decode log entry", |b| {
        b.iter(|| codec::decode::<LogBatch>(&encoded).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = ingest;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(ingest);
