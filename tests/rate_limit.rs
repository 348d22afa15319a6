//! Per-tenant rate limits on events: 429 with Retry-After and RateLimit-* headers, changeable
//! at run time, and a limited tenant does not slow down another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{batch, track, Auth, TestServer};
use serde_json::json;

#[test]
fn exceeding_the_limit_is_429_and_other_tenants_are_unaffected() {
    let server = TestServer::start();
    let limited = server.create_tenant_with(json!({
        "name": "limited",
        "settings": {"rate_limit_events_per_second": 1, "rate_limit_burst": 20}
    }));
    let other = server.create_tenant("other");
    let events = |prefix: &str| {
        batch(
            (0..10)
                .map(|i| track(&format!("{prefix}{i}"), "u", "e"))
                .collect(),
        )
    };

    // The burst admits 20 events, counted per event (two batches of 10), then refuses.
    for round in 0..2 {
        let reply = server.post_json(
            "/v1/batch",
            Auth::Basic(&limited.write_key),
            &events(&format!("a{round}-")),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("ratelimit-limit"), Some("1"));
    }
    let refused = server.post_json(
        "/v1/batch",
        Auth::Basic(&limited.write_key),
        &events("refused-"),
    );
    let detail = refused.problem(429);
    assert!(detail.contains("1 events/s"), "{detail}");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(refused.header("ratelimit-limit"), Some("1"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert!(refused.header("ratelimit-reset").is_some());

    // While `limited` is refused, `other` goes through every time.
    for i in 0..20 {
        let reply = server.post_json(
            "/v1/batch",
            Auth::Basic(&other.write_key),
            &events(&format!("o{i}-")),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let still_refused = server.post_json(
        "/v1/batch",
        Auth::Basic(&limited.write_key),
        &events("again-"),
    );
    still_refused.problem(429);

    // Nothing from refused requests was stored.
    assert_eq!(server.export(&limited.read_key, "").len(), 20);
    let metrics = server.metrics();
    assert!(
        metrics.contains("statsremote_rate_limited_events_total"),
        "{metrics}"
    );
}

#[test]
fn limits_change_at_run_time_through_the_admin_api() {
    let server = TestServer::start();
    let tenant = server.create_tenant_with(json!({
        "name": "t", "settings": {"rate_limit_events_per_second": 1, "rate_limit_burst": 5}
    }));
    let ten = |p: &str| {
        batch(
            (0..10)
                .map(|i| track(&format!("{p}{i}"), "u", "e"))
                .collect(),
        )
    };
    // A batch larger than the burst can never pass: that is a 413, not a retryable 429.
    let detail = server
        .post_json("/v1/batch", Auth::Basic(&tenant.write_key), &ten("x"))
        .problem(413);
    assert!(detail.contains("burst is 5"), "{detail}");
    let patched = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(
            &json!({"settings": {"rate_limit_events_per_second": 1000, "rate_limit_burst": 1000}}),
        ),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.json()["settings"]["rate_limit_burst"], 1000);
    for round in 0..5 {
        let reply = server.post_json(
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &ten(&format!("r{round}-")),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}
