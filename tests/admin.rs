//! The admin API: create, list, get, patch, rotate keys, delete with purge; the admin token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{batch, track, Auth, TestServer};
use serde_json::json;

#[test]
fn tenant_lifecycle() {
    let server = TestServer::start();
    let created = server.admin("POST", "/admin/v1/tenants", Some(&json!({"name": "acme"})));
    assert_eq!(created.status, 201, "{}", created.body);
    let body = created.json();
    let id = body["id"].as_str().unwrap().to_string();
    let write_key = body["write_key"].as_str().unwrap().to_string();
    let read_key = body["read_key"].as_str().unwrap().to_string();
    assert!(write_key.starts_with("sr_write_") && write_key.len() >= 9 + 32);
    assert!(read_key.starts_with("sr_read_"));
    assert_eq!(body["settings"]["dedup_window"], "7days");

    let listed = server.admin("GET", "/admin/v1/tenants", None).json();
    assert_eq!(listed["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(listed["tenants"][0]["name"], "acme");
    assert!(
        listed.to_string().find("sr_write_").is_none(),
        "list must not show keys"
    );

    let patched = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{id}"),
        Some(&json!({"name": "acme-renamed", "settings": {"dedup_window": "1h"}})),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    let got = server
        .admin("GET", &format!("/admin/v1/tenants/{id}"), None)
        .json();
    assert_eq!(got["name"], "acme-renamed");
    assert_eq!(got["settings"]["dedup_window"], "1h");

    // Rotating the write key: the old one stops working, the new one works, the read key stays.
    assert_eq!(
        server
            .post_json("/v1/track", Auth::Basic(&write_key), &track("1", "u", "e"))
            .status,
        200
    );
    let rotated = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{id}/rotate-keys"),
        Some(&json!({"which": "write"})),
    );
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let new_write = rotated.json()["write_key"].as_str().unwrap().to_string();
    assert!(rotated.json().get("read_key").is_none());
    server
        .post_json("/v1/track", Auth::Basic(&write_key), &track("2", "u", "e"))
        .problem(401);
    assert_eq!(
        server
            .post_json("/v1/track", Auth::Basic(&new_write), &track("3", "u", "e"))
            .status,
        200
    );
    assert_eq!(server.export(&read_key, "").len(), 2);

    // Delete purges: keys stop working, data is gone, a new tenant does not see it.
    let deleted = server.admin("DELETE", &format!("/admin/v1/tenants/{id}"), None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["purged_log_entries"], 2);
    server
        .post_json("/v1/track", Auth::Basic(&new_write), &track("4", "u", "e"))
        .problem(401);
    server
        .get("/v1/events/export", Auth::Bearer(&read_key))
        .problem(401);
    server
        .admin("GET", &format!("/admin/v1/tenants/{id}"), None)
        .problem(404);
    server
        .admin("DELETE", &format!("/admin/v1/tenants/{id}"), None)
        .problem(404);
    assert_eq!(
        server.admin("GET", "/admin/v1/tenants", None).json()["tenants"],
        json!([])
    );
    // A new tenant starts empty; the deleted tenant's events are nowhere.
    let fresh = server.create_tenant("fresh");
    assert!(server.export(&fresh.read_key, "").is_empty());
    let reply = server.post_json(
        "/v1/track",
        Auth::Basic(&fresh.write_key),
        &track("1", "u", "e"),
    );
    assert_eq!(reply.json()["accepted"], 1, "{}", reply.body);
}

#[test]
fn tenants_and_keys_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = {
        let server = TestServer::start_in(dir.path(), &[]);
        let tenant = server.create_tenant("durable");
        assert_eq!(
            server
                .post_json(
                    "/v1/batch",
                    Auth::Basic(&tenant.write_key),
                    &batch(vec![track("m", "u", "e")])
                )
                .status,
            200
        );
        tenant
    }; // SIGKILL on drop
    let server = TestServer::start_in(dir.path(), &[]);
    assert_eq!(server.export(&tenant.read_key, "").len(), 1);
    assert_eq!(
        server
            .admin("GET", &format!("/admin/v1/tenants/{}", tenant.id), None)
            .json()["name"],
        "durable"
    );
}

#[test]
fn generated_admin_token_is_printed_once_and_only_its_hash_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    // No STATSREMOTE_ADMIN_TOKEN: an empty value means "not set".
    let token = {
        let server = TestServer::start_in(dir.path(), &[("STATSREMOTE_ADMIN_TOKEN", "")]);
        let lines = server.stdout();
        let line = lines
            .iter()
            .find(|l| l.contains("Generated admin token"))
            .unwrap_or_else(|| panic!("token not printed: {lines:?}"));
        let token = line.rsplit(' ').next().unwrap().to_string();
        assert!(token.starts_with("sr_admin_"));
        assert_eq!(
            server.get("/admin/v1/tenants", Auth::Bearer(&token)).status,
            200
        );
        assert!(
            !server.server_log().contains(&token),
            "token must not be logged"
        );
        token
    };
    let server = TestServer::start_in(dir.path(), &[("STATSREMOTE_ADMIN_TOKEN", "")]);
    let lines = server.stdout();
    assert!(
        !lines.iter().any(|l| l.contains("Generated admin token")),
        "printed twice"
    );
    assert_eq!(
        server.get("/admin/v1/tenants", Auth::Bearer(&token)).status,
        200
    );
    // The token is not stored in plain text anywhere under the data dir.
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "plain token found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
