//! Every error status, each answered as problem+json that says what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use common::{batch, track, Auth, TestServer};
use serde_json::json;

#[test]
fn malformed_json_is_400_and_says_where() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let key = Auth::Basic(&tenant.write_key);
    let reply = server.request(
        "POST",
        "/v1/batch",
        key,
        &[],
        Some(b"{\"batch\": [\n  {\"type\": \"track\",,}]}"),
    );
    let detail = reply.problem(400);
    assert!(detail.contains("line 2 column"), "{detail}");
    let detail = server
        .request("POST", "/v1/batch", key, &[], Some(b"{\"events\": []}"))
        .problem(400);
    assert!(detail.contains("`batch`"), "{detail}");
    let detail = server
        .request("POST", "/v1/track", key, &[], Some(b"[]"))
        .problem(400);
    assert!(detail.contains("JSON object"), "{detail}");
    let detail = server
        .request("POST", "/v1/track", key, &[], Some(&[0xc3, 0x28]))
        .problem(400);
    assert!(detail.contains("UTF-8"), "{detail}");
    // A single invalid event: 400 with the reason in `errors`.
    let reply = server.post_json("/v1/track", key, &json!({"userId": "u"}));
    reply.problem(400);
    let errors = &reply.json()["errors"];
    assert_eq!(errors[0]["index"], 0);
    assert!(errors[0]["reason"].as_str().unwrap().contains("`event`"));
    // Wrong types name the field.
    let reply = server.post_json(
        "/v1/track",
        key,
        &json!({"userId": {"id": 1}, "event": "e"}),
    );
    reply.problem(400);
    assert!(reply.json()["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("`userId`"));
}

#[test]
fn missing_and_unknown_keys_are_401() {
    let server = TestServer::start();
    server.create_tenant("acme");
    let missing = server.post_json("/v1/batch", Auth::None, &batch(vec![track("1", "u", "e")]));
    assert!(missing.problem(401).contains("missing write key"));
    assert!(missing.header("www-authenticate").is_some());
    let unknown = server.post_json(
        "/v1/batch",
        Auth::Basic("sr_write_nope"),
        &batch(vec![track("1", "u", "e")]),
    );
    assert!(unknown.problem(401).contains("unknown key"));
    let garbage = server.request(
        "POST",
        "/v1/batch",
        Auth::None,
        &[("Authorization", "Basic !!!")],
        Some(b"{}"),
    );
    garbage.problem(401);
    let scheme = server.request(
        "POST",
        "/v1/batch",
        Auth::None,
        &[("Authorization", "Digest x")],
        Some(b"{}"),
    );
    scheme.problem(401);
    let export = server.get("/v1/events/export", Auth::None);
    export.problem(401);
    let admin = server.get("/admin/v1/tenants", Auth::None);
    admin.problem(401);
    let wrong_admin = server.get("/admin/v1/tenants", Auth::Bearer("not-the-token"));
    wrong_admin.problem(401);
}

#[test]
fn oversized_bodies_events_and_batches_are_413() {
    let server = TestServer::start_with_env(&[
        ("STATSREMOTE__LIMITS__MAX_BODY_BYTES", "64KiB"),
        ("STATSREMOTE__LIMITS__MAX_EVENT_BYTES", "4KiB"),
        ("STATSREMOTE__LIMITS__MAX_EVENTS_PER_REQUEST", "10"),
    ]);
    let tenant = server.create_tenant("acme");
    let key = Auth::Basic(&tenant.write_key);
    let huge = vec![b' '; 70 * 1024];
    let detail = server
        .request("POST", "/v1/batch", key, &[], Some(&huge))
        .problem(413);
    assert!(detail.contains("65536"), "{detail}");
    // A small gzip body that inflates past the limit (decompression bomb).
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![b' '; 10 << 20]).unwrap();
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 64 * 1024);
    let detail = server
        .request(
            "POST",
            "/v1/batch",
            key,
            &[("Content-Encoding", "gzip")],
            Some(&bomb),
        )
        .problem(413);
    assert!(detail.contains("decompressed"), "{detail}");
    let many = batch((0..11).map(|i| track(&i.to_string(), "u", "e")).collect());
    let detail = server.post_json("/v1/batch", key, &many).problem(413);
    assert!(
        detail.contains("11 events") && detail.contains("10"),
        "{detail}"
    );
    // One oversized event in a batch is rejected alone.
    let mut big = track("big", "u", "e");
    big["properties"] = json!({"blob": "x".repeat(5000)});
    let reply = server.post_json(
        "/v1/batch",
        key,
        &batch(vec![big, track("small", "u", "e")]),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["accepted"], 1);
    assert!(json["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("limit is 4096 bytes"));
}

#[test]
fn unsupported_and_corrupt_encodings() {
    let server = TestServer::start();
    let tenant = server.create_tenant("acme");
    let key = Auth::Basic(&tenant.write_key);
    let detail = server
        .request(
            "POST",
            "/v1/batch",
            key,
            &[("Content-Encoding", "lzma")],
            Some(b"xx"),
        )
        .problem(415);
    assert!(detail.contains("lzma"), "{detail}");
    let detail = server
        .request(
            "POST",
            "/v1/batch",
            key,
            &[("Content-Encoding", "gzip")],
            Some(b"definitely not gzip"),
        )
        .problem(400);
    assert!(detail.contains("gzip"), "{detail}");
}

#[test]
fn unknown_routes_and_methods() {
    let server = TestServer::start();
    server.get("/v2/nothing", Auth::None).problem(404);
    server.get("/v1/batch", Auth::None).problem(405);
    let admin_bad_field = server.admin(
        "POST",
        "/admin/v1/tenants",
        Some(&json!({"name": "x", "colour": "red"})),
    );
    assert!(admin_bad_field.problem(400).contains("colour"));
    let admin_bad_setting = server.admin(
        "POST",
        "/admin/v1/tenants",
        Some(&json!({"name": "x", "settings": {"rate_limit_burst": 0}})),
    );
    assert!(admin_bad_setting.problem(400).contains("rate_limit_burst"));
    server
        .admin("GET", "/admin/v1/tenants/0000000000000001", None)
        .problem(404);
    server
        .admin("GET", "/admin/v1/tenants/not-an-id", None)
        .problem(404);
}

#[test]
fn backpressure_is_503_with_retry_after_and_spares_other_tenants() {
    // One batch in flight per tenant: concurrent requests of the same tenant must see 503.
    let server = TestServer::start_with_env(&[("STATSREMOTE__ACTORS__MAILBOX_CAPACITY", "1")]);
    let noisy = server.create_tenant("noisy");
    let quiet = server.create_tenant("quiet");
    let big: Vec<u8> = batch(
        (0..2000)
            .map(|i| track(&format!("m{i}"), "u", "e"))
            .collect(),
    )
    .to_string()
    .into_bytes();
    let server = std::sync::Arc::new(server);
    let mut saw_503 = None;
    for round in 0..30 {
        let handles: Vec<_> = (0..12)
            .map(|t| {
                let server = server.clone();
                let key = noisy.write_key.clone();
                let body = String::from_utf8(big.clone())
                    .unwrap()
                    .replace("\"m", &format!("\"r{round}t{t}m"));
                std::thread::spawn(move || {
                    server.request(
                        "POST",
                        "/v1/batch",
                        Auth::Basic(&key),
                        &[],
                        Some(body.as_bytes()),
                    )
                })
            })
            .collect();
        // Meanwhile the quiet tenant, one request at a time, is never refused.
        for i in 0..3 {
            let reply = server.post_json(
                "/v1/track",
                Auth::Basic(&quiet.write_key),
                &track(&format!("q{round}-{i}"), "u", "e"),
            );
            assert_eq!(reply.status, 200, "quiet tenant refused: {}", reply.body);
        }
        for handle in handles {
            let reply = handle.join().unwrap();
            if reply.status == 503 {
                saw_503 = Some(reply);
            } else {
                assert_eq!(reply.status, 200, "{}", reply.body);
            }
        }
        if saw_503.is_some() {
            break;
        }
    }
    let reply = saw_503.expect("a full pipeline answers 503");
    assert!(reply.problem(503).contains("pipeline"));
    assert_eq!(reply.header("retry-after"), Some("1"));
}
