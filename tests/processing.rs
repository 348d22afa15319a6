//! Tracking plans and dead letters through the real server: schema versions and their
//! compatibility checks, each enforcement mode, unplanned names, the dead-letter store and its
//! replay (twice, counted once), dead letters across a SIGKILL and their retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};

fn order_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "total": {"type": "number", "minimum": 0},
            "currency": {"type": "string", "enum": ["EUR", "USD"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}
        },
        "required": ["total"]
    })
}

fn put_schema(server: &TestServer, tenant: &Tenant, event: &str, body: &Value) -> common::Reply {
    let path = format!(
        "/admin/v1/tenants/{}/schemas/{}",
        tenant.id,
        event.replace(' ', "%20")
    );
    server.admin("PUT", &path, Some(body))
}

/// Registers `order_schema` for `Order Completed`.
fn plan_orders(server: &TestServer, tenant: &Tenant) {
    let put = put_schema(
        server,
        tenant,
        "Order Completed",
        &json!({"schema": order_schema()}),
    );
    assert_eq!(put.status, 201, "{}", put.body);
}

fn settings(server: &TestServer, tenant: &Tenant, settings: Value) {
    let reply = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(&json!({ "settings": settings })),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn order(id: &str, user: &str, properties: Value) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": "Order Completed",
           "properties": properties, "timestamp": "2026-01-02T03:04:05.000Z"})
}

