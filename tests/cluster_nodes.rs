//! Cluster mode end to end: private `nats-server -js`, `redis-server` and S3-compatible (moto)
//! instances on free ports, then ingest and process nodes (the real binary with `--role`), the
//! API through either ingest node, and faults under load. Every fault test names the events
//! acknowledged, exported and rolled up, which must be equal, each messageId once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Auth, Tenant, TestServer};
use serde_json::{json, Value};
use testkit::services::Service;

/// Few partitions, short leases: failovers within seconds.
const PARTITIONS: u16 = 8;
const LEASE_TIMEOUT: &str = "3s";
const LEASE_RENEW: &str = "500ms";
/// How long a test waits for the rollups to match what was acknowledged.
const SETTLE: Duration = Duration::from_secs(60);
/// The range every event of these tests falls in (see `common::track`).
const RANGE: &str = "from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z";

struct Cluster {
    nats: Service,
    redis: Service,
    /// The cold tier and checkpoints, checkpointed every second.
    s3: testkit::s3::S3Server,
    prefix: String,
    /// Settings every node gets besides the cluster's.
    env: Vec<(String, String)>,
    ingest: Vec<TestServer>,
    process: Vec<TestServer>,
}

impl Cluster {
    fn start(ingest: usize, process: usize) -> Cluster {
        Cluster::start_with(ingest, process, Vec::new())
    }

    fn start_with(ingest: usize, process: usize, extra: Vec<(String, String)>) -> Cluster {
        let s3 = testkit::s3::S3Server::start().unwrap();
        s3.create_bucket("cluster").unwrap();
        let mut env = s3.server_env("cluster", "c");
        env.push(("STATSREMOTE__CLUSTER__CHECKPOINT_EVERY".into(), "1s".into()));
        env.extend(extra);
        let mut cluster = Cluster {
            nats: Service::nats().unwrap(),
            redis: Service::redis().unwrap(),
            s3,
            prefix: format!("t{}", std::process::id()),
            env,
            ingest: Vec::new(),
            process: Vec::new(),
        };
        for n in 0..process {
            let node = cluster.node("process", &format!("process-{n}"));
            cluster.process.push(node);
        }
        for n in 0..ingest {
            let node = cluster.node("ingest", &format!("ingest-{n}"));
            cluster.ingest.push(node);
        }
        cluster
    }

