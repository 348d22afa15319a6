//! Hostile clients: what a request costs the server process (CPU from `/proc/<pid>/stat`, peak
//! RSS from `/proc/<pid>/status`) is a small multiple of its bytes whatever its shape, with a
//! key and without; slow uploads are cut off; connections are capped.
//!
//! CPU budgets are ratios against a benign body of the same size sent to the same server (the
//! test binary is a debug build on a shared machine: absolute times mean little, a quadratic
//! shape shows as a ratio of hundreds). Memory budgets are absolute.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{process_stats, reset_peak_rss, Auth, Reply, TestServer};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// What one request cost the server: CPU, and its peak RSS above the RSS before it.
struct Cost {
    cpu: Duration,
    peak_growth: u64,
}

fn measure(server: &TestServer, send: impl FnOnce() -> Reply) -> (Reply, Cost) {
    let pid = server.pid();
    reset_peak_rss(pid);
    let before = process_stats(pid);
    let reply = send();
    let after = process_stats(pid);
    let cost = Cost {
        cpu: after.cpu.saturating_sub(before.cpu),
        peak_growth: after.peak_rss_bytes.saturating_sub(before.rss_bytes),
    };
    (reply, cost)
}

fn post(server: &TestServer, path: &str, auth: Auth<'_>, body: &[u8]) -> Reply {
    server.request(
        "POST",
        path,
        auth,
        &[("Content-Type", "application/json")],
        Some(body),
    )
}

/// A benign batch of about `bytes`: ordinary events of about 300 bytes.
fn benign(bytes: usize) -> Vec<u8> {
    let event = |i: usize| {
        json!({"type": "track", "userId": format!("u{i}"), "event": "Signed Up",
               "messageId": format!("benign-{bytes}-{i}"),
               "properties": {"plan": "pro", "n": i, "referrer": "https://example.com/x",
                              "title": "A page of the product that this user has just seen",
                              "path": "/docs/getting-started/install"}})
    };
    let one = event(0).to_string().len() + 1;
    let events: Vec<Value> = (0..bytes / one).map(event).collect();
    json!({ "batch": events }).to_string().into_bytes()
}

/// Asserts a hostile shape cost at most `factor` times the benign body of the same size, with
/// 0.3 s of slack for the granularity of CPU accounting.
fn assert_linear(shape: &str, hostile: &Cost, benign: &Cost, factor: u32) {
    let budget = benign.cpu * factor + Duration::from_millis(300);
    assert!(
        hostile.cpu <= budget,
        "{shape}: {:?} of CPU, more than {factor} times the {:?} of a benign body of its size",
        hostile.cpu,
        benign.cpu
    );
}

/// Segment's batch-level `context` is held once per batch: 2,000 minimal events under a large
/// batch context cost about their bytes, with no key, with an unknown key and with a valid one.
#[test]
fn batch_level_context_is_not_multiplied_by_the_events() {
    let server = TestServer::start();
    let tenant = server.create_tenant("amplified");
    let body_with = |context_bytes: usize, events: usize, key: Option<&str>| {
        let batch: Vec<Value> = (0..events)
            .map(|i| json!({"type": "track", "userId": "u", "event": "e", "messageId": format!("m{i}")}))
            .collect();
        let mut body = json!({
            "context": {"blob": "c".repeat(context_bytes), "library": {"name": "hostile"}},
            "batch": batch,
        });
        if let Some(key) = key {
            body["writeKey"] = json!(key);
        }
        body.to_string().into_bytes()
    };
    // The attack of the issue: 176 KB, 2,000 events, a 100 KB context; then 4 MiB of it.
    for (context, events) in [(100_000, 2_000), (2_000_000, 10_000)] {
        for key in [None, Some("sr_write_unknown")] {
            let body = body_with(context, events, key);
            let (reply, cost) = measure(&server, || post(&server, "/v1/batch", Auth::None, &body));
            reply.problem(401);
            assert!(
                cost.peak_growth < 32 * MIB,
                "{} bytes without a valid key raised peak RSS by {} MiB",
                body.len(),
                cost.peak_growth / MIB
            );
        }
    }
    // With a valid key, each event is over 64 KiB once the context is merged in: every event
    // is refused, each with its reason, and the batch costs its bytes.
    let body = body_with(100_000, 2_000, Some(&tenant.write_key));
    let (reply, cost) = measure(&server, || post(&server, "/v1/batch", Auth::None, &body));
    let detail = reply.problem(400);
    assert!(detail.contains("all 2000 events were rejected"), "{detail}");
    let reason = reply.json()["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("merged in; the limit is 65536 bytes"),
        "{reason}"
    );
    assert!(
        cost.peak_growth < 48 * MIB,
        "{} MiB",
        cost.peak_growth / MIB
    );
    // Under the limit, the events are stored with the context once, and exported merged.
    let body = body_with(30_000, 2_000, Some(&tenant.write_key));
    let (reply, cost) = measure(&server, || post(&server, "/v1/batch", Auth::None, &body));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["accepted"], 2000);
    assert!(
        cost.peak_growth < 48 * MIB,
        "2,000 events under a 30 KB context raised peak RSS by {} MiB",
        cost.peak_growth / MIB
    );
    let exported = server.export(&tenant.read_key, "");
    assert_eq!(exported.len(), 2000);
    assert_eq!(
        exported[1999]["context"]["blob"].as_str().unwrap().len(),
        30_000
    );
    assert_eq!(exported[0]["statsremote"]["libraryName"], "hostile");
}

