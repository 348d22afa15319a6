//! The second scenario: query latency and live-tick delay while events are ingested.
//!
//! It back-fills 30 days of minute buckets (one event per minute, so a 30-day minute series
//! really scans 43,200 stored buckets), then runs ingestion at a held rate while one thread
//! loops over the queries (30-day minute series, 90-day hour series, 7-day uniques, a funnel
//! over the last 10 minutes) and `--subscribers` WebSocket clients record how long after its
//! timestamp each tick arrives.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use crate::dates::{parse_rfc3339_micros, rfc3339, unix_now};
use crate::server::{Target, Tenant};

/// Latency summary of one kind of request.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// Sends one event per minute for the last 30 days (and one per hour for the 60 days before).
pub(crate) fn backfill(target: &Target, tenant: &Tenant) -> Result<u64> {
    let now = unix_now();
    let mut times: Vec<i64> = (1..=30 * 1440).map(|m| now - m * 60).collect();
    times.extend((30 * 24..90 * 24).map(|h| now - h * 3600));
    for (chunk_index, chunk) in times.chunks(1000).enumerate() {
        let batch: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, at)| {
                json!({"type": "track", "event": "Backfilled", "userId": format!("user-{}", i % 500),
                       "messageId": format!("backfill-{chunk_index}-{i}"), "timestamp": rfc3339(*at)})
            })
            .collect();
        ureq::post(&format!("{}/v1/batch", target.base))
            .set("Authorization", &format!("Bearer {}", tenant.write_key))
            .send_json(json!({ "batch": batch }))?;
    }
    Ok(times.len() as u64)
}

/// Loops over the queries until `stop`; one histogram per query.
pub(crate) fn query_loop(
    target: &Target,
    tenant: &Tenant,
    stop: &AtomicBool,
) -> Result<BTreeMap<String, Latency>> {
    let now = unix_now();
    let minute = now - now.rem_euclid(60);
    let hour = now - now.rem_euclid(3600);
    let minute_series = format!(
        "/v1/query/series?event=Backfilled&interval=minute&from={}&to={}",
        rfc3339(minute - 30 * 86_400),
        rfc3339(minute)
    );
    let queries = [
        ("series 30d by minute", minute_series.clone()),
        (
            "series 30d by minute, values",
            format!("{minute_series}&format=values"),
        ),
        (
            "series 90d by hour",
            format!(
                "/v1/query/series?event=Backfilled&interval=hour&from={}&to={}",
                rfc3339(hour - 90 * 86_400),
                rfc3339(hour)
            ),
        ),
        (
            "uniques 7d",
            format!(
                "/v1/query/uniques?from={}&to={}",
                rfc3339(minute - 7 * 86_400),
                rfc3339(minute)
            ),
        ),
    ];
    let mut histograms: Vec<Histogram<u64>> = (0..queries.len() + 1)
        .map(|_| histogram())
        .collect::<Result<_>>()?;
    let agent = crate::agent_builder(Duration::from_secs(120)).build();
    while !stop.load(Ordering::Relaxed) {
        for (index, (_, path)) in queries.iter().enumerate() {
            let started = Instant::now();
            read_body(
                agent
                    .get(&format!("{}{}", target.base, path))
                    .set("Authorization", &format!("Bearer {}", tenant.read_key))
                    .call()?,
            )?;
            histograms[index].record(started.elapsed().as_micros().max(1) as u64)?;
        }
        let now = unix_now();
        let started = Instant::now();
        read_body(
            agent
                .post(&format!("{}/v1/query/funnel", target.base))
                .set("Authorization", &format!("Bearer {}", tenant.read_key))
                .send_json(
                    json!({"steps": ["Page Viewed", "Button Clicked", "Signed Up"], "window": "5m",
                                  "from": rfc3339(now - 600), "to": rfc3339(now + 60)}),
                )?,
        )?;
        histograms[queries.len()].record(started.elapsed().as_micros().max(1) as u64)?;
    }
    let mut out = BTreeMap::new();
    for (index, (name, _)) in queries.iter().enumerate() {
        out.insert(name.to_string(), Latency::of(&histograms[index]));
    }
    out.insert(
        "funnel 10 min".to_string(),
        Latency::of(&histograms[queries.len()]),
    );
    Ok(out)
}

/// Reads a whole answer as bytes, into a buffer of its announced size. (`into_string` checks
/// the text as UTF-8 char by char and grows a zeroed buffer: for a large series that can take
/// the client longer than the server takes to answer, and it would be measured as query
/// latency.)
fn read_body(response: ureq::Response) -> Result<Vec<u8>> {
    use std::io::Read;
    let announced = response
        .header("Content-Length")
        .and_then(|length| length.parse::<usize>().ok());
    let mut body = Vec::with_capacity(announced.unwrap_or(64 * 1024));
    response.into_reader().read_to_end(&mut body)?;
    if let Some(length) = announced {
        if body.len() != length {
            return Err(anyhow!(
                "answer cut short: {} of {length} bytes",
                body.len()
            ));
        }
    }
    Ok(body)
}

/// Reader threads of the subscribers, and the tick delays they record (µs).
pub(crate) type Subscribers = (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Histogram<u64>>>);

/// Opens `count` WebSocket subscribers; returns the threads reading them (tick delay in µs).
pub(crate) fn subscribers(
    target: &Target,
    tenant: &Tenant,
    count: usize,
    stop: Arc<AtomicBool>,
) -> Result<Subscribers> {
    let delays = Arc::new(Mutex::new(histogram()?));
    let addr = target.base.trim_start_matches("http://").to_string();
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let url = format!("ws://{addr}/v1/live?key={}", tenant.read_key);
        let (socket, _) = tungstenite::client::client(url, stream)
            .map_err(|e| anyhow!("WebSocket handshake: {e}"))?;
        sockets.push(socket);
    }
    // Two reader threads share the sockets; each read is short (timeout), so a stop is quick.
    let per_thread = count.div_ceil(2).max(1);
    let mut handles = Vec::new();
    let mut sockets = sockets.into_iter();
    loop {
        let mut mine: Vec<_> = sockets.by_ref().take(per_thread).collect();
        if mine.is_empty() {
            break;
        }
        let (stop, delays) = (Arc::clone(&stop), Arc::clone(&delays));
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for socket in &mut mine {
                    if let Ok(tungstenite::Message::Text(text)) = socket.read() {
                        let received = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default();
                        let tick: serde_json::Value =
                            serde_json::from_str(text.as_str()).unwrap_or_default();
                        if let Some(sent) = tick["ts"].as_str().and_then(parse_rfc3339_micros) {
                            let delay = (received.as_micros() as i64 - sent).max(1) as u64;
                            if let Ok(mut h) = delays.lock() {
                                let _ = h.record(delay.min(600_000_000));
                            }
                        }
                    }
                }
            }
        }));
    }
    Ok((handles, delays))
}

/// Tick delay summary.
pub(crate) fn tick_latency(delays: &Mutex<Histogram<u64>>) -> Option<Latency> {
    delays.lock().ok().map(|h| Latency::of(&h))
}
