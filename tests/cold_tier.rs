//! The cold tier against the real server: old log entries move to Parquet segments on the local
//! store, and exports, funnels, queries, rollup rebuilds, restarts and dedup see every event
//! exactly once across both tiers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{batch, Auth, Tenant, TestServer};
use serde_json::{json, Value};

const HOUR: i64 = 3600;

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Settings that flush within a second of an entry's arrival.
const FAST_FLUSH: [(&str, &str); 4] = [
    ("STATSREMOTE__STORAGE__HOT_RETENTION", "1s"),
    ("STATSREMOTE__STORAGE__DEDUP_MAX_AGE", "200ms"),
    ("STATSREMOTE__COLD__FLUSH_INTERVAL", "200ms"),
    ("STATSREMOTE__ROLLUPS__FLUSH_INTERVAL", "200ms"),
];

/// Events flushed to the cold tier so far, from `/metrics`.
fn flushed(server: &TestServer, tenant: &Tenant) -> u64 {
    let prefix = format!(
        "statsremote_cold_flushed_events_total{{tenant=\"{}\"}} ",
        tenant.id
    );
    server
        .metrics()
        .lines()
        .find_map(|line| {
            line.strip_prefix(&prefix)
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

fn wait_flushed(server: &TestServer, tenant: &Tenant, events: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while flushed(server, tenant) < events {
        assert!(
            Instant::now() < deadline,
            "only {} of {events} events flushed",
            flushed(server, tenant)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `count` track events for users u0..u9, each doing `a` then `b`, spread over two hours.
fn send(server: &TestServer, tenant: &Tenant, prefix: &str, count: usize, start: i64) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(25) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|i| {
                json!({
                    "type": "track",
                    "messageId": format!("{prefix}-{i}"),
                    "userId": format!("u{}", (i / 2) % 10),
                    "event": if i % 2 == 0 { "a" } else { "b" },
                    "timestamp": rfc3339(start + (*i as i64) * 2 * HOUR / count as i64),
                    "context": { "locale": "fr" },
                })
            })
            .collect();
        let mut body = batch(events);
        body["context"] = json!({ "app": { "name": "shop" } });
        let reply = server.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

/// (seq, messageId, merged context) of every exported event.
fn exported(server: &TestServer, tenant: &Tenant, from: i64, to: i64) -> Vec<(u64, String, Value)> {
    let query = format!("?from={}&to={}", rfc3339(from), rfc3339(to));
    server
        .export(&tenant.read_key, &query)
        .into_iter()
        .map(|line| {
            let seq = line["statsremote"]["seq"].as_u64().unwrap();
            (
                seq,
                line["messageId"].as_str().unwrap().to_string(),
                line["context"].clone(),
            )
        })
        .collect()
}

fn totals(server: &TestServer, tenant: &Tenant, from: i64, to: i64) -> Value {
    let path = format!("/v1/query/events?from={}&to={}", rfc3339(from), rfc3339(to));
    let mut answer = server.get(&path, Auth::Bearer(&tenant.read_key)).json();
    answer.as_object_mut().unwrap().remove("as_of");
    answer
}

fn funnel(server: &TestServer, tenant: &Tenant, from: i64, to: i64) -> Value {
    let body = json!({
        "steps": ["a", "b"],
        "window": "3h",
        "from": rfc3339(from),
        "to": rfc3339(to),
    });
    let reply = server.post_json("/v1/query/funnel", Auth::Bearer(&tenant.read_key), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["steps"].clone()
}

fn parquet_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn flushed_events_are_read_once_across_both_tiers_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &FAST_FLUSH);
    let tenant = server.create_tenant("cold");
    let start = (now_secs() - 6 * HOUR) / HOUR * HOUR;
    let (from, to) = (start - HOUR, start + 4 * HOUR);
    send(&server, &tenant, "old", 200, start);
    wait_flushed(&server, &tenant, 200);

    // The admin listing names the same segments as the directory holds. The pass that
    // flushed the last events may still be compacting an hour's segments: wait until both
    // sides agree.
    let (files, listing) = common::poll(Duration::from_secs(30), || {
        let files = parquet_files(&dir.path().join("cold/events"));
        let listing = server.admin(
            "GET",
            &format!("/admin/v1/tenants/{}/segments", tenant.id),
            None,
        );
        assert_eq!(listing.status, 200, "{}", listing.body);
        let listing = listing.json();
        let mut listed: Vec<String> = listing["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                dir.path()
                    .join("cold")
                    .join(s["path"].as_str().unwrap())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        listed.sort();
        if listed == files {
            Ok((files, listing))
        } else {
            Err(format!("{listed:?} != {files:?}"))
        }
    });

    // Hourly Parquet segments, by event time, Hive style.
    assert!(files.len() >= 2, "{files:?}");
    let hour = rfc3339(start);
    let expected_dir = format!(
        "tenant={}/date={}/hour={}/",
        tenant.id,
        &hour[..10],
        &hour[11..13]
    );
    assert!(files.iter().any(|f| f.contains(&expected_dir)), "{files:?}");

    assert_eq!(listing["cold_watermark"], 200);
    let rows: u64 = listing["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 200);
    let unknown = server.admin("GET", "/admin/v1/tenants/0000000000000001/segments", None);
    assert_eq!(unknown.status, 404, "{}", unknown.body);

    // Newer events stay hot for a moment: the export spans both tiers, in order, once each.
    send(&server, &tenant, "new", 50, start + HOUR);
    let events = exported(&server, &tenant, from, to);
    let seqs: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=250).collect::<Vec<u64>>());
    assert!(events
        .iter()
        .all(|e| e.2 == json!({ "app": { "name": "shop" }, "locale": "fr" })));
    // Only part of the range: hours outside it are skipped, what is inside is all there (100
    // cold events and 25 hot ones in the second hour).
    let part = exported(&server, &tenant, start + HOUR, start + 2 * HOUR);
    assert_eq!(
        part.len(),
        100 + 25,
        "{} events in the second hour",
        part.len()
    );

    wait_flushed(&server, &tenant, 250);
    let lag_line = format!(
        "statsremote_cold_flush_lag_seconds{{tenant=\"{}\"}}",
        tenant.id
    );
    assert!(server.metrics().contains(&lag_line), "no flush lag metric");
    server.wait_rollups_caught_up(&tenant.read_key);
    let before = (
        totals(&server, &tenant, from, to),
        funnel(&server, &tenant, from, to),
    );
    assert_eq!(before.1[0]["users"], 10);

    // A rebuild replays the cold segments, then the hot log.
    let rebuild = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/rollups/rebuild", tenant.id),
        None,
    );
    assert_eq!(rebuild.status, 202, "{}", rebuild.body);
    server.wait_rollups_caught_up(&tenant.read_key);
    let deadline = Instant::now() + Duration::from_secs(30);
    while totals(&server, &tenant, from, to) != before.0 {
        assert!(Instant::now() < deadline, "rebuilt rollups differ");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.terminate().success());

    // After a restart: the same events, and retries of flushed events are still duplicates.
    let server = TestServer::start_in(dir.path(), &FAST_FLUSH);
    assert_eq!(exported(&server, &tenant, from, to), events);
    send(&server, &tenant, "old", 10, start);
    let events_after = exported(&server, &tenant, from, to);
    assert_eq!(events_after.len(), 250, "retries counted once");
    assert_eq!(funnel(&server, &tenant, from, to), before.1);

    // Deleting the tenant deletes its segments too.
    let deleted = server.admin("DELETE", &format!("/admin/v1/tenants/{}", tenant.id), None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let left = parquet_files(&dir.path().join("cold/events"));
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_kill_while_flushing_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = std::sync::Arc::new(TestServer::start_in(dir.path(), &FAST_FLUSH));
    let tenant = server.create_tenant("killed");
    let start = (now_secs() - 6 * HOUR) / HOUR * HOUR;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|sender| {
            let (server, stop) = (std::sync::Arc::clone(&server), std::sync::Arc::clone(&stop));
            let key = tenant.write_key.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let ids: Vec<String> =
                        (0..50).map(|i| format!("s{sender}-b{n}-e{i}")).collect();
                    let events: Vec<Value> = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            json!({
                                "type": "track",
                                "messageId": id,
                                "userId": format!("u{}", i % 7),
                                "event": "e",
                                "timestamp": rfc3339(start + ((n * 50 + i) as i64 % (3 * HOUR))),
                            })
                        })
                        .collect();
                    let body = batch(events).to_string();
                    match server.try_post("/v1/batch", Auth::Bearer(&key), body.as_bytes()) {
                        Some(reply) if reply.status == 200 => acked.extend(ids),
                        Some(reply) if reply.status == 503 => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Some(reply) => panic!("unexpected reply {}: {}", reply.status, reply.body),
                        None => break,
                    }
                }
                acked
            })
        })
        .collect();
    // Long enough for several flushes to commit while the senders keep going.
    wait_flushed(&server, &tenant, 2_000);
    std::thread::sleep(Duration::from_millis(700));
    server.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<String> = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    drop(server);

    let server = TestServer::start_in(dir.path(), &FAST_FLUSH);
    assert!(!parquet_files(&dir.path().join("cold/events")).is_empty());
    let stored = exported(&server, &tenant, start - HOUR, start + 4 * HOUR);
    let mut ids: Vec<&str> = stored.iter().map(|e| e.1.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "an event is stored twice");
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| ids.binary_search(&id.as_str()).is_err())
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events missing: {missing:?}"
    );
    let seqs: Vec<u64> = stored.iter().map(|e| e.0).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequences out of order"
    );
    // The rollups count every stored event once, across the restart and the flushes.
    server.wait_rollups_caught_up(&tenant.read_key);
    let counted =
        totals(&server, &tenant, start - HOUR, start + 4 * HOUR)["events"][0]["count"].clone();
    assert_eq!(counted, stored.len() as u64);
}

