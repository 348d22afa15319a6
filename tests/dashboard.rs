//! The dashboard at `/`, driven in headless Chromium (Debian's `chromium`, by playwright-core
//! from target/node-env; `tests/dashboard/dashboard.mjs`) against the real server: sign-in,
//! live numbers that move after events are sent, a series, top events and a funnel whose
//! numbers equal the API's, the read-only views, the admin view (create a tenant, change a
//! setting, rotate a key and see the old one refused), a phone-sized screen and keyboard
//! navigation. Screenshots of each view go to `target/dashboard-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Auth, TestServer, ADMIN_TOKEN};
use serde_json::{json, Value};

const FROM: &str = "2026-01-02T00:00:00Z";
const TO: &str = "2026-01-03T00:00:00Z";

fn event(n: usize, user: usize, name: &str, at: &str) -> Value {
    json!({"type": "track", "event": name, "userId": format!("u{user}"),
           "messageId": format!("dash-{n}"), "timestamp": at})
}

/// 20 users viewed at 10:00, 15 of them clicked at 11:00, 8 bought at 12:00, and 10 viewed
/// again at 13:00 (2026-01-02, UTC).
fn send_known_events(server: &TestServer, tenant: &common::Tenant) {
    let mut batch = Vec::new();
    for user in 0..20 {
        batch.push(event(batch.len(), user, "Viewed", "2026-01-02T10:05:00Z"));
    }
    for user in 0..15 {
        batch.push(event(batch.len(), user, "Clicked", "2026-01-02T11:10:00Z"));
    }
    for user in 0..8 {
        batch.push(event(batch.len(), user, "Bought", "2026-01-02T12:15:00Z"));
    }
    for user in 0..10 {
        batch.push(event(batch.len(), user, "Viewed", "2026-01-02T13:20:00Z"));
    }
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": batch }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// A schema that refuses `Checked` without `plan`, and one event it refuses (a dead letter).
fn make_a_dead_letter(server: &TestServer, tenant: &common::Tenant) {
    let schema =
        json!({"schema": {"type": "object", "required": ["plan"]}, "enforcement": "reject"});
    let path = format!("/admin/v1/tenants/{}/schemas/Checked", tenant.id);
    let reply = server.admin("PUT", &path, Some(&schema));
    assert_eq!(reply.status, 201, "{}", reply.body);
    let refused = json!({"batch": [event(1000, 1, "Checked", "2026-01-02T14:00:00Z")]});
    let reply = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &refused);
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn numbers(cells: &Value, column: usize) -> Vec<u64> {
    (cells.as_array().unwrap().iter())
        .map(|row| {
            row[column]
                .as_str()
                .unwrap()
                .replace(',', "")
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn the_dashboard_shows_what_the_api_answers() {
    let node_env = testkit::envs::browser_env().expect("node and chromium for the browser tests");
    let server = TestServer::start_with_env(&[("STATSREMOTE__STORAGE__HOT_RETENTION", "1s")]);
    let tenant = server.create_tenant("dashboard");
    send_known_events(&server, &tenant);
    make_a_dead_letter(&server, &tenant);
    server.wait_rollups_caught_up(&tenant.read_key);
    std::thread::sleep(Duration::from_millis(1100));
    let flushed = server.admin("POST", "/admin/v1/flush", None);
    assert_eq!(flushed.status, 200, "{}", flushed.body);

    let shots = testkit::envs::workspace_root().join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let script = testkit::envs::workspace_root().join("tests/dashboard/dashboard.mjs");
    let output = std::process::Command::new("node")
        .arg(&script)
        .env("NODE_ENV_DIR", &node_env)
        .env("BASE", &server.base)
        .env("READ_KEY", &tenant.read_key)
        .env("WRITE_KEY", &tenant.write_key)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TENANT_ID", &tenant.id)
        .env("FROM", FROM)
        .env("TO", TO)
        .env("STEPS", "Viewed,Clicked,Bought")
        .env("SERIES_EVENT", "Viewed")
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(seen["problems"], json!([]), "{seen:#}");
    println!(
        "cold load: {} bytes in {} files; first live number {:.0} ms after navigation ({:.0} ms after sign-in); events seen live {} ms after sending",
        seen["page_weight_bytes"],
        seen["page_files"].as_array().unwrap().len(),
        seen["first_live_number_ms"].as_f64().unwrap(),
        seen["sign_in_to_first_live_number_ms"].as_f64().unwrap(),
        seen["live_seen_after_ms"],
    );

    // The browser rotated the read key last; the API is asked with the new one.
    let read_key = seen["new_read_key"].as_str().unwrap().to_string();

    // Sign-in: a wrong key is refused with the server's reason; the key never enters a URL.
    let wrong = seen["wrong_key_error"].as_str().unwrap();
    assert!(wrong.contains("401"), "{wrong}");
    assert_eq!(seen["addresses_with_a_key"], json!([]), "{seen:#}");
    assert_eq!(seen["unlabelled"], json!([]), "every control has a label");
    assert_eq!(
        seen["keyboard_reached_series"], true,
        "{}",
        seen["keyboard_focus"]
    );

    // Live: the 25 events sent while watching move the second's count, the minute's total
    // (unless a new minute began in between) and the minute's top events.
    let live = &seen["live"];
    assert_eq!(
        live["seen"]["row"],
        json!(["Live Clicked", "25", "5"]),
        "{live}"
    );
    assert_eq!(live["max_events_per_second"], 25, "{live}");
    let (before, after) = (
        live["before"]["minute"].as_u64().unwrap(),
        live["seen"]["minute"].as_u64().unwrap(),
    );
    assert!(after >= before + 25 || after == 25, "{live}");

    // Series: the same buckets and values as the API, in the table and in the CSV.
    let reply = server.get(
        &format!("/v1/query/series?event=Viewed&metric=count&interval=hour&from={FROM}&to={TO}"),
        Auth::Bearer(&read_key),
    );
    let api: Vec<u64> = (reply.json()["points"].as_array().unwrap().iter())
        .map(|p| p["value"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers(&seen["series"], 1), api);
    assert_eq!(api.iter().sum::<u64>(), 30);
    assert_eq!(seen["series"][10][0], "2026-01-02 10:00");
    let csv = seen["series_csv"].as_array().unwrap();
    assert_eq!(csv[0], "bucket_start,count,relative_error");
    assert_eq!(csv.len(), api.len() + 1);
    assert_eq!(csv[11], "2026-01-02T10:00:00.000Z,20,");
    let refused = seen["series_refused"].as_str().unwrap();
    assert!(refused.contains("HTTP 400"), "{refused}");

    // Top events: every row equals the API's.
    let reply = server.get(
        &format!("/v1/query/events?from={FROM}&to={TO}&limit=100"),
        Auth::Bearer(&read_key),
    );
    let api: Vec<(String, u64, u64)> = (reply.json()["events"].as_array().unwrap().iter())
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
                e["uniques"].as_u64().unwrap(),
            )
        })
        .collect();
    let shown: Vec<(String, u64, u64)> = (seen["top"].as_array().unwrap().iter())
        .zip(
            numbers(&seen["top"], 1)
                .into_iter()
                .zip(numbers(&seen["top"], 2)),
        )
        .map(|(row, (count, users))| (row[0].as_str().unwrap().to_string(), count, users))
        .collect();
    assert_eq!(shown, api);
    assert!(api.contains(&("Viewed".to_string(), 30, 20)), "{api:?}");

    // Funnel: users per step as the API answers, with the conversions.
    let reply = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&read_key),
        &json!({"steps": ["Viewed", "Clicked", "Bought"], "window": "1d", "from": FROM, "to": TO}),
    );
    let api: Vec<u64> = (reply.json()["steps"].as_array().unwrap().iter())
        .map(|s| s["users"].as_u64().unwrap())
        .collect();
    assert_eq!(api, [20, 15, 8]);
    assert_eq!(numbers(&seen["funnel"], 2), api);
    assert_eq!(seen["funnel"][1][3], "75.0%");
    assert_eq!(seen["funnel"][2][4], "40.0%");

    // Read-only views: the flushed segment, the dead letter, the schema.
    let segments = seen["segments"].as_array().unwrap();
    assert!(!segments.is_empty(), "{seen:#}");
    let rows: u64 = numbers(&seen["segments"], 2).iter().sum();
    assert_eq!(rows, 53, "{segments:?}");
    assert_eq!(seen["deadletters"][0][1], "Checked", "{seen:#}");
    assert_eq!(seen["deadletters"][0][2], "schema_mismatch");
    assert_eq!(seen["schemas"][0][0], "Checked");
    assert_eq!(seen["schemas"][0][1], "version 1");

    // Admin: the created tenant works, the setting changed, and the rotated key is refused
    // (by the API and by the live view still holding it), while the new one works.
    let created = seen["created_read_key"].as_str().unwrap();
    assert_eq!(
        server.get("/v1/tenant", Auth::Bearer(created)).json()["name"],
        "made-in-the-dashboard"
    );
    let record = server.admin("GET", &format!("/admin/v1/tenants/{}", tenant.id), None);
    assert_eq!(record.json()["settings"]["max_event_names"], 500);
    assert_eq!(seen["settings_saved"], "Saved: max_event_names, sampling.");
    assert_eq!(seen["sampling_after_save"]["default"], 0.5, "{seen:#}");
    // Emptied: no sampling, as the server says it.
    assert_eq!(record.json()["settings"]["sampling"]["default"], 1.0);
    let shown: Value =
        serde_json::from_str(seen["sampling_shown_after_clearing"].as_str().unwrap()).unwrap();
    assert_eq!(shown["default"].as_f64(), Some(1.0), "{shown}");
    assert_eq!(shown["events"], json!({}), "{shown}");
    let refused = seen["settings_refused"].as_str().unwrap();
    assert!(refused.contains("rate_limit_burst"), "{refused}");
    assert_eq!(
        server
            .get("/v1/tenant", Auth::Bearer(&tenant.read_key))
            .status,
        401
    );
    assert_eq!(
        server.get("/v1/tenant", Auth::Bearer(&read_key)).status,
        200
    );
    let live = seen["live_after_rotation"].as_str().unwrap();
    assert!(live.contains("no longer valid"), "{live}");

    // A phone-sized screen: nothing wider than the screen, every view in the menu.
    assert!(seen["phone_overflow_px"].as_i64().unwrap() <= 0, "{seen:#}");
    assert_eq!(seen["phone_menu_links"].as_array().unwrap().len(), 8);
    assert_eq!(seen["screenshots"].as_array().unwrap().len(), 13);
    for shot in seen["screenshots"].as_array().unwrap() {
        let bytes = std::fs::metadata(shot.as_str().unwrap()).unwrap().len();
        assert!(bytes > 5_000, "{shot}: {bytes} bytes");
    }
}

