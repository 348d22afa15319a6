//! SDK conformance: the official SDKs, pinned and installed into project-local environments
//! (`tests/python/requirements.txt`, `tests/sdk/node/package-lock.json`), send every call type
//! to the real server as an app would, flush, and resend one event with the same id; the export
//! must hold each event exactly once, with its ids, properties, library and client timestamp.
//! The browser libraries (posthog-js, @segment/analytics-next) run in headless Chromium on a
//! page served from another origin (`tests/sdk/node/browser.mjs`), with sendBeacon and
//! text/plain bodies, and their identity calls must make one person. Every SDK also goes through
//! a proxy that first answers 429, then 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::{Tenant, TestServer};
use serde_json::Value;

/// Runs `tests/sdk/python/send.py`; returns the ids it used, by call.
fn send_with_python(
    sdk: &str,
    host: &str,
    tenant: &Tenant,
    run: &str,
    extra: &[&str],
) -> BTreeMap<String, String> {
    let bin = testkit::envs::python_env().unwrap();
    let script = testkit::envs::workspace_root().join("tests/sdk/python/send.py");
    let output = std::process::Command::new(bin.join("python"))
        .arg(&script)
        .args([sdk, host, &tenant.write_key, run])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{sdk}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Runs `tests/sdk/node/send.mjs`; returns the ids it used, by call.
fn send_with_node(sdk: &str, host: &str, tenant: &Tenant, run: &str) -> BTreeMap<String, String> {
    let env = testkit::envs::node_env().unwrap();
    let script = testkit::envs::workspace_root().join("tests/sdk/node/send.mjs");
    let output = std::process::Command::new("node")
        .arg(&script)
        .args([sdk, host, &tenant.write_key, run])
        .env("NODE_ENV_DIR", &env)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{sdk}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Runs `tests/sdk/node/browser.mjs` (the SDK in headless Chromium); returns the ids it used.
fn send_with_browser(
    sdk: &str,
    host: &str,
    tenant: &Tenant,
    run: &str,
    faults: bool,
) -> BTreeMap<String, String> {
    let env = testkit::envs::browser_env().unwrap();
    let script = testkit::envs::workspace_root().join("tests/sdk/node/browser.mjs");
    let output = std::process::Command::new("node")
        .arg(&script)
        .args([sdk, host, &tenant.write_key, run])
        .args(faults.then_some("faults"))
        .env("NODE_ENV_DIR", &env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{sdk}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // What the page sent and saw: shown when a check below fails.
    eprintln!("{sdk}: {stdout}");
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The exported events, by messageId; each id must appear once, and the query API must count
/// as many events as the export holds.
fn exported_once(server: &TestServer, tenant: &Tenant) -> BTreeMap<String, Value> {
    let mut by_id = BTreeMap::new();
    for event in server.export(
        &tenant.read_key,
        "?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
    ) {
        let id = event["messageId"].as_str().unwrap().to_string();
        assert!(
            by_id.insert(id.clone(), event).is_none(),
            "{id} stored twice"
        );
    }
    server.wait_rollups_caught_up(&tenant.read_key);
    let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let to = tomorrow
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let path = format!("/v1/query/events?from=2026-01-01T00:00:00Z&to={to}");
    let reply = server.get(&path, common::Auth::Bearer(&tenant.read_key));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let counted: u64 = (reply.json()["events"].as_array().unwrap().iter())
        .map(|event| event["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, by_id.len() as u64, "{}", reply.body);
    by_id
}

const SENT_AT: &str = "2026-03-01T10:00:00.000Z";

/// Checks the six Segment calls of a run.
fn check_segment(
    server: &TestServer,
    tenant: &Tenant,
    run: &str,
    ids: &BTreeMap<String, String>,
    library: &str,
) {
    let events = exported_once(server, tenant);
    assert_eq!(events.len(), 6, "{events:?}");
    for (call, id) in ids {
        let event = &events[id];
        assert_eq!(event["type"], call.as_str(), "{event}");
        assert_eq!(event["userId"], format!("{run}-user"), "{event}");
        assert_eq!(event["originalTimestamp"], SENT_AT, "{event}");
        assert_eq!(event["statsremote"]["libraryName"], library, "{event}");
    }
    assert_eq!(events[&ids["track"]]["event"], "Signed Up");
    assert_eq!(events[&ids["track"]]["properties"]["plan"], "pro");
    assert_eq!(
        events[&ids["identify"]]["traits"]["email"],
        "ann@example.com"
    );
    assert_eq!(events[&ids["page"]]["name"], "Home");
    assert_eq!(events[&ids["group"]]["groupId"], format!("{run}-team"));
    assert_eq!(events[&ids["alias"]]["previousId"], format!("{run}-anon"));
}

#[test]
fn segment_python_counts_every_call_once() {
    let server = TestServer::start();
    let tenant = server.create_tenant("segment-python");
    let ids = send_with_python("segment", &server.url(""), &tenant, "sp", &[]);
    check_segment(&server, &tenant, "sp", &ids, "analytics-python");
}

#[test]
fn segment_node_counts_every_call_once() {
    let server = TestServer::start();
    let tenant = server.create_tenant("segment-node");
    let ids = send_with_node("segment", &server.url(""), &tenant, "sn");
    check_segment(&server, &tenant, "sn", &ids, "@segment/analytics-node");
}

#[test]
fn posthog_node_counts_every_event_once() {
    let server = TestServer::start();
    let tenant = server.create_tenant("posthog-node");
    let ids = send_with_node("posthog", &server.url(""), &tenant, "pn");
    let events = exported_once(&server, &tenant);
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events
        .values()
        .all(|event| event["statsremote"]["libraryName"] == "posthog-node"));
    // capture() takes the uuid and timestamp given; identify() and alias() make their own.
    let captured = &events[&ids["capture"]];
    assert_eq!(captured["event"], "signed_up");
    assert_eq!(captured["userId"], "pn-user");
    assert_eq!(captured["originalTimestamp"], SENT_AT);
    assert_eq!(captured["properties"]["plan"], "pro");
    let of_type = |kind: &str| -> &Value {
        let found: Vec<&Value> = events.values().filter(|e| e["type"] == kind).collect();
        assert_eq!(found.len(), 1, "{kind}: {found:?}");
        found[0]
    };
    let identify = of_type("identify");
    assert_eq!(identify["userId"], "pn-user");
    assert_eq!(identify["traits"]["email"], "ann@example.com", "{identify}");
    let alias = of_type("alias");
    assert_eq!(alias["userId"], "pn-new", "{alias}");
    assert_eq!(alias["previousId"], "pn-user", "{alias}");
    assert_eq!(of_type("group")["groupId"], "pn-team");
}
fn posthog_python(run: &str, extra: &[&str]) {
    let server = TestServer::start();
    let tenant = server.create_tenant(run);
    let ids = send_with_python("posthog", &server.url(""), &tenant, run, extra);
    let events = exported_once(&server, &tenant);
    assert_eq!(events.len(), 4, "{events:?}");
    let user = format!("{run}-user");
    for id in ids.values() {
        let event = &events[id];
        assert_eq!(event["userId"], user.as_str(), "{event}");
        assert_eq!(event["originalTimestamp"], SENT_AT, "{event}");
        assert_eq!(
            event["statsremote"]["libraryName"], "posthog-python",
            "{event}"
        );
    }
    let captured = &events[&ids["capture"]];
    assert_eq!(captured["event"], "signed_up");
    assert_eq!(captured["properties"]["plan"], "pro");
    assert_eq!(events[&ids["set"]]["event"], "$set");
    assert_eq!(events[&ids["alias"]]["type"], "alias");
    assert_eq!(events[&ids["alias"]]["previousId"], format!("{run}-anon"));
    assert_eq!(events[&ids["group_identify"]]["type"], "group");
    assert_eq!(
        events[&ids["group_identify"]]["groupId"],
        format!("{run}-team")
    );
}

#[test]
fn posthog_python_counts_every_event_once() {
    posthog_python("pp", &[]);
}

#[test]
fn posthog_python_v1_counts_every_event_once() {
    posthog_python("pv", &["v1"]);
}

/// posthog-js in Chromium: it asks for its flags and config (minimal answers), then captures
/// in batches, identifies, aliases, groups, resends one uuid and sends one event by
/// sendBeacon; every event is stored once, and all of them belong to one person.
fn check_posthog_js(
    server: &TestServer,
    tenant: &Tenant,
    run: &str,
    ids: &BTreeMap<String, String>,
) {
    let events = exported_once(server, tenant);
    let kinds: Vec<String> = events
        .values()
        .map(|e| format!("{} {}", e["type"], e["event"]))
        .collect();
    assert_eq!(events.len(), 6, "{kinds:?}");
    let captured = &events[&ids["capture"]];
    assert_eq!(captured["event"], "signed_up");
    // The resend of the same uuid comes after `identify`, with the identified id; posthog-js
    // may send its batches side by side, so either copy can be the one stored (once).
    let user = captured["userId"].as_str().unwrap_or_default();
    assert!(
        user == ids["anonymous"] || user == format!("{run}-user"),
        "{user}"
    );
    assert_eq!(captured["properties"]["plan"], "pro");
    assert_eq!(captured["originalTimestamp"], SENT_AT);
    assert_eq!(captured["statsremote"]["libraryName"], "web");
    assert_eq!(events[&ids["clicked"]]["userId"], format!("{run}-user"));
    assert_eq!(events[&ids["beacon"]]["event"], "left");
    let of_type = |kind: &str| -> &Value {
        let found: Vec<&Value> = events.values().filter(|e| e["type"] == kind).collect();
        assert_eq!(found.len(), 1, "{kind}: {kinds:?}");
        found[0]
    };
    let identify = of_type("identify");
    assert_eq!(identify["userId"], format!("{run}-user"));
    assert_eq!(identify["anonymousId"], ids["anonymous"].as_str());
    assert_eq!(identify["traits"]["email"], "ann@example.com", "{identify}");
    assert_eq!(of_type("alias")["userId"], format!("{run}-alias"));
    assert_eq!(of_type("group")["groupId"], format!("{run}-team"));
    server.wait_rollups_caught_up(&tenant.read_key);
    let persons = exported_once(server, tenant);
    for event in persons.values() {
        assert_eq!(
            event["statsremote"]["person"],
            format!("{run}-alias"),
            "{event}"
        );
    }
}

/// @segment/analytics-next in Chromium, configured inline (no settings CDN): every call type
/// with an anonymous start, a resend of one messageId, and a sendBeacon with a text/plain body.
fn check_segment_browser(
    server: &TestServer,
    tenant: &Tenant,
    run: &str,
    ids: &BTreeMap<String, String>,
) {
    let events = exported_once(server, tenant);
    assert_eq!(events.len(), 7, "{events:?}");
    for call in [
        "page", "track", "identify", "clicked", "group", "alias", "beacon",
    ] {
        let event = &events[&ids[call]];
        assert_eq!(event["originalTimestamp"], SENT_AT, "{event}");
        assert_eq!(event["anonymousId"], ids["anonymous"].as_str(), "{event}");
    }
    for call in ["page", "track", "identify", "clicked", "group"] {
        let event = &events[&ids[call]];
        assert_eq!(
            event["statsremote"]["libraryName"], "analytics.js",
            "{event}"
        );
    }
    assert_eq!(events[&ids["page"]]["name"], "Home");
    assert!(events[&ids["page"]].get("userId").is_none());
    assert_eq!(events[&ids["track"]]["properties"]["plan"], "pro");
    assert_eq!(events[&ids["identify"]]["userId"], format!("{run}-user"));
    assert_eq!(
        events[&ids["identify"]]["traits"]["email"],
        "ann@example.com"
    );
    assert_eq!(events[&ids["clicked"]]["userId"], format!("{run}-user"));
    assert_eq!(events[&ids["group"]]["groupId"], format!("{run}-team"));
    assert_eq!(
        events[&ids["alias"]]["previousId"],
        ids["anonymous"].as_str()
    );
    assert_eq!(events[&ids["alias"]]["userId"], format!("{run}-user"));
    assert_eq!(events[&ids["beacon"]]["statsremote"]["endpoint"], "/v1/t");
    server.wait_rollups_caught_up(&tenant.read_key);
    let events = exported_once(server, tenant);
    for event in events.values() {
        assert_eq!(
            event["statsremote"]["person"],
            format!("{run}-user"),
            "{events:#?}"
        );
    }
}

#[test]
fn posthog_js_in_a_browser_counts_every_event_once() {
    let server = TestServer::start();
    let tenant = server.create_tenant("posthog-js");
    let ids = send_with_browser(
        "posthog-js",
        server.url("").trim_end_matches('/'),
        &tenant,
        "pj",
        false,
    );
    check_posthog_js(&server, &tenant, "pj", &ids);
}

#[test]
fn segment_analytics_next_in_a_browser_counts_every_call_once() {
    let server = TestServer::start();
    let host = server.url("");
    let host = host.trim_end_matches('/');
    let standard = server.create_tenant("analytics-next");
    let ids = send_with_browser("segment", host, &standard, "sb", false);
    check_segment_browser(&server, &standard, "sb", &ids);
    let batching = server.create_tenant("analytics-next-batching");
    let ids = send_with_browser("segment-batching", host, &batching, "sbb", false);
    check_segment_browser(&server, &batching, "sbb", &ids);
}

/// Each SDK against a server that first answers 429, then 503: every event ends up counted
/// once (the SDKs retry both).
#[test]
fn every_sdk_retries_through_429_and_503() {
    let server = TestServer::start();
    let upstream = server
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let cases: [(&str, &str, &str, usize); 6] = [
        ("python", "segment", "rs", 6),
        ("python", "posthog", "rp", 4),
        ("node", "segment", "rn", 6),
        ("node", "posthog", "rq", 4),
        // Browsers without their beacon, which no SDK can retry.
        ("browser", "segment-batching", "rb", 6),
        ("browser", "posthog-js", "rj", 5),
    ];
    for (runtime, sdk, run, expected) in cases {
        let tenant = server.create_tenant(run);
        let proxy = testkit::proxy::FaultyProxy::start(&upstream, &[429, 503]).unwrap();
        let via = format!("http://{}", proxy.address());
        match runtime {
            "python" => send_with_python(sdk, &via, &tenant, run, &[]),
            "node" => send_with_node(sdk, &via, &tenant, run),
            _ => send_with_browser(sdk, &via, &tenant, run, true),
        };
        assert_eq!(proxy.faults_sent(), 2, "{runtime} {sdk}");
        let events = exported_once(&server, &tenant);
        assert_eq!(events.len(), expected, "{runtime} {sdk}: {events:?}");
    }
}
