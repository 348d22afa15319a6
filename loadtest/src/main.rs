//! `loadtest`: the StatsRemote load generator and benchmark.
//!
//! For each mode (durable: group-commit fsync; buffered; ceiling: parse and discard) it starts the
//! release server on a free port with a fresh data dir (or targets `--url`), creates tenants,
//! sends realistic Segment batches from `--concurrency` keep-alive connections until the event or
//! time budget is spent, then checks that the server counted exactly what it acknowledged. It
//! prints one table, with each mode's throughput as a ratio of the ceiling measured in the same
//! run, and `--json FILE` writes the same figures.

mod cluster;
mod cold;
mod dates;
mod generate;
mod hostile;
mod queries;
mod server;
mod steady;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::dates::now_rfc3339;
use crate::generate::{Generator, Protocol, UserSet};
use crate::server::{Target, Tenant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Full pipeline, acknowledged after a group-commit fsync.
    Durable,
    /// Full pipeline, acknowledged after the write reached the OS.
    Buffered,
    /// Parse and validate, then discard (benchmark.ceiling_discard_events).
    Ceiling,
}

impl Mode {
    fn settings(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Mode::Durable => vec![("STATSREMOTE__STORAGE__DURABILITY", "fsync")],
            Mode::Buffered => vec![("STATSREMOTE__STORAGE__DURABILITY", "buffered")],
            Mode::Ceiling => vec![
                ("STATSREMOTE__STORAGE__DURABILITY", "buffered"),
                ("STATSREMOTE__BENCHMARK__CEILING_DISCARD_EVENTS", "true"),
            ],
        }
    }
}

/// Whether the tenants have a tracking plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Plans {
    /// No schemas (the default).
    None,
    /// A schema for every event name, `schema_enforcement = "reject"` (every event passes).
    Every,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Throughput, latency and verification of ingestion, per mode.
    Ingest,
    /// Query latency and live-tick delay while ingesting at `--rate` (durable mode).
    Queries,
    /// A good tenant's ack latency at `--rate` (default 20k events/s), without and with other
    /// connections sending the worst shapes (no key, a valid key, stalled uploads).
    Hostile,
    /// A cluster on this machine (private NATS and Redis, `--process-nodes` process nodes), one
    /// then two ingest nodes: throughput, ack latency and CPU per event by role.
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "Load generator and benchmark for StatsRemote"
)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Ingest)]
    scenario: Scenario,
    /// A burst, for smoke tests: 300k events per mode, at most 10 s each, no minimum time.
    /// Its figures are labelled as a burst; the steady-state runs are the headline.
    #[arg(long)]
    quick: bool,
    /// WebSocket subscribers in the queries scenario.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Events to send per mode, at least (see `--min-seconds`).
    #[arg(long, default_value_t = 3_000_000)]
    events: u64,
    /// Each mode runs at least this long, sending past `--events` if need be, so that the
    /// storage engine's background work (flushes, compactions) happens during the run.
    #[arg(long, default_value_t = 30)]
    min_seconds: u64,
    /// Longest time per mode, in seconds.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Benchmarks only: a delay added to every fsync of the server's event log (e.g. `5ms`),
    /// to reproduce a slow disk (`benchmark.fsync_delay`).
    #[arg(long)]
    fsync_delay: Option<String>,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tenants to spread the load over.
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// One heavy tenant beside light ones: this many connections send to the first tenant as
    /// fast as they are answered, the others to the remaining tenants at `--rate` (0 is the
    /// light tenants' baseline, alone). The report gives the light tenants' latency apart.
    #[arg(long)]
    heavy_connections: Option<usize>,
    /// Distinct users.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Distinct event names (Zipf-distributed).
    #[arg(long, default_value_t = 50)]
    event_names: usize,
    /// Target rate in events/s (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Body compression.
    #[arg(long, value_enum, default_value_t = Compression::None)]
    compression: Compression,
    /// Modes to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Durable, Mode::Buffered, Mode::Ceiling])]
    modes: Vec<Mode>,
    /// Target a running server instead of starting one (runs a single mode: whatever it is).
    #[arg(long)]
    url: Option<String>,
    /// Admin token of the server at `--url`.
    #[arg(long, default_value = "")]
    admin_token: String,
    /// The server binary to start.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Percent of events (0-100) sent with a timestamp 1 to `--late-hours` hours in the past,
    /// as SDKs that queue events offline do.
    #[arg(long, default_value_t = 0)]
    late_percent: u32,
    #[arg(long, default_value_t = 24)]
    late_hours: u32,
    /// After each stored mode: an admin flush, then the cold tier's files per hour and bytes per
    /// event (run the server with a short `STATSREMOTE__STORAGE__HOT_RETENTION`).
    #[arg(long)]
    cold_report: bool,
    /// Body shapes to send, each mode once per shape (posthog: PostHog's `/batch/`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Protocol::Segment])]
    protocols: Vec<Protocol>,
    /// Tracking plans to run each mode with, in order (`every`: a schema per event name).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Plans::None])]
    plans: Vec<Plans>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Process nodes in the cluster scenario.
    #[arg(long, default_value_t = 1)]
    process_nodes: usize,
    /// Cluster scenario: a shared S3-compatible store (moto) for checkpoints and cold segments,
    /// checkpointing this often (e.g. `5s`); without it, a local cold store (neither).
    #[arg(long)]
    cluster_checkpoint_every: Option<String>,
}

