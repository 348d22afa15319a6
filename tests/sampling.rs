//! Weighted sampling: the estimators' accuracy against the unsampled truth over many seeds, and
//! the whole path through the real server (setting, reply, export, rollups, queries, funnels,
//! dedup before sampling, metrics).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};
use statsremote::enrich::user_hash;
use statsremote::rollup::Sketch;
use statsremote::sampling::{estimate_count, estimate_users, keeps, Estimate};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Event names with their weights (rates 1/10, 1/2, exempt).
const VIEW: (&str, u32) = ("view", 10);
const CLICK: (&str, u32) = ("click", 2);
const SIGNUP: (&str, u32) = ("signup", 1);

/// A deterministic generator (splitmix64), so that every seed's data is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One user's events by name: every user views 1–6 times, half click 1–3 times, one in five
/// signs up once.
fn journey(rng: &mut Rng) -> Vec<((&'static str, u32), u64)> {
    let mut events = vec![(VIEW, 1 + rng.below(6))];
    if rng.below(2) == 0 {
        events.push((CLICK, 1 + rng.below(3)));
    }
    if rng.below(5) == 0 {
        events.push((SIGNUP, 1));
    }
    events
}

/// What the rollups hold of one series: the weighted count, the unsampled users, and per
/// weight the kept events and users.
#[derive(Default)]
struct Series {
    true_count: u64,
    true_users: BTreeSet<u64>,
    count: u64,
    users: Sketch,
    kept: BTreeMap<u32, (u64, Sketch)>,
}

impl Series {
    fn add(&mut self, hash: u64, weight: u32, events: u64) {
        self.true_count += events;
        self.true_users.insert(hash);
        if !keeps(hash, weight) {
            return;
        }
        self.count += events * u64::from(weight);
        if weight == 1 {
            self.users.insert_hash(hash);
        } else {
            let kept = self.kept.entry(weight).or_default();
            kept.0 += events;
            kept.1.insert_hash(hash);
        }
    }

    fn estimates(&self) -> (Estimate, Estimate) {
        let weighted: u64 = self.kept.iter().map(|(w, k)| u64::from(*w) * k.0).sum();
        let counts: Vec<(u32, u64, f64)> = (self.kept.iter())
            .map(|(w, (events, users))| (*w, *events, users.estimate() as f64))
            .collect();
        let users: Vec<(u32, &Sketch)> = self.kept.iter().map(|(w, k)| (*w, &k.1)).collect();
        (
            estimate_count(self.count - weighted, &counts),
            estimate_users(Some(&self.users), &users),
        )
    }
}

/// Over 200 seeds (tenant key and data), each series' count and distinct users are compared
/// with the unsampled truth: the truth is within the stated 95% bound for nearly every seed
/// (the count's bound assumes users send similar numbers of events, which these users nearly
/// do), and the estimates are unbiased.
#[test]
fn sampled_counts_and_uniques_are_within_the_stated_error_over_many_seeds() {
    const SEEDS: u64 = 200;
    let names = ["view", "click", "signup", "all"];
    // Per series and metric: seeds within the bound, summed signed relative error, bounds.
    let mut within = [[0u64; 2]; 4];
    let mut signed = [[0f64; 2]; 4];
    let mut bounds = [[0f64; 2]; 4];
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&rng.next().to_le_bytes());
        let mut series: Vec<Series> = (0..4).map(|_| Series::default()).collect();
        for user in 0..3000u64 {
            let hash = user_hash(&key, &format!("user-{seed}-{user}"));
            for ((name, weight), events) in journey(&mut rng) {
                let at = names.iter().position(|n| *n == name).unwrap();
                series[at].add(hash, weight, events);
                series[3].add(hash, weight, events);
            }
        }
        for (at, series) in series.iter().enumerate() {
            let (count, users) = series.estimates();
            let truths = [series.true_count as f64, series.true_users.len() as f64];
            for (metric, (estimate, truth)) in [count, users].iter().zip(truths).enumerate() {
                let off = (estimate.value - truth) / truth;
                // Sketch error (HyperLogLog, ≈0.4%) comes on top of the sampling's.
                let bound = estimate.relative_error.unwrap_or(0.0) + 0.01;
                within[at][metric] += u64::from(off.abs() <= bound);
                signed[at][metric] += off;
                bounds[at][metric] += bound;
            }
        }
    }
    for (at, name) in names.iter().enumerate() {
        for (metric, what) in ["count", "uniques"].iter().enumerate() {
            let coverage = within[at][metric] as f64 / SEEDS as f64;
            let bias = signed[at][metric] / SEEDS as f64;
            let bound = bounds[at][metric] / SEEDS as f64;
            eprintln!("{name} {what}: within the bound for {coverage:.3} of seeds, mean error {bias:+.4}, mean bound {bound:.4}");
            assert!(coverage >= 0.9, "{name} {what}: coverage {coverage}");
            // Unbiased: the mean error is well inside the standard error of a mean of 200.
            assert!(bias.abs() < bound / 4.0, "{name} {what}: bias {bias}");
        }
    }
}

fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

fn event(id: &str, user: &str, name: &str, at: i64) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": name,
           "timestamp": rfc3339(at)})
}

fn send(server: &TestServer, tenant: &Tenant, events: &[Value]) -> Value {
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": events }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn query(server: &TestServer, tenant: &Tenant, path: &str) -> Value {
    let reply = server.get(path, Auth::Bearer(&tenant.read_key));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// `estimate` is within twice its stated 95% bound (plus the sketch's error) of `truth`.
fn close(what: &str, estimate: f64, truth: f64, error: f64) {
    let off = (estimate - truth).abs() / truth;
    assert!(
        off <= 2.0 * error + 0.01,
        "{what}: {estimate} for {truth}, off by {off:.4}, stated {error:.4}"
    );
}

#[test]
fn sampling_through_the_server() {
    let server = TestServer::start();
    let tenant = server.create_tenant_with(json!({"name": "sampled", "settings": {
        "rate_limit_events_per_second": 1_000_000, "rate_limit_burst": 1_000_000}}));
    // Rates are validated and named in the error.
    let bad = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(&json!({"settings": {"sampling": {"events": {"view": 0}}}})),
    );
    assert!(bad.problem(400).contains("(0, 1]"), "{}", bad.body);
    let set = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(&json!({"settings": {"sampling": {
            "default": 1.0, "events": {"view": 0.1, "click": 0.5, "signup": 0.1},
            "exempt": ["signup"]}}})),
    );
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(
        set.json()["settings"]["sampling"]["events"]["view"],
        json!(0.1)
    );

    // 3000 users: each signs up, then views 1-4 times within the hour; half click.
    let t0 = (OffsetDateTime::now_utc().unix_timestamp() - 86_400) / 3600 * 3600;
    let mut rng = Rng(7);
    let mut events = Vec::new();
    let mut truth: BTreeMap<&str, (u64, BTreeSet<String>)> = BTreeMap::new();
    for user in 0..3000 {
        let who = format!("u{user}");
        let mut add = |name: &'static str, at: i64, events: &mut Vec<Value>| {
            let id = format!("{who}-{}", events.len());
            events.push(event(&id, &who, name, at));
            let entry = truth.entry(name).or_default();
            entry.0 += 1;
            entry.1.insert(who.clone());
        };
        add("signup", t0 + 60, &mut events);
        for view in 0..1 + rng.below(4) {
            add("view", t0 + 120 + view as i64, &mut events);
        }
        if rng.below(2) == 0 {
            add("click", t0 + 300, &mut events);
        }
    }
    let mut accepted = 0;
    let mut sampled_out = 0;
    let mut first_reply = Value::Null;
    for chunk in events.chunks(500) {
        let reply = send(&server, &tenant, chunk);
        accepted += reply["accepted"].as_u64().unwrap();
        sampled_out += reply["sampled_out"].as_u64().unwrap_or(0);
        if first_reply.is_null() {
            first_reply = reply;
        }
    }
    assert_eq!(accepted + sampled_out, events.len() as u64);
    assert!(sampled_out > events.len() as u64 / 2, "{sampled_out}");
    server.wait_rollups_caught_up(&tenant.read_key);

    // Stored events carry their weight; exempt ones none.
    let exported = server.export(&tenant.read_key, "");
    assert_eq!(exported.len() as u64, accepted);
    for stored in &exported {
        let weight = &stored["statsremote"]["weight"];
        match stored["event"].as_str().unwrap() {
            "view" => assert_eq!(weight, &json!(10)),
            "click" => assert_eq!(weight, &json!(2)),
            _ => assert!(weight.is_null(), "{stored}"),
        }
    }

    // Totals per event: weighted counts and scaled uniques within the stated error; the exempt
    // event exact, with no error stated.
    let range = format!("from={}&to={}", rfc3339(t0), rfc3339(t0 + 3600));
    let totals = query(&server, &tenant, &format!("/v1/query/events?{range}"));
    for total in totals["events"].as_array().unwrap() {
        let name = total["event"].as_str().unwrap();
        let (count, users) = &truth[name];
        if name == "signup" {
            assert_eq!(total["count"], json!(*count), "{total}");
            assert!(total.get("relative_error").is_none(), "{total}");
            continue;
        }
        let error = &total["relative_error"];
        close(
            name,
            total["count"].as_f64().unwrap(),
            *count as f64,
            error["count"].as_f64().unwrap(),
        );
        close(
            name,
            total["uniques"].as_f64().unwrap(),
            users.len() as f64,
            error["uniques"].as_f64().unwrap(),
        );
    }
    // Distinct users of all events: every user signed up (exempt), so the estimate is the
    // unsampled users plus nothing: exact up to the sketch.
    let all = query(&server, &tenant, &format!("/v1/query/uniques?{range}"));
    close("all users", all["uniques"].as_f64().unwrap(), 3000.0, 0.0);
    let views = query(
        &server,
        &tenant,
        &format!("/v1/query/uniques?event=view&{range}"),
    );
    close(
        "view users",
        views["uniques"].as_f64().unwrap(),
        3000.0,
        views["relative_error"].as_f64().unwrap(),
    );
    // The series says which rates it was sampled at, and each sampled point its error.
    let series = query(
        &server,
        &tenant,
        &format!("/v1/query/series?event=view&interval=hour&{range}"),
    );
    assert_eq!(series["sampled_rates"], json!([0.1]));
    let point = &series["points"][0];
    close(
        "view series",
        point["value"].as_f64().unwrap(),
        truth["view"].0 as f64,
        point["relative_error"].as_f64().unwrap(),
    );

    // Funnel signup → view: the first step exact, the second weighted.
    let funnel = server.post_json(
        "/v1/query/funnel",
        Auth::Bearer(&tenant.read_key),
        &json!({"steps": ["signup", "view"], "window": "1h",
                "from": rfc3339(t0), "to": rfc3339(t0 + 3600)}),
    );
    assert_eq!(funnel.status, 200, "{}", funnel.body);
    let steps = funnel.json()["steps"].clone();
    assert_eq!(steps[0]["users"], json!(3000), "{steps}");
    assert_eq!(steps[0]["relative_error"], json!(0.0), "{steps}");
    close(
        "funnel step 2",
        steps[1]["users"].as_f64().unwrap(),
        3000.0,
        steps[1]["relative_error"].as_f64().unwrap(),
    );

    // Dedup comes before sampling: the first batch sent again under a lower rate is all
    // duplicates (the kept ones) and sampled-out events (nested: dropped at 0.1, dropped at
    // 0.01).
    let lower = server.admin(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        Some(
            &json!({"settings": {"sampling": {"events": {"view": 0.01, "click": 0.5},
                                               "exempt": ["signup"]}}}),
        ),
    );
    assert_eq!(lower.status, 200, "{}", lower.body);
    let again = send(&server, &tenant, &events[..500]);
    assert_eq!(again["accepted"], json!(0), "{again}");
    assert_eq!(again["duplicates"], first_reply["accepted"], "{again}");
    assert_eq!(again["sampled_out"], first_reply["sampled_out"], "{again}");

    // PostHog v1 answers sampled-out events `ok` (not to be resent) with why.
    let batch: Vec<Value> = (0..40)
        .map(|i| json!({"uuid": format!("ph-{i}"), "event": "view", "distinct_id": format!("ph-user-{i}"),
                        "timestamp": rfc3339(t0 + 600)}))
        .collect();
    let reply = server.request(
        "POST",
        "/i/v1/analytics/events",
        Auth::Bearer(&tenant.write_key),
        &[("Content-Type", "application/json")],
        Some(json!({ "batch": batch }).to_string().as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json()["results"].clone();
    let details: Vec<&str> = (0..40)
        .map(|i| results[format!("ph-{i}")]["details"].as_str().unwrap())
        .collect();
    let posthog_sampled = details.iter().filter(|d| **d == "sampled_out").count() as u64;
    assert!(posthog_sampled >= 30, "{results}");
    assert!(
        details
            .iter()
            .all(|d| *d == "sampled_out" || *d == "stored"),
        "{results}"
    );

    let metrics = server.metrics();
    let line = metrics
        .lines()
        .find(|line| line.starts_with("statsremote_sampled_out_total"))
        .expect("sampled-out counter");
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        counted as u64,
        sampled_out + first_reply["sampled_out"].as_u64().unwrap() + posthog_sampled
    );
}
