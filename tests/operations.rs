//! /healthz, /readyz, /metrics, /openapi.json and CORS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{batch, track, Auth, TestServer};

#[test]
fn health_readiness_and_metrics() {
    let server = TestServer::start();
    assert_eq!(server.get("/healthz", Auth::None).json()["status"], "ok");
    let ready = server.get("/readyz", Auth::None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["checks"]["log_writer"], true);

    let tenant = server.create_tenant("m");
    for i in 0..5 {
        let events = (0..10)
            .map(|j| track(&format!("{i}-{j}"), "u", "e"))
            .collect();
        assert_eq!(
            server
                .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch(events))
                .status,
            200
        );
    }
    let metrics = server.metrics();
    for name in [
        "statsremote_http_requests_total",
        "statsremote_ingest_events_total",
        "statsremote_ingest_ack_latency_seconds_bucket",
        "statsremote_group_commit_requests_bucket",
        "statsremote_group_commit_events_bucket",
        "statsremote_log_fsync_seconds_bucket",
        "statsremote_tenant_mailbox_depth",
        "statsremote_log_queue_depth",
        "statsremote_tenant_pipelines",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    let accepted = metrics
        .lines()
        .find(|l| {
            l.starts_with("statsremote_ingest_events_total")
                && l.contains("accepted")
                && l.contains(&tenant.id)
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(accepted.ends_with(" 50"), "{accepted}");
}

#[test]
fn openapi_describes_every_route() {
    let server = TestServer::start();
    let reply = server.get("/openapi.json", Auth::None);
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/batch",
        "/v1/import",
        "/v1/track",
        "/v1/identify",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
        "/v1/b",
        "/v1/t",
        "/v1/i",
        "/v1/p",
        "/v1/s",
        "/v1/g",
        "/v1/a",
        "/v1/events/export",
        "/admin/v1/tenants",
        "/admin/v1/tenants/{id}",
        "/admin/v1/tenants/{id}/rotate-keys",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/v1/query/series",
        "/v1/query/events",
        "/v1/query/uniques",
        "/v1/query/funnel",
        "/v1/live",
        "/admin/v1/tenants/{id}/rollups/rebuild",
        "/admin/v1/tenants/{id}/segments",
        "/admin/v1/flush",
        "/admin/v1/tenants/{id}/users/{user_id}",
        "/admin/v1/deletions/{id}",
        "/e",
        "/i/v1/analytics/events",
        "/flags",
        "/array/{token}/config",
        "/admin/v1/tenants/{id}/schemas",
        "/admin/v1/tenants/{id}/schemas/{event}",
        "/v1/schemas",
        "/v1/deadletter",
        "/admin/v1/tenants/{id}/deadletter/replay",
        "/v1/tenant",
        "/v1/segments",
        "/",
    ] {
        assert!(paths.contains_key(path), "openapi.json lacks {path}");
    }
}

#[test]
fn browsers_may_send_events_cross_origin() {
    let server = TestServer::start();
    let preflight = server.request(
        "OPTIONS",
        "/v1/batch",
        Auth::None,
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type, content-encoding",
            ),
        ],
        None,
    );
    assert_eq!(preflight.status, 200, "{preflight:?}");
    assert!(
        preflight.header("access-control-allow-origin").is_some(),
        "{preflight:?}"
    );
    let tenant = server.create_tenant("web");
    let reply = server.request(
        "POST",
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &[
            ("Origin", "https://app.example.com"),
            ("Content-Type", "text/plain"),
        ],
        Some(batch(vec![track("web-1", "u", "e")]).to_string().as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.header("access-control-allow-origin").is_some());
}

#[test]
fn a_full_data_disk_refuses_ingestion_with_the_reason_and_readyz_says_why() {
    let server = TestServer::start_with_env(&[("STATSREMOTE__STORAGE__MIN_FREE_SPACE", "1000TiB")]);
    let tenant = server.create_tenant("full");
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &batch(vec![track("m1", "u", "e")]),
    );
    let detail = reply.problem(503);
    assert!(detail.contains("storage.min_free_space"), "{detail}");
    let ready = server.get("/readyz", Auth::None);
    assert_eq!(ready.status, 503, "{}", ready.body);
    let body = ready.json();
    assert_eq!(body["checks"]["disk_space"], false);
    assert!(body["disk"].as_str().unwrap().contains("free"), "{body}");
    // Nothing was stored: the export is empty.
    assert!(server.export(&tenant.read_key, "").is_empty());
}