fn send(server: &TestServer, tenant: &Tenant, events: Vec<Value>) -> Value {
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &common::batch(events),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn dead_letters(server: &TestServer, tenant: &Tenant, query: &str) -> Value {
    let reply = server.get(
        &format!("/v1/deadletter{query}"),
        Auth::Bearer(&tenant.read_key),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn replay(server: &TestServer, tenant: &Tenant, filter: Value) -> Value {
    let reply = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/deadletter/replay", tenant.id),
        Some(&filter),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Counts of `Order Completed` in the rollups, once they cover every durable event.
fn order_count(server: &TestServer, tenant: &Tenant) -> u64 {
    server.wait_rollups_caught_up(&tenant.read_key);
    let reply = server.get(
        "/v1/query/events?from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z",
        Auth::Bearer(&tenant.read_key),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "Order Completed")
        .map_or(0, |e| e["count"].as_u64().unwrap())
}

#[test]
fn schema_versions_are_registered_checked_listed_and_retired() {
    let server = TestServer::start();
    let tenant = server.create_tenant("plans");
    let first = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": order_schema()}),
    );
    assert_eq!(first.status, 201, "{}", first.body);
    let first = first.json();
    assert_eq!(first["version"], 1);
    assert_eq!(first["compatibility"], "backward");

    // Backward (the default): narrowing changes are refused, each by its path.
    let mut narrower = order_schema();
    narrower["properties"]["currency"]["enum"] = json!(["EUR"]);
    narrower["properties"]["total"]["type"] = json!("integer");
    narrower["required"] = json!(["total", "currency"]);
    let refused = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": narrower}),
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let changes: Vec<(String, String)> = refused.json()["breaking_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().into(),
                c["change"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected = [
        ("$.currency", "enum_shrunk"),
        ("$.total", "type_narrowed"),
        ("$.currency", "required_added"),
    ];
    assert_eq!(
        changes,
        expected
            .map(|(p, c)| (p.to_string(), c.to_string()))
            .to_vec()
    );

    // Forward: removing a constrained property is refused; adding an optional one is fine.
    let mut removed = order_schema();
    removed["properties"]
        .as_object_mut()
        .unwrap()
        .remove("currency");
    let refused = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": removed, "compatibility": "forward"}),
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.json()["breaking_changes"][0]["path"], "$.currency");
    assert_eq!(
        refused.json()["breaking_changes"][0]["change"],
        "property_removed"
    );
    let mut added = order_schema();
    added["properties"]["coupon"] = json!({"type": "string"});
    let second = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": added, "compatibility": "full", "enforcement": "reject"}),
    );
    assert_eq!(second.status, 201, "{}", second.body);
    assert_eq!(second.json()["version"], 2);
    // Full now holds for the event: a widening is refused too.
    let mut widened = order_schema();
    widened["properties"]["coupon"] = json!({"type": ["string", "null"]});
    let refused = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": widened}),
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        refused.json()["breaking_changes"][0]["change"],
        "type_widened"
    );
    // `none` takes anything.
    let third = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": {"type": "object"}, "compatibility": "none"}),
    );
    assert_eq!(third.status, 201, "{}", third.body);

    // Listing: admin per event, the tenant its whole plan with its read key.
    let listed = server.admin(
        "GET",
        &format!("/admin/v1/tenants/{}/schemas/Order%20Completed", tenant.id),
        None,
    );
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["in_force"], 3);
    assert_eq!(listed.json()["versions"].as_array().unwrap().len(), 3);
    let own = server.get("/v1/schemas", Auth::Bearer(&tenant.read_key));
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.json()["events"][0]["event"], "Order Completed");
    assert_eq!(own.json()["schema_enforcement"], "off");
    assert_eq!(
        server
            .get("/v1/schemas", Auth::Bearer(&tenant.write_key))
            .status,
        403
    );

    // Retiring the version in force puts the previous one back.
    let retired = server.admin(
        "DELETE",
        &format!("/admin/v1/tenants/{}/schemas/Order%20Completed", tenant.id),
        None,
    );
    assert_eq!(retired.status, 200, "{}", retired.body);
    assert_eq!(retired.json()["version"], 3);
    assert!(retired.json()["retired_at"].is_string());
    let listed = server.admin(
        "GET",
        &format!("/admin/v1/tenants/{}/schemas/Order%20Completed", tenant.id),
        None,
    );
    assert_eq!(listed.json()["in_force"], 2);

    // Bad input is named.
    let bad = put_schema(&server, &tenant, "X", &json!({"schema": {"type": 5}}));
    assert!(
        bad.problem(400).contains("not a valid JSON Schema"),
        "{}",
        bad.body
    );
    let bad = put_schema(
        &server,
        &tenant,
        "X",
        &json!({"schema": {}, "compatibility": "sideways"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let missing = server.admin(
        "DELETE",
        &format!("/admin/v1/tenants/{}/schemas/X?version=9", tenant.id),
        None,
    );
    assert_eq!(missing.status, 404, "{}", missing.body);
}

#[test]
fn enforcement_modes_decide_what_happens_to_a_mismatch() {
    let server = TestServer::start();
    let tenant = server.create_tenant("enforcement");
    plan_orders(&server, &tenant);
    let bad = |id: &str| order(id, "u1", json!({"total": "12", "currency": "GBP"}));
    let good = |id: &str| order(id, "u2", json!({"total": 12, "currency": "EUR"}));

    // off (the default): everything is stored, nothing flagged.
    let reply = send(&server, &tenant, vec![bad("off-bad"), good("off-good")]);
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(2), Some(0))
    );

    // warn: stored, flagged in the export, counted in /metrics.
    settings(&server, &tenant, json!({"schema_enforcement": "warn"}));
    let reply = send(&server, &tenant, vec![bad("warn-bad"), good("warn-good")]);
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(2), Some(0))
    );
    let exported = server.export(&tenant.read_key, "");
    let flag = |id: &str| {
        exported
            .iter()
            .find(|e| e["messageId"] == id)
            .map(|e| e["statsremote"]["schemaWarning"].clone())
            .unwrap()
    };
    assert_eq!(flag("warn-bad"), "schema_mismatch");
    assert_eq!(flag("warn-good"), Value::Null);
    assert_eq!(flag("off-bad"), Value::Null);

    // reject: dead-lettered and listed in the reply with the schema's paths; the rest stored.
    settings(&server, &tenant, json!({"schema_enforcement": "reject"}));
    let reply = send(
        &server,
        &tenant,
        vec![good("rej-good"), bad("rej-bad"), json!({"type": "track"})],
    );
    assert_eq!(reply["accepted"], 1, "{reply}");
    assert_eq!(reply["rejected"], 2, "{reply}");
    let errors = reply["errors"].as_array().unwrap();
    // The parser's rejection (index 2) and the plan's (index 1), in request order.
    assert_eq!(errors[0]["index"], 1);
    assert_eq!(errors[0]["messageId"], "rej-bad");
    assert_eq!(errors[0]["deadLettered"], true);
    assert_eq!(errors[0]["schemaVersion"], 1);
    let violations: Vec<(String, String)> = errors[0]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().into(),
                v["schema_path"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        violations.contains(&("$.total".into(), "/properties/total/type".into())),
        "{violations:?}"
    );
    assert!(
        violations.contains(&("$.currency".into(), "/properties/currency/enum".into())),
        "{violations:?}"
    );
    assert!(errors[0]["reason"]
        .as_str()
        .unwrap()
        .contains("schema version 1"));
    assert_eq!(errors[1]["index"], 2);
    assert!(errors[1].get("deadLettered").is_none());
    // A request whose events are all refused by the plan is still a 200: they are kept.
    let reply = send(&server, &tenant, vec![bad("rej-bad-2")]);
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(0), Some(1))
    );

    let stored = common::message_ids(&server.export(&tenant.read_key, ""));
    assert!(stored.contains(&"rej-good".to_string()));
    assert!(!stored.iter().any(|id| id.starts_with("rej-bad")));
    assert_eq!(order_count(&server, &tenant), 5, "off 2, warn 2, reject 1");

    let letters = dead_letters(&server, &tenant, "");
    let items = letters["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{letters}");
    // Newest first.
    assert_eq!(items[0]["message_id"], "rej-bad-2");
    assert_eq!(items[1]["message_id"], "rej-bad");
    assert_eq!(items[1]["reason"]["kind"], "schema_mismatch");
    assert_eq!(items[1]["reason"]["schema_version"], 1);
    assert_eq!(items[1]["body"]["properties"]["total"], "12");
    assert_eq!(items[1]["body"]["event"], "Order Completed");
    assert_eq!(items[1]["source"]["endpoint"], "/v1/batch");
    assert!(items[1]["received_at"].is_string());

    // An event's own enforcement wins over the tenant's.
    settings(&server, &tenant, json!({"schema_enforcement": "off"}));
    let mut strict = order_schema();
    strict["properties"]["coupon"] = json!({"type": "string"});
    let put = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": strict, "enforcement": "reject"}),
    );
    assert_eq!(put.status, 201, "{}", put.body);
    let reply = send(&server, &tenant, vec![bad("own-bad")]);
    assert_eq!(reply["rejected"], 1, "{reply}");

    // Unplanned names follow `unplanned_events`.
    let signup =
        |id: &str| json!({"type": "track", "messageId": id, "userId": "u3", "event": "Signed Up"});
    settings(&server, &tenant, json!({"unplanned_events": "warn"}));
    let reply = send(&server, &tenant, vec![signup("unplanned-warn")]);
    assert_eq!(reply["accepted"], 1);
    settings(&server, &tenant, json!({"unplanned_events": "reject"}));
    let reply = send(&server, &tenant, vec![signup("unplanned-reject")]);
    assert_eq!(reply["rejected"], 1, "{reply}");
    assert!(reply["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("no schema"));
    let unplanned = dead_letters(&server, &tenant, "?reason=unplanned");
    assert_eq!(
        unplanned["items"].as_array().unwrap().len(),
        1,
        "{unplanned}"
    );
    assert_eq!(unplanned["items"][0]["message_id"], "unplanned-reject");
    let exported = server.export(&tenant.read_key, "");
    let warned = exported
        .iter()
        .find(|e| e["messageId"] == "unplanned-warn")
        .unwrap();
    assert_eq!(warned["statsremote"]["schemaWarning"], "unplanned");

    // Paging and filters.
    let page = dead_letters(&server, &tenant, "?limit=2");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_string();
    let rest = dead_letters(&server, &tenant, &format!("?limit=2&before={next}"));
    assert_eq!(rest["items"].as_array().unwrap().len(), 2, "{rest}");
    let by_event = dead_letters(&server, &tenant, "?event=Signed%20Up");
    assert_eq!(by_event["items"].as_array().unwrap().len(), 1);
    let bad_query = server.get(
        "/v1/deadletter?reason=other",
        Auth::Bearer(&tenant.read_key),
    );
    assert!(bad_query.problem(400).contains("reason"));

    let metrics = server.metrics();
    let tenant_label = format!("tenant=\"{}\"", tenant.id);
    let line = |name: &str, labels: &[&str]| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains(&tenant_label)
                    && labels.iter().all(|x| l.contains(x))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        line(
            "statsremote_dead_letters_total",
            &["reason=\"schema_mismatch\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        line("statsremote_dead_letters_total", &["reason=\"unplanned\""]),
        Some(1.0)
    );
    assert_eq!(
        line(
            "statsremote_schema_violations_total",
            &["outcome=\"warned\"", "reason=\"schema_mismatch\""]
        ),
        Some(1.0)
    );
}

