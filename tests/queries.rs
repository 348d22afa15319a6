//! Query answers compared with brute force over the same generated events: several tenants,
//! late (out-of-order) events, hour and day boundaries; uniques at 100k+ users; funnels;
//! rollups identical across restarts, SIGKILL and a rebuild; cache invalidation by late events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Auth, Tenant, TestServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// One generated event (times in whole seconds).
#[derive(Debug, Clone)]
struct Ev {
    id: String,
    name: String,
    user: String,
    at: i64,
}

fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

fn parse(text: &str) -> i64 {
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn now_secs() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn send(server: &TestServer, tenant: &Tenant, events: &[Ev]) {
    for chunk in events.chunks(500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|e| json!({"type": "track", "event": e.name, "userId": e.user, "messageId": e.id, "timestamp": rfc3339(e.at)}))
            .collect();
        let reply = server.post_json(
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &json!({ "batch": batch }),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.json()["accepted"],
            chunk.len() as u64,
            "{}",
            reply.body
        );
    }
}

/// Waits until the stored rollups include every durable event (`as_of` caught up).
fn wait_caught_up(server: &TestServer, tenant: &Tenant, expected_seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = format!(
        "/v1/query/uniques?from={}&to={}",
        rfc3339(now_secs() - 30 * DAY),
        rfc3339(now_secs() + DAY)
    );
    loop {
        let reply = server.get(&path, Auth::Bearer(&tenant.read_key));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let as_of = &reply.json()["as_of"];
        let rolled = as_of["rolled_up_through_seq"].as_u64().unwrap();
        let log = as_of["log_seq"].as_u64().unwrap();
        if rolled == log && log == expected_seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rollups never caught up: {as_of} (expected {expected_seq})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn generate(
    rng: &mut StdRng,
    prefix: &str,
    count: usize,
    from: i64,
    to: i64,
    names: &[&str],
    users: usize,
) -> Vec<Ev> {
    (0..count)
        .map(|i| Ev {
            id: format!("{prefix}-{i}"),
            name: names[rng.random_range(0..names.len())].to_string(),
            user: format!("user-{}", rng.random_range(0..users)),
            at: rng.random_range(from..to),
        })
        .collect()
}

fn bucket(at: i64, width: i64) -> i64 {
    at.div_euclid(width) * width
}

/// Brute force: per bucket start, count and distinct users.
fn brute_series(
    events: &[Ev],
    name: Option<&str>,
    width: i64,
) -> BTreeMap<i64, (u64, HashSet<String>)> {
    let mut out: BTreeMap<i64, (u64, HashSet<String>)> = BTreeMap::new();
    for e in events.iter().filter(|e| name.is_none_or(|n| n == e.name)) {
        let entry = out.entry(bucket(e.at, width)).or_default();
        entry.0 += 1;
        entry.1.insert(e.user.clone());
    }
    out
}

fn check_everything(server: &TestServer, tenant: &Tenant, events: &[Ev], names: &[&str]) {
    let key = Auth::Bearer(&tenant.read_key);
    let first = events.iter().map(|e| e.at).min().unwrap();
    let last = events.iter().map(|e| e.at).max().unwrap();
    for (interval, width) in [("minute", MINUTE), ("hour", HOUR), ("day", DAY)] {
        let from = bucket(first, width);
        let to = bucket(last, width) + width;
        for name in names.iter().map(|n| Some(*n)).chain([None]) {
            let expected = brute_series(events, name, width);
            for metric in ["count", "uniques"] {
                let mut path = format!(
                    "/v1/query/series?metric={metric}&interval={interval}&from={}&to={}",
                    rfc3339(from),
                    rfc3339(to)
                );
                if let Some(name) = name {
                    path.push_str(&format!("&event={}", name.replace(' ', "%20")));
                }
                let reply = server.get(&path, key);
                assert_eq!(reply.status, 200, "{}", reply.body);
                let points = reply.json()["points"].as_array().unwrap().clone();
                assert_eq!(
                    points.len() as i64,
                    (to - from) / width,
                    "{interval} {name:?}: one point per bucket"
                );
                for point in &points {
                    let at = parse(point["ts"].as_str().unwrap());
                    let value = point["value"].as_u64().unwrap();
                    let want = expected
                        .get(&at)
                        .map(|(count, users)| {
                            if metric == "count" {
                                *count
                            } else {
                                users.len() as u64
                            }
                        })
                        .unwrap_or(0);
                    assert_eq!(
                        value,
                        want,
                        "{metric} {interval} {name:?} at {}",
                        rfc3339(at)
                    );
                }
            }
        }
    }
    // Events listing over the whole range: exact counts and (small) exact uniques, largest first.
    let from = bucket(first, MINUTE);
    let to = bucket(last, MINUTE) + MINUTE;
    let reply = server.get(
        &format!("/v1/query/events?from={}&to={}", rfc3339(from), rfc3339(to)),
        key,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let listed = reply.json()["events"].as_array().unwrap().clone();
    let mut expected: Vec<(String, u64, u64)> = names
        .iter()
        .map(|n| {
            let matching: Vec<&Ev> = events.iter().filter(|e| e.name == *n).collect();
            let users: HashSet<&str> = matching.iter().map(|e| e.user.as_str()).collect();
            (n.to_string(), matching.len() as u64, users.len() as u64)
        })
        .filter(|(_, count, _)| *count > 0)
        .collect();
    expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let got: Vec<(String, u64, u64)> = listed
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
                e["uniques"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    // Uniques over unaligned sub-ranges (rounded outward to the minute), merged across resolutions.
    for (start, end) in [
        (first + 17, last - 29),
        (first + DAY / 2, first + DAY / 2 + 3 * HOUR + 7),
    ] {
        if start >= end {
            continue;
        }
        let (aligned_from, aligned_to) = (bucket(start, MINUTE), bucket(end - 1, MINUTE) + MINUTE);
        for name in [Some(names[0]), None] {
            let want: HashSet<&str> = events
                .iter()
                .filter(|e| {
                    e.at >= aligned_from && e.at < aligned_to && name.is_none_or(|n| n == e.name)
                })
                .map(|e| e.user.as_str())
                .collect();
            let mut path = format!(
                "/v1/query/uniques?from={}&to={}",
                rfc3339(start),
                rfc3339(end)
            );
            if let Some(name) = name {
                path.push_str(&format!("&event={}", name.replace(' ', "%20")));
            }
            let reply = server.get(&path, key);
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(
                reply.json()["uniques"].as_u64().unwrap(),
                want.len() as u64,
                "{path}"
            );
        }
    }
}

/// A snapshot of answers that must not change across restarts.
fn snapshot(server: &TestServer, tenant: &Tenant, from: i64, to: i64) -> Vec<Value> {
    let key = Auth::Bearer(&tenant.read_key);
    let mut out = Vec::new();
    for path in [
        format!(
            "/v1/query/series?interval=hour&from={}&to={}",
            rfc3339(from),
            rfc3339(to)
        ),
        format!(
            "/v1/query/series?interval=day&metric=uniques&from={}&to={}",
            rfc3339(from),
            rfc3339(to)
        ),
        format!("/v1/query/events?from={}&to={}", rfc3339(from), rfc3339(to)),
        format!(
            "/v1/query/uniques?from={}&to={}",
            rfc3339(from),
            rfc3339(to)
        ),
    ] {
        let mut body = server.get(&path, key).json();
        body.as_object_mut().unwrap().remove("as_of");
        out.push(body);
    }
    out
}

#[test]
fn queries_match_brute_force_with_late_events_and_several_tenants() {
    let server = TestServer::start();
    let names = ["Signed Up", "Viewed", "Bought", "Shared"];
    let now = now_secs();
    // Three days ending an hour ago: crosses hour and day boundaries.
    let (from, to) = (now - 3 * DAY, now - HOUR);
    let mut rng = StdRng::seed_from_u64(7);
    let tenants: Vec<Tenant> = (0..3)
        .map(|i| server.create_tenant(&format!("t{i}")))
        .collect();
    let mut all: HashMap<usize, Vec<Ev>> = HashMap::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let events = generate(&mut rng, &format!("t{index}-a"), 1500, from, to, &names, 40);
        send(&server, tenant, &events);
        all.insert(index, events);
    }
    for (index, tenant) in tenants.iter().enumerate() {
        wait_caught_up(&server, tenant, 1500);
        // Late wave: older events arrive after their buckets were flushed to storage.
        let late = generate(
            &mut rng,
            &format!("t{index}-late"),
            500,
            from,
            from + DAY,
            &names,
            60,
        );
        send(&server, tenant, &late);
        all.get_mut(&index).unwrap().extend(late);
    }
    for (index, tenant) in tenants.iter().enumerate() {
        wait_caught_up(&server, tenant, 2000);
        check_everything(&server, tenant, &all[&index], &names);
    }
}

#[test]
fn uniques_stay_within_the_error_bound_at_120k_users() {
    let server = TestServer::start();
    let tenant = server.create_tenant("many");
    let users = 120_000usize;
    let at = bucket(now_secs() - 2 * DAY, DAY) + 10 * HOUR;
    let events: Vec<Ev> = (0..users)
        .map(|i| Ev {
            id: format!("u{i}"),
            name: "Seen".into(),
            user: format!("user-{i}"),
            at: at + (i as i64 % 3000),
        })
        .collect();
    for chunk in events.chunks(5000) {
        send(&server, &tenant, chunk);
    }
    wait_caught_up(&server, &tenant, users as u64);
    let key = Auth::Bearer(&tenant.read_key);
    let day = server.get(
        &format!(
            "/v1/query/series?interval=day&metric=uniques&from={}&to={}",
            rfc3339(bucket(at, DAY)),
            rfc3339(bucket(at, DAY) + DAY)
        ),
        key,
    );
    // HyperLogLog++ at precision 16 has a standard error of 0.41%, and each run hashes the users
    // with a new tenant's random key: a bound of 1% (2.5 standard errors) failed about one run
    // in seventy. 2% is 4.9 standard errors (about one run in a million), still far below what
    // a broken merge or a lost flush would show.
    let value = day.json()["points"][0]["value"].as_u64().unwrap() as f64;
    let error = (value - users as f64).abs() / users as f64;
    assert!(
        error <= 0.02,
        "day uniques {value} vs {users}: error {error}"
    );
    let hour = server.get(
        &format!(
            "/v1/query/series?interval=hour&metric=uniques&from={}&to={}",
            rfc3339(bucket(at, HOUR)),
            rfc3339(bucket(at, HOUR) + HOUR)
        ),
        key,
    );
    let value = hour.json()["points"][0]["value"].as_u64().unwrap() as f64;
    let error = (value - users as f64).abs() / users as f64;
    assert!(
        error <= 0.02,
        "hour uniques {value} vs {users}: error {error}"
    );
    let range = server.get(
        &format!(
            "/v1/query/uniques?from={}&to={}",
            rfc3339(at - 3 * DAY),
            rfc3339(at + DAY)
        ),
        key,
    );
    let value = range.json()["uniques"].as_u64().unwrap() as f64;
    assert!(
        (value - users as f64).abs() / users as f64 <= 0.02,
        "range uniques {value}"
    );
}

#[test]
fn rollups_are_identical_after_restart_sigkill_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b", "c"];
    let now = now_secs();
    let (from, to) = (now - 2 * DAY, now - HOUR);
    let mut rng = StdRng::seed_from_u64(11);
    let server = TestServer::start_in(dir.path(), &[]);
    let tenant = server.create_tenant("restarts");
    let mut events = generate(&mut rng, "first", 2000, from, to, &names, 30);
    send(&server, &tenant, &events);
    wait_caught_up(&server, &tenant, 2000);
    let range = (bucket(from, DAY), bucket(to, DAY) + DAY);
    let before = snapshot(&server, &tenant, range.0, range.1);
    assert!(server.terminate().success());

    let server = TestServer::start_in(dir.path(), &[]);
    wait_caught_up(&server, &tenant, 2000);
    assert_eq!(
        snapshot(&server, &tenant, range.0, range.1),
        before,
        "after a clean restart"
    );

    // SIGKILL right after more events were acknowledged: some are not yet rolled up.
    let more = generate(&mut rng, "second", 3000, from, to, &names, 30);
    send(&server, &tenant, &more);
    server.kill();
    events.extend(more);
    let server = TestServer::start_in(dir.path(), &[]);
    wait_caught_up(&server, &tenant, 5000);
    check_everything(&server, &tenant, &events, &names);
    let after_kill = snapshot(&server, &tenant, range.0, range.1);

    let rebuild = server.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/rollups/rebuild", tenant.id),
        None,
    );
    assert_eq!(rebuild.status, 202, "{}", rebuild.body);
    wait_caught_up(&server, &tenant, 5000);
    assert_eq!(
        snapshot(&server, &tenant, range.0, range.1),
        after_kill,
        "after a rebuild"
    );
}

#[test]
fn late_events_invalidate_cached_answers() {
    let server = TestServer::start();
    let tenant = server.create_tenant("cache");
    let day = bucket(now_secs() - 3 * DAY, DAY);
    let ev = |id: &str, at: i64| Ev {
        id: id.into(),
        name: "e".into(),
        user: "u".into(),
        at,
    };
    send(&server, &tenant, &[ev("1", day + HOUR)]);
    wait_caught_up(&server, &tenant, 1);
    let path = format!(
        "/v1/query/series?interval=day&from={}&to={}",
        rfc3339(day),
        rfc3339(day + DAY)
    );
    let count = |server: &TestServer| {
        server.get(&path, Auth::Bearer(&tenant.read_key)).json()["points"][0]["value"]
            .as_u64()
            .unwrap()
    };
    // A minute series over the same day is built from 24 hour blocks, cached once rendered.
    let minutes = format!(
        "/v1/query/series?interval=minute&from={}&to={}",
        rfc3339(day),
        rfc3339(day + DAY)
    );
    let minute_counts = |server: &TestServer| -> Vec<u64> {
        let reply = server.get(&minutes, Auth::Bearer(&tenant.read_key));
        // Streamed from the blocks, yet announced with its length (no chunked encoding).
        let length = reply.body.len().to_string();
        assert_eq!(reply.header("content-length"), Some(length.as_str()));
        let answer = reply.json();
        let points = answer["points"].as_array().unwrap();
        points
            .iter()
            .map(|p| p["value"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(count(&server), 1);
    assert_eq!(count(&server), 1); // served from the cache
    let before = minute_counts(&server);
    assert_eq!(before.len(), 1440);
    assert_eq!(minute_counts(&server), before); // served from the cached blocks
    assert_eq!(before.iter().sum::<u64>(), 1);
    assert!(server
        .metrics()
        .contains("statsremote_query_cache_hits_total"));
    send(&server, &tenant, &[ev("2", day + 2 * HOUR)]);
    wait_caught_up(&server, &tenant, 2);
    // The flush invalidates the cached answers after its watermark becomes visible.
    common::poll(Duration::from_secs(30), || match count(&server) {
        2 => Ok(()),
        n => Err(format!(
            "the late event did not invalidate the cached answer: {n}"
        )),
    });
    let after = minute_counts(&server);
    assert_eq!((after[60], after[120]), (1, 1), "and the cached block");
    assert_eq!(after.iter().sum::<u64>(), 2);
    // The compact format: the same values, without timestamps.
    let compact = server
        .get(
            &format!("{minutes}&format=values"),
            Auth::Bearer(&tenant.read_key),
        )
        .json();
    let values: Vec<u64> = compact["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(values, after);
    assert!(compact.get("points").is_none());
    assert_eq!(parse(compact["from"].as_str().unwrap()), day);
}

fn funnel(
    server: &TestServer,
    tenant: &Tenant,
    steps: &[&str],
    window: &str,
    from: i64,
    to: i64,
) -> Vec<u64> {
    let reply = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&tenant.read_key),
        &json!({"steps": steps, "window": window, "from": rfc3339(from), "to": rfc3339(to)}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["users"].as_u64().unwrap())
        .collect()
}

#[test]
fn funnels_respect_order_window_edges_and_repeated_steps() {
    let server = TestServer::start();
    let tenant = server.create_tenant("funnel");
    let t0 = bucket(now_secs() - DAY, HOUR);
    let ev = |user: &str, name: &str, offset: i64| Ev {
        id: format!("{user}-{name}-{offset}"),
        name: name.into(),
        user: user.into(),
        at: t0 + offset,
    };
    let events = vec![
        // u1: a, b, c in order within 10 minutes.
        ev("u1", "a", 0),
        ev("u1", "b", 60),
        ev("u1", "c", 120),
        // u2: c before b: reaches b only.
        ev("u2", "a", 0),
        ev("u2", "c", 30),
        ev("u2", "b", 60),
        // u3: b exactly at the window edge (600 s, inside), c one second past it (outside).
        ev("u3", "a", 0),
        ev("u3", "b", 600),
        ev("u3", "c", 601),
        // u4: only b and c, no a.
        ev("u4", "b", 0),
        ev("u4", "c", 10),
        // u5: a, then a again later, then b and c within the window of the second a.
        ev("u5", "a", 0),
        ev("u5", "a", 3000),
        ev("u5", "b", 3100),
        ev("u5", "c", 3200),
        // u6: a, b, a (repeated step), nothing else.
        ev("u6", "a", 0),
        ev("u6", "b", 10),
        ev("u6", "a", 20),
    ];
    send(&server, &tenant, &events);
    let (from, to) = (t0 - HOUR, t0 + 2 * HOUR);
    assert_eq!(
        funnel(&server, &tenant, &["a", "b", "c"], "10m", from, to),
        vec![5, 5, 2]
    );
    // A window one second shorter loses u3 at b (b at exactly 600 s).
    assert_eq!(
        funnel(&server, &tenant, &["a", "b", "c"], "599s", from, to),
        vec![5, 4, 2]
    );
    // Repeated steps: a -> b -> a.
    assert_eq!(
        funnel(&server, &tenant, &["a", "b", "a"], "1h", from, to),
        vec![5, 5, 1]
    );
    // The range limits the events considered.
    assert_eq!(
        funnel(&server, &tenant, &["a", "b", "c"], "1h", t0 + 2000, to),
        vec![1, 1, 1]
    );
    // Bad input names the field.
    let bad = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&tenant.read_key),
        &json!({"steps": [], "window": "1h", "from": rfc3339(from), "to": rfc3339(to)}),
    );
    assert!(bad.problem(400).contains("steps"));
    let bad = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&tenant.read_key),
        &json!({"steps": ["a"], "window": "soon", "from": rfc3339(from), "to": rfc3339(to)}),
    );
    assert!(bad.problem(400).contains("window"));
}