/// What one mode measured.
#[derive(Debug, Serialize)]
struct Run {
    mode: Mode,
    protocol: Protocol,
    plans: Plans,
    events_per_sec: f64,
    mb_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    sent: u64,
    acked: u64,
    /// Acknowledged events the server does not count (None: not checked, e.g. ceiling mode).
    lost: Option<u64>,
    /// Events the server counts more than once (None: not checked).
    duplicated: Option<u64>,
    /// Distinct users sent vs counted by the server.
    users_sent: u64,
    users_counted: Option<u64>,
    errors: BTreeMap<String, u64>,
    server_cpu_cores: Option<f64>,
    peak_rss_mb: Option<f64>,
    seconds: f64,
    /// A short burst (`--quick`), not a steady state.
    burst: bool,
    /// The delay added to every fsync, if any.
    fsync_delay: Option<String>,
    /// Events acknowledged per one-second window.
    windows: Option<steady::Windows>,
    /// Mean milliseconds per request in each server stage (`steady::STAGES`).
    stages_ms: BTreeMap<String, f64>,
    /// With `--heavy-connections`: the light tenants' events/s, ack p50 and p99 (ms).
    light: Option<(f64, f64, f64)>,
}

/// Per-worker tallies, merged at the end.
struct Tally {
    latency: Histogram<u64>,
    /// Requests of the light tenants (with `--heavy-connections`): latency and events acked.
    light: Histogram<u64>,
    light_acked: u64,
    sent: u64,
    acked: u64,
    /// Events of requests whose outcome is unknown (transport error): maybe stored.
    uncertain: u64,
    bytes: u64,
    errors: BTreeMap<String, u64>,
    users: UserSet,
}

impl Tally {
    fn new(users: u64) -> Result<Tally> {
        Ok(Tally {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            light: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            light_acked: 0,
            sent: 0,
            acked: 0,
            uncertain: 0,
            bytes: 0,
            errors: BTreeMap::new(),
            users: UserSet::new(users),
        })
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.light.add(&other.light)?;
        self.light_acked += other.light_acked;
        self.sent += other.sent;
        self.acked += other.acked;
        self.uncertain += other.uncertain;
        self.bytes += other.bytes;
        for (status, count) in other.errors {
            *self.errors.entry(status).or_default() += count;
        }
        self.users.merge(&other.users);
        Ok(())
    }
}

