//! Enrichment through the real server: browser, OS and device type from the user agent; country,
//! region and city from a GeoIP database the test builds (before the address is anonymised);
//! referrer host and UTM parameters; all of it in the export, and in the cold tier's columns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Auth, TestServer};
use serde_json::{json, Value};

const CHROME_LINUX: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";

/// Builds the test's GeoIP database (tests/python/geoip_db.py) in `dir`.
fn geoip_database(dir: &std::path::Path) -> String {
    let bin = testkit::envs::python_env().unwrap();
    let path = dir.join("places.mmdb");
    let script = testkit::envs::workspace_root().join("tests/python/geoip_db.py");
    let status = std::process::Command::new(bin.join("python"))
        .arg(script)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path.to_str().unwrap().to_string()
}

fn by_id(events: &[Value]) -> std::collections::BTreeMap<String, Value> {
    events
        .iter()
        .map(|e| {
            (
                e["messageId"].as_str().unwrap().to_string(),
                e["statsremote"].clone(),
            )
        })
        .collect()
}

#[test]
fn agents_places_and_campaigns_are_derived_and_kept_in_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let database = geoip_database(dir.path());
    let data = dir.path().join("data");
    let server = TestServer::start_in(
        &data,
        &[
            ("STATSREMOTE__ENRICH__GEOIP_DATABASE", database.as_str()),
            ("STATSREMOTE__SERVER__TRUST_FORWARDED_FOR", "true"),
            ("STATSREMOTE__STORAGE__HOT_RETENTION", "1s"),
        ],
    );
    let tenant = server.create_tenant("enriched");
    let body = json!({
        "context": {"userAgent": IPHONE, "page": {"referrer": "https://www.news.example/story"}},
        "batch": [
            // Its own context: Chrome on Linux, the end user's address forwarded by a server SDK,
            // UTM parameters in the page's address.
            {"type": "track", "messageId": "own", "userId": "u1", "event": "Viewed",
             "context": {"userAgent": CHROME_LINUX, "ip": "203.0.113.77",
                         "page": {"url": "https://shop.example/?utm_source=newsletter&utm_medium=email&utm_campaign=spring"}}},
            // Nothing of its own: the batch's agent and referrer, the request's address.
            {"type": "track", "messageId": "batch", "userId": "u2", "event": "Viewed"},
            // Segment's campaign object, an address the database does not know.
            {"type": "page", "messageId": "campaign", "userId": "u3", "name": "Home",
             "context": {"ip": "192.0.2.1", "campaign": {"source": "ads", "name": "launch", "term": "shoes"}}},
        ]
    });
    let reply = server.request(
        "POST",
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &[
            ("Content-Type", "application/json"),
            ("X-Forwarded-For", "198.51.100.23"),
        ],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    let check = |stored: &std::collections::BTreeMap<String, Value>, tier: &str| {
        let own = &stored["own"];
        assert_eq!(own["browser"], "Chrome", "{tier}: {own}");
        assert_eq!(own["browserVersion"], "126", "{tier}");
        assert_eq!(own["os"], "Linux", "{tier}");
        assert_eq!(own["deviceType"], "desktop", "{tier}");
        assert_eq!(
            (
                own["country"].as_str(),
                own["region"].as_str(),
                own["city"].as_str()
            ),
            (Some("DE"), Some("BE"), Some("Berlin")),
            "{tier}"
        );
        assert_eq!(own["utmSource"], "newsletter", "{tier}");
        assert_eq!(own["utmMedium"], "email", "{tier}");
        assert_eq!(own["utmCampaign"], "spring", "{tier}");
        assert_eq!(
            own["referrerHost"], "news.example",
            "{tier}: the batch's referrer fills in"
        );
        let batch = &stored["batch"];
        assert_eq!(
            (
                batch["browser"].as_str(),
                batch["os"].as_str(),
                batch["deviceType"].as_str()
            ),
            (Some("Mobile Safari"), Some("iOS"), Some("mobile")),
            "{tier}"
        );
        assert_eq!(
            (batch["country"].as_str(), batch["city"].as_str()),
            (Some("FR"), Some("Paris")),
            "{tier}"
        );
        assert_eq!(batch["region"], Value::Null, "{tier}");
        // The address itself is kept anonymised only.
        assert_eq!(batch["clientIp"], "198.51.100.0", "{tier}");
        let campaign = &stored["campaign"];
        assert_eq!(
            (
                campaign["utmSource"].as_str(),
                campaign["utmCampaign"].as_str(),
                campaign["utmTerm"].as_str()
            ),
            (Some("ads"), Some("launch"), Some("shoes")),
            "{tier}"
        );
        assert_eq!(
            campaign["country"],
            Value::Null,
            "{tier}: 192.0.2.1 is not in the database"
        );
    };
    check(&by_id(&server.export(&tenant.read_key, "")), "hot log");
    let exported = server.export(&tenant.read_key, "");
    assert!(
        !exported
            .iter()
            .any(|e| e.to_string().contains("203.0.113.77")),
        "the end user's full address is not stored"
    );

    // Moved to the cold tier: the same fields, read back from their Parquet columns.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let flushed = server.admin("POST", "/admin/v1/flush", None);
    assert_eq!(flushed.status, 200, "{}", flushed.body);
    let segments = server.admin(
        "GET",
        &format!("/admin/v1/tenants/{}/segments", tenant.id),
        None,
    );
    assert!(
        !segments.json()["segments"].as_array().unwrap().is_empty(),
        "{}",
        segments.body
    );
    check(&by_id(&server.export(&tenant.read_key, "")), "cold tier");
}

#[test]
fn enrichment_can_be_turned_off_and_a_bad_database_stops_the_start() {
    let server = TestServer::start_with_env(&[
        ("STATSREMOTE__ENRICH__USER_AGENT", "false"),
        ("STATSREMOTE__ENRICH__CAMPAIGN", "false"),
    ]);
    let tenant = server.create_tenant("plain");
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &common::batch(vec![json!({"type": "track", "messageId": "m", "userId": "u", "event": "e",
            "context": {"userAgent": CHROME_LINUX, "page": {"url": "https://x.example/?utm_source=a"}}})]),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let stored = &server.export(&tenant.read_key, "")[0]["statsremote"];
    assert_eq!(stored["browser"], Value::Null, "{stored}");
    assert_eq!(stored["utmSource"], Value::Null, "{stored}");
    drop(server);

    let output = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env(
            "STATSREMOTE__ENRICH__GEOIP_DATABASE",
            "/nonexistent/places.mmdb",
        )
        .env(
            "STATSREMOTE__STORAGE__DATA_DIR",
            tempfile::tempdir().unwrap().path(),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("enrich.geoip_database"), "{stderr}");
}