#[test]
fn bad_query_parameters_name_the_parameter() {
    let server = TestServer::start();
    let tenant = server.create_tenant("params");
    let key = Auth::Bearer(&tenant.read_key);
    let now = now_secs();
    let range = format!("from={}&to={}", rfc3339(now - DAY), rfc3339(now));
    for (query, needle) in [
        (format!("/v1/query/series?metric=sum&{range}"), "`metric`"),
        (format!("/v1/query/series?format=csv&{range}"), "`format`"),
        (
            format!("/v1/query/series?interval=week&{range}"),
            "`interval`",
        ),
        ("/v1/query/series?interval=hour".to_string(), "`from`"),
        (
            format!("/v1/query/series?from={}&to=never", rfc3339(now)),
            "`to`",
        ),
        (
            format!(
                "/v1/query/series?interval=minute&from={}&to={}",
                rfc3339(now - 40 * DAY),
                rfc3339(now)
            ),
            "interval=minute",
        ),
        (format!("/v1/query/events?{range}&limit=0"), "`limit`"),
        (format!("/v1/query/uniques?{range}&colour=red"), "colour"),
    ] {
        let detail = server.get(&query, key).problem(400);
        assert!(detail.contains(needle), "{query}: {detail}");
    }
    server
        .get(
            &format!("/v1/query/series?{range}"),
            Auth::Bearer(&tenant.write_key),
        )
        .problem(403);
    server
        .get(&format!("/v1/query/series?{range}"), Auth::None)
        .problem(401);
}

