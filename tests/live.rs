//! `/v1/live` over WebSocket: ticks with fresh counts, subscription filters, auth, a slow client
//! that does not grow server memory, and many subscribers on one tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{connect, next_tick};
use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};
use tungstenite::Message;

fn send_now(server: &TestServer, tenant: &Tenant, events: &[(&str, &str)]) {
    let batch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (name, user))| json!({"type": "track", "event": name, "userId": user, "messageId": format!("{name}-{user}-{i}-{:?}", Instant::now())}))
        .collect();
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": batch }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn subscribers_see_new_events_counted_within_two_seconds() {
    let server = TestServer::start();
    let tenant = server.create_tenant("live");
    let mut socket = connect(&server, &format!("?key={}", tenant.read_key), None).unwrap();
    socket
        .send(Message::text(json!({"subscribe": ["Clicked"]}).to_string()))
        .unwrap();
    let first = next_tick(&mut socket);
    assert!(first["seq"].as_u64().is_some(), "{first}");
    common::clear_of_minute_end(Duration::from_secs(5));
    send_now(
        &server,
        &tenant,
        &[
            ("Clicked", "u1"),
            ("Clicked", "u2"),
            ("Clicked", "u1"),
            ("Other", "u3"),
        ],
    );
    // Timed from the acknowledgement: the request itself waits for a durable write.
    let sent = Instant::now();
    loop {
        let tick = next_tick(&mut socket);
        let minute = &tick["minute"];
        assert!(
            minute["events"].get("Other").is_none(),
            "filtered out: {tick}"
        );
        if minute["events"]["Clicked"]["count"] == 3 {
            assert_eq!(minute["events"]["Clicked"]["uniques"], 2);
            assert!(minute["total"]["count"].as_u64().unwrap() >= 4, "{tick}");
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "not counted within 2 s: {tick}"
        );
    }
    assert!(sent.elapsed() < Duration::from_secs(2));
    let metrics = server.metrics();
    assert!(
        metrics.contains("statsremote_live_subscribers"),
        "{metrics}"
    );
    socket.close(None).unwrap();
}

#[test]
fn live_requires_a_read_key_of_the_tenant() {
    let server = TestServer::start();
    let tenant = server.create_tenant("auth");
    assert_eq!(connect(&server, "", None).err().as_deref(), Some("401"));
    assert_eq!(
        connect(&server, "?key=sr_read_nope", None).err().as_deref(),
        Some("401")
    );
    assert_eq!(
        connect(&server, &format!("?key={}", tenant.write_key), None)
            .err()
            .as_deref(),
        Some("403")
    );
    let mut socket = connect(&server, "", Some(&tenant.read_key)).unwrap();
    assert!(next_tick(&mut socket)["minute"].is_object());
    // A malformed client message gets an error message, and the connection stays usable.
    socket.send(Message::text("{\"subscribe\": 5}")).unwrap();
    let reply = next_tick(&mut socket);
    let reply = if reply.get("error").is_some() {
        reply
    } else {
        next_tick(&mut socket)
    };
    assert!(
        reply["error"].as_str().unwrap().contains("subscribe"),
        "{reply}"
    );
    assert!(next_tick(&mut socket)["seq"].as_u64().is_some());
}

fn server_rss_kb(server: &TestServer) -> u64 {
    common::process_stats(server.pid()).rss_bytes / 1024
}

/// CPU time in clock ticks (1/100 s).
fn server_cpu_ticks(server: &TestServer) -> u64 {
    common::process_stats(server.pid()).cpu.as_millis() as u64 / 10
}

#[test]
fn a_slow_client_gets_coalesced_ticks_and_does_not_grow_server_memory() {
    let server = TestServer::start_with_env(&[("STATSREMOTE__LIVE__TICK_INTERVAL", "10ms")]);
    let tenant = server.create_tenant("slow");
    // Large ticks: many distinct events in the current minute.
    let names: Vec<String> = (0..400)
        .map(|i| format!("event-with-a-fairly-long-name-{i:04}"))
        .collect();
    let events: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "u")).collect();
    send_now(&server, &tenant, &events);
    let mut slow = connect(&server, &format!("?key={}", tenant.read_key), None).unwrap();
    let first = next_tick(&mut slow);
    let start_rss = server_rss_kb(&server);
    // Don't read for a while: ~600 ticks of ~40 KB are produced meanwhile.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        send_now(&server, &tenant, &events[..10]);
    }
    let end_rss = server_rss_kb(&server);
    eprintln!("server RSS while a client stalls: {start_rss} kB -> {end_rss} kB");
    assert!(
        end_rss < start_rss + 64 * 1024,
        "RSS grew from {start_rss} kB to {end_rss} kB"
    );
    // Reading again, the client first drains what the kernel's socket buffers took in (their
    // size depends on the machine: a few hundred of these ticks), then gets current ticks,
    // with gaps in `seq` where ticks were coalesced.
    let mut last = first["seq"].as_u64().unwrap();
    let mut skipped = 0;
    for _ in 0..2_000 {
        let tick = next_tick(&mut slow);
        let seq = tick["seq"].as_u64().unwrap();
        skipped += seq - last - 1;
        last = seq;
        if skipped > 0 {
            break;
        }
    }
    assert!(skipped > 0, "a slow client must have ticks coalesced");
    let metrics = server.metrics();
    assert!(
        metrics.contains("statsremote_live_coalesced_ticks_total"),
        "{metrics}"
    );
}

