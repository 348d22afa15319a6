//! The cold tier on S3-compatible storage through the real server: moto's S3 server behind a
//! proxy the test can switch off. Flushes land in the bucket and are read back across a
//! restart; with the store unreachable, ingestion goes on, the flush lag and failures show on
//! `/metrics`, and once it is back everything is flushed, each event once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{batch, track, Auth, Tenant, TestServer};
use serde_json::Value;
use testkit::proxy::ToggleProxy;
use testkit::s3::S3Server;

fn metric(server: &TestServer, name: &str, tenant: &Tenant) -> f64 {
    let prefix = format!("{name}{{tenant=\"{}\"}} ", tenant.id);
    server
        .metrics()
        .lines()
        .find_map(|line| {
            line.strip_prefix(&prefix)
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

fn send(server: &TestServer, tenant: &Tenant, prefix: &str, count: usize) {
    let events: Vec<Value> = (0..count)
        .map(|i| track(&format!("{prefix}-{i}"), &format!("u{}", i % 7), "Bought"))
        .collect();
    let reply = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn message_ids(server: &TestServer, tenant: &Tenant) -> Vec<String> {
    let mut ids: Vec<String> = server
        .export(
            &tenant.read_key,
            "?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
        )
        .iter()
        .map(|event| event["messageId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn admin_flush(server: &TestServer, tenant: &Tenant) -> common::Reply {
    server.admin(
        "POST",
        &format!("/admin/v1/flush?tenant={}", tenant.id),
        None,
    )
}

#[test]
fn segments_go_to_s3_and_an_outage_delays_flushes_without_losing_anything() {
    let s3 = S3Server::start().unwrap();
    s3.create_bucket("cold").unwrap();
    let upstream = s3.endpoint().trim_start_matches("http://").to_string();
    let proxy = ToggleProxy::start(&upstream).unwrap();
    let endpoint = format!("http://{}", proxy.address());
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("STATSREMOTE__COLD__STORE", "s3"),
        ("STATSREMOTE__COLD__S3__BUCKET", "cold"),
        ("STATSREMOTE__COLD__S3__PREFIX", "statsremote"),
        ("STATSREMOTE__COLD__S3__ENDPOINT", endpoint.as_str()),
        ("STATSREMOTE__COLD__S3__ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", testkit::s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", testkit::s3::SECRET_KEY),
        ("STATSREMOTE__STORAGE__HOT_RETENTION", "1s"),
        ("STATSREMOTE__STORAGE__DEDUP_MAX_AGE", "200ms"),
        ("STATSREMOTE__COLD__FLUSH_INTERVAL", "400ms"),
        ("STATSREMOTE__ROLLUPS__FLUSH_INTERVAL", "200ms"),
    ];
    let server = TestServer::start_in(dir.path(), &env);
    let tenant = server.create_tenant("s3");

    // Flushed into the bucket, under the prefix.
    send(&server, &tenant, "before", 50);
    std::thread::sleep(Duration::from_millis(1100));
    let reply = admin_flush(&server, &tenant);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["tenants"][0]["cold_watermark"], 50);
    let listing = ureq::get(&format!(
        "{}/cold?list-type=2&prefix=statsremote/",
        s3.endpoint()
    ))
    .call()
    .unwrap()
    .into_string()
    .unwrap();
    assert!(listing.contains("statsremote/events/tenant="), "{listing}");
    assert!(listing.contains(".parquet"), "{listing}");
    assert!(
        listing.contains("statsremote/manifest/tenant="),
        "{listing}"
    );
    assert!(
        !std::fs::exists(dir.path().join("cold")).unwrap(),
        "nothing in a local folder"
    );

    // The store goes away: ingestion goes on, flushes fail and the lag grows.
    proxy.down();
    for round in 0..4 {
        send(&server, &tenant, &format!("during{round}"), 25);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "statsremote_cold_flush_failures_total", &tenant) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failed flush: {}",
            server.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = admin_flush(&server, &tenant);
    assert_eq!(reply.status, 503, "{}", reply.body);
    std::thread::sleep(Duration::from_millis(1500));
    let lag = metric(&server, "statsremote_cold_flush_lag_seconds", &tenant);
    assert!(lag >= 1.0, "lag {lag}");
    let expected: Vec<String> = {
        let mut ids: Vec<String> = (0..50).map(|i| format!("before-{i}")).collect();
        for round in 0..4 {
            ids.extend((0..25).map(|i| format!("during{round}-{i}")));
        }
        ids.sort();
        ids
    };
    // What is in the bucket cannot be read meanwhile: the export says so rather than
    // answering with less.
    let reply = server.get(
        "/v1/events/export?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
        Auth::Bearer(&tenant.read_key),
    );
    assert!(
        reply.problem(503).contains("object store"),
        "{}",
        reply.body
    );

    // Back: the flusher catches up by itself, each event once.
    proxy.up();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "statsremote_cold_flushed_events_total", &tenant) < 150.0 {
        assert!(Instant::now() < deadline, "not flushed after the outage");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(message_ids(&server, &tenant), expected);
    let reply = admin_flush(&server, &tenant);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["tenants"][0]["cold_watermark"], 150);

    // A restart reads the segments back from the bucket; retries are still duplicates.
    drop(server);
    let server = TestServer::start_in(dir.path(), &env);
    assert_eq!(message_ids(&server, &tenant), expected);
    send(&server, &tenant, "before", 50);
    assert_eq!(
        message_ids(&server, &tenant),
        expected,
        "retries after restart are duplicates"
    );
}