/// The page and its files: cached by ETag, compressed when asked, with a strict policy; an
/// unknown file is a problem+json 404.
#[test]
fn the_dashboard_files_are_served_with_etags_and_a_strict_policy() {
    let server = TestServer::start();
    let page = server.get("/", Auth::None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/ui/app.js"), "{}", page.body);
    let header = |reply: &common::Reply, name: &str| {
        (reply.headers.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let policy = header(&page, "content-security-policy").unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let etag = header(&page, "etag").unwrap();
    let again = server.request("GET", "/", Auth::None, &[("If-None-Match", &etag)], None);
    assert_eq!(again.status, 304);
    // Raw, since the test client undoes the compression itself.
    let mut connection = server.raw_connection(
        b"GET /ui/vendor/uplot/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    );
    let mut response = Vec::new();
    std::io::Read::read_to_end(&mut connection, &mut response).unwrap();
    let head = String::from_utf8_lossy(&response[..response.len().min(1024)]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    // Another representation, another tag.
    assert!(head.contains("-gz\""), "{head}");
    assert!(response.len() < 30_000, "{} bytes", response.len());
    let licence = server.get("/ui/vendor/uplot/LICENSE", Auth::None);
    assert!(licence.body.contains("MIT"), "{}", licence.body);
    let missing = server.get("/ui/nothing.js", Auth::None);
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("nothing.js"), "{}", missing.body);
    assert_eq!(
        server.request("HEAD", "/", Auth::None, &[], None).status,
        200
    );
    let posted = server.post_json("/", Auth::None, &json!({}));
    assert_eq!(posted.status, 405);
}
