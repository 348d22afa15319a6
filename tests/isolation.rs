//! Tenant isolation: every key kind of one tenant against every endpoint gets 401/403, or only
//! its own tenant's data, and nothing of another tenant leaks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{batch, message_ids, track, Auth, TestServer};
use serde_json::json;

#[test]
fn keys_only_reach_their_own_tenant() {
    let server = TestServer::start();
    let a = server.create_tenant("a");
    let b = server.create_tenant("b");
    assert_eq!(
        server
            .post_json(
                "/v1/batch",
                Auth::Basic(&a.write_key),
                &batch(vec![track("a1", "ua", "A")])
            )
            .status,
        200
    );
    assert_eq!(
        server
            .post_json(
                "/v1/batch",
                Auth::Basic(&b.write_key),
                &batch(vec![track("b1", "ub", "B")])
            )
            .status,
        200
    );

    // A's keys on export: read key sees only A; write key is forbidden.
    assert_eq!(message_ids(&server.export(&a.read_key, "")), vec!["a1"]);
    assert_eq!(message_ids(&server.export(&b.read_key, "")), vec!["b1"]);
    server
        .get("/v1/events/export", Auth::Bearer(&a.write_key))
        .problem(403);

    // Read keys cannot write anywhere, in any auth form.
    for path in ["/v1/batch", "/v1/import"] {
        server
            .post_json(
                path,
                Auth::Basic(&a.read_key),
                &batch(vec![track("x", "u", "e")]),
            )
            .problem(403);
    }
    for path in [
        "/v1/track",
        "/v1/identify",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
    ] {
        server
            .post_json(path, Auth::Bearer(&a.read_key), &track("x", "u", "e"))
            .problem(403);
    }
    let mut in_body = batch(vec![track("x", "u", "e")]);
    in_body["writeKey"] = json!(a.read_key);
    server
        .post_json("/v1/batch", Auth::None, &in_body)
        .problem(403);

    // Tenant keys cannot use the admin API, on any admin endpoint.
    let admin_paths = [
        ("GET", "/admin/v1/tenants".to_string()),
        ("POST", "/admin/v1/tenants".to_string()),
        ("GET", format!("/admin/v1/tenants/{}", b.id)),
        ("PATCH", format!("/admin/v1/tenants/{}", b.id)),
        ("DELETE", format!("/admin/v1/tenants/{}", b.id)),
        ("POST", format!("/admin/v1/tenants/{}/rotate-keys", b.id)),
    ];
    for key in [&a.write_key, &a.read_key] {
        for (method, path) in &admin_paths {
            let reply = server.request(
                method,
                path,
                Auth::Bearer(key),
                &[("Content-Type", "application/json")],
                Some(b"{\"name\":\"x\"}"),
            );
            reply.problem(403);
        }
    }
    // The admin token is not a tenant key.
    server
        .post_json(
            "/v1/batch",
            Auth::Basic(common::ADMIN_TOKEN),
            &batch(vec![track("x", "u", "e")]),
        )
        .problem(403);
    server
        .get("/v1/events/export", Auth::Bearer(common::ADMIN_TOKEN))
        .problem(403);

    // Nothing was written by any refused request; B still has only its own event.
    assert_eq!(message_ids(&server.export(&a.read_key, "")), vec!["a1"]);
    assert_eq!(message_ids(&server.export(&b.read_key, "")), vec!["b1"]);
    // The same messageId in two tenants is two events: dedup is per tenant.
    assert_eq!(
        server
            .post_json(
                "/v1/batch",
                Auth::Basic(&b.write_key),
                &batch(vec![track("a1", "ub", "B")])
            )
            .json()["accepted"],
        1
    );
}
