//! What a steady-state run reports beyond its totals: throughput over one-second windows, and
//! where each request's time went, from the server's stage histograms
//! (`statsremote_ingest_stage_seconds{stage}`, read before and after the run).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The server's stages, in the order a request goes through them.
pub(crate) const STAGES: [&str; 7] = [
    "read",
    "parse",
    "pipeline",
    "log_queue",
    "write",
    "fsync",
    "reply",
];

/// Events acknowledged per one-second window: the smallest, the median and the largest.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Windows {
    pub min: u64,
    pub median: u64,
    pub max: u64,
    /// Whole windows counted (the first and the last, partial, are left out).
    pub count: usize,
}

/// Counts acknowledged events in one-second windows while a run lasts.
pub(crate) struct WindowCounter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl WindowCounter {
    /// Starts counting the growth of `acked` each second.
    pub(crate) fn start(acked: Arc<AtomicU64>) -> WindowCounter {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut windows = Vec::new();
            let mut last = acked.load(Ordering::Relaxed);
            let mut next = Instant::now() + Duration::from_secs(1);
            while !stopping.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                let total = acked.load(Ordering::Relaxed);
                windows.push(total - last);
                last = total;
                next += Duration::from_secs(1);
            }
            windows
        });
        WindowCounter { stop, thread }
    }

    /// Stops counting; the whole windows' figures (`None` with fewer than one).
    pub(crate) fn finish(self) -> Option<Windows> {
        self.stop.store(true, Ordering::Relaxed);
        let mut windows = self.thread.join().ok()?;
        // The first window holds the ramp-up (connections opening, tenants' actors starting).
        if windows.len() > 1 {
            windows.remove(0);
        }
        if windows.is_empty() {
            return None;
        }
        let count = windows.len();
        windows.sort_unstable();
        Some(Windows {
            min: windows[0],
            median: windows[count / 2],
            max: windows[count - 1],
            count,
        })
    }
}

/// Sum and count of each stage's histogram in one `/metrics` scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct StageTotals(BTreeMap<String, (f64, f64)>);

impl StageTotals {
    pub(crate) fn parse(metrics: &str) -> StageTotals {
        let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("statsremote_ingest_stage_seconds_") else {
                continue;
            };
            let (is_sum, rest) = match rest.split_once('{') {
                Some(("sum", rest)) => (true, rest),
                Some(("count", rest)) => (false, rest),
                _ => continue,
            };
            let Some(stage) = rest
                .split_once("stage=\"")
                .and_then(|(_, after)| after.split_once('"'))
                .map(|(stage, _)| stage.to_string())
            else {
                continue;
            };
            let Some(value) = line
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
            else {
                continue;
            };
            let entry = totals.entry(stage).or_default();
            if is_sum {
                entry.0 += value;
            } else {
                entry.1 += value;
            }
        }
        StageTotals(totals)
    }

    /// Each stage's mean in milliseconds between `before` and this scrape.
    pub(crate) fn mean_ms_since(&self, before: &StageTotals) -> BTreeMap<String, f64> {
        STAGES
            .iter()
            .filter_map(|stage| {
                let (sum, count) = self.0.get(*stage)?;
                let (sum_before, count_before) = before.0.get(*stage).copied().unwrap_or_default();
                let requests = count - count_before;
                (requests > 0.0)
                    .then(|| (stage.to_string(), 1000.0 * (sum - sum_before) / requests))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_means_come_from_the_difference_of_two_scrapes() {
        let before = StageTotals::parse(
            "statsremote_ingest_stage_seconds_sum{stage=\"fsync\"} 1\n\
             statsremote_ingest_stage_seconds_count{stage=\"fsync\"} 100\n",
        );
        let after = StageTotals::parse(
            "# TYPE statsremote_ingest_stage_seconds histogram\n\
             statsremote_ingest_stage_seconds_bucket{stage=\"fsync\",le=\"0.01\"} 300\n\
             statsremote_ingest_stage_seconds_sum{stage=\"fsync\"} 3\n\
             statsremote_ingest_stage_seconds_count{stage=\"fsync\"} 300\n\
             statsremote_ingest_stage_seconds_sum{stage=\"read\"} 0.2\n\
             statsremote_ingest_stage_seconds_count{stage=\"read\"} 200\n",
        );
        let means = after.mean_ms_since(&before);
        assert_eq!(means["fsync"], 10.0);
        assert_eq!(means["read"], 1.0);
        assert!(!means.contains_key("parse"));
    }
}