fn open_file_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[test]
fn a_thousand_subscribers_on_one_tenant() {
    let server = TestServer::start();
    let tenant = server.create_tenant("crowd");
    let wanted = 1000.min(open_file_limit().saturating_sub(200) / 2);
    let mut sockets: Vec<_> = (0..wanted)
        .map(|_| connect(&server, &format!("?key={}", tenant.read_key), None).unwrap())
        .collect();
    let rss_before = server_rss_kb(&server);
    let cpu_before = server_cpu_ticks(&server);
    let started = Instant::now();
    // Realistic ticks: 20 distinct events in the current minute besides the one checked.
    let others: Vec<String> = (0..20).map(|i| format!("Other event {i}")).collect();
    let mut events: Vec<(&str, &str)> = others.iter().map(|n| (n.as_str(), "u9")).collect();
    events.extend([("Crowd", "u1"), ("Crowd", "u2")]);
    common::clear_of_minute_end(Duration::from_secs(15));
    let sent = time::OffsetDateTime::now_utc();
    send_now(&server, &tenant, &events);
    std::thread::sleep(Duration::from_secs(3));
    // Every subscriber gets ticks, and sees the events in a tick stamped within 10 s of the
    // send, whatever older ticks it has queued since it connected.
    let rfc3339 = time::format_description::well_known::Rfc3339;
    for socket in &mut sockets {
        loop {
            let tick = next_tick(socket);
            if tick["minute"]["events"]["Crowd"]["count"] == 2 {
                break;
            }
            let at = time::OffsetDateTime::parse(tick["ts"].as_str().unwrap(), &rfc3339).unwrap();
            assert!(
                at < sent + Duration::from_secs(10),
                "a subscriber never saw the events: {tick}"
            );
        }
    }
    let cpu = server_cpu_ticks(&server) - cpu_before;
    let seconds = started.elapsed().as_secs_f64();
    let rss_after = server_rss_kb(&server);
    eprintln!(
        "{wanted} live subscribers: server CPU {:.1}% of one core over {seconds:.1} s, RSS {rss_before} kB -> {rss_after} kB",
        cpu as f64 / seconds,
    );
    assert!(server.metrics().contains(&format!(
        "statsremote_live_subscribers{{tenant=\"{}\"}} {wanted}",
        tenant.id
    )));
}

/// A browser offers the read key as a subprotocol beside `statsremote` (it cannot set headers
/// on a WebSocket); the server selects `statsremote`. A `key.` offer alone, or a wrong key, is
/// refused.
#[test]
fn browsers_pass_the_read_key_as_a_subprotocol() {
    let server = TestServer::start();
    let tenant = server.create_tenant("subprotocol");
    let handshake = |protocols: &str| {
        let offered = [("Sec-WebSocket-Protocol", protocols)];
        common::connect_with_headers(&server, "", &offered).map(|(socket, response)| {
            let selected = response.headers()["sec-websocket-protocol"]
                .to_str()
                .unwrap();
            (socket, selected.to_string())
        })
    };
    let (mut socket, selected) =
        handshake(&format!("statsremote, key.{}", tenant.read_key)).unwrap();
    assert_eq!(selected, "statsremote");
    let tick = next_tick(&mut socket);
    assert!(tick["seq"].as_u64().is_some(), "{tick}");
    assert_eq!(
        handshake(&format!("key.{}", tenant.read_key))
            .err()
            .as_deref(),
        Some("401")
    );
    assert_eq!(
        handshake("statsremote, key.sr_read_0000").err().as_deref(),
        Some("401")
    );
    assert_eq!(
        handshake(&format!("statsremote, key.{}", tenant.write_key))
            .err()
            .as_deref(),
        Some("403")
    );
}
