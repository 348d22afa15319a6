//! What one tenant's keys can hold on to: distinct event names (rolled up as `$other` past the
//! cap), exports, funnels and live connections at once (429 past the caps), stalled exports
//! (cut off), and anything opened with a key that is then rotated or deleted (closed at once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{batch, process_stats, track, Auth, TestServer};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

#[test]
fn event_names_over_the_cap_are_rolled_up_as_other() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(data_dir.path(), &[]);
    let tenant = server.create_tenant("names");
    let reply = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(&json!({"settings": {"max_event_names": 3}})),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["settings"]["max_event_names"], 3);
    // Five names, two events each, plus page views (a built-in series, never capped).
    let mut events: Vec<Value> = (0..10)
        .map(|i| track(&format!("m{i}"), "u", &format!("name{}", i % 5)))
        .collect();
    events.push(
        json!({"type": "page", "userId": "u", "name": "Home", "messageId": "p1",
                       "timestamp": "2026-01-02T03:04:05.000Z"}),
    );
    let reply = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events));
    assert_eq!(reply.json()["accepted"], 11);
    server.wait_rollups_caught_up(&tenant.read_key);
    let reply = server.get(
        "/v1/query/events?from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z",
        Auth::Bearer(&tenant.read_key),
    );
    let mut counts: Vec<(String, u64)> = reply.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
            )
        })
        .collect();
    counts.sort();
    let expected: Vec<(String, u64)> = [
        ("$other", 4),
        ("$page", 1),
        ("name0", 2),
        ("name1", 2),
        ("name2", 2),
    ]
    .iter()
    .map(|(n, c)| (n.to_string(), *c))
    .collect();
    assert_eq!(counts, expected);
    // Stored and exported as sent.
    let exported = server.export(&tenant.read_key, "");
    assert_eq!(exported[4]["event"], "name4");
    let metrics = server.metrics();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("statsremote_event_names_overflow_total"))
        .expect("overflow metric");
    assert!(line.ends_with(" 4"), "{line}");
    // The cap survives a restart: a new name still goes to $other.
    assert!(server.terminate().success());
    drop(server);
    let server = TestServer::start_in(data_dir.path(), &[]);
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &batch(vec![
            track("late", "u", "name9"),
            track("again", "u", "name0"),
        ]),
    );
    assert_eq!(reply.json()["accepted"], 2, "{}", reply.body);
    server.wait_rollups_caught_up(&tenant.read_key);
    let series = |event: &str| {
        server.get(
            &format!(
                "/v1/query/uniques?from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z&event={event}"
            ),
            Auth::Bearer(&tenant.read_key),
        )
    };
    assert_eq!(series("name9").json()["uniques"], 0);
    let reply = server.get(
        "/v1/query/series?event=$other&interval=day&from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z",
        Auth::Bearer(&tenant.read_key),
    );
    assert_eq!(reply.json()["points"][0]["value"], 5, "{}", reply.body);
}

fn connect_live(server: &TestServer, key: &str) -> Result<WebSocket<TcpStream>, u16> {
    let addr = server.base.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("ws://{addr}/v1/live?key={key}");
    match tungstenite::client::client(request, stream) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("WebSocket handshake: {other}"),
    }
}