#[test]
fn rebuilds_during_ingestion_end_exact() {
    let server = std::sync::Arc::new(TestServer::start());
    let tenant = server.create_tenant("busy");
    let names = ["x", "y"];
    let now = now_secs();
    let mut rng = StdRng::seed_from_u64(5);
    let events = generate(&mut rng, "busy", 6000, now - DAY, now - HOUR, &names, 25);
    let sender = {
        let server = std::sync::Arc::clone(&server);
        let tenant = tenant.clone();
        let events = events.clone();
        std::thread::spawn(move || {
            for chunk in events.chunks(200) {
                send(&server, &tenant, chunk);
            }
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        let reply = server.admin(
            "POST",
            &format!("/admin/v1/tenants/{}/rollups/rebuild", tenant.id),
            None,
        );
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
    sender.join().unwrap();
    wait_caught_up(&server, &tenant, 6000);
    check_everything(&server, &tenant, &events, &names);
}

#[test]
fn events_past_a_resolutions_retention_skip_only_that_resolution() {
    let server = TestServer::start_with_env(&[("STATSREMOTE__ROLLUPS__MINUTE_RETENTION", "1h")]);
    let tenant = server.create_tenant("retention");
    let old = bucket(now_secs() - 3 * HOUR, HOUR) + 5 * MINUTE;
    send(
        &server,
        &tenant,
        &[Ev {
            id: "old".into(),
            name: "e".into(),
            user: "u".into(),
            at: old,
        }],
    );
    wait_caught_up(&server, &tenant, 1);
    let key = Auth::Bearer(&tenant.read_key);
    let minute = server.get(
        &format!(
            "/v1/query/series?interval=minute&from={}&to={}",
            rfc3339(bucket(old, HOUR)),
            rfc3339(bucket(old, HOUR) + HOUR)
        ),
        key,
    );
    assert!(minute.json()["points"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["value"] == 0));
    let hour = server.get(
        &format!(
            "/v1/query/series?interval=hour&from={}&to={}",
            rfc3339(bucket(old, HOUR)),
            rfc3339(bucket(old, HOUR) + HOUR)
        ),
        key,
    );
    assert_eq!(hour.json()["points"][0]["value"], 1);
    // Counted once the flush's watermark is visible, a moment later.
    common::poll(Duration::from_secs(30), || {
        let metrics = server.metrics();
        let skipped = metrics.lines().any(|l| {
            l.starts_with("statsremote_rollup_skipped_events_total")
                && l.contains("minute")
                && l.ends_with(" 1")
        });
        if skipped {
            Ok(())
        } else {
            Err(metrics)
        }
    });
}
