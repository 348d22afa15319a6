//! The Prometheus rules of `deploy/prometheus` against the real server's `/metrics`.
//!
//! `promtool` (Debian's, unpacked by `scripts/promtool-env.sh`) checks the rules and runs
//! their fixtures, then evaluates them over what the server exported under load: two scrapes,
//! extended as if the server kept going at the same pace for 40 minutes, so that the rules see
//! the metric names and labels the server really writes. Under that healthy load the SLIs
//! must come out as the load made them (availability 1, the dead-letter ratio the test caused)
//! and no alert may fire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Auth, TestServer};
use serde_json::{json, Value};

const RULES: &str = "deploy/prometheus/statsremote.rules.yml";
const FIXTURES: &str = "deploy/prometheus/tests/statsremote.test.yml";

/// Alerts on the ack latency: a shared test machine cannot promise them either way, so the
/// scraped run only evaluates their recording rules.
const MACHINE_DEPENDENT: [&str; 2] = ["StatsRemoteAckLatencyHigh", "StatsRemoteAckLatencyCritical"];

fn root() -> PathBuf {
    testkit::envs::workspace_root()
}

fn promtool(args: &[&str]) -> String {
    let tool = testkit::envs::promtool().expect("promtool");
    let output = std::process::Command::new(tool)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_check_and_their_fixtures_pass() {
    let checked = promtool(&["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", FIXTURES]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every metric the rules and the Grafana dashboard read is one the server defines, so a
/// renamed metric cannot leave an alert or a panel silently empty.
#[test]
fn the_rules_and_the_dashboard_read_metrics_the_server_exports() {
    let defined = std::fs::read_to_string(root().join("src/telemetry.rs")).unwrap();
    for file in [RULES, "deploy/grafana/statsremote.json"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let mut used: Vec<&str> = (text.match_indices("statsremote_"))
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        assert!(used.len() >= 5, "{file}: {used:?}");
        for name in used {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                defined.contains(&format!("\"{family}\"")),
                "{file} reads {name}, which src/telemetry.rs does not define"
            );
        }
    }
}

/// One scrape: every sample by its series (name and labels as written), and each metric
/// family's type.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

fn scrape(server: &TestServer) -> Scrape {
    let text = server.metrics();
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            types.insert(
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            );
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            samples.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
    }
    Scrape { samples, types }
}

/// Whether `series` counts up (a counter, or a histogram's or summary's parts).
fn counts_up(series: &str, types: &BTreeMap<String, String>) -> bool {
    let name = series.split('{').next().unwrap();
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|family| types.contains_key(*family))
        .unwrap_or(name);
    matches!(
        types.get(family).map(String::as_str),
        Some("counter" | "histogram" | "summary")
    )
}

/// `series` with the labels Prometheus adds at scrape time.
fn as_scraped(series: &str) -> String {
    const TARGET: &str = r#"job="statsremote",instance="127.0.0.1:8080""#;
    match series.split_once('{') {
        Some((name, labels)) => format!("{name}{{{TARGET},{labels}"),
        None => format!("{series}{{{TARGET}}}"),
    }
}

/// The rules' alert names.
fn alert_names(rules: &Path) -> Vec<String> {
    (std::fs::read_to_string(rules).unwrap().lines())
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect()
}

fn send(server: &TestServer, tenant: &common::Tenant, batch: &[Value]) -> u16 {
    let reply = server.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": batch }),
    );
    reply.status
}