    fn node(&self, role: &str, name: &str) -> TestServer {
        let (nats, redis) = (self.nats.url(), self.redis.url());
        let mut env = vec![
            ("STATSREMOTE__CLUSTER__ROLE", role),
            ("STATSREMOTE__CLUSTER__NODE_ID", name),
            ("STATSREMOTE__CLUSTER__NATS_URL", nats.as_str()),
            ("STATSREMOTE__CLUSTER__REDIS_URL", redis.as_str()),
            ("STATSREMOTE__CLUSTER__PREFIX", self.prefix.as_str()),
            ("STATSREMOTE__CLUSTER__PARTITIONS", "8"),
            ("STATSREMOTE__CLUSTER__LEASE_TIMEOUT", LEASE_TIMEOUT),
            ("STATSREMOTE__CLUSTER__LEASE_RENEW_EVERY", LEASE_RENEW),
            ("STATSREMOTE__CLUSTER__PUBLISH_TIMEOUT", "2s"),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        TestServer::start_with_env(&env)
    }

    /// The process node (index) that holds `tenant`'s partition now.
    fn owner_of(&self, tenant: &Tenant) -> Option<usize> {
        let id: statsremote::ids::TenantId = tenant.id.parse().unwrap();
        let partition = statsremote::cluster::partition_of(id, PARTITIONS);
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut connection = client.get_connection().unwrap();
        let holder: Option<String> = redis::cmd("GET")
            .arg(format!("{}:lease:{partition}", self.prefix))
            .query(&mut connection)
            .unwrap();
        // `<node id>#<start>:<token>`
        let holder = holder?;
        let node = holder.split('#').next()?.to_string();
        node.strip_prefix("process-")?.parse().ok()
    }

    /// Waits until the process nodes hold fair shares of the partitions.
    fn settled(&self) {
        let nodes = self.process.len() as u64;
        let fair: Vec<u64> = (0..nodes)
            .map(|n| u64::from(PARTITIONS) / nodes + u64::from(n < u64::from(PARTITIONS) % nodes))
            .collect();
        let started = Instant::now();
        loop {
            let mut shares: Vec<u64> = self.process.iter().map(owned).collect();
            shares.sort_unstable_by(|a, b| b.cmp(a));
            if shares == fair {
                return;
            }
            assert!(started.elapsed() < SETTLE, "shares {shares:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new tenant, and load for it through every ingest node, with 30 batches acknowledged.
    fn under_load(&self, tag: &str) -> (Tenant, Load) {
        let tenant = self.ingest[0].create_tenant(tag);
        std::thread::sleep(Duration::from_millis(500));
        let bases: Vec<String> = self.ingest.iter().map(|n| n.base.clone()).collect();
        let load = Load::start(bases, &tenant, tag);
        wait_for_acks(&load, 30);
        (tenant, load)
    }

    /// A new tenant whose partition `process` node owns (after [`Cluster::settled`]).
    fn tenant_owned_by(&self, process: usize, name: &str) -> Tenant {
        for n in 0..64 {
            let tenant = self.ingest[0].create_tenant(&format!("{name}-{n}"));
            if self.owner_of(&tenant) == Some(process) {
                return tenant;
            }
        }
        panic!("none of 64 tenants landed on process-{process}'s partitions");
    }
}

impl Cluster {
    /// The tenant's segments in the shared store, checking that `events/` holds exactly those
    /// its newest published manifest names.
    fn cold_segments(&self, tenant: &Tenant) -> usize {
        let store = common::s3_store(&self.s3, "cluster", "c");
        let id: statsremote::ids::TenantId = tenant.id.parse().unwrap();
        // A maintenance pass may be between its commit and moving what it replaced.
        let started = Instant::now();
        let published = loop {
            let published = statsremote::storage::cold::newest_published(&store, id).unwrap();
            let named: BTreeSet<String> =
                published.segments.iter().map(|s| s.path.clone()).collect();
            let listed: BTreeSet<String> = common::runtime()
                .block_on(store.list(&format!("events/tenant={id}/")))
                .unwrap()
                .into_iter()
                .map(|object| object.location.to_string())
                .collect();
            if listed == named {
                break published;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "events/ {listed:?} against the manifest's {named:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // The admin API lists them on an ingest node.
        let reply = self.ingest[0].admin(
            "GET",
            &format!("/admin/v1/tenants/{}/segments", tenant.id),
            None,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = reply.json();
        let served: BTreeSet<String> = (answer["segments"].as_array().unwrap().iter())
            .map(|s| s["path"].as_str().unwrap().to_string())
            .collect();
        let named: BTreeSet<String> = published.segments.iter().map(|s| s.path.clone()).collect();
        assert_eq!(served, named);
        assert_eq!(answer["cold_watermark"], published.cold_watermark);
        named.len()
    }
}

/// The sum of a counter's series whose labels contain `label`.
fn labelled_sum(node: &TestServer, name: &str, label: &str) -> u64 {
    (node.metrics().lines())
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

/// The partitions a process node says it owns.
fn owned(node: &TestServer) -> u64 {
    node.metrics()
        .lines()
        .find_map(|line| line.strip_prefix("statsremote_cluster_partitions_owned "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// One cluster at a time: each test runs six processes with short leases on a machine that
/// may have two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tenant's event counts over [`RANGE`], as `node` answers them.
fn counts(node: &TestServer, tenant: &Tenant) -> Option<Value> {
    let reply = node.get(
        &format!("/v1/query/events?{RANGE}"),
        Auth::Bearer(&tenant.read_key),
    );
    (reply.status == 200).then(|| reply.json())
}

fn total(answer: &Value) -> u64 {
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["count"].as_u64().unwrap())
        .sum()
}

/// Waits until `node` counts `expected` events for the tenant; returns the last answer.
fn wait_total(node: &TestServer, tenant: &Tenant, expected: u64) -> Value {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < SETTLE {
        if let Some(answer) = counts(node, tenant) {
            if total(&answer) == expected {
                return answer;
            }
            last = answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{} did not count {expected} events in {SETTLE:?}: {last}",
        node.base
    );
}

/// The `statsremote.person` of the exported event `message_id`.
fn person_of(node: &TestServer, tenant: &Tenant, message_id: &str) -> String {
    let reply = node.get(
        &format!("/v1/events/export?{RANGE}"),
        Auth::Bearer(&tenant.read_key),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    (reply.body.lines())
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|event| event["messageId"] == message_id)
        .map(|event| event["statsremote"]["person"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{message_id} not exported"))
}

/// The messageIds of the tenant's dead letters listed through `node`, `limit` per page, each
/// listed once.
fn listed_letters(node: &TestServer, tenant: &Tenant, limit: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut before = String::new();
    loop {
        let reply = node.get(
            &format!("/v1/deadletter?limit={limit}{before}"),
            Auth::Bearer(&tenant.read_key),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let page = reply.json();
        for item in page["items"].as_array().unwrap() {
            let id = item["message_id"].as_str().unwrap().to_string();
            assert_eq!(item["reason"]["kind"], "schema_mismatch", "{item}");
            assert!(ids.insert(id.clone()), "{id} listed twice");
        }
        match page["next"].as_str() {
            Some(next) => before = format!("&before={next}"),
            None => return ids,
        }
    }
}

fn event(id: &str, n: u64) -> Value {
    let name = if n.is_multiple_of(3) {
        "Signed Up"
    } else {
        "Viewed"
    };
    common::track(id, &format!("user-{}", n % 40), name)
}

/// Sends batches of new events through the ingest nodes in turn until stopped. A batch that
/// fails (node gone, 503) is sent again, to the next node, until one acknowledges it; the
/// messageIds acknowledged are kept.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    refusals: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    fn start(bases: Vec<String>, tenant: &Tenant, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let (key, tag) = (tenant.write_key.clone(), tag.to_string());
        let thread = {
            let (stop, acked, refusals) = (stop.clone(), acked.clone(), refusals.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                let mut node = 0;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (0..10).map(|i| format!("{tag}-{n}-{i}")).collect();
                    let events: Vec<Value> = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| event(id, n + i as u64))
                        .collect();
                    let body = json!({ "batch": events }).to_string();
                    let mut delivered = false;
                    while !delivered {
                        if stop.load(Ordering::Relaxed) {
                            // Never acknowledged: not counted.
                            return;
                        }
                        node = (node + 1) % bases.len();
                        let sent = agent
                            .post(&format!("{}/v1/batch", bases[node]))
                            .set("Authorization", &format!("Bearer {key}"))
                            .set("Content-Type", "application/json")
                            .send_string(&body);
                        match sent {
                            Ok(_) => {
                                delivered = true;
                                continue;
                            }
                            Err(ureq::Error::Status(status, response)) => {
                                let retry = response.header("Retry-After").map(str::to_string);
                                refusals.lock().unwrap().push(format!("{status} {retry:?}"));
                            }
                            Err(error) => refusals.lock().unwrap().push(error.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    acked.lock().unwrap().extend(ids);
                    n += 10;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Load {
            stop,
            acked,
            refusals,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops and returns the messageIds acknowledged and the refusals seen.
    fn finish(mut self) -> (BTreeSet<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let refusals = std::mem::take(&mut *self.refusals.lock().unwrap());
        (acked, refusals)
    }
}

/// Waits until the load has had `more` batches acknowledged.
fn wait_for_acks(load: &Load, more: usize) {
    let target = load.acked() + more * 10;
    let started = Instant::now();
    while load.acked() < target {
        assert!(
            started.elapsed() < SETTLE,
            "the load stalled at {}",
            load.acked()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Expected counts of the acknowledged ids, by event name (see [`event`]).
fn expected_by_name(acked: &BTreeSet<String>) -> (u64, u64) {
    let (mut signed_up, mut viewed) = (0, 0);
    for id in acked {
        let mut parts = id.rsplitn(3, '-');
        let i: u64 = parts.next().unwrap().parse().unwrap();
        let n: u64 = parts.next().unwrap().parse().unwrap();
        if (n + i).is_multiple_of(3) {
            signed_up += 1;
        } else {
            viewed += 1;
        }
    }
    (signed_up, viewed)
}

fn count_of(answer: &Value, name: &str) -> u64 {
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == name)
        .map_or(0, |e| e["count"].as_u64().unwrap())
}

/// The messageIds of the tenant's export over [`RANGE`] through `node`; fails on a duplicate.
fn exported(node: &TestServer, tenant: &Tenant) -> Option<BTreeSet<String>> {
    let reply = node.get(
        &format!("/v1/events/export?{RANGE}"),
        Auth::Bearer(&tenant.read_key),
    );
    if reply.status != 200 {
        return None;
    }
    let mut ids = BTreeSet::new();
    for line in reply.body.lines() {
        // A stream cut off (the store slow or gone) is a failed attempt.
        let event: Value = serde_json::from_str(line).ok()?;
        let id = event["messageId"].as_str()?.to_string();
        assert!(ids.insert(id.clone()), "{id} exported twice");
    }
    Some(ids)
}

/// Waits until the export through `node` holds exactly the acknowledged events (the cold tier
/// has what the partition's owner flushed before its last checkpoint).
fn wait_exported(node: &TestServer, tenant: &Tenant, acked: &BTreeSet<String>) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < SETTLE {
        if let Some(ids) = exported(node, tenant) {
            let unknown: Vec<&String> = ids.difference(acked).take(5).collect();
            assert!(
                unknown.is_empty(),
                "exported, never acknowledged: {unknown:?}"
            );
            if ids.len() == acked.len() {
                return;
            }
            last = Some(ids.len());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{} exported {last:?} of {} acknowledged events",
        node.base,
        acked.len()
    );
}

/// Every acknowledged event counted and exported once, per name, on every ingest node.
fn assert_exact(cluster: &Cluster, tenant: &Tenant, acked: &BTreeSet<String>, what: &str) {
    let (signed_up, viewed) = expected_by_name(acked);
    for node in &cluster.ingest {
        let answer = wait_total(node, tenant, acked.len() as u64);
        assert_eq!(
            count_of(&answer, "Signed Up"),
            signed_up,
            "{what}: {answer}"
        );
        assert_eq!(count_of(&answer, "Viewed"), viewed, "{what}: {answer}");
    }
    // Still exact once the owners have checked their tenants against Redis again.
    std::thread::sleep(Duration::from_secs(6));
    let again = counts(&cluster.ingest[0], tenant).expect("counts");
    assert_eq!(total(&again), acked.len() as u64, "{what}, later: {again}");
    for node in &cluster.ingest {
        wait_exported(node, tenant, acked);
    }
    println!(
        "{what}: acknowledged {} events, exported {} and rolled up {} (Signed Up {signed_up}, Viewed {viewed}) on each of {} ingest nodes",
        acked.len(),
        acked.len(),
        acked.len(),
        cluster.ingest.len()
    );
}

#[test]
fn any_ingest_node_serves_the_api_with_the_same_numbers() {
    let _serial = serial();
    let cluster = Cluster::start(2, 2);
    let (a, b) = (&cluster.ingest[0], &cluster.ingest[1]);

    // Readiness names the role and each engine.
    let ready = a.get("/readyz", Auth::None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    let ready = ready.json();
    assert_eq!(ready["role"], "ingest");
    assert_eq!(ready["checks"]["nats"], true, "{ready}");
    assert_eq!(ready["checks"]["redis"], true, "{ready}");
    let process_ready = cluster.process[0].get("/readyz", Auth::None).json();
    assert_eq!(process_ready["role"], "process", "{process_ready}");

    // A tenant created on one node works on the other within a second.
    let tenant = a.create_tenant("cluster");
    let created = Instant::now();
    let path = format!("/admin/v1/tenants/{}", tenant.id);
    while b.admin("GET", &path, None).status != 200 {
        assert!(created.elapsed() < Duration::from_secs(5), "not shared");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "tenant seen on the other node after {:?}",
        created.elapsed()
    );

    // Events through both nodes, a retry of the same batch through the other: counted once.
    let first: Vec<Value> = (0..30).map(|n| event(&format!("a-{n}-0"), n)).collect();
    let second: Vec<Value> = (30..50).map(|n| event(&format!("b-{n}-0"), n)).collect();
    for (node, events) in [(a, &first), (b, &second), (b, &first)] {
        let reply = node.post_json(
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &json!({ "batch": events }),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let on_a = wait_total(a, &tenant, 50);
    let on_b = wait_total(b, &tenant, 50);
    println!(
        "50 events sent through two nodes, counted {} and {}",
        total(&on_a),
        total(&on_b)
    );
    assert_eq!(on_a["events"], on_b["events"]);
    // Both nodes export the 50 once the owner has flushed them to the shared cold tier.
    let sent: BTreeSet<String> = (first.iter().chain(&second))
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    let flushed = Instant::now();
    wait_exported(a, &tenant, &sent);
    wait_exported(b, &tenant, &sent);
    println!(
        "50 events exported through each node {:?} after they were counted",
        flushed.elapsed()
    );
    let signed_up = (0..50u64).filter(|n| n.is_multiple_of(3)).count() as u64;
    assert_eq!(count_of(&on_a, "Signed Up"), signed_up, "{on_a}");
    let uniques = |node: &TestServer| {
        let reply = node.get(
            &format!("/v1/query/uniques?{RANGE}"),
            Auth::Bearer(&tenant.read_key),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()["uniques"].as_u64().unwrap()
    };
    // Redis's HyperLogLog: of 40 users, two share one of its 16,384 registers about one run
    // in twenty (each tenant hashes users with its own key), more rarely two pairs.
    assert!((37..=40).contains(&uniques(a)), "{}", uniques(a));
    assert_eq!(uniques(a), uniques(b));
    let series = b.get(
        &format!("/v1/query/series?event=Viewed&interval=day&{RANGE}"),
        Auth::Bearer(&tenant.read_key),
    );
    assert_eq!(series.status, 200, "{}", series.body);
    assert_eq!(series.json()["points"][0]["value"], 50 - signed_up);

    // The dashboard and the endpoints only it needs work on ingest nodes too.
    assert_eq!(b.get("/", Auth::None).status, 200);
    let own = b.get("/v1/tenant", Auth::Bearer(&tenant.read_key));
    assert_eq!(own.json()["id"], tenant.id.as_str(), "{}", own.body);
    let segments = b.get("/v1/segments", Auth::Bearer(&tenant.read_key));
    assert_eq!(segments.status, 200, "{}", segments.body);

    // A live socket on one ingest node sees events sent through the other, counted per person
    // as the owner knows the links: `la0` was identified as `l0` (and rolled up) first.
    let now = format!("{:?}", Instant::now());
    let linked = json!({"batch": [
        {"type": "identify", "userId": "l0", "anonymousId": "la0", "messageId": format!("link-{now}")},
        common::track(&format!("linked-{now}"), "l0", "Linked")]});
    let reply = a.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &linked);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let started = Instant::now();
    while counts(b, &tenant).map_or(0, |c| count_of(&c, "Linked")) == 0 {
        assert!(
            started.elapsed() < SETTLE,
            "the link was not rolled up: {:?}",
            counts(b, &tenant)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut socket = common::connect(b, &format!("?key={}", tenant.read_key), None).unwrap();
    common::next_tick(&mut socket);
    common::clear_of_minute_end(Duration::from_secs(15));
    let mut live_events: Vec<Value> = (0..3)
        .map(|n| json!({"type": "track", "event": "Live", "userId": format!("l{n}"), "messageId": format!("live-{n}-{now}")}))
        .collect();
    live_events.push(json!({"type": "track", "event": "Live", "anonymousId": "la0", "messageId": format!("live-a-{now}")}));
    let reply = a.post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": live_events }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let sent = Instant::now();
    loop {
        let tick = common::next_tick(&mut socket);
        let live = &tick["minute"]["events"]["Live"];
        if live["count"] == 4 {
            assert_eq!(live["uniques"], 3, "la0 is l0: {tick}");
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "no live tick: {tick}"
        );
    }
    println!("live tick on the other node after {:?}", sent.elapsed());

    // A tracking plan registered through one ingest node is enforced by the other, and the
    // nodes number versions from the shared plan, whichever node registers.
    let schema_path = format!("/admin/v1/tenants/{}/schemas/Checked", tenant.id);
    let strict =
        json!({"type": "object", "required": ["plan"], "properties": {"plan": {"type": "string"}}});
    let registered = a.admin(
        "PUT",
        &schema_path,
        Some(&json!({"schema": strict, "enforcement": "reject"})),
    );
    assert_eq!(registered.status, 201, "{}", registered.body);
    assert_eq!(registered.json()["version"], 1);
    let checked = |node: &TestServer, id: &str, properties: Value| {
        let batch = json!({"batch": [{"type": "track", "event": "Checked", "timestamp": "2026-01-02T05:00:00Z", "userId": "u", "messageId": id, "properties": properties}]});
        let reply = node.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &batch);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    };
    let registered_at = Instant::now();
    // Events named Checked that were logged, and the one refused while the plan arrived.
    let mut logged_checked = 0;
    let refused_first = loop {
        let id = format!("unchecked-{:?}", Instant::now());
        let reply = checked(b, &id, json!({}));
        if reply["rejected"] == 1 {
            break id;
        }
        logged_checked += 1;
        assert!(
            registered_at.elapsed() < Duration::from_secs(5),
            "the plan registered on a is not enforced on b: {reply}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "schema registered on one node enforced on the other after {:?}",
        registered_at.elapsed()
    );
    assert_eq!(
        checked(b, "checked-ok", json!({"plan": "pro"}))["rejected"],
        0
    );
    logged_checked += 1;
    let loosened = json!({"type": "object", "properties": {"plan": {"type": "string"}}});
    let second = b.admin("PUT", &schema_path, Some(&json!({"schema": loosened})));
    assert_eq!(second.status, 201, "{}", second.body);
    assert_eq!(
        second.json()["version"],
        2,
        "numbered after the version registered on a"
    );
    let incompatible = a.admin(
        "PUT",
        &schema_path,
        Some(&json!({"schema": {"type": "object", "properties": {"plan": {"type": "integer"}}}})),
    );
    assert_eq!(incompatible.status, 409, "{}", incompatible.body);
    let retired = a.admin("DELETE", &format!("{schema_path}?version=2"), None);
    assert_eq!(retired.status, 200, "{}", retired.body);
    let retired_at = Instant::now();
    loop {
        let plan = b.get("/v1/schemas", Auth::Bearer(&tenant.read_key));
        assert_eq!(plan.status, 200, "{}", plan.body);
        let plan = plan.json();
        if plan["events"][0]["in_force"] == 1 {
            assert_eq!(
                plan["events"][0]["versions"].as_array().map(Vec::len),
                Some(2)
            );
            break;
        }
        assert!(
            retired_at.elapsed() < Duration::from_secs(5),
            "retired on a, still in force on b: {plan}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Refused events are dead letters any ingest node lists, a retry of a logged event
    // excepted; a replay through either node logs them once.
    let refused = json!({"batch": [
        {"type": "track", "event": "Checked", "timestamp": "2026-01-02T05:00:00Z", "userId": "u", "messageId": "dl-1", "properties": {}},
        {"type": "track", "event": "Checked", "timestamp": "2026-01-02T05:00:00Z", "userId": "u", "messageId": "dl-2", "properties": {"plan": 5}},
        {"type": "track", "event": "Checked", "timestamp": "2026-01-02T05:00:00Z", "userId": "u", "messageId": "checked-ok", "properties": {}},
    ]});
    let reply = a.post_json("/v1/batch", Auth::Basic(&tenant.write_key), &refused);
    assert_eq!(reply.json()["rejected"], 3, "{}", reply.body);
    let letters: BTreeSet<String> = [refused_first.as_str(), "dl-1", "dl-2"]
        .map(String::from)
        .into();
    let listed_at = Instant::now();
    loop {
        let listed = listed_letters(b, &tenant, 2);
        if listed == letters {
            break;
        }
        assert!(
            listed_at.elapsed() < SETTLE,
            "dead letters listed: {listed:?}, expected {letters:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "3 dead letters listed on the other node after {:?}",
        listed_at.elapsed()
    );
    let retired = a.admin("DELETE", &format!("{schema_path}?version=1"), None);
    assert_eq!(retired.status, 200, "{}", retired.body);
    let retired_at = Instant::now();
    while b.get("/v1/schemas", Auth::Bearer(&tenant.read_key)).json()["events"][0]["in_force"]
        != Value::Null
    {
        assert!(retired_at.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let replay_path = format!("/admin/v1/tenants/{}/deadletter/replay", tenant.id);
    let replayed = b.admin("POST", &replay_path, None);
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert_eq!(
        (
            replayed.json()["matched"].as_u64(),
            replayed.json()["logged"].as_u64()
        ),
        (Some(3), Some(3)),
        "{}",
        replayed.body
    );
    assert_eq!(listed_letters(a, &tenant, 100), BTreeSet::new());
    let again = a.admin("POST", &replay_path, None);
    assert_eq!(again.json()["matched"], 0, "{}", again.body);
    let expected = logged_checked + 3;
    let replayed_at = Instant::now();
    loop {
        let count = counts(a, &tenant).map_or(0, |answer| count_of(&answer, "Checked"));
        if count == expected {
            break;
        }
        assert!(
            replayed_at.elapsed() < SETTLE,
            "Checked counted {count} times, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // What a process node never serves is said.
    let on_process = cluster.process[0].post_json(
        "/v1/batch",
        Auth::Basic(&tenant.write_key),
        &json!({ "batch": first }),
    );
    assert!(on_process.problem(501).contains("ingest nodes"));

    // A key rotated on one node stops working on the other.
    let rotated = a.admin(
        "POST",
        &format!("/admin/v1/tenants/{}/rotate-keys", tenant.id),
        Some(&json!({ "which": "write" })),
    );
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let rotated_at = Instant::now();
    loop {
        let reply = b.post_json(
            "/v1/batch",
            Auth::Basic(&tenant.write_key),
            &json!({ "batch": [event("late", 1)] }),
        );
        if reply.status == 401 {
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(5),
            "old key still works"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_process_node_killed_under_load_loses_and_doubles_nothing() {
    let _serial = serial();
    let cluster = Cluster::start(2, 2);
    cluster.settled();
    let victim = &cluster.tenant_owned_by(0, "kill");
    let bases: Vec<String> = cluster.ingest.iter().map(|n| n.base.clone()).collect();
    let load = Load::start(bases, victim, "kill");
    wait_for_acks(&load, 30);
    cluster.process[0].kill();
    let killed = Instant::now();
    wait_for_acks(&load, 30);
    let (acked, refusals) = load.finish();
    println!(
        "refused while the process node was gone: {}",
        refusals.len()
    );
    assert_exact(&cluster, victim, &acked, "process node SIGKILL");
    println!(
        "taken over and caught up {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(cluster.owner_of(victim), Some(1));
}

#[test]
fn an_ingest_node_killed_clients_retry_on_the_other() {
    let _serial = serial();
    let cluster = Cluster::start(2, 1);
    let (tenant, load) = cluster.under_load("ingest");
    cluster.ingest[0].kill();
    wait_for_acks(&load, 30);
    let (acked, refusals) = load.finish();
    println!(
        "refused or failed while the node was gone: {}",
        refusals.len()
    );
    let survivor = &cluster.ingest[1];
    let (signed_up, viewed) = expected_by_name(&acked);
    let answer = wait_total(survivor, &tenant, acked.len() as u64);
    assert_eq!(count_of(&answer, "Signed Up"), signed_up);
    assert_eq!(count_of(&answer, "Viewed"), viewed);
    wait_exported(survivor, &tenant, &acked);
    println!(
        "ingest node SIGKILL: acknowledged {} events, exported {} and rolled up {}",
        acked.len(),
        acked.len(),
        total(&answer)
    );
}

#[test]
fn nats_restarted_under_load_refuses_with_retry_after_and_loses_nothing() {
    let _serial = serial();
    let mut cluster = Cluster::start(2, 1);
    let (tenant, load) = cluster.under_load("nats");
    cluster.nats.kill();
    std::thread::sleep(Duration::from_secs(2));
    cluster.nats.restart().unwrap();
    wait_for_acks(&load, 30);
    let (acked, refusals) = load.finish();
    assert!(
        refusals.iter().any(|r| r == "503 Some(\"1\")"),
        "503 with Retry-After while NATS was down: {refusals:?}"
    );
    println!("refused while NATS was down: {}", refusals.len());
    assert_exact(&cluster, &tenant, &acked, "NATS restart");
}

#[test]
fn redis_restarted_or_emptied_the_owners_write_the_rollups_again() {
    let _serial = serial();
    let mut cluster = Cluster::start(2, 2);
    let (tenant, load) = cluster.under_load("redis");
    cluster.redis.kill();
    std::thread::sleep(Duration::from_secs(1));
    // Queries fail clearly while Redis is gone.
    let down = cluster.ingest[0].get(
        &format!("/v1/query/events?{RANGE}"),
        Auth::Bearer(&tenant.read_key),
    );
    assert!(down.problem(503).contains("Redis"), "{}", down.body);
    cluster.redis.restart().unwrap();
    wait_for_acks(&load, 30);
    let (acked, _) = load.finish();
    assert_exact(&cluster, &tenant, &acked, "Redis restart");

    // Everything Redis held is lost: the owners write it again from their logs.
    let client = redis::Client::open(cluster.redis.url()).unwrap();
    let mut connection = client.get_connection().unwrap();
    let () = redis::cmd("FLUSHALL").query(&mut connection).unwrap();
    let emptied = Instant::now();
    assert_exact(&cluster, &tenant, &acked, "Redis emptied");
    println!(
        "rollups written again {:?} after Redis was emptied",
        emptied.elapsed()
    );

    // Both process nodes die, a new one starts: it takes the partition from a checkpoint, so
    // its log lacks the events before it. Redis is emptied again: those come back from the
    // cold tier.
    let fresh = cluster.node("process", "process-2");
    cluster.process.push(fresh);
    for node in &cluster.process[..2] {
        node.kill();
    }
    let survivor = &cluster.process[2];
    let killed = Instant::now();
    while cluster.owner_of(&tenant) != Some(2) {
        assert!(killed.elapsed() < SETTLE, "not taken over");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_exact(&cluster, &tenant, &acked, "process nodes replaced");
    let () = redis::cmd("FLUSHALL").query(&mut connection).unwrap();
    assert_exact(&cluster, &tenant, &acked, "Redis emptied after a failover");
    let from_cold = counter(survivor, "statsremote_cluster_rollup_cold_events_total");
    println!("{from_cold} events rolled up again from the cold tier");
    assert!(from_cold > 0, "the new owner's log held everything");
    assert_eq!(
        counter(survivor, "statsremote_cluster_rollup_gap_sequences_total"),
        0
    );
}

#[test]
fn a_paused_owner_is_fenced_out_and_new_process_nodes_take_a_fair_share() {
    let _serial = serial();
    let mut cluster = Cluster::start(1, 2);
    cluster.settled();
    let victim = &cluster.tenant_owned_by(0, "pause");
    let bases = vec![cluster.ingest[0].base.clone()];
    let load = Load::start(bases, victim, "pause");
    wait_for_acks(&load, 20);
    common::send_signal(cluster.process[0].pid(), "STOP");
    // The other node takes the partition once the lease has expired.
    let paused = Instant::now();
    while cluster.owner_of(victim) != Some(1) {
        assert!(paused.elapsed() < SETTLE, "not taken over");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("taken over {:?} after the pause", paused.elapsed());
    wait_for_acks(&load, 20);
    common::send_signal(cluster.process[0].pid(), "CONT");
    wait_for_acks(&load, 20);
    let (acked, _) = load.finish();
    assert_exact(&cluster, victim, &acked, "paused owner");
    let metrics = cluster.process[0].metrics();
    assert!(
        metrics.contains("statsremote_cluster_lease_changes_total{change=\"lost\"}"),
        "{metrics}"
    );

    // A third process node: each settles at its fair share of the 8 partitions (3, 3, 2).
    let third = cluster.node("process", "process-2");
    cluster.process.push(third);
    let joined = Instant::now();
    cluster.settled();
    println!(
        "fair shares {:?} after the third node joined",
        joined.elapsed()
    );
    assert_exact(&cluster, victim, &acked, "after rebalancing");
}

/// A counter of a node's `/metrics`, 0 when absent.
fn counter(node: &TestServer, name: &str) -> u64 {
    node.metrics()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

#[test]
fn a_new_owner_starts_from_the_checkpoint_once_the_stream_is_trimmed() {
    let _serial = serial();
    let cluster = Cluster::start(1, 2);
    cluster.settled();
    let victim = &cluster.tenant_owned_by(0, "ckpt");
    // Dead letters from before the checkpoints, which the stream then no longer holds.
    let refused_schema = json!({"schema": false, "enforcement": "reject"});
    let path = format!("/admin/v1/tenants/{}/schemas/Refused", victim.id);
    let registered = cluster.ingest[0].admin("PUT", &path, Some(&refused_schema));
    assert_eq!(registered.status, 201, "{}", registered.body);
    let refused: Vec<Value> = (0..5)
        .map(|n| common::track(&format!("refused-{n}"), "u", "Refused"))
        .collect();
    let reply = cluster.ingest[0].post_json(
        "/v1/batch",
        Auth::Basic(&victim.write_key),
        &json!({ "batch": refused }),
    );
    assert_eq!(reply.json()["rejected"], 5, "{}", reply.body);
    let bases = vec![cluster.ingest[0].base.clone()];
    let load = Load::start(bases, victim, "ckpt");
    // Checkpoints written, and the stream below the one before the latest dropped.
    let started = Instant::now();
    while counter(
        &cluster.process[0],
        "statsremote_cluster_stream_trimmed_total",
    ) == 0
    {
        assert!(started.elapsed() < SETTLE, "the stream was never trimmed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let checkpoints = counter(&cluster.process[0], "statsremote_cluster_checkpoints_total");
    println!(
        "{checkpoints} checkpoints and a trim after {:?}",
        started.elapsed()
    );
    // The owner merges the hour's small segments (one per checkpoint) as they gather.
    let compacted = || {
        labelled_sum(
            &cluster.process[0],
            "statsremote_cold_maintenance_segments_written_total",
            "task=\"compaction\"",
        )
    };
    while compacted() == 0 {
        assert!(started.elapsed() < SETTLE, "no compaction");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "small segments compacted {:?} after the load started",
        started.elapsed()
    );
    wait_for_acks(&load, 10);
    cluster.process[0].kill();
    wait_for_acks(&load, 30);
    let (acked, _) = load.finish();

    // A retry of the first batch, acknowledged long before the checkpoint the new owner
    // started from: its ids are known there, so it counts nothing.
    let first: Vec<Value> = (0..10u64)
        .map(|i| event(&format!("ckpt-0-{i}"), i))
        .collect();
    assert!(acked.contains("ckpt-0-0"));
    let retry = cluster.ingest[0].post_json(
        "/v1/batch",
        Auth::Basic(&victim.write_key),
        &json!({ "batch": first }),
    );
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_exact(
        &cluster,
        victim,
        &acked,
        "owner SIGKILL after a checkpoint and a trim",
    );
    let log = cluster.process[1].server_log();
    assert!(
        log.contains("partition state taken from its checkpoint"),
        "the new owner did not start from the checkpoint"
    );
    // Two owners flushed the hour, a segment per checkpoint, and compacted it: `events/`
    // holds exactly the segments the newest manifest names.
    let segments = cluster.cold_segments(victim);
    println!("{segments} segments at the end");
    // The letters outlived their owner and the stream's trim, each listed once.
    let letters = listed_letters(&cluster.ingest[0], victim, 2);
    let expected: BTreeSet<String> = (0..5).map(|n| format!("refused-{n}")).collect();
    assert_eq!(letters, expected);
}

#[test]
fn object_storage_unavailable_for_a_while_checkpoints_wait_and_nothing_is_lost() {
    let _serial = serial();
    let cluster = Cluster::start(1, 2);
    cluster.settled();
    let victim = &cluster.tenant_owned_by(0, "s3");
    let owner = &cluster.process[0];
    let checkpoints = || counter(owner, "statsremote_cluster_checkpoints_total");
    let load = Load::start(vec![cluster.ingest[0].base.clone()], victim, "s3");
    let started = Instant::now();
    while checkpoints() == 0 {
        assert!(started.elapsed() < SETTLE, "no checkpoint");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The store stops answering: ingestion and rollups go on, checkpoints wait.
    cluster.s3.pause().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = checkpoints();
    wait_for_acks(&load, 30);
    // The partition goes on: the rollups count what is acknowledged meanwhile.
    let during = load.acked() as u64;
    let waited = Instant::now();
    while counts(&cluster.ingest[0], victim).map_or(0, |answer| total(&answer)) < during {
        assert!(
            waited.elapsed() < SETTLE,
            "the partition stalled with the store"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        checkpoints(),
        before,
        "a checkpoint was written while the store was down"
    );
    cluster.s3.resume().unwrap();
    let resumed = Instant::now();
    while checkpoints() <= before {
        assert!(resumed.elapsed() < SETTLE, "checkpoints did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "checkpoints resumed {:?} after the store came back",
        resumed.elapsed()
    );
    wait_for_acks(&load, 10);
    // The owner dies too: the next one starts from what the checkpoints and the stream hold.
    owner.kill();
    wait_for_acks(&load, 20);
    let (acked, _) = load.finish();
    assert_exact(
        &cluster,
        victim,
        &acked,
        "object store down, then the owner killed",
    );
}

/// The same events through a single node and through a cluster: the query API answers with
/// the same counts, and distinct users within the two sketches' errors.
#[test]
fn the_cluster_answers_queries_as_the_single_node_does() {
    use time::format_description::well_known::Rfc3339;
    let _serial = serial();
    let single = TestServer::start();
    let cluster = Cluster::start(1, 1);
    // Two event names admitted: the third counts as `$other` on both.
    let capped = json!({"name": "same", "settings": {"max_event_names": 2}});
    let on_single = single.create_tenant_with(capped.clone());
    let on_cluster = cluster.ingest[0].create_tenant_with(capped);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let hour = now - now.rem_euclid(3600);
    let at = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .unwrap()
            .format(&Rfc3339)
            .unwrap()
    };
    // 3 names, 30 users, over the last two hours; one event in twenty reuses the messageId of
    // the one before it (a retry).
    let events: Vec<Value> = (0..600i64)
        .map(|n| {
            let name = ["Viewed", "Clicked", "Bought"][(n % 7 % 3) as usize];
            json!({
                "type": "track",
                "messageId": format!("same-{}", n - n / 10 % 2 * (n % 10 == 0) as i64),
                "userId": format!("u{}", n * 7 % 30),
                "event": name,
                "timestamp": at(hour - 3600 + n * 11 % 7000),
            })
        })
        .collect();
    // Then 10 anonymous visitors view, identify as users u0..u9, and click and buy under
    // their anonymous ids: the identity links make them those users' events (rollups count
    // them for the users from the identify on; funnels and exports resolve all of them).
    let anonymous = |kind: &str, k: i64, n: i64| {
        json!({
            "type": "track", "messageId": format!("anon-{kind}-{k}"), "anonymousId": format!("anon-{k}"),
            "event": kind, "timestamp": at(hour - 3000 + k * 60 + n),
        })
    };
    let viewed: Vec<Value> = (0..10).map(|k| anonymous("Viewed", k, 0)).collect();
    let identified: Vec<Value> = (0..10)
        .map(|k| json!({"type": "identify", "messageId": format!("identify-{k}"), "userId": format!("u{k}"), "anonymousId": format!("anon-{k}"), "timestamp": at(hour - 3000 + k * 60 + 10)}))
        .collect();
    let after: Vec<Value> = (0..10)
        .flat_map(|k| [anonymous("Clicked", k, 20), anonymous("Bought", k, 30)])
        .collect();
    let batches: Vec<&[Value]> = (events.chunks(100))
        .chain([&viewed[..], &identified[..], &after[..]])
        .collect();
    for (node, tenant) in [(&single, &on_single), (&cluster.ingest[0], &on_cluster)] {
        for chunk in &batches {
            let reply = node.post_json(
                "/v1/batch",
                Auth::Basic(&tenant.write_key),
                &json!({ "batch": chunk }),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
    }
    let (from, to) = (at(hour - 7200), at(hour + 3600));
    let range = format!("from={from}&to={to}");
    single.wait_rollups_caught_up(&on_single.read_key);
    let expected = ask(&single, &on_single, &format!("/v1/query/events?{range}"));
    let stored: u64 = (expected["events"].as_array().unwrap().iter())
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    wait_total_in(&cluster.ingest[0], &on_cluster, &range, stored);
    let got = ask(
        &cluster.ingest[0],
        &on_cluster,
        &format!("/v1/query/events?{range}"),
    );
    let by_name = |answer: &Value| -> Vec<(String, u64, u64)> {
        let mut rows: Vec<(String, u64, u64)> = (answer["events"].as_array().unwrap().iter())
            .map(|e| {
                let name = e["event"].as_str().unwrap().to_string();
                (
                    name,
                    e["count"].as_u64().unwrap(),
                    e["uniques"].as_u64().unwrap(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let (expected_rows, got_rows) = (by_name(&expected), by_name(&got));
    let names: Vec<&str> = expected_rows.iter().map(|row| row.0.as_str()).collect();
    assert_eq!(
        names,
        ["$identify", "$other", "Clicked", "Viewed"],
        "{expected}"
    );
    for ((name, count, users), (got_name, got_count, got_users)) in
        expected_rows.iter().zip(&got_rows)
    {
        assert_eq!((name, count), (got_name, got_count));
        assert!(
            users.abs_diff(*got_users) <= 1,
            "{name}: {users} against {got_users}"
        );
    }
    for interval in ["minute", "hour", "day"] {
        for event in ["Viewed", "Bought"] {
            let path = format!("/v1/query/series?event={event}&interval={interval}&{range}");
            let expected = ask(&single, &on_single, &path);
            let got = ask(&cluster.ingest[0], &on_cluster, &path);
            assert_eq!(expected["points"], got["points"], "{path}");
        }
    }
    let path = format!("/v1/query/uniques?event=Clicked&{range}");
    let (expected, got) = (
        ask(&single, &on_single, &path)["uniques"].as_u64().unwrap(),
        ask(&cluster.ingest[0], &on_cluster, &path)["uniques"]
            .as_u64()
            .unwrap(),
    );
    assert!(expected.abs_diff(got) <= 1, "{expected} against {got}");

    // The same events exported, once the owner has flushed them, and the same funnel.
    let export =
        |node: &TestServer, tenant: &Tenant| -> Vec<(String, String, String, String, String)> {
            let reply = node.get(
                &format!("/v1/events/export?{range}"),
                Auth::Bearer(&tenant.read_key),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            let mut rows: Vec<_> = (reply.body.lines())
                .map(|line| {
                    let event: Value = serde_json::from_str(line).unwrap();
                    let text = |key: &str| event[key].as_str().unwrap_or_default().to_string();
                    let person = event["statsremote"]["person"].as_str().unwrap_or_default();
                    (
                        text("messageId"),
                        text("event"),
                        text("userId"),
                        text("timestamp"),
                        person.to_string(),
                    )
                })
                .collect();
            rows.sort();
            rows
        };
    let expected_export = export(&single, &on_single);
    assert_eq!(expected_export.len() as u64, stored);
    let waited = Instant::now();
    let mut got_export = export(&cluster.ingest[0], &on_cluster);
    while got_export.len() < expected_export.len() {
        assert!(waited.elapsed() < SETTLE, "exported {}", got_export.len());
        std::thread::sleep(Duration::from_millis(250));
        got_export = export(&cluster.ingest[0], &on_cluster);
    }
    assert_eq!(expected_export, got_export);
    let funnel = |node: &TestServer, tenant: &Tenant| {
        let reply = node.post_json(
            "/v1/query/funnel",
            Auth::Bearer(&tenant.read_key),
            &json!({"steps": ["Viewed", "Clicked", "Bought"], "window": "30m", "from": from, "to": to}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()["steps"].clone()
    };
    let expected_funnel = funnel(&single, &on_single);
    assert_eq!(expected_funnel, funnel(&cluster.ingest[0], &on_cluster));
    println!(
        "single node and cluster agree: {stored} events stored of 640 sent, {expected_rows:?}, exported alike, funnel {expected_funnel}"
    );
}

/// A query's answer (read key), which must be 200.
fn ask(node: &TestServer, tenant: &Tenant, path: &str) -> Value {
    let reply = node.get(path, Auth::Bearer(&tenant.read_key));
    assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    reply.json()
}

/// Waits until `node` counts `expected` events for the tenant over `range`.
fn wait_total_in(node: &TestServer, tenant: &Tenant, range: &str, expected: u64) {
    let started = Instant::now();
    loop {
        let reply = node.get(
            &format!("/v1/query/events?{range}"),
            Auth::Bearer(&tenant.read_key),
        );
        if reply.status == 200 && total(&reply.json()) == expected {
            return;
        }
        assert!(started.elapsed() < SETTLE, "not counted: {}", reply.body);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sampled events: distinct users are scaled from the kept users in the cluster as on the
/// single node (an unscaled answer would be a quarter of the truth).
#[test]
fn sampled_users_are_scaled_in_the_cluster_as_on_the_single_node() {
    let _serial = serial();
    let single = TestServer::start();
    let cluster = Cluster::start(1, 1);
    let settings = json!({"name": "sampled", "settings": {
        "rate_limit_events_per_second": 1_000_000, "rate_limit_burst": 1_000_000,
        "sampling": {"events": {"Viewed": 0.25}}}});
    let on_single = single.create_tenant_with(settings.clone());
    let on_cluster = cluster.ingest[0].create_tenant_with(settings);
    std::thread::sleep(Duration::from_millis(500));
    // 2,000 users, two events each.
    let events: Vec<Value> = (0..4000)
        .map(|n| common::track(&format!("s-{n}"), &format!("user-{}", n % 2000), "Viewed"))
        .collect();
    for (node, tenant) in [(&single, &on_single), (&cluster.ingest[0], &on_cluster)] {
        for chunk in events.chunks(500) {
            let reply = node.post_json(
                "/v1/batch",
                Auth::Basic(&tenant.write_key),
                &json!({ "batch": chunk }),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
    }
    single.wait_rollups_caught_up(&on_single.read_key);
    // An unsampled event sent last: once it is counted, everything before it is.
    let done = json!({ "batch": [common::track("s-done", "user-0", "Done")] });
    let reply = cluster.ingest[0].post_json("/v1/batch", Auth::Basic(&on_cluster.write_key), &done);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let started = Instant::now();
    let done_counted =
        || counts(&cluster.ingest[0], &on_cluster).map_or(0, |a| count_of(&a, "Done"));
    while done_counted() == 0 {
        assert!(started.elapsed() < SETTLE, "not rolled up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let path = format!("/v1/query/uniques?event=Viewed&{RANGE}");
    let expected = ask(&single, &on_single, &path)["uniques"].as_u64().unwrap();
    let got = ask(&cluster.ingest[0], &on_cluster, &path)["uniques"]
        .as_u64()
        .unwrap();
    println!("distinct users of 2,000, sampled at 1/4: single node {expected}, cluster {got}");
    // Sampling error (95%: about ±8% here) and the sketches' error.
    for estimate in [expected, got] {
        assert!(estimate.abs_diff(2000) < 300, "{estimate} against 2000");
    }
    let series = ask(
        &cluster.ingest[0],
        &on_cluster,
        &format!("/v1/query/series?event=Viewed&metric=uniques&interval=day&{RANGE}"),
    );
    let day = series["points"][0]["value"].as_u64().unwrap();
    assert!(day.abs_diff(got) <= got / 100 + 1, "{day} against {got}");
    // The answers say how far off they may be, as the single node's do.
    let error = |node: &TestServer, tenant: &Tenant| {
        ask(node, tenant, &path)["relative_error"].as_f64().unwrap()
    };
    let (single_error, cluster_error) = (
        error(&single, &on_single),
        error(&cluster.ingest[0], &on_cluster),
    );
    println!("relative errors (95%): single node {single_error:.3}, cluster {cluster_error:.3}");
    assert!((0.01..0.2).contains(&cluster_error), "{cluster_error}");
    assert!(
        series["points"][0]["relative_error"].as_f64().is_some(),
        "{series}"
    );
    // Count series too: the day's count of Viewed with its error, against the single node's.
    let count_error = |node: &TestServer, tenant: &Tenant| {
        let path = format!("/v1/query/series?event=Viewed&metric=count&interval=day&{RANGE}");
        let point = ask(node, tenant, &path)["points"][0].clone();
        (
            point["value"].as_u64().unwrap(),
            point["relative_error"].as_f64().unwrap(),
        )
    };
    let (single_count, cluster_count) = (
        count_error(&single, &on_single),
        count_error(&cluster.ingest[0], &on_cluster),
    );
    println!("count series (value, relative error): single node {single_count:.3?}, cluster {cluster_count:.3?}");
    assert!(
        cluster_count.1 > single_count.1 / 2.0 && cluster_count.1 < single_count.1 * 2.0,
        "{cluster_count:?} against {single_count:?}"
    );
    // The top events too, for the count and the distinct users.
    let top = |node: &TestServer, tenant: &Tenant| {
        let answer = ask(node, tenant, &format!("/v1/query/events?{RANGE}"));
        let viewed = (answer["events"].as_array().unwrap().iter())
            .find(|e| e["event"] == "Viewed")
            .cloned()
            .unwrap();
        let error = &viewed["relative_error"];
        (
            error["count"].as_f64().unwrap(),
            error["uniques"].as_f64().unwrap(),
        )
    };
    let (single_top, cluster_top) = (
        top(&single, &on_single),
        top(&cluster.ingest[0], &on_cluster),
    );
    println!("top events' relative errors (count, uniques): single node {single_top:.3?}, cluster {cluster_top:.3?}");
    for (single, cluster) in [(single_top.0, cluster_top.0), (single_top.1, cluster_top.1)] {
        assert!(
            cluster > single / 2.0 && cluster < single * 2.0,
            "{cluster} against {single}"
        );
    }
}

#[test]
fn a_user_is_erased_through_any_ingest_node_also_when_the_owner_dies() {
    let _serial = serial();
    let cluster = Cluster::start(2, 2);
    cluster.settled();
    let victim = &cluster.tenant_owned_by(0, "erase");
    let (a, b) = (&cluster.ingest[0], &cluster.ingest[1]);
    // A dead letter of the user erased, one of another user.
    let path = format!("/admin/v1/tenants/{}/schemas/Refused", victim.id);
    let registered = a.admin(
        "PUT",
        &path,
        Some(&json!({"schema": false, "enforcement": "reject"})),
    );
    assert_eq!(registered.status, 201, "{}", registered.body);
    let refused = json!({"batch": [
        common::track("refused-7", "user-7", "Refused"),
        common::track("refused-8", "user-8", "Refused"),
    ]});
    let reply = a.post_json("/v1/batch", Auth::Basic(&victim.write_key), &refused);
    assert_eq!(reply.json()["rejected"], 2, "{}", reply.body);
    // 200 events of 40 users, 5 each.
    let events: Vec<Value> = (0..200u64)
        .map(|n| event(&format!("erase-{n}"), n))
        .collect();
    // And user-7 identified an anonymous id: two identity links name it.
    let identify = json!({"type": "identify", "messageId": "identify-7", "userId": "user-7", "anonymousId": "anon-7", "timestamp": "2026-01-02T03:04:05Z"});
    // Then an event under that anonymous id: user-7's person until the erasure.
    let anonymous = json!({"type": "track", "event": "Viewed", "messageId": "anon-7-viewed", "anonymousId": "anon-7", "timestamp": "2026-01-02T03:04:06Z"});
    let tail = [identify, anonymous];
    let batches = (events.chunks(50)).chain([&tail[..1], &tail[1..]]);
    for chunk in batches {
        let reply = a.post_json(
            "/v1/batch",
            Auth::Basic(&victim.write_key),
            &json!({ "batch": chunk }),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // A flush through the other node: once answered, the export holds every event.
    let flushed = b.admin(
        "POST",
        &format!("/admin/v1/flush?tenant={}", victim.id),
        None,
    );
    assert_eq!(flushed.status, 200, "{}", flushed.body);
    assert_eq!(
        flushed.json()["tenants"][0]["cold_watermark"],
        202,
        "{}",
        flushed.body
    );
    let mut all: BTreeSet<String> = (0..200).map(|n| format!("erase-{n}")).collect();
    all.extend(["identify-7".to_string(), "anon-7-viewed".to_string()]);
    assert_eq!(exported(a, victim).as_ref(), Some(&all));
    wait_total(b, victim, 202);
    assert_eq!(person_of(a, victim, "anon-7-viewed"), "user-7");

    // Asked through one node; the owner dies at once, so whether it or the next owner does
    // the work, the outcome must be the same.
    let asked = b.admin(
        "DELETE",
        &format!("/admin/v1/tenants/{}/users/user-7", victim.id),
        None,
    );
    assert_eq!(asked.status, 202, "{}", asked.body);
    let location = (asked.headers.iter())
        .find(|(name, _)| name.eq_ignore_ascii_case("location"))
        .map(|(_, value)| value.clone())
        .unwrap();
    assert_eq!(asked.json()["status"], "running");
    cluster.process[0].kill();
    let killed = Instant::now();
    let job = loop {
        let job = a.admin("GET", &location, None);
        assert_eq!(job.status, 200, "{}", job.body);
        let job = job.json();
        if job["status"] == "done" {
            break job;
        }
        assert_eq!(job["status"], "running", "{job}");
        assert!(killed.elapsed() < SETTLE, "erasure not done: {job}");
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "erasure done {:?} after the owner was killed: {job}",
        killed.elapsed()
    );
    assert_eq!(job["removed_events"], 6, "{job}");
    assert_eq!(job["removed_dead_letters"], 1, "{job}");
    assert_eq!(job["removed_identity_links"], 2, "{job}");
    let mut kept: BTreeSet<String> = (0..200u64)
        .filter(|n| n % 40 != 7)
        .map(|n| format!("erase-{n}"))
        .collect();
    kept.insert("anon-7-viewed".into());
    wait_exported(a, victim, &kept);
    wait_exported(b, victim, &kept);
    let letters = listed_letters(b, victim, 10);
    assert_eq!(letters, BTreeSet::from(["refused-8".to_string()]));
    // The links naming the user are gone: the anonymous id is a person of its own (also for
    // a node that read the links before).
    assert_eq!(person_of(a, victim, "anon-7-viewed"), "anon-7");
    assert_eq!(person_of(b, victim, "anon-7-viewed"), "anon-7");

    // A rollup rebuild (through either node) recounts from what is stored: the new owner
    // started from a checkpoint, so from the cold tier, where the user's 6 events are gone.
    let rebuild = format!("/admin/v1/tenants/{}/rollups/rebuild", victim.id);
    let rebuilt = a.admin("POST", &rebuild, None);
    assert_eq!(rebuilt.status, 202, "{}", rebuilt.body);
    wait_total(b, victim, 196);

    // The same owner erases a user whose events its own log still holds: a rebuild after it
    // recounts from the cold tier, not from that log.
    let late: Vec<Value> = (0..10)
        .map(|n| common::track(&format!("late-{n}"), "user-9", "Viewed"))
        .collect();
    let reply = b.post_json(
        "/v1/batch",
        Auth::Basic(&victim.write_key),
        &json!({ "batch": late }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_total(b, victim, 206);
    let asked = a.admin(
        "DELETE",
        &format!("/admin/v1/tenants/{}/users/user-9", victim.id),
        None,
    );
    assert_eq!(asked.status, 202, "{}", asked.body);
    let location = format!(
        "/admin/v1/deletions/{}",
        asked.json()["id"].as_str().unwrap()
    );
    let asked_at = Instant::now();
    loop {
        let job = b.admin("GET", &location, None).json();
        if job["status"] == "done" {
            assert_eq!(job["removed_events"], 15, "{job}");
            break;
        }
        assert!(asked_at.elapsed() < SETTLE, "erasure not done: {job}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rebuilt = b.admin("POST", &rebuild, None);
    assert_eq!(rebuilt.status, 202, "{}", rebuilt.body);
    // Rolled up again through the last of the 212 sequences: 191 events left.
    let rebuilt_at = Instant::now();
    loop {
        let answer = ask(a, victim, &format!("/v1/query/events?{RANGE}"));
        if answer["as_of"]["rolled_up_through_seq"].as_u64() >= Some(212) {
            assert_eq!(total(&answer), 191, "{answer}");
            break;
        }
        assert!(
            rebuilt_at.elapsed() < SETTLE,
            "not rolled up again: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let unknown = "/admin/v1/deletions/00000000-0000-4000-8000-000000000000";
    a.admin("GET", unknown, None).problem(404);
}
