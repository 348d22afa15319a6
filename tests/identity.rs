//! Identity resolution through the real server (see `src/identity.rs` and the README's
//! "Identity" section): anonymous events, then an identify, then more events count one person in
//! uniques and funnels; chained aliases make one person; a merge of two known users is refused;
//! PostHog's identity calls follow the same rule; links survive a SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

/// The start of an hour a day ago: every event of a test is placed after it.
fn base() -> i64 {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    (now - 86_400) / 3600 * 3600
}

fn send(server: &TestServer, tenant: &Tenant, events: Vec<Value>) {
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": events }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// An event from `who` (`("user", id)` or `("anon", id)`) at `at`.
fn track(id: &str, who: (&str, &str), event: &str, at: i64) -> Value {
    let mut e = json!({"type": "track", "messageId": id, "event": event, "timestamp": rfc3339(at)});
    let field = if who.0 == "user" {
        "userId"
    } else {
        "anonymousId"
    };
    e[field] = json!(who.1);
    e
}

fn identify(id: &str, user: &str, anon: &str, at: i64) -> Value {
    json!({"type": "identify", "messageId": id, "userId": user, "anonymousId": anon,
           "traits": {"plan": "pro"}, "timestamp": rfc3339(at)})
}

fn alias(id: &str, previous: &str, user: &str, at: i64) -> Value {
    json!({"type": "alias", "messageId": id, "previousId": previous, "userId": user,
           "timestamp": rfc3339(at)})
}

fn uniques(server: &TestServer, tenant: &Tenant, from: i64, to: i64) -> u64 {
    let path = format!(
        "/v1/query/uniques?from={}&to={}",
        rfc3339(from),
        rfc3339(to)
    );
    let reply = server.get(&path, Auth::Bearer(&tenant.read_key));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["uniques"].as_u64().unwrap()
}

fn funnel(server: &TestServer, tenant: &Tenant, steps: &[&str], from: i64, to: i64) -> Vec<u64> {
    let reply = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&tenant.read_key),
        &json!({"steps": steps, "window": "1h", "from": rfc3339(from), "to": rfc3339(to)}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["users"].as_u64().unwrap())
        .collect()
}

/// messageId → resolved person, from the export.
fn persons(server: &TestServer, tenant: &Tenant) -> std::collections::BTreeMap<String, String> {
    server
        .export(&tenant.read_key, "")
        .iter()
        .map(|e| {
            let person = e["statsremote"]["person"].as_str().unwrap().to_string();
            (e["messageId"].as_str().unwrap().to_string(), person)
        })
        .collect()
}