#[test]
fn the_rules_evaluate_over_metrics_scraped_under_load() {
    let server = TestServer::start();
    let tenant = server.create_tenant("slo");
    let schema =
        json!({"schema": {"type": "object", "required": ["plan"]}, "enforcement": "reject"});
    let path = format!("/admin/v1/tenants/{}/schemas/Checked", tenant.id);
    assert_eq!(server.admin("PUT", &path, Some(&schema)).status, 201);
    let mut n = 0;
    let mut batch = |size: usize, refused: usize| -> Vec<Value> {
        (0..size)
            .map(|i| {
                n += 1;
                let name = if i < refused { "Checked" } else { "Viewed" };
                json!({"type": "track", "event": name, "userId": format!("u{}", n % 300),
                       "messageId": format!("slo-{n}")})
            })
            .collect()
    };
    // Every series the rules read exists before the first scrape, as on a running server.
    assert_eq!(send(&server, &tenant, &batch(10, 1)), 200);
    assert_eq!(send(&server, &tenant, &[json!({"type": "track"})]), 400);
    server.wait_rollups_caught_up(&tenant.read_key);
    let first = scrape(&server);

    // Load: batches of 100 events, one in every 200 refused by the plan (a dead letter; the
    // objective allows 1%), and a client error now and then (not the service's fault: no
    // error budget spent).
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let refused = usize::from(requests % 2 == 0);
        assert_eq!(send(&server, &tenant, &batch(100, refused)), 200);
        requests += 1;
        if requests % 10 == 0 {
            assert_eq!(send(&server, &tenant, &[json!({"type": "track"})]), 400);
        }
    }
    server.wait_rollups_caught_up(&tenant.read_key);
    // The rollup actor reports its freshness just after its flush is stored, a moment after
    // the query API can see the flush: scrape once it has.
    let reported = Instant::now();
    let second = loop {
        let scraped = scrape(&server);
        let age = (scraped.samples.iter())
            .filter(|(series, _)| series.starts_with("statsremote_rollup_watermark_age_seconds"))
            .map(|(_, age)| *age)
            .fold(0.0, f64::max);
        if age < 0.5 || reported.elapsed() > Duration::from_secs(5) {
            break scraped;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    // The two scrapes a minute apart, then the same pace for 40 minutes.
    let mut input_series = Vec::new();
    for (series, last) in &second.samples {
        let before = first.samples.get(series).copied().unwrap_or(0.0);
        let values = if counts_up(series, &second.types) {
            format!("{before}+{}x40", last - before)
        } else {
            format!("{last}x40")
        };
        input_series.push(json!({"series": as_scraped(series), "values": values}));
    }
    input_series.push(json!({"series": as_scraped("up"), "values": "1x40"}));

    let delta = |name: &str, filter: &dyn Fn(&str) -> bool| -> f64 {
        (second.samples.iter())
            .filter(|(series, _)| series.split('{').next() == Some(name) && filter(series))
            .map(|(series, last)| last - first.samples.get(series).copied().unwrap_or(0.0))
            .sum()
    };
    let letters = delta("statsremote_dead_letters_total", &|_| true);
    let reached = delta("statsremote_ingest_events_total", &|series| {
        ["accepted", "duplicate", "rejected"]
            .iter()
            .any(|outcome| series.contains(&format!("outcome=\"{outcome}\"")))
    });
    assert!(letters > 0.0 && reached > letters, "{letters} of {reached}");
    let ratio = letters / reached;
    println!(
        "{requests} batches in {:?}: {letters} dead letters of {reached} events (ratio {ratio:.4})",
        started.elapsed()
    );

    let rules = root().join(RULES);
    let job = r#"{job="statsremote"}"#;
    let alerts: Vec<Value> = (alert_names(&rules).into_iter())
        .filter(|name| !MACHINE_DEPENDENT.contains(&name.as_str()))
        .map(|name| json!({"eval_time": "40m", "alertname": name, "exp_alerts": []}))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let at = "40m";
    let fixture = json!({
        "rule_files": [rules],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input_series,
            "promql_expr_test": [
                {"expr": "statsremote:ingest_availability:ratio_rate5m", "eval_time": at,
                 "exp_samples": [{"labels": format!("statsremote:ingest_availability:ratio_rate5m{job}"), "value": 1}]},
                {"expr": "statsremote:ingest_availability:ratio_rate1h", "eval_time": at,
                 "exp_samples": [{"labels": format!("statsremote:ingest_availability:ratio_rate1h{job}"), "value": 1}]},
                // The dead-letter ratio the load made, to a millionth.
                {"expr": "round(statsremote:dead_letters:ratio_rate5m * 1e6)", "eval_time": at,
                 "exp_samples": [{"labels": job, "value": (ratio * 1e6).round()}]},
                // A p99 was measured, within the histogram's range.
                {"expr": "count(statsremote:ingest_ack_latency_seconds:p99_5m > 0 <= 5)", "eval_time": at,
                 "exp_samples": [{"labels": "{}", "value": 1}]},
                // The rollups had caught up when scraped (to within the last report).
                {"expr": "round(statsremote:rollup_watermark_age_seconds:max)", "eval_time": at,
                 "exp_samples": [{"labels": job, "value": 0}]},
            ],
            "alert_rule_test": alerts,
        }],
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scraped.test.yml");
    // YAML is a superset of JSON.
    std::fs::write(&file, serde_json::to_string_pretty(&fixture).unwrap()).unwrap();
    let tested = promtool(&["test", "rules", file.to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
