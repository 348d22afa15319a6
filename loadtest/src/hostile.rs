//! The hostile scenario: one well-behaved tenant sends at a moderate held rate while other
//! connections send the worst shapes there are (without a key, with a valid key of another
//! tenant, and uploads that stall). Each of two runs starts its own server: one without the
//! attack, one with it; the report sets the good tenant's ack latency of the two side by side,
//! with what the attackers got back and the server's peak RSS.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::server::{self, Target, Tenant};
use crate::{agent_builder, run_mode, Args, Mode, Run};

/// What the attackers sent and what came back, by attack and status.
type Outcomes = Arc<Mutex<BTreeMap<String, u64>>>;

/// Requests of each body-sending attack at once, and uploads kept stalled.
const BODY_ATTACKERS: usize = 2;
const STALLED_UPLOADS: usize = 500;

/// The bodies: Segment batches shaped to cost the most per byte.
struct Bodies {
    /// 2,000 minimal events under a ~2 MB batch-level context, no key.
    amplifying: Vec<u8>,
    /// Events of ~900 distinct unknown members each, about 4 MB, no key.
    wide: Vec<u8>,
    /// The same wide events with a valid key (accepted, stored).
    wide_keyed: Vec<u8>,
    /// A gzip of 200 MB of spaces (about 200 KB sent).
    bomb: Vec<u8>,
}

