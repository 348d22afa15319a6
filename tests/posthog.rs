//! PostHog capture compatibility over raw HTTP: every route, body shape and encoding PostHog's
//! SDKs use, the v1 protocol's per-event reply, dedup by `uuid`, and clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use base64::Engine;
use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn export(server: &TestServer, tenant: &Tenant) -> Vec<Value> {
    server.export(
        &tenant.read_key,
        "?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
    )
}

fn event(uuid: &str, name: &str, distinct_id: &str) -> Value {
    json!({
        "uuid": uuid,
        "event": name,
        "distinct_id": distinct_id,
        "properties": { "plan": "pro", "$lib": "posthog-python", "$lib_version": "6.0.0" },
        "timestamp": "2026-03-01T10:00:00Z",
    })
}

#[test]
fn server_sdk_batches_are_stored_once_per_uuid() {
    let server = TestServer::start();
    let tenant = server.create_tenant("posthog");
    // posthog-python / posthog-node: POST /batch/ with the key in the body.
    let body = json!({
        "api_key": tenant.write_key,
        "batch": [event("0190a0e0-0000-7000-8000-000000000001", "signed up", "user-1"),
                  event("0190a0e0-0000-7000-8000-000000000002", "paid", "user-1")],
        "sent_at": "2026-03-01T10:00:05Z",
    });
    for path in ["/batch/", "/batch"] {
        let reply = server.request(
            "POST",
            path,
            Auth::None,
            &[("Content-Type", "application/json")],
            Some(&gzip(body.to_string().as_bytes())),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json(), json!({"status": 1}));
    }
    let events = export(&server, &tenant);
    assert_eq!(events.len(), 2, "the resend counted once: {events:?}");
    let first = &events[0];
    assert_eq!(first["messageId"], "0190a0e0-0000-7000-8000-000000000001");
    assert_eq!(first["userId"], "user-1");
    assert_eq!(first["event"], "signed up");
    assert_eq!(first["properties"]["plan"], "pro");
    // The client's time as sent; `timestamp` is corrected by `sent_at` (5 s before sending).
    assert_eq!(first["originalTimestamp"], "2026-03-01T10:00:00.000Z");
    assert_eq!(first["statsremote"]["libraryName"], "posthog-python");
}