#[test]
fn replayed_dead_letters_are_logged_once_even_when_replayed_twice() {
    let server = TestServer::start();
    let tenant = server.create_tenant("replay");
    settings(&server, &tenant, json!({"schema_enforcement": "reject"}));
    plan_orders(&server, &tenant);
    let string_total = |id: &str| order(id, "u1", json!({"total": "12", "currency": "EUR"}));
    let negative = |id: &str| order(id, "u2", json!({"total": -1, "currency": "EUR"}));
    let reply = send(
        &server,
        &tenant,
        vec![
            string_total("s1"),
            string_total("s2"),
            negative("n1"),
            order("ok", "u3", json!({"total": 1})),
        ],
    );
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(1), Some(3))
    );
    // A retry of a dead-lettered event is dead-lettered again (it is not in the log).
    let reply = send(&server, &tenant, vec![string_total("s1")]);
    assert_eq!(reply["rejected"], 1);
    assert_eq!(
        dead_letters(&server, &tenant, "")["items"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Still refused: the letters stay, with the replay counted.
    let report = replay(&server, &tenant, json!({}));
    assert_eq!(report["matched"], 4, "{report}");
    assert_eq!(report["still_refused"], 4, "{report}");
    assert_eq!(report["logged"], 0);
    let letters = dead_letters(&server, &tenant, "");
    assert!(
        letters["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["replays"] == 1),
        "{letters}"
    );

    // The plan learns that totals may be strings: the string totals pass, the negative one not.
    let mut fixed = order_schema();
    fixed["properties"]["total"] = json!({"type": ["number", "string"], "minimum": 0});
    let put = put_schema(
        &server,
        &tenant,
        "Order Completed",
        &json!({"schema": fixed}),
    );
    assert_eq!(put.status, 201, "{}", put.body);
    let report = replay(&server, &tenant, json!({"event": "Order Completed"}));
    assert_eq!(report["matched"], 4, "{report}");
    // s1 twice: logged once, the second copy a duplicate.
    assert_eq!(report["logged"], 2, "{report}");
    assert_eq!(report["duplicates"], 1, "{report}");
    assert_eq!(report["still_refused"], 1, "{report}");
    let left = dead_letters(&server, &tenant, "");
    let left = left["items"].as_array().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["message_id"], "n1");
    assert_eq!(left[0]["replays"], 2);
    assert_eq!(left[0]["reason"]["schema_version"], 2);
    assert_eq!(left[0]["reason"]["errors"][0]["path"], "$.total");

    // Replaying again finds nothing new to log; the client's own retry is a duplicate.
    let again = replay(&server, &tenant, json!({}));
    assert_eq!(
        (again["matched"].as_u64(), again["logged"].as_u64()),
        (Some(1), Some(0)),
        "{again}"
    );
    let retry = send(&server, &tenant, vec![string_total("s2")]);
    assert_eq!(
        (retry["accepted"].as_u64(), retry["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    // The replayed events carry their original ids and timestamps, once each.
    let exported = server.export(&tenant.read_key, "");
    let mut ids = common::message_ids(&exported);
    ids.sort();
    assert_eq!(ids, ["ok", "s1", "s2"]);
    let s1 = exported.iter().find(|e| e["messageId"] == "s1").unwrap();
    assert_eq!(s1["timestamp"], "2026-01-02T03:04:05.000Z");
    assert_eq!(s1["properties"]["total"], "12");
    assert_eq!(order_count(&server, &tenant), 3);

    let bad = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/deadletter/replay", tenant.id),
        Some(&json!({"reason": "nope"})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn dead_letters_are_durable_when_acknowledged_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("STATSREMOTE__COLD__FLUSH_INTERVAL", "1s")];
    let server = TestServer::start_in(dir.path(), &env);
    let tenant = server.create_tenant("durable-letters");
    settings(&server, &tenant, json!({"unplanned_events": "reject"}));
    let events: Vec<Value> = (0..20)
        .map(|n| json!({"type": "track", "messageId": format!("m{n}"), "userId": "u", "event": "Unplanned"}))
        .collect();
    // A large batch-level context: stored once for the request's letters, shown in each.
    let big = "x".repeat(60_000);
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({"batch": events, "context": {"app": {"name": "shop"}, "padding": big}}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    assert_eq!(reply["rejected"], 20);
    server.kill();
    drop(server);
    let server = TestServer::start_in(dir.path(), &env);
    let letters = dead_letters(&server, &tenant, "");
    assert_eq!(letters["items"].as_array().unwrap().len(), 20, "{letters}");
    for letter in letters["items"].as_array().unwrap() {
        assert_eq!(letter["body"]["context"]["app"]["name"], "shop");
    }
    // The context's 60 KB are stored once, not once per letter (1.2 MB).
    let label = format!("statsremote_dead_letter_bytes{{tenant=\"{}\"}} ", tenant.id);
    let bytes = common::poll(std::time::Duration::from_secs(30), || {
        // The flusher runs once its tenant's pipeline does; a query starts it.
        server.wait_rollups_caught_up(&tenant.read_key);
        let metrics = server.metrics();
        let value = metrics.lines().find_map(|l| l.strip_prefix(&label));
        let value = value.ok_or_else(|| format!("no {label}"))?;
        Ok(value.trim().parse::<f64>().unwrap())
    });
    assert!((60_000.0..200_000.0).contains(&bytes), "{bytes} bytes");

    // Retention: letters older than it go at the tenant's next flusher pass.
    settings(&server, &tenant, json!({"deadletter_retention": "1s"}));
    // The flusher runs once its tenant's pipeline does; a query starts it.
    server.wait_rollups_caught_up(&tenant.read_key);
    // The pass counts the letters once their deletion is durable, after they are gone from
    // listings: wait for both.
    let label = format!(
        "statsremote_dead_letters_expired_total{{tenant=\"{}\"}} ",
        tenant.id
    );
    let expired = common::poll(std::time::Duration::from_secs(30), || {
        let left = dead_letters(&server, &tenant, "")["items"]
            .as_array()
            .unwrap()
            .len();
        let metrics = server.metrics();
        match (left, metrics.lines().find_map(|l| l.strip_prefix(&label))) {
            (0, Some(expired)) => Ok(expired.trim().to_string()),
            (left, expired) => Err(format!("{left} letters left, expired counter {expired:?}")),
        }
    });
    assert_eq!(expired, "20");
}

#[test]
fn erasing_a_user_removes_their_dead_letters() {
    let server = TestServer::start();
    let tenant = server.create_tenant("erase-letters");
    settings(&server, &tenant, json!({"unplanned_events": "reject"}));
    let event = |id: &str, who: &str, field: &str| {
        let mut e = json!({"type": "track", "messageId": id, "event": "Unplanned"});
        e[field] = json!(who);
        e
    };
    let reply = send(
        &server,
        &tenant,
        vec![
            event("g1", "gina", "userId"),
            event("g2", "gina", "anonymousId"),
            event("h1", "hal", "userId"),
        ],
    );
    assert_eq!(reply["rejected"], 3, "{reply}");
    let job = server.request_erasure(&tenant.id, "gina");
    let done = server.wait_erasure(&job);
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["removed_dead_letters"], 2, "{done}");
    let left = dead_letters(&server, &tenant, "");
    let ids: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h1"]);
}

/// Dedup comes before validation: a retry of a logged event is a duplicate, even when the plan
/// would refuse it now; only a new event is checked.
#[test]
fn a_retry_of_a_logged_event_is_a_duplicate_whatever_the_plan_says_now() {
    let server = TestServer::start();
    let tenant = server.create_tenant("order");
    let first = send(
        &server,
        &tenant,
        vec![order("early", "u1", json!({"total": "12"}))],
    );
    assert_eq!(first["accepted"], 1, "{first}");
    plan_orders(&server, &tenant);
    settings(&server, &tenant, json!({"schema_enforcement": "reject"}));
    let retry = send(
        &server,
        &tenant,
        vec![
            order("early", "u1", json!({"total": "12"})),
            order("late", "u1", json!({"total": "12"})),
        ],
    );
    assert_eq!(retry["duplicates"], 1, "{retry}");
    assert_eq!(retry["rejected"], 1, "{retry}");
    assert_eq!(retry["errors"][0]["messageId"], "late", "{retry}");
    let letters = dead_letters(&server, &tenant, "");
    assert_eq!(letters["items"].as_array().unwrap().len(), 1, "{letters}");
}