/// The request body, compressed as asked (borrowed when not: no 56 KB copy per request).
fn compress(kind: Compression, body: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>> {
    Ok(std::borrow::Cow::Owned(match kind {
        Compression::None => return Ok(std::borrow::Cow::Borrowed(body)),
        Compression::Gzip => {
            use std::io::Write;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(body)?;
            encoder.finish()?
        }
        Compression::Zstd => zstd::stream::encode_all(body, 1)?,
    }))
}

/// How much a run sends: at least `events`, for at least until `min_until`.
struct Budget {
    events: u64,
    min_until: Instant,
    claimed: AtomicU64,
    /// Events acknowledged so far (for the one-second windows).
    acked: Arc<AtomicU64>,
}

impl Budget {
    /// Whether another batch of `batch` events is to be sent.
    fn claim(&self, batch: u64) -> bool {
        let before = self.claimed.fetch_add(batch, Ordering::Relaxed);
        before + batch <= self.events || Instant::now() < self.min_until
    }
}

/// One connection's send loop.
#[allow(clippy::too_many_arguments)]
fn worker(
    index: usize,
    base: String,
    tenants: Arc<Vec<Tenant>>,
    generator: Arc<Generator>,
    args: Arc<Args>,
    budget: Arc<Budget>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Result<Tally> {
    let mut tally = Tally::new(generator.users)?;
    let agent = agent_builder(Duration::from_secs(60))
        .max_idle_connections_per_host(1)
        .build();
    let url = format!("{base}{}", generator.protocol.path());
    let mut rng = StdRng::seed_from_u64(index as u64 + 1);
    let mut body = Vec::with_capacity(64 * 1024);
    let batch = generator.batch_size as u64;
    // With a heavy tenant: connections below `heavy` send to it, unpaced; the others share
    // `--rate` and the remaining tenants.
    let heavy = args
        .heavy_connections
        .map(|heavy| heavy.min(args.concurrency));
    let is_heavy = heavy.is_some_and(|heavy| index < heavy);
    let paced = heavy
        .map_or(args.concurrency, |heavy| args.concurrency - heavy)
        .max(1);
    let interval = (args.rate > 0 && !is_heavy)
        .then(|| Duration::from_secs_f64(batch as f64 * paced as f64 / args.rate as f64));
    // At a held rate, connections start spread over one interval: in step, every connection's
    // request would arrive at once, a burst no set of independent clients sends.
    let mut next_send = Instant::now()
        + interval.map_or(Duration::ZERO, |interval| {
            interval.mul_f64(index as f64 / paced as f64)
        });
    let mut n = 0u64;
    let content_encoding = match args.compression {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
        Compression::Zstd => Some("zstd"),
    };
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if !budget.claim(batch) {
            break;
        }
        if let Some(interval) = interval {
            let now = Instant::now();
            if next_send > now {
                std::thread::sleep(next_send - now);
            }
            next_send += interval;
        }
        let tenant = match heavy {
            Some(_) if is_heavy || tenants.len() == 1 => &tenants[0],
            Some(_) => &tenants[1 + (index + n as usize) % (tenants.len() - 1)],
            None => &tenants[(index + n as usize) % tenants.len()],
        };
        let request_id = ((index as u64) << 40) | n;
        n += 1;
        let mut users = UserSet::new(generator.users);
        generator.fill(&mut body, n as usize, request_id, &mut rng, &mut users);
        let payload = compress(args.compression, &body)?;
        let mut request = agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", tenant.write_key))
            .set("Content-Type", "application/json");
        if let Some(encoding) = content_encoding {
            request = request.set("Content-Encoding", encoding);
        }
        let started = Instant::now();
        let result = request.send_bytes(&payload);
        let micros = started.elapsed().as_micros().max(1) as u64;
        tally.sent += batch;
        tally.bytes += body.len() as u64;
        let _ = tally.latency.record(micros.min(120_000_000));
        let light = heavy.is_some() && !is_heavy;
        if light {
            let _ = tally.light.record(micros.min(120_000_000));
        }
        match result {
            Ok(response) => {
                let _ = response.into_string();
                tally.acked += batch;
                if light {
                    tally.light_acked += batch;
                }
                budget.acked.fetch_add(batch, Ordering::Relaxed);
                tally.users.merge(&users);
            }
            Err(ureq::Error::Status(code, response)) => {
                let _ = response.into_string();
                *tally.errors.entry(code.to_string()).or_default() += 1;
            }
            Err(error) => {
                tally.uncertain += batch;
                *tally
                    .errors
                    .entry(format!("transport: {}", error.kind()))
                    .or_default() += 1;
            }
        }
    }
    Ok(tally)
}

/// Runs one mode against `target`.
fn run_mode(
    mode: Mode,
    plans: Plans,
    target: &Target,
    args: &Arc<Args>,
    generator: &Arc<Generator>,
) -> Result<(Run, Arc<Vec<Tenant>>)> {
    let tenants: Arc<Vec<Tenant>> = Arc::new(
        (0..args.tenants.max(1))
            .map(|i| target.create_tenant(&format!("loadtest-{mode:?}-{i}")))
            .collect::<Result<_>>()?,
    );
    if plans == Plans::Every {
        for tenant in tenants.iter() {
            register_plan(target, tenant, args.event_names)?;
        }
    }
    for tenant in tenants.iter() {
        target.wait_known(tenant)?;
    }
    let from = now_rfc3339(-3600 * (i64::from(args.late_hours) + 2));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = target.stats().map(|stats| stats.cpu);
    let stages_before = target.metrics().map(|m| steady::StageTotals::parse(&m));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let budget = Arc::new(Budget {
        events: args.events,
        min_until: started + Duration::from_secs(args.min_seconds.min(args.duration)),
        claimed: AtomicU64::new(0),
        acked: Arc::new(AtomicU64::new(0)),
    });
    let windows = steady::WindowCounter::start(Arc::clone(&budget.acked));
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|index| {
            let (base, tenants, generator, args, budget, stop) = (
                target.bases[index % target.bases.len()].clone(),
                Arc::clone(&tenants),
                Arc::clone(generator),
                Arc::clone(args),
                Arc::clone(&budget),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                worker(
                    index, base, tenants, generator, args, budget, stop, deadline,
                )
            })
        })
        .collect();
    let mut total = Tally::new(generator.users)?;
    for handle in workers {
        match handle.join() {
            Ok(tally) => total.merge(tally?)?,
            Err(_) => bail!("a load worker panicked"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let windows = windows.finish();
    let stages_ms = match (stages_before, target.metrics()) {
        (Ok(before), Ok(after)) => steady::StageTotals::parse(&after).mean_ms_since(&before),
        _ => BTreeMap::new(),
    };
    let after = target.stats();
    let server_cpu_cores = match (cpu_before, after) {
        (Some(before), Some(after)) => Some((after.cpu - before).as_secs_f64() / seconds),
        _ => None,
    };
    let peak_rss_mb = after.map(|stats| stats.peak_rss_bytes as f64 / 1_048_576.0);

    // Verification: the server's rolled-up counts and uniques against what it acknowledged.
    let (mut lost, mut duplicated, mut users_counted) = (None, None, None);
    if mode != Mode::Ceiling {
        let to = now_rfc3339(3600);
        let mut counted = 0u64;
        let mut users = 0u64;
        for tenant in tenants.iter() {
            if target.cluster {
                // Only the acknowledged events of this tenant can be counted: spread evenly.
                target.wait_counted(tenant, &from, &to, total.acked / tenants.len() as u64)?;
            } else {
                target.wait_caught_up(tenant, &from, &to)?;
            }
            let events = target.query(
                tenant,
                &format!("/v1/query/events?from={from}&to={to}&limit=10000"),
            )?;
            counted += events["events"]
                .as_array()
                .map(|list| list.iter().filter_map(|e| e["count"].as_u64()).sum::<u64>())
                .unwrap_or(0);
            let uniques =
                target.query(tenant, &format!("/v1/query/uniques?from={from}&to={to}"))?;
            users = users.max(uniques["uniques"].as_u64().unwrap_or(0));
        }
        lost = Some(total.acked.saturating_sub(counted));
        duplicated = Some(counted.saturating_sub(total.acked + total.uncertain));
        if args.tenants <= 1 {
            users_counted = Some(users);
        }
    }
    let ms = |q: f64| total.latency.value_at_quantile(q) as f64 / 1000.0;
    let run = Run {
        mode,
        protocol: generator.protocol,
        plans,
        events_per_sec: total.acked as f64 / seconds,
        mb_per_sec: total.bytes as f64 / seconds / 1_048_576.0,
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: total.latency.max() as f64 / 1000.0,
        sent: total.sent,
        acked: total.acked,
        lost,
        duplicated,
        users_sent: total.users.len(),
        users_counted,
        errors: total.errors,
        server_cpu_cores,
        peak_rss_mb,
        seconds,
        burst: args.quick,
        fsync_delay: (mode == Mode::Durable)
            .then(|| args.fsync_delay.clone())
            .flatten(),
        windows,
        stages_ms,
        light: args.heavy_connections.map(|_| {
            let light_ms = |q: f64| total.light.value_at_quantile(q) as f64 / 1000.0;
            (
                total.light_acked as f64 / seconds,
                light_ms(0.5),
                light_ms(0.99),
            )
        }),
    };
    Ok((run, tenants))
}

/// A schema for each of the generator's event names, rejecting what does not match.
fn register_plan(target: &Target, tenant: &Tenant, event_names: usize) -> Result<()> {
    let schema = generate::properties_schema();
    for rank in 0..event_names.max(1) {
        let name = generate::event_name(rank).replace(' ', "%20");
        target.admin_json(
            "PUT",
            &format!("/admin/v1/tenants/{}/schemas/{name}", tenant.id),
            &serde_json::json!({ "schema": schema }),
        )?;
    }
    target.admin_json(
        "PATCH",
        &format!("/admin/v1/tenants/{}", tenant.id),
        &serde_json::json!({ "settings": { "schema_enforcement": "reject" } }),
    )?;
    Ok(())
}

impl Run {
    /// The mode, the body shape when it is not Segment's, and `+plan` with schemas.
    fn label(&self) -> String {
        let mode = format!("{:?}", self.mode).to_lowercase();
        let shaped = match self.protocol {
            Protocol::Segment => mode,
            Protocol::Posthog => format!("{mode}/ph"),
        };
        let planned = match self.plans {
            Plans::None => shaped,
            Plans::Every => format!("{shaped}+plan"),
        };
        match &self.fsync_delay {
            Some(delay) => format!("{planned}+{delay}"),
            None => planned,
        }
    }
}

fn print_table(runs: &[Run]) {
    let ceiling = runs
        .iter()
        .find(|r| r.mode == Mode::Ceiling)
        .map(|r| r.events_per_sec);
    println!(
        "{:<9} {:>11} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>10} {:>6} {:>6} {:>8} {:>6} {:>8} {:>9}",
        "mode", "events/s", "MB/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "sent", "acked", "lost", "dup", "errors", "cpu", "rss MiB", "vs ceil"
    );
    for run in runs {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<9} {:>11.0} {:>7.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.1} {:>10} {:>10} {:>6} {:>6} {:>8} {:>6} {:>8} {:>9}",
            run.label(),
            run.events_per_sec,
            run.mb_per_sec,
            run.p50_ms,
            run.p90_ms,
            run.p99_ms,
            run.p999_ms,
            run.max_ms,
            run.sent,
            run.acked,
            opt(run.lost),
            opt(run.duplicated),
            run.errors.values().sum::<u64>(),
            run.server_cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
            run.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")),
            ceiling.map_or("-".into(), |c| format!("{:.0}%", 100.0 * run.events_per_sec / c)),
        );
    }
    if runs.iter().any(|r| r.burst) {
        println!("(--quick: a burst of at most 10 s per mode, not a steady state)");
    }
    println!("\nevents/s in 1-second windows, and mean ms per request in each server stage:");
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>5} {}",
        "mode",
        "1s min",
        "1s median",
        "1s max",
        "wins",
        steady::STAGES.map(|s| format!("{s:>9}")).join(" ")
    );
    for run in runs {
        let window = |pick: fn(&steady::Windows) -> u64| {
            run.windows
                .as_ref()
                .map_or("-".to_string(), |w| pick(w).to_string())
        };
        let stages: Vec<String> = steady::STAGES
            .iter()
            .map(|stage| {
                (run.stages_ms.get(*stage)).map_or(format!("{:>9}", "-"), |ms| format!("{ms:>9.2}"))
            })
            .collect();
        println!(
            "{:<14} {:>9} {:>9} {:>9} {:>5} {}",
            run.label(),
            window(|w| w.min),
            window(|w| w.median),
            window(|w| w.max),
            run.windows.as_ref().map_or(0, |w| w.count),
            stages.join(" ")
        );
    }
    for run in runs {
        if let Some((events, p50, p99)) = run.light {
            println!(
                "{}: light tenants {events:.0} events/s, ack p50 {p50:.2} ms, p99 {p99:.2} ms",
                run.label()
            );
        }
        if !run.errors.is_empty() {
            println!("{:?} errors: {:?}", run.mode, run.errors);
        }
        if let Some(counted) = run.users_counted {
            println!(
                "{:?}: {} distinct users sent, {} counted",
                run.mode, run.users_sent, counted
            );
        }
    }
}