#[test]
fn browser_bodies_in_every_encoding_are_read() {
    let server = TestServer::start();
    let tenant = server.create_tenant("browser");
    let js_event = |uuid: &str| {
        json!({
            "uuid": uuid,
            "event": "$pageview",
            "properties": { "token": tenant.write_key, "distinct_id": "anon-1", "$current_url": "https://shop.example/" },
            "timestamp": "2026-03-01T10:00:00Z",
        })
    };
    let text = |value: &Value| value.to_string().into_bytes();
    // gzip-js: gzip sent as text/plain.
    let batch = json!([js_event("a1"), js_event("a2")]);
    let reply = server.request(
        "POST",
        "/e/?compression=gzip-js&ver=1.200.0&_=1700000000000",
        Auth::None,
        &[("Content-Type", "text/plain")],
        Some(&gzip(&text(&batch))),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // gzip recognised by its magic bytes whatever the parameter says.
    let reply = server.request(
        "POST",
        "/i/v0/e/",
        Auth::None,
        &[("Content-Type", "text/plain")],
        Some(&gzip(&text(&json!(js_event("a3"))))),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // compression=base64 on the raw body.
    let encoded = base64::engine::general_purpose::STANDARD.encode(text(&json!([js_event("a4")])));
    let reply = server.request(
        "POST",
        "/e/?compression=base64",
        Auth::None,
        &[("Content-Type", "text/plain")],
        Some(encoded.as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // A form field `data=` (base64), as older posthog-js sends.
    let encoded = base64::engine::general_purpose::STANDARD.encode(text(&json!([js_event("a5")])));
    let form = format!("data={}", urlencode(&encoded));
    let reply = server.request(
        "POST",
        "/e/",
        Auth::None,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(form.as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // GET with `data=` in the query (image beacons).
    let encoded = base64::engine::general_purpose::STANDARD.encode(text(&js_event("a6")));
    let reply = server.get(&format!("/e/?data={}", urlencode(&encoded)), Auth::None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    // sendBeacon: 204.
    let reply = server.request(
        "POST",
        "/e/?beacon=1",
        Auth::None,
        &[("Content-Type", "text/plain")],
        Some(&text(&json!([js_event("a7")]))),
    );
    assert_eq!(reply.status, 204, "{}", reply.body);
    let ids: Vec<String> = export(&server, &tenant)
        .iter()
        .map(|event| event["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]);
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[test]
fn v1_answers_per_uuid_and_marks_duplicates() {
    let server = TestServer::start();
    let tenant = server.create_tenant("v1");
    let body = json!({
        "created_at": "2026-03-01T10:00:05Z",
        "historical_migration": false,
        "batch": [event("u-1", "opened", "p-1"), event("u-2", "closed", "p-1"), {"uuid": "u-3", "event": "no person"}],
    });
    let send = || {
        server.request(
            "POST",
            "/i/v1/analytics/events",
            Auth::Bearer(&tenant.write_key),
            &[
                ("Content-Type", "application/json"),
                ("Content-Encoding", "gzip"),
            ],
            Some(&gzip(body.to_string().as_bytes())),
        )
    };
    let reply = send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = &reply.json()["results"];
    assert_eq!(results["u-1"], json!({"result": "ok", "details": "stored"}));
    assert_eq!(results["u-2"]["result"], "ok");
    assert_eq!(results["u-3"]["result"], "drop", "rejected, and not resent");
    assert!(results["u-3"]["details"]
        .as_str()
        .unwrap()
        .contains("distinct_id"));
    let again = send().json();
    assert_eq!(
        again["results"]["u-1"],
        json!({"result": "ok", "details": "duplicate"}),
        "{again}"
    );
    assert_eq!(export(&server, &tenant).len(), 2);
}

#[test]
fn offsets_and_sent_at_correct_the_client_clock() {
    let server = TestServer::start();
    let tenant = server.create_tenant("clock");
    // The client's clock is a day behind: sent_at says yesterday; the event happened 2 s
    // before sending (offset, in ms).
    let yesterday = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let sent_at = yesterday
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body = json!({
        "api_key": tenant.write_key,
        "sent_at": sent_at,
        "batch": [{"uuid": "o-1", "event": "late", "distinct_id": "x", "offset": 2000}],
    });
    let reply = server.post_json("/batch/", Auth::None, &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let stored = &export(&server, &tenant)[0];
    let at = |field: &str| {
        time::OffsetDateTime::parse(
            stored[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let skew = at("receivedAt") - at("timestamp");
    assert!(
        skew >= time::Duration::milliseconds(1900) && skew < time::Duration::seconds(10),
        "corrected to about 2 s before receipt: {skew} ({stored})"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let server = TestServer::start();
    let tenant = server.create_tenant("errors");
    let post = |path: &str, content_type: &str, body: &[u8]| {
        server.request(
            "POST",
            path,
            Auth::None,
            &[("Content-Type", content_type)],
            Some(body),
        )
    };
    let no_key = json!({"batch": [event("k-1", "x", "y")]});
    let reply = post("/batch/", "application/json", no_key.to_string().as_bytes());
    assert!(reply.problem(401).contains("key"), "{}", reply.body);
    let wrong_key = json!({"api_key": "phc_nope", "batch": [event("k-1", "x", "y")]});
    assert_eq!(
        post(
            "/batch/",
            "application/json",
            wrong_key.to_string().as_bytes()
        )
        .status,
        401
    );
    let reply = post("/e/", "text/plain", b"{not json");
    assert!(reply.problem(400).contains("JSON"), "{}", reply.body);
    let reply = post(
        "/e/?compression=lz64",
        "application/x-www-form-urlencoded",
        b"data=!!!!",
    );
    assert!(reply.problem(400).contains("lz64"), "{}", reply.body);
    let missing =
        json!({"api_key": tenant.write_key, "batch": [{"uuid": "m-1", "distinct_id": "d"}]});
    let reply = post(
        "/batch/",
        "application/json",
        missing.to_string().as_bytes(),
    );
    assert!(reply.problem(400).contains("event"), "{}", reply.body);
    // A gzip bomb stops at the body limit.
    let bomb = gzip(&vec![b' '; 64 * 1024 * 1024]);
    let reply = post("/e/?compression=gzip-js", "text/plain", &bomb);
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(export(&server, &tenant).is_empty());
}

/// The bodies in `tests/data/posthog/` were produced by running posthog-js's own code (1.449.2
/// for gzip-js, 1.61.0, the last with lz64, for lz64 and plain base64); see their
/// `*.request.json` for the URL and headers the library used.
#[test]
fn bodies_captured_from_posthog_js_are_read() {
    let server = TestServer::start();
    let tenant = server.create_tenant("captured");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/posthog");
    let events_in = |name: &str| -> usize {
        let json: Value = serde_json::from_slice(&std::fs::read(data.join(name)).unwrap()).unwrap();
        json.get("batch").unwrap_or(&json).as_array().unwrap().len()
    };
    let mut expected = 0;
    for (body, url, content_type, json) in [
        ("gzip-js.bin", "/e/", "text/plain", "gzip-js.json"),
        (
            "lz64.txt",
            "/e/?ip=1&_=1796339747645&ver=1.61.0",
            "application/x-www-form-urlencoded",
            "lz64.json",
        ),
        (
            "base64-1.61.0.txt",
            "/e/?ip=1&_=1796339747645&ver=1.61.0",
            "application/x-www-form-urlencoded",
            "base64-1.61.0.json",
        ),
    ] {
        let bytes = std::fs::read(data.join(body)).unwrap();
        // The samples carry the key "phc_testtoken"; the tenant's key goes in the header.
        let reply = server.request(
            "POST",
            url,
            Auth::Bearer(&tenant.write_key),
            &[("Content-Type", content_type)],
            Some(&bytes),
        );
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
        assert_eq!(reply.json(), json!({"status": 1}));
        expected += events_in(json);
    }
    let events = export(&server, &tenant);
    assert_eq!(events.len(), expected);
    assert!(
        events.iter().all(|event| event["userId"].is_string()),
        "{events:?}"
    );
    assert!(events
        .iter()
        .any(|event| event["statsremote"]["libraryName"] == "web"));
}

#[test]
fn browser_start_up_calls_get_minimal_answers() {
    let server = TestServer::start();
    let config = server.get("/array/phc_key/config", Auth::None);
    assert_eq!(config.status, 200);
    assert_eq!(
        config.json()["supportedCompression"],
        json!(["gzip-js", "base64"])
    );
    assert_eq!(config.json()["hasFeatureFlags"], false);
    let script = server.get("/array/phc_key/config.js", Auth::None);
    assert_eq!(script.status, 200);
    assert!(
        script.body.contains("_POSTHOG_REMOTE_CONFIG"),
        "{}",
        script.body
    );
    assert!(script.body.contains("\"phc_key\""), "{}", script.body);
    for path in ["/flags/?v=2", "/decide/?v=3"] {
        let reply = server.request(
            "POST",
            path,
            Auth::None,
            &[("Content-Type", "text/plain")],
            Some(b"x"),
        );
        assert_eq!(reply.status, 200, "{path}");
        let answer = reply.json();
        assert_eq!(answer["flags"], json!({}));
        assert_eq!(answer["featureFlags"], json!({}));
        assert_eq!(answer["errorsWhileComputingFlags"], false);
    }
}