impl Bodies {
    fn new(attacker: &Tenant) -> Result<Bodies> {
        let minimal: Vec<Value> = (0..2000)
            .map(|_| json!({"type": "track", "userId": "u", "event": "e"}))
            .collect();
        let amplifying = json!({"context": {"blob": "c".repeat(2_000_000)}, "batch": minimal})
            .to_string()
            .into_bytes();
        let wide_event = {
            let mut event = String::from(r#"{"type":"track","userId":"u","event":"e""#);
            for i in 0..900 {
                event.push_str(&format!(r#","member_{i}":{i}"#));
            }
            event.push('}');
            event
        };
        let events = vec![wide_event.as_str(); 4_000_000 / wide_event.len()].join(",");
        let wide = format!(r#"{{"batch":[{events}]}}"#).into_bytes();
        let wide_keyed = format!(
            r#"{{"writeKey":"{}","batch":[{events}]}}"#,
            attacker.write_key
        )
        .into_bytes();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![b' '; 200 << 20])?;
        let bomb = encoder.finish()?;
        Ok(Bodies {
            amplifying,
            wide,
            wide_keyed,
            bomb,
        })
    }
}

/// One attacker connection: sends `body` again and again until `stop`.
fn send_loop(
    base: String,
    name: &'static str,
    body: Arc<Vec<u8>>,
    encoding: Option<&'static str>,
    stop: Arc<AtomicBool>,
    outcomes: Outcomes,
) {
    let agent = agent_builder(Duration::from_secs(60)).build();
    while !stop.load(Ordering::Relaxed) {
        let mut request = agent
            .post(&format!("{base}/v1/batch"))
            .set("Content-Type", "application/json");
        if let Some(encoding) = encoding {
            request = request.set("Content-Encoding", encoding);
        }
        let status = match request.send_bytes(&body) {
            Ok(response) => response.status().to_string(),
            Err(ureq::Error::Status(code, _)) => code.to_string(),
            Err(error) => format!("transport: {}", error.kind()),
        };
        if let Ok(mut outcomes) = outcomes.lock() {
            *outcomes.entry(format!("{name} {status}")).or_default() += 1;
        }
    }
}

/// Keeps `STALLED_UPLOADS` uploads open that declared 4 MB, sent 60 KB and stopped; replaces
/// each one the server closes.
fn stall_loop(base: String, attacker: Tenant, stop: Arc<AtomicBool>, outcomes: Outcomes) {
    let addr = base.trim_start_matches("http://").to_string();
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n{{\"batch\":[\"{}",
        attacker.write_key,
        "x".repeat(60_000)
    );
    let mut open: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Drop the connections the server has closed (a read that does not time out).
        open.retain_mut(|stream| {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(_) => {
                    if let Ok(mut outcomes) = outcomes.lock() {
                        *outcomes.entry("stalled upload closed".into()).or_default() += 1;
                    }
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            }
        });
        while open.len() < STALLED_UPLOADS && !stop.load(Ordering::Relaxed) {
            let Ok(mut stream) = TcpStream::connect(&addr) else {
                break;
            };
            if stream.write_all(head.as_bytes()).is_err() {
                continue;
            }
            let _ = stream.set_nonblocking(true);
            open.push(stream);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the good tenant's load (a durable run at `args.rate`) against a fresh server, with or
/// without the attack; returns its run, the attackers' outcomes and the server's peak RSS.
fn one_run(
    args: &Arc<Args>,
    generator: &Arc<crate::generate::Generator>,
    attack: bool,
) -> Result<(Run, BTreeMap<String, u64>)> {
    let binary = args
        .server_bin
        .clone()
        .unwrap_or_else(server::default_binary);
    let mut target = Target::start(&binary, &Mode::Durable.settings())?;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Outcomes = Arc::default();
    let mut threads = Vec::new();
    if attack {
        let attacker = target.create_tenant("attacker")?;
        let bodies = Bodies::new(&attacker)?;
        let attacks: [(&'static str, Vec<u8>, Option<&'static str>); 4] = [
            ("no key, batch context", bodies.amplifying, None),
            ("no key, wide events", bodies.wide, None),
            ("valid key, wide events", bodies.wide_keyed, None),
            ("no key, gzip bomb", bodies.bomb, Some("gzip")),
        ];
        for (name, body, encoding) in attacks {
            let body = Arc::new(body);
            for _ in 0..BODY_ATTACKERS {
                let (base, body, stop, outcomes) = (
                    target.base.clone(),
                    Arc::clone(&body),
                    Arc::clone(&stop),
                    Arc::clone(&outcomes),
                );
                threads.push(std::thread::spawn(move || {
                    send_loop(base, name, body, encoding, stop, outcomes)
                }));
            }
        }
        let (base, stop_stalls, stall_outcomes) = (
            target.base.clone(),
            Arc::clone(&stop),
            Arc::clone(&outcomes),
        );
        threads.push(std::thread::spawn(move || {
            stall_loop(base, attacker, stop_stalls, stall_outcomes)
        }));
        // Let the attack reach its full strength before the good tenant starts.
        std::thread::sleep(Duration::from_secs(2));
    }
    let run = run_mode(Mode::Durable, crate::Plans::None, &target, args, generator);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    target.stop();
    let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    Ok((run?.0, outcomes))
}

/// The scenario: the good tenant without the attack, then with it.
pub(crate) fn run(args: &Arc<Args>, generator: &Arc<crate::generate::Generator>) -> Result<()> {
    println!(
        "hostile: the good tenant sends {} events/s from {} connections for {} s; attackers: {} \
         connections per body shape, {} stalled uploads",
        args.rate, args.concurrency, args.duration, BODY_ATTACKERS, STALLED_UPLOADS
    );
    let (calm, _) = one_run(args, generator, false)?;
    let (attacked, outcomes) = one_run(args, generator, true)?;
    println!(
        "\n{:<16} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>8}",
        "good tenant",
        "events/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "lost",
        "cpu",
        "rss MiB"
    );
    for (label, run) in [("without attack", &calm), ("under attack", &attacked)] {
        println!(
            "{label:<16} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>7} {:>6} {:>6} {:>8}",
            run.events_per_sec,
            run.p50_ms,
            run.p90_ms,
            run.p99_ms,
            run.max_ms,
            run.errors.values().sum::<u64>(),
            run.lost.map_or("-".into(), |l| l.to_string()),
            run.server_cpu_cores
                .map_or("-".into(), |c| format!("{c:.2}")),
            run.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")),
        );
    }
    println!("\nattackers' requests, by what they got back:");
    for (what, count) in &outcomes {
        println!("  {what:<40} {count:>8}");
    }
    if let Some(path) = &args.json {
        let report =
            json!({ "without_attack": calm, "under_attack": attacked, "attackers": outcomes });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
