//! Every Segment endpoint, auth form, compression, NDJSON and partial batches, through the real
//! server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use common::{batch, message_ids, track, Auth, TestServer};
use serde_json::json;

#[test]
fn every_endpoint_accepts_its_event_type() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let key = Auth::Basic(&tenant.write_key);
    let calls = [
        (
            "/v1/track",
            json!({"messageId": "t", "userId": "u1", "event": "Clicked"}),
            "track",
        ),
        (
            "/v1/identify",
            json!({"messageId": "i", "userId": "u1", "traits": {"plan": "pro"}}),
            "identify",
        ),
        (
            "/v1/page",
            json!({"messageId": "p", "anonymousId": "a1", "name": "Home", "properties": {"path": "/"}}),
            "page",
        ),
        (
            "/v1/screen",
            json!({"messageId": "s", "userId": "u1", "name": "Settings"}),
            "screen",
        ),
        (
            "/v1/group",
            json!({"messageId": "g", "userId": "u1", "groupId": "org-1", "traits": {"size": 3}}),
            "group",
        ),
        (
            "/v1/alias",
            json!({"messageId": "a", "userId": "u1", "previousId": "a1"}),
            "alias",
        ),
    ];
    for (path, body, _) in &calls {
        let reply = server.post_json(path, key, body);
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(
            reply.json(),
            json!({"success": true, "accepted": 1, "duplicates": 0, "rejected": 0})
        );
    }
    for path in ["/v1/batch", "/v1/import"] {
        let id = format!("b{path}");
        let reply = server.post_json(path, key, &batch(vec![track(&id, "u2", "Bought")]));
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(reply.json()["accepted"], 1);
    }
    let events = server.export(&tenant.read_key, "");
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        vec!["track", "identify", "page", "screen", "group", "alias", "track", "track"]
    );
    assert_eq!(events[0]["event"], "Clicked");
    assert_eq!(events[2]["name"], "Home");
    assert_eq!(events[4]["groupId"], "org-1");
    assert_eq!(events[5]["previousId"], "a1");
    let endpoints: Vec<&str> = events
        .iter()
        .map(|e| e["statsremote"]["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints[6..], ["/v1/batch", "/v1/import"]);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["statsremote"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

#[test]
fn every_auth_form_works() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let basic = server.post_json(
        "/v1/track",
        Auth::Basic(&tenant.write_key),
        &track("1", "u", "e"),
    );
    assert_eq!(basic.status, 200, "{}", basic.body);
    let bearer = server.post_json(
        "/v1/track",
        Auth::Bearer(&tenant.write_key),
        &track("2", "u", "e"),
    );
    assert_eq!(bearer.status, 200, "{}", bearer.body);
    let mut in_body = track("3", "u", "e");
    in_body["writeKey"] = json!(tenant.write_key);
    assert_eq!(
        server.post_json("/v1/track", Auth::None, &in_body).status,
        200
    );
    let mut batch_body = batch(vec![track("4", "u", "e")]);
    batch_body["writeKey"] = json!(tenant.write_key);
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::None, &batch_body)
            .status,
        200
    );
    let events = server.export(&tenant.read_key, "");
    assert_eq!(message_ids(&events), vec!["1", "2", "3", "4"]);
    // The write key given in the body is not stored with the event.
    assert!(events.iter().all(|e| e.get("writeKey").is_none()));
}

fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "zstd" => zstd::stream::encode_all(data, 3).unwrap(),
        "br" => {
            let mut out = Vec::new();
            brotli::BrotliCompress(&mut &data[..], &mut out, &Default::default()).unwrap();
            out
        }
        other => panic!("no encoder for {other}"),
    }
}

#[test]
fn every_compression_is_accepted() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    for encoding in ["gzip", "deflate", "zstd", "br"] {
        let events = (0..50)
            .map(|i| track(&format!("{encoding}-{i}"), "u", "Compressed"))
            .collect();
        let body = compress(encoding, batch(events).to_string().as_bytes());
        let reply = server.request(
            "POST",
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &[
                ("Content-Type", "application/json"),
                ("Content-Encoding", encoding),
            ],
            Some(&body),
        );
        assert_eq!(reply.status, 200, "{encoding}: {}", reply.body);
        assert_eq!(reply.json()["accepted"], 50, "{encoding}");
    }
    assert_eq!(server.export(&tenant.read_key, "").len(), 200);
}