/// An HTTP client whose reads and writes each time out after `limit`. Per-read and per-write
/// limits, not one deadline for the request: with a deadline ureq sets the socket's timeouts
/// again before every 8 KB read, two syscalls each.
pub(crate) fn agent_builder(limit: Duration) -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(limit)
        .timeout_write(limit)
}

/// The queries scenario: back-fill, then ingest at a held rate while measuring queries and ticks.
fn run_queries(args: &Arc<Args>, generator: &Arc<Generator>) -> Result<()> {
    let binary = args
        .server_bin
        .clone()
        .unwrap_or_else(server::default_binary);
    let mut target = match &args.url {
        Some(url) => Target::existing(url, &args.admin_token),
        None => Target::start(&binary, &Mode::Durable.settings())?,
    };
    let tenant = target.create_tenant("loadtest-queries")?;
    let started = Instant::now();
    let backfilled = queries::backfill(&target, &tenant)?;
    target.wait_caught_up(&tenant, &now_rfc3339(-100 * 86_400), &now_rfc3339(3600))?;
    println!(
        "back-filled {backfilled} events over 90 days in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (readers, delays) =
        queries::subscribers(&target, &tenant, args.subscribers, Arc::clone(&stop))?;
    let query_stop = Arc::clone(&stop);
    let query_target = Target::existing(&target.base, &target.admin_token);
    let query_tenant = tenant.clone();
    let query_thread =
        std::thread::spawn(move || queries::query_loop(&query_target, &query_tenant, &query_stop));
    let (ingest, _) = run_mode(Mode::Durable, Plans::None, &target, args, generator)?;
    stop.store(true, Ordering::Relaxed);
    let latencies = query_thread
        .join()
        .map_err(|_| anyhow::anyhow!("query thread panicked"))??;
    for reader in readers {
        let _ = reader.join();
    }
    let ticks = queries::tick_latency(&delays);
    target.stop();
    print_table(std::slice::from_ref(&ingest));
    println!(
        "\n{:<32} {:>8} {:>9} {:>9} {:>9}",
        "query (under the load above)", "count", "p50 ms", "p99 ms", "max ms"
    );
    for (name, latency) in &latencies {
        println!(
            "{name:<32} {:>8} {:>9.2} {:>9.2} {:>9.2}",
            latency.count, latency.p50_ms, latency.p99_ms, latency.max_ms
        );
    }
    if let Some(ticks) = &ticks {
        println!(
            "{:<32} {:>8} {:>9.2} {:>9.2} {:>9.2}   ({} subscribers; delay after the tick's timestamp)",
            "live tick delay", ticks.count, ticks.p50_ms, ticks.p99_ms, ticks.max_ms, args.subscribers
        );
    }
    if let Some(path) = &args.json {
        let report =
            serde_json::json!({ "runs": [ingest], "queries": latencies, "live_ticks": ticks });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.events = args.events.min(300_000);
        args.duration = args.duration.min(10);
        args.min_seconds = 0;
    }
    if args.scenario == Scenario::Hostile && args.rate == 0 {
        // A moderate, held rate: the good tenant's latency, not the machine's ceiling.
        args.rate = 20_000;
        args.concurrency = args.concurrency.min(4);
    }
    let args = Arc::new(args);
    let late = generate::Late {
        percent: args.late_percent.min(100),
        max_hours: args.late_hours.max(1),
    };
    let generators: Vec<Arc<Generator>> = (args.protocols.iter())
        .map(|&protocol| {
            let generator = Generator::new(
                args.batch_size,
                args.users,
                args.event_names,
                42,
                late,
                protocol,
            );
            generator.map(Arc::new)
        })
        .collect::<Result<_>>()?;
    let generator = Arc::clone(
        generators
            .first()
            .ok_or_else(|| anyhow::anyhow!("no protocol"))?,
    );
    if args.scenario == Scenario::Queries {
        return run_queries(&args, &generator);
    }
    if args.scenario == Scenario::Hostile {
        return hostile::run(&args, &generator);
    }
    if args.scenario == Scenario::Cluster {
        return cluster::run(&args, &generator);
    }
    println!(
        "loadtest: {} events per mode, batches of {} (~{} bytes/event), {} connections, {} tenant(s), {} users, compression {:?}",
        args.events, args.batch_size, generator.event_bytes, args.concurrency, args.tenants, args.users, args.compression
    );
    let mut runs = Vec::new();
    let mut cold_reports = Vec::new();
    if let Some(url) = &args.url {
        let target = Target::existing(url, &args.admin_token);
        let mode = args.modes.first().copied().unwrap_or(Mode::Durable);
        let plans = args.plans.first().copied().unwrap_or(Plans::None);
        runs.push(run_mode(mode, plans, &target, &args, &generator)?.0);
    } else {
        let binary = args
            .server_bin
            .clone()
            .unwrap_or_else(server::default_binary);
        for mode in &args.modes {
            for generator in &generators {
                for plans in &args.plans {
                    let mut settings = mode.settings();
                    if let (Mode::Durable, Some(delay)) = (mode, &args.fsync_delay) {
                        settings.push(("STATSREMOTE__BENCHMARK__FSYNC_DELAY", delay.as_str()));
                    }
                    let mut target = Target::start(&binary, &settings)?;
                    let (run, tenants) = run_mode(*mode, *plans, &target, &args, generator)?;
                    if args.cold_report && *mode != Mode::Ceiling {
                        let report = cold::report(&target, &tenants)?;
                        cold::print(&report);
                        cold_reports.push(report);
                    }
                    target.stop();
                    runs.push(run);
                }
            }
        }
    }
    print_table(&runs);
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(
                &serde_json::json!({ "runs": runs, "cold": cold_reports }),
            )?,
        )?;
        println!("wrote {}", path.display());
    }
    let failed: Vec<_> = runs
        .iter()
        .filter(|r| r.lost.unwrap_or(0) > 0 || r.duplicated.unwrap_or(0) > 0)
        .collect();
    if !failed.is_empty() {
        bail!(
            "events were lost or counted twice: {:?}",
            failed.iter().map(|r| r.mode).collect::<Vec<_>>()
        );
    }
    Ok(())
}