/// Every shape costs time linear in its bytes: many members, repeated members, long strings,
/// many tiny events, NDJSON lines, deep nesting. Each gets a clear answer.
#[test]
fn every_shape_parses_in_linear_time() {
    let server = TestServer::start();
    let tenant = server.create_tenant("shapes");
    let key = Auth::Basic(&tenant.write_key);
    let size = 2 * MIB as usize;
    let (reply, benign_cost) = measure(&server, || post(&server, "/v1/batch", key, &benign(size)));
    assert_eq!(reply.status, 200, "{}", reply.body);

    let members = |count: usize, distinct: bool| {
        let mut event = String::from(r#"{"type":"track","userId":"u","event":"e""#);
        for i in 0..count {
            let name = if distinct { i } else { i % 3 };
            event.push_str(&format!(r#","member_{name}":{i}"#));
        }
        event.push('}');
        event
    };
    let batch_of = |event: &str, count: usize| {
        format!(r#"{{"batch":[{}]}}"#, vec![event; count].join(",")).into_bytes()
    };
    let nested = format!(
        r#"{{"type":"track","userId":"u","event":"e","properties":{{"p":{}1{}}}}}"#,
        "[".repeat(120),
        "]".repeat(120)
    );
    let shapes: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // Events of 999 distinct unknown members: within the cap, stored.
        (
            "distinct members",
            batch_of(&members(996, true), 100),
            200,
            "",
        ),
        // One event of 150,000 members: refused for its member count.
        (
            "one huge object",
            batch_of(&members(150_000, true), 1),
            400,
            "top-level members",
        ),
        // Repeated members: the last one wins, in one pass.
        (
            "repeated members",
            batch_of(&members(996, false), 100),
            200,
            "",
        ),
        // A 2 MB string: refused for its size.
        (
            "long string",
            batch_of(
                &format!(
                    r#"{{"type":"track","userId":"u","event":"e","properties":{{"s":"{}"}}}}"#,
                    "x".repeat(size)
                ),
                1,
            ),
            400,
            "bytes as compact JSON",
        ),
        // 10,000 empty objects: each refused with its reason.
        (
            "many tiny events",
            batch_of("{}", 10_000),
            400,
            "all 10000 events were rejected",
        ),
        // Deep nesting within the JSON parser's limit.
        ("deep nesting", batch_of(&nested, 2_000), 200, ""),
    ];
    for (shape, body, status, expected) in shapes {
        let (reply, cost) = measure(&server, || post(&server, "/v1/batch", key, &body));
        assert_eq!(
            reply.status,
            status,
            "{shape}: {}",
            &reply.body[..reply.body.len().min(300)]
        );
        if !expected.is_empty() {
            assert!(
                reply.body.contains(expected),
                "{shape}: {}",
                &reply.body[..300]
            );
        }
        assert_linear(shape, &cost, &benign_cost, 4);
        assert!(
            cost.peak_growth < 64 * MIB,
            "{shape}: {} MiB",
            cost.peak_growth / MIB
        );
    }
    // NDJSON: a line per event.
    let lines: String = (0..10_000)
        .map(|i| {
            format!(
                "{}\n",
                members(20, true).replace("\"e\"", &format!("\"n{}\"", i % 7))
            )
        })
        .collect();
    let (reply, cost) = measure(&server, || {
        server.request(
            "POST",
            "/v1/batch",
            key,
            &[("Content-Type", "application/x-ndjson")],
            Some(lines.as_bytes()),
        )
    });
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_linear("ndjson", &cost, &benign_cost, 4);
}

/// A bomb: a few KB of gzip that would be far more than the body limit costs no more than the
/// limit, and refusing it does not keep the worker from anything else.
#[test]
fn compressed_bombs_stop_at_the_limit() {
    let server = TestServer::start();
    let tenant = server.create_tenant("bomb");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![b' '; 200 * MIB as usize]).unwrap();
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 300_000);
    let (reply, cost) = measure(&server, || {
        server.request(
            "POST",
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &[("Content-Encoding", "gzip")],
            Some(&bomb),
        )
    });
    let detail = reply.problem(413);
    assert!(detail.contains("decompressed"), "{detail}");
    assert!(
        cost.peak_growth < 32 * MIB,
        "{} MiB",
        cost.peak_growth / MIB
    );
}

/// Reads what the server sends until it closes the connection (or `limit` passes).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
    )
}