/// Reads until the server closes the socket; how long that took.
fn until_closed(socket: &mut WebSocket<TcpStream>, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < limit, "the live session stayed open");
        match socket.read() {
            Ok(Message::Close(_)) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn live_connections_are_capped_and_closed_when_the_key_goes() {
    let server = TestServer::start_with_env(&[("STATSREMOTE__READS__MAX_LIVE_CONNECTIONS", "2")]);
    let tenant = server.create_tenant("live");
    let other = server.create_tenant("other");
    let mut first = connect_live(&server, &tenant.read_key).unwrap();
    let mut second = connect_live(&server, &tenant.read_key).unwrap();
    assert_eq!(connect_live(&server, &tenant.read_key).err(), Some(429));
    // Another tenant has its own places.
    let mut others = connect_live(&server, &other.read_key).unwrap();
    // Rotating the write key leaves read sessions alone; rotating the read key ends them.
    let rotate = |which: &str| {
        server.admin(
            "POST",
            &format!("/admin/v1/tenants/{}/rotate-keys", tenant.id),
            Some(&json!({"which": which})),
        )
    };
    assert_eq!(rotate("write").status, 200);
    first.read().expect("still open after a write-key rotation");
    assert_eq!(rotate("read").status, 200);
    let took = until_closed(&mut first, Duration::from_secs(5));
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
    until_closed(&mut second, Duration::from_secs(5));
    // Places are given back: the new key connects. Deleting the tenant closes it too.
    let new_key = {
        let reply = rotate("read");
        reply.json()["read_key"].as_str().unwrap().to_string()
    };
    let mut third = connect_live(&server, &new_key).unwrap();
    assert_eq!(
        server
            .admin("DELETE", &format!("/admin/v1/tenants/{}", tenant.id), None)
            .status,
        200
    );
    until_closed(&mut third, Duration::from_secs(5));
    others
        .read()
        .expect("the other tenant's session is untouched");
}

/// Events with large properties, so an export is several MB: more than socket buffers and the
/// server's queue hold for a client that reads nothing.
fn fill(server: &TestServer, write_key: &str, megabytes: usize) {
    let payload = "p".repeat(30_000);
    for chunk in 0..megabytes / 3 {
        let events: Vec<Value> = (0..100)
            .map(|i| {
                let mut event = track(&format!("big-{chunk}-{i}"), "u", "big");
                event["properties"]["payload"] = json!(payload);
                event
            })
            .collect();
        let reply = server.post_json("/v1/batch", Auth::Basic(write_key), &batch(events));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

/// Starts an export and reads only the response head, leaving the body unread.
fn stalled_export(server: &TestServer, read_key: &str) -> TcpStream {
    let request = format!(
        "GET /v1/events/export HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {read_key}\r\n\r\n"
    );
    let mut stream = server.raw_connection(request.as_bytes());
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    stream
}

/// Reads the rest of a chunked export; true if it ended with the final chunk, false if the
/// connection was cut.
fn finished_cleanly(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    all.ends_with(b"\r\n0\r\n\r\n")
}

#[test]
fn exports_are_capped_cut_off_when_stalled_and_when_the_key_goes() {
    let server = TestServer::start_with_env(&[
        ("STATSREMOTE__READS__MAX_CONCURRENT_EXPORTS", "1"),
        ("STATSREMOTE__READS__EXPORT_STALL_TIMEOUT", "2s"),
    ]);
    let tenant = server.create_tenant("exports");
    fill(&server, &tenant.write_key, 24);
    // One export at a time: a second one is refused while the first is open.
    let mut stalled = stalled_export(&server, &tenant.read_key);
    let refused = server.get("/v1/events/export", Auth::Bearer(&tenant.read_key));
    let detail = refused.problem(429);
    assert!(detail.contains("reads.max_concurrent_exports"), "{detail}");
    // The stalled one is cut off (not ended as if complete), which frees its place.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !finished_cleanly(&mut stalled),
        "a stalled export ended as if complete"
    );
    let full = server.get("/v1/events/export", Auth::Bearer(&tenant.read_key));
    assert_eq!(full.status, 200);
    assert_eq!(full.body.lines().count(), 800);

    // Rotating the read key cuts an export in flight within a second.
    let server = TestServer::start_with_env(&[("STATSREMOTE__READS__EXPORT_STALL_TIMEOUT", "60s")]);
    let tenant = server.create_tenant("revoked");
    fill(&server, &tenant.write_key, 24);
    let mut stalled = stalled_export(&server, &tenant.read_key);
    std::thread::sleep(Duration::from_millis(300));
    let reply = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/rotate-keys", tenant.id),
        Some(&json!({"which": "read"})),
    );
    // Timed from the answer: the rotation itself is durable and may wait for a slow fsync.
    let rotated = Instant::now();
    assert_eq!(reply.status, 200);
    assert!(!finished_cleanly(&mut stalled));
    let took = rotated.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "export cut {took:?} after the rotation"
    );
    // Its blocking thread is free again: the server's CPU settles.
    let pid = server.pid();
    let before = process_stats(pid).cpu;
    std::thread::sleep(Duration::from_secs(1));
    assert!(process_stats(pid).cpu - before < Duration::from_millis(500));
}

#[test]
fn funnels_are_capped_per_tenant() {
    let server = TestServer::start_with_env(&[("STATSREMOTE__READS__MAX_CONCURRENT_FUNNELS", "1")]);
    let tenant = server.create_tenant("funnels");
    // Enough events that one funnel takes a while to compute.
    for round in 0..30 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                track(
                    &format!("f-{round}-{i}"),
                    &format!("u{i}"),
                    ["a", "b"][i % 2],
                )
            })
            .collect();
        server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events));
    }
    let body = json!({"steps": ["a", "b"], "window": "1h",
                      "from": "2026-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"});
    // Many at once: every answer is a result or a 429 that names the cap, and at least one
    // of each.
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let reply =
                        server.post_json("/v1/query/funnel", Auth::Bearer(&tenant.read_key), &body);
                    (reply.status, reply.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().any(|(status, _)| *status == 200),
        "{answers:?}"
    );
    for (status, body) in &answers {
        match status {
            200 => assert!(
                body.contains("\"users\":1000")
                    || body.contains("\"users\": 1000")
                    || body.contains("steps"),
                "{body}"
            ),
            429 => assert!(body.contains("reads.max_concurrent_funnels"), "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
}