#[test]
fn anonymous_events_then_identify_then_more_count_one_person() {
    let server = TestServer::start();
    let tenant = server.create_tenant("identity");
    let t0 = base();
    // Before the identify: the visitor browses anonymously.
    send(
        &server,
        &tenant,
        vec![
            track("m1", ("anon", "anon-1"), "Viewed", t0 + 10),
            track("m2", ("anon", "anon-1"), "Viewed", t0 + 20),
        ],
    );
    send(
        &server,
        &tenant,
        vec![identify("m3", "alice", "anon-1", t0 + 130)],
    );
    // After it: events under the user id and, as a browser still sends, the anonymous id.
    send(
        &server,
        &tenant,
        vec![
            track("m4", ("user", "alice"), "Signed Up", t0 + 300),
            track("m5", ("anon", "anon-1"), "Purchased", t0 + 310),
            track("m6", ("anon", "anon-1"), "Purchased", t0 + 320),
        ],
    );
    // A second visitor who never identifies.
    send(
        &server,
        &tenant,
        vec![track("m7", ("anon", "anon-2"), "Viewed", t0 + 400)],
    );
    server.wait_rollups_caught_up(&tenant.read_key);

    // After the identify, alice's anonymous and identified events are one person; anon-2 is
    // another.
    assert_eq!(uniques(&server, &tenant, t0 + 240, t0 + 600), 2);
    assert_eq!(uniques(&server, &tenant, t0 + 300, t0 + 320), 1);
    // Rollups keep the events before the identify with the anonymous id (documented): the hour
    // counts anon-1's early events, alice, and anon-2.
    assert_eq!(uniques(&server, &tenant, t0, t0 + 3600), 3);
    // Funnels resolve with the stored links: the anonymous view before the identify, the
    // sign-up as alice and the purchase by anonymous id are one person's journey.
    assert_eq!(
        funnel(
            &server,
            &tenant,
            &["Viewed", "Signed Up", "Purchased"],
            t0,
            t0 + 3600
        ),
        vec![2, 1, 1]
    );
    // The export keeps the raw ids and adds the person.
    let export = server.export(&tenant.read_key, "");
    let m5 = export.iter().find(|e| e["messageId"] == "m5").unwrap();
    assert_eq!(m5["anonymousId"], "anon-1");
    assert!(m5.get("userId").is_none());
    assert_eq!(m5["statsremote"]["person"], "alice");
    let persons = persons(&server, &tenant);
    for id in ["m1", "m2", "m3", "m4", "m5", "m6"] {
        assert_eq!(persons[id], "alice", "{id}");
    }
    assert_eq!(persons["m7"], "anon-2");
    let metrics = server.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("statsremote_identity_links_total")
                && l.contains("outcome=\"joined\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[test]
fn a_second_user_on_the_same_device_does_not_take_its_anonymous_id() {
    let server = TestServer::start();
    let tenant = server.create_tenant("shared-device");
    let t0 = base();
    send(
        &server,
        &tenant,
        vec![identify("i1", "alice", "device", t0 + 10)],
    );
    send(
        &server,
        &tenant,
        vec![identify("i2", "bob", "device", t0 + 20)],
    );
    send(
        &server,
        &tenant,
        vec![track("t1", ("anon", "device"), "Opened", t0 + 30)],
    );
    server.wait_rollups_caught_up(&tenant.read_key);
    let persons = persons(&server, &tenant);
    assert_eq!(persons["t1"], "alice");
    assert_eq!(persons["i2"], "bob");
}

#[test]
fn chained_aliases_make_one_person() {
    let server = TestServer::start();
    let tenant = server.create_tenant("aliases");
    let t0 = base();
    send(
        &server,
        &tenant,
        vec![
            alias("a1", "anon-x", "x@example.com", t0 + 10),
            // The second alias renames the person: its ids follow.
            alias("a2", "x@example.com", "db-1", t0 + 20),
        ],
    );
    send(
        &server,
        &tenant,
        vec![
            track("e1", ("anon", "anon-x"), "Opened", t0 + 120),
            track("e2", ("user", "x@example.com"), "Opened", t0 + 130),
            track("e3", ("user", "db-1"), "Opened", t0 + 140),
        ],
    );
    server.wait_rollups_caught_up(&tenant.read_key);
    assert_eq!(uniques(&server, &tenant, t0 + 120, t0 + 180), 1);
    let persons = persons(&server, &tenant);
    for id in ["a1", "a2", "e1", "e2", "e3"] {
        assert_eq!(persons[id], "db-1", "{id}");
    }
}

#[test]
fn merging_two_known_users_is_refused() {
    let server = TestServer::start();
    let tenant = server.create_tenant("merge");
    let t0 = base();
    send(
        &server,
        &tenant,
        vec![
            identify("i1", "u1", "a1", t0 + 10),
            identify("i2", "u2", "a2", t0 + 20),
        ],
    );
    send(&server, &tenant, vec![alias("al", "u1", "u2", t0 + 30)]);
    send(
        &server,
        &tenant,
        vec![
            track("e1", ("anon", "a1"), "Opened", t0 + 120),
            track("e2", ("user", "u1"), "Opened", t0 + 121),
            track("e3", ("anon", "a2"), "Opened", t0 + 122),
            track("e4", ("user", "u2"), "Opened", t0 + 123),
        ],
    );
    server.wait_rollups_caught_up(&tenant.read_key);
    assert_eq!(uniques(&server, &tenant, t0 + 120, t0 + 180), 2);
    let persons = persons(&server, &tenant);
    assert_eq!(
        (persons["e1"].as_str(), persons["e2"].as_str()),
        ("u1", "u1")
    );
    assert_eq!(
        (persons["e3"].as_str(), persons["e4"].as_str()),
        ("u2", "u2")
    );
    let metrics = server.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("statsremote_identity_links_total")
                && l.contains("kind=\"alias\"")
                && l.contains("outcome=\"refused\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[test]
fn posthog_identify_and_alias_follow_the_same_rule() {
    let server = TestServer::start();
    let tenant = server.create_tenant("posthog-identity");
    let t0 = base();
    let capture = |uuid: &str, distinct: &str, event: &str, at: i64, props: Value| {
        let mut properties = json!({"$lib": "web"});
        for (k, v) in props.as_object().unwrap() {
            properties[k] = v.clone();
        }
        json!({"event": event, "uuid": uuid, "distinct_id": distinct,
               "timestamp": rfc3339(at), "properties": properties})
    };
    let post = |events: Vec<Value>| {
        let reply = server.post_json(
            "/batch/",
            Auth::None,
            &json!({"api_key": tenant.write_key, "batch": events}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    };
    post(vec![capture(
        "00000000-0000-4000-8000-000000000001",
        "ph-anon",
        "$pageview",
        t0 + 10,
        json!({}),
    )]);
    post(vec![capture(
        "00000000-0000-4000-8000-000000000002",
        "ph-user",
        "$identify",
        t0 + 20,
        json!({"$anon_distinct_id": "ph-anon"}),
    )]);
    post(vec![capture(
        "00000000-0000-4000-8000-000000000003",
        "ph-user",
        "$create_alias",
        t0 + 30,
        json!({"alias": "backend-7"}),
    )]);
    post(vec![
        capture(
            "00000000-0000-4000-8000-000000000004",
            "ph-anon",
            "clicked",
            t0 + 120,
            json!({}),
        ),
        capture(
            "00000000-0000-4000-8000-000000000005",
            "backend-7",
            "paid",
            t0 + 130,
            json!({}),
        ),
    ]);
    server.wait_rollups_caught_up(&tenant.read_key);
    assert_eq!(uniques(&server, &tenant, t0 + 120, t0 + 180), 1);
    assert_eq!(
        funnel(
            &server,
            &tenant,
            &["$pageview", "clicked", "paid"],
            t0,
            t0 + 3600
        ),
        vec![1, 1, 1],
        "{:?}",
        server.export(&tenant.read_key, "")
    );
    let persons = persons(&server, &tenant);
    assert!(persons.values().all(|p| p == "backend-7"), "{persons:?}");
}

#[test]
fn links_survive_a_kill_before_the_rollups_flush() {
    let dir = tempfile::tempdir().unwrap();
    // Rollups flush rarely, so the kill comes before the links are stored: the restart
    // derives them again from the log.
    let env = [("STATSREMOTE__ROLLUPS__FLUSH_INTERVAL", "1h")];
    let server = TestServer::start_in(dir.path(), &env);
    let tenant = server.create_tenant("crash");
    let t0 = base();
    send(
        &server,
        &tenant,
        vec![
            track("b1", ("anon", "anon-9"), "Viewed", t0 + 10),
            identify("b2", "carol", "anon-9", t0 + 20),
        ],
    );
    server.kill();
    drop(server);
    let server = TestServer::start_in(dir.path(), &[]);
    send(
        &server,
        &tenant,
        vec![track("b3", ("anon", "anon-9"), "Bought", t0 + 130)],
    );
    server.wait_rollups_caught_up(&tenant.read_key);
    assert_eq!(uniques(&server, &tenant, t0 + 120, t0 + 180), 1);
    assert_eq!(
        funnel(&server, &tenant, &["Viewed", "Bought"], t0, t0 + 3600),
        vec![1, 1]
    );
    let persons = persons(&server, &tenant);
    assert_eq!(persons["b3"], "carol");
}

#[test]
fn erasing_a_user_removes_the_links_that_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]);
    let tenant = server.create_tenant("erase-identity");
    let t0 = base();
    send(
        &server,
        &tenant,
        vec![
            track("r1", ("anon", "anon-e"), "Viewed", t0 + 10),
            identify("r2", "erin", "anon-e", t0 + 20),
            track("r3", ("user", "erin"), "Bought", t0 + 30),
            identify("r4", "frank", "anon-f", t0 + 40),
        ],
    );
    server.wait_rollups_caught_up(&tenant.read_key);
    assert_eq!(persons(&server, &tenant)["r1"], "erin");
    let job = server.request_erasure(&tenant.id, "erin");
    let done = server.wait_erasure(&job);
    assert_eq!(done["status"], "done", "{done}");
    // erin's own link, and anon-e's (whose parent erin was).
    assert_eq!(done["removed_identity_links"], 2, "{done}");
    assert_eq!(done["removed_events"], 2, "{done}");
    let persons = persons(&server, &tenant);
    assert!(!persons.contains_key("r2") && !persons.contains_key("r3"));
    // The anonymous id keeps its events, as a person of its own; frank is untouched.
    assert_eq!(persons["r1"], "anon-e");
    assert_eq!(persons["r4"], "frank");
    // A restart (which reloads the links and replays nothing erased) keeps it so.
    server.terminate();
    drop(server);
    let server = TestServer::start_in(dir.path(), &[]);
    server.wait_rollups_caught_up(&tenant.read_key);
    let persons = self::persons(&server, &tenant);
    assert_eq!(persons["r1"], "anon-e");
    assert_eq!(persons["r4"], "frank");
}