/// Uploads that stop are cut off: headers within `server.header_timeout`, the body within
/// `server.body_timeout` (408), and a stalled upload holds only what it sent.
#[test]
fn slow_and_stalled_uploads_are_cut_off() {
    let server = TestServer::start_with_env(&[
        ("STATSREMOTE__SERVER__HEADER_TIMEOUT", "1s"),
        ("STATSREMOTE__SERVER__BODY_TIMEOUT", "2s"),
    ]);
    let tenant = server.create_tenant("slow");
    // Headers that never end.
    let mut stream = server.raw_connection(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-");
    let (_, took) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(5),
        "headers stalled for {took:?}"
    );

    // 300 uploads that declare 4 MB, send 60 KB and stop, with a valid key.
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:", tenant.write_key));
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n{{\"batch\":[\"{}",
        "x".repeat(60_000)
    );
    let pid = server.pid();
    reset_peak_rss(pid);
    let before = process_stats(pid);
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..300)
        .map(|_| server.raw_connection(head.as_bytes()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = process_stats(pid);
    let growth = during.peak_rss_bytes.saturating_sub(before.rss_bytes);
    // 300 × 60 KB = 18 MB received; nothing is reserved for the 4 MB each declared.
    assert!(
        growth < 64 * MIB,
        "300 stalled uploads raised peak RSS by {} MiB",
        growth / MIB
    );
    for stream in &mut stalled {
        let (answer, _) = read_until_closed(stream, Duration::from_secs(10));
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{}",
            &answer[..answer.len().min(200)]
        );
        assert!(answer.contains("server.body_timeout"), "{answer}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "stalled uploads were open for {took:?}"
    );
    // The server still answers.
    assert_eq!(server.get("/healthz", Auth::None).status, 200);
}

/// `server.max_connections` caps open connections: one over the cap waits until one closes.
#[test]
fn connections_over_the_cap_wait_for_a_free_one() {
    let server = TestServer::start_with_env(&[
        ("STATSREMOTE__SERVER__MAX_CONNECTIONS", "4"),
        ("STATSREMOTE__SERVER__WORKERS", "2"),
        ("STATSREMOTE__SERVER__HEADER_TIMEOUT", "30s"),
    ]);
    // Four idle connections take every place.
    let idle: Vec<TcpStream> = (0..4).map(|_| server.raw_connection(b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut waiting = server.raw_connection(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    waiting
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut first = [0u8; 12];
    assert!(
        waiting.read(&mut first).is_err(),
        "a fifth connection was served while four were open"
    );
    drop(idle);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = waiting.read(&mut first).unwrap();
    assert_eq!(&first[..n], b"HTTP/1.1 200");
}

/// Private endpoints send no CORS headers; the tenant API mirrors any origin.
#[test]
fn admin_and_metrics_are_not_readable_cross_origin() {
    let server = TestServer::start_with_env(&[(
        "STATSREMOTE__SERVER__METRICS_TOKEN",
        "metrics-token-0123456789",
    )]);
    let origin = [("Origin", "https://evil.example")];
    let metrics = server.request(
        "GET",
        "/metrics",
        Auth::Bearer("metrics-token-0123456789"),
        &origin,
        None,
    );
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.header("access-control-allow-origin"), None);
    server
        .request("GET", "/metrics", Auth::None, &[], None)
        .problem(401);
    server
        .request(
            "GET",
            "/metrics",
            Auth::Bearer("wrong-token-0123456789"),
            &[],
            None,
        )
        .problem(401);
    let admin = server.request(
        "GET",
        "/admin/v1/tenants",
        Auth::Bearer(common::ADMIN_TOKEN),
        &origin,
        None,
    );
    assert_eq!(admin.status, 200);
    assert_eq!(admin.header("access-control-allow-origin"), None);
    let tenant = server.create_tenant("cors");
    let events = server.request(
        "POST",
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &origin,
        Some(
            json!({"batch": [common::track("c1", "u", "e")]})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(events.status, 200);
    assert_eq!(
        events.header("access-control-allow-origin"),
        Some("https://evil.example")
    );
}