#[test]
fn ndjson_batches_are_accepted_on_batch_only() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let body = format!(
        "{}\n\n{}\n{{broken\n{}\n",
        track("n1", "u", "A"),
        track("n2", "u", "B"),
        json!({"type": "identify", "userId": "u", "messageId": "n3"})
    );
    let reply = server.request(
        "POST",
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &[("Content-Type", "application/x-ndjson")],
        Some(body.as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(
        (json["accepted"].as_u64(), json["rejected"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(json["errors"][0]["index"], 2);
    let reply = server.request(
        "POST",
        "/v1/track",
        Auth::Basic(&tenant.write_key),
        &[("Content-Type", "application/x-ndjson")],
        Some(body.as_bytes()),
    );
    reply.problem(415);
}

#[test]
fn partial_batches_keep_valid_events_and_list_the_rest() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let body = json!({
        "sentAt": "2026-01-02T03:04:15.000Z",
        "context": {"library": {"name": "analytics-node", "version": "2.1.0"}},
        "batch": [
            track("ok-1", "u1", "Signed Up"),
            {"type": "track", "userId": "u1", "messageId": "bad-1"},
            {"type": "track", "event": "No User", "messageId": "bad-2"},
            {"type": "wat", "userId": "u1", "messageId": "bad-3"},
            {"type": "track", "userId": "u1", "event": "Bad Time", "timestamp": "last tuesday", "messageId": "bad-4"},
            {"type": "track", "userId": "u1", "event": "Bad Props", "properties": [1, 2], "messageId": "bad-5"},
            track("ok-2", "u2", "Signed Up"),
        ]
    });
    let reply = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["accepted"], 2);
    assert_eq!(json["rejected"], 5);
    let errors = json["errors"].as_array().unwrap();
    let indexes: Vec<u64> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2, 3, 4, 5]);
    let ids: Vec<&str> = errors
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["bad-1", "bad-2", "bad-3", "bad-4", "bad-5"]);
    assert!(errors[0]["reason"].as_str().unwrap().contains("`event`"));
    assert!(errors[1]["reason"].as_str().unwrap().contains("userId"));
    assert!(errors[2]["reason"]
        .as_str()
        .unwrap()
        .contains("unknown type"));
    assert!(errors[3]["reason"].as_str().unwrap().contains("timestamp"));
    assert!(errors[4]["reason"].as_str().unwrap().contains("properties"));

    let events = server.export(&tenant.read_key, "");
    assert_eq!(message_ids(&events), vec!["ok-1", "ok-2"]);
    // Batch-level context is merged into each event; enrichment is visible.
    let first = &events[0];
    assert_eq!(first["context"]["library"]["name"], "analytics-node");
    assert_eq!(first["statsremote"]["libraryName"], "analytics-node");
    assert_eq!(first["statsremote"]["libraryVersion"], "2.1.0");
    assert_eq!(first["statsremote"]["clientIp"], "127.0.0.0");
    assert_eq!(first["properties"], json!({"plan": "pro", "n": 1}));
    // Clock skew: the client clock ran 10 s ahead of sentAt → timestamp = receivedAt - 10 s.
    let received = first["receivedAt"].as_str().unwrap();
    let corrected = first["timestamp"].as_str().unwrap();
    let received_ms =
        time::OffsetDateTime::parse(received, &time::format_description::well_known::Rfc3339)
            .unwrap();
    let corrected_ms =
        time::OffsetDateTime::parse(corrected, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!((received_ms - corrected_ms).whole_milliseconds(), 10_000);
    assert_eq!(first["originalTimestamp"], "2026-01-02T03:04:05.000Z");
    assert_eq!(first["sentAt"], "2026-01-02T03:04:15.000Z");
}

#[test]
fn future_timestamps_are_clamped_and_flagged() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let mut event = track("future", "u", "Time Travel");
    event["timestamp"] = json!("2999-01-01T00:00:00Z");
    let reply = server.post_json("/v1/track", Auth::Basic(&tenant.write_key), &event);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let events = server.export(&tenant.read_key, "");
    assert_eq!(events[0]["statsremote"]["clampedFutureTimestamp"], true);
    assert_eq!(events[0]["timestamp"], events[0]["receivedAt"]);
    assert_eq!(events[0]["originalTimestamp"], "2999-01-01T00:00:00.000Z");
}

#[test]
fn export_filters_by_time_and_event() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let mut events = Vec::new();
    for (i, (day, name)) in [("01", "A"), ("02", "B"), ("03", "A"), ("04", "B")]
        .iter()
        .enumerate()
    {
        let mut event = track(&format!("e{i}"), "u", name);
        event["timestamp"] = json!(format!("2026-01-{day}T12:00:00Z"));
        events.push(event);
    }
    assert_eq!(
        server
            .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events))
            .status,
        200
    );
    let range = server.export(
        &tenant.read_key,
        "?from=2026-01-02T00:00:00Z&to=2026-01-04T00:00:00Z",
    );
    assert_eq!(message_ids(&range), vec!["e1", "e2"]);
    let only_a = server.export(&tenant.read_key, "?event=A");
    assert_eq!(message_ids(&only_a), vec!["e0", "e2"]);
    let bad = server.get(
        "/v1/events/export?from=yesterday",
        Auth::Bearer(&tenant.read_key),
    );
    assert!(bad.problem(400).contains("`from`"));
    let reversed = server.get(
        "/v1/events/export?from=2026-01-04T00:00:00Z&to=2026-01-01T00:00:00Z",
        Auth::Bearer(&tenant.read_key),
    );
    reversed.problem(400);
}
