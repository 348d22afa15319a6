//! SDK conformance: the official SDKs, pinned and installed into project-local environments
//! (`tests/python/requirements.txt`), send every call type to the real server as an app
//! would, flush, and resend one event with the same id; the export must hold each event
//! exactly once, with its ids, properties, library and client timestamp.
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

/// The exported events, by messageId; each id must appear once.
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
    let cases: [(&str, &str, &str, usize); 4] = [
        ("python", "segment", "rs", 6),
        ("python", "posthog", "rp", 4),
        ("node", "segment", "rn", 6),
        ("node", "posthog", "rq", 4),
    ];
    for (runtime, sdk, run, expected) in cases {
        let tenant = server.create_tenant(run);
        let proxy = testkit::proxy::FaultyProxy::start(&upstream, &[429, 503]).unwrap();
        let via = format!("http://{}", proxy.address());
        match runtime {
            "python" => send_with_python(sdk, &via, &tenant, run, &[]),
            _ => send_with_node(sdk, &via, &tenant, run),
        };
        assert_eq!(proxy.faults_sent(), 2, "{runtime} {sdk}");
        let events = exported_once(&server, &tenant);
        assert_eq!(events.len(), expected, "{runtime} {sdk}: {events:?}");
    }
}