/// Counts in the Parquet files by DuckDB, as a warehouse reads them: `{"a": n, ...}` by event,
/// and `{"<hour>": n}` by the Hive `date`/`hour` partition.
fn duckdb_counts(cold_root: &std::path::Path) -> Value {
    let bin = testkit::envs::python_env().unwrap();
    let script = r#"
import duckdb, json, sys
glob = sys.argv[1] + "/events/**/*.parquet"
rel = f"read_parquet('{glob}', hive_partitioning = true)"
by_event = dict(duckdb.sql(f"select event, count(*) from {rel} group by event").fetchall())
by_hour = {f"{d} {h}": n for d, h, n in duckdb.sql(
    f"select date::varchar, hour::varchar, count(*) from {rel} group by all").fetchall()}
users = dict(duckdb.sql(f"select user_id, count(*) from {rel} group by user_id").fetchall())
print(json.dumps({"by_event": by_event, "by_hour": by_hour, "users": users}))
"#;
    let out = std::process::Command::new(bin.join("python"))
        .args(["-c", script, cold_root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Committed segments per hour, from the admin listing.
fn files_per_hour(
    server: &TestServer,
    tenant: &Tenant,
) -> std::collections::BTreeMap<String, usize> {
    let listing = server
        .admin(
            "GET",
            &format!("/admin/v1/tenants/{}/segments", tenant.id),
            None,
        )
        .json();
    let mut hours = std::collections::BTreeMap::new();
    for segment in listing["segments"].as_array().unwrap() {
        *hours
            .entry(segment["hour"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    hours
}

fn admin_flush(server: &TestServer, tenant: &Tenant) -> u64 {
    let reply = server.admin(
        "POST",
        &format!("/admin/v1/flush?tenant={}", tenant.id),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["tenants"][0]["cold_watermark"]
        .as_u64()
        .unwrap()
}

#[test]
fn admin_flush_compaction_erasure_and_retention_agree_with_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    // Flushes and compactions only when asked: no periodic pass within the test.
    let env = [
        ("STATSREMOTE__STORAGE__HOT_RETENTION", "1s"),
        ("STATSREMOTE__COLD__FLUSH_INTERVAL", "1h"),
        ("STATSREMOTE__ROLLUPS__FLUSH_INTERVAL", "200ms"),
        ("STATSREMOTE__COLD__GRACE_PERIOD", "1h"),
        ("STATSREMOTE__COLD__COMPACT_MIN_SEGMENTS", "2"),
    ];
    let server = TestServer::start_in(dir.path(), &env);
    let tenant = server.create_tenant("lifecycle");
    // Four rounds of late events into the same two hours, six hours back: each flush adds a
    // small segment per hour, which the same pass merges with the hour's earlier one.
    let start = (now_secs() / HOUR - 6) * HOUR;
    let mut watermark = 0;
    for round in 0..4 {
        send(&server, &tenant, &format!("r{round}"), 100, start);
        std::thread::sleep(Duration::from_millis(1100));
        let reached = admin_flush(&server, &tenant);
        assert_eq!(
            reached,
            watermark + 100,
            "the admin flush moves everything due"
        );
        watermark = reached;
        let hours = files_per_hour(&server, &tenant);
        assert_eq!(hours.len(), 2, "{hours:?}");
        assert!(
            hours.values().all(|files| *files == 1),
            "compacted: {hours:?}"
        );
    }
    let cold_root = dir.path().join("cold");
    assert_eq!(
        parquet_files(&cold_root.join("events")).len(),
        2,
        "superseded files left events/"
    );
    // Rounds 2 to 4 each merged two segments in each of the two hours.
    assert_eq!(
        parquet_files(&cold_root.join("trash")).len(),
        12,
        "and wait out the grace period"
    );
    let everything = exported(&server, &tenant, start - HOUR, now_secs() + HOUR);
    assert_eq!(everything.len(), 400);
    assert!(
        everything.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "in sequence order"
    );

    // DuckDB over events/ agrees with the query API.
    let api = totals(&server, &tenant, start - HOUR, now_secs() + HOUR);
    let counted = duckdb_counts(&cold_root);
    for row in api["events"].as_array().unwrap() {
        let event = row["event"].as_str().unwrap();
        if event.starts_with('$') {
            continue;
        }
        assert_eq!(
            counted["by_event"][event], row["count"],
            "{event}: {counted}"
        );
    }
    assert_eq!(
        counted["by_hour"].as_object().unwrap().len(),
        2,
        "{counted}"
    );
    assert_eq!(
        counted["by_hour"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>(),
        400
    );

    // Per-user erasure: every event of u3 leaves both tiers; a hot event of u3 too.
    send(&server, &tenant, "hot", 20, now_secs() - 2 * HOUR);
    let u3_before = counted["users"]["u3"].as_u64().unwrap() + 2;
    let job = server.request_erasure(&tenant.id, "u3");
    assert_eq!(job["status"], "running");
    // Events keep arriving; those after the request are not the job's (u3 has 2 of them).
    send(&server, &tenant, "after", 20, now_secs() - 2 * HOUR);
    let done = server.wait_erasure(&job);
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["removed_events"].as_u64(), Some(u3_before), "{done}");
    assert!(done["rewritten_segments"].as_u64().unwrap() >= 2, "{done}");
    assert!(done["superseded_purged_by"].is_string(), "{done}");
    assert!(
        done["requested_by"]["token_fingerprint"].is_string(),
        "{done}"
    );
    let left = server.export(
        &tenant.read_key,
        &format!(
            "?from={}&to={}",
            rfc3339(start - HOUR),
            rfc3339(now_secs() + HOUR)
        ),
    );
    assert_eq!(left.len() as u64, 440 - u3_before);
    let u3_after: Vec<&str> = (left.iter())
        .filter(|event| event["userId"] == "u3")
        .map(|event| event["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        u3_after,
        vec!["after-6", "after-7"],
        "only what came after the request"
    );
    let counted = duckdb_counts(&cold_root);
    assert!(counted["users"].get("u3").is_none(), "{counted}");
    // Rollups are aggregates: they keep counting the erased events (documented).
    server.wait_rollups_caught_up(&tenant.read_key);
    let after = totals(&server, &tenant, start - 2 * HOUR, now_secs() + HOUR);
    let counts: u64 = (after["events"].as_array().unwrap().iter())
        .filter(|row| !row["event"].as_str().unwrap().starts_with('$'))
        .map(|row| row["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 440, "{after}");

    // Retention: segments of hours that ended more than 3h ago go; the recent hour stays.
    let patch = json!({ "settings": { "raw_retention": "3h" } });
    let reply = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(&patch),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    admin_flush(&server, &tenant);
    let hours = files_per_hour(&server, &tenant);
    let oldest_kept = rfc3339(now_secs() - 4 * HOUR);
    assert!(hours.keys().all(|hour| *hour > oldest_kept), "{hours:?}");
    let left = server.export(
        &tenant.read_key,
        &format!(
            "?from={}&to={}",
            rfc3339(start - HOUR),
            rfc3339(now_secs() + HOUR)
        ),
    );
    assert_eq!(left.len(), 40 - 2);
    // A rollup rebuild replays what is left: retention and the erasure left gaps in the tier.
    let path = format!("/admin/v1/tenants/{}/rollups/rebuild", tenant.id);
    assert_eq!(server.admin("POST", &path, None).status, 202);
    server.wait_rollups_caught_up(&tenant.read_key);
    let rebuilt = totals(&server, &tenant, start - 2 * HOUR, now_secs() + HOUR);
    let counts: u64 = (rebuilt["events"].as_array().unwrap().iter())
        .filter(|row| !row["event"].as_str().unwrap().starts_with('$'))
        .map(|row| row["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 38, "{rebuilt}");
    let metrics = server.metrics();
    assert!(
        metrics.contains("statsremote_cold_maintenance_events_removed_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("statsremote_hot_log_bytes_per_event")
            || metrics.contains("statsremote_hot_log_bytes "),
        "{metrics}"
    );

    // Restart: the erasure job is still there, and nothing comes back.
    drop(server);
    let server = TestServer::start_in(dir.path(), &env);
    let job_path = format!("/admin/v1/deletions/{}", job["id"].as_str().unwrap());
    assert_eq!(
        server.admin("GET", &job_path, None).json()["status"],
        "done"
    );
    let left = server.export(
        &tenant.read_key,
        &format!(
            "?from={}&to={}",
            rfc3339(start - HOUR),
            rfc3339(now_secs() + HOUR)
        ),
    );
    assert_eq!(left.len(), 38);
}
