//! The cold tier after a run (`--cold-report`): an admin flush, then the tenants' committed
//! segments per hour (how well compaction keeps late events in few files) and bytes per event
//! in Parquet and in the hot log.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::server::{Target, Tenant};

#[derive(Debug, Serialize)]
pub(crate) struct ColdReport {
    pub(crate) hours: usize,
    pub(crate) files: usize,
    pub(crate) max_files_per_hour: usize,
    pub(crate) mean_files_per_hour: f64,
    pub(crate) rows: u64,
    pub(crate) parquet_bytes_per_event: f64,
    pub(crate) hot_log_bytes_per_event: Option<f64>,
    pub(crate) flush_seconds: f64,
}

pub(crate) fn report(target: &Target, tenants: &[Tenant]) -> Result<ColdReport> {
    // Before the flush empties the hot log.
    let metrics = target.metrics()?;
    let hot_log_bytes_per_event = metrics.lines().find_map(|line| {
        line.strip_prefix("statsremote_hot_log_bytes_per_event ")
            .and_then(|value| value.trim().parse().ok())
    });
    let started = std::time::Instant::now();
    target
        .admin("POST", "/admin/v1/flush")
        .context("admin flush")?;
    let flush_seconds = started.elapsed().as_secs_f64();
    let mut per_hour: BTreeMap<(String, String), usize> = BTreeMap::new();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for tenant in tenants {
        let listing = target.admin("GET", &format!("/admin/v1/tenants/{}/segments", tenant.id))?;
        for segment in listing["segments"].as_array().into_iter().flatten() {
            let hour = segment["hour"].as_str().unwrap_or_default().to_string();
            *per_hour.entry((tenant.id.clone(), hour)).or_default() += 1;
            rows += segment["rows"].as_u64().unwrap_or(0);
            bytes += segment["bytes"].as_u64().unwrap_or(0);
        }
    }
    let files: usize = per_hour.values().sum();
    Ok(ColdReport {
        hours: per_hour.len(),
        files,
        max_files_per_hour: per_hour.values().copied().max().unwrap_or(0),
        mean_files_per_hour: files as f64 / per_hour.len().max(1) as f64,
        rows,
        parquet_bytes_per_event: bytes as f64 / rows.max(1) as f64,
        hot_log_bytes_per_event,
        flush_seconds,
    })
}

pub(crate) fn print(report: &ColdReport) {
    println!(
        "cold tier: {} segments over {} tenant-hours (max {} per hour, mean {:.2}), {} events, {:.1} bytes/event in Parquet, {} bytes/event in the hot log; admin flush {:.2} s",
        report.files,
        report.hours,
        report.max_files_per_hour,
        report.mean_files_per_hour,
        report.rows,
        report.parquet_bytes_per_event,
        report
            .hot_log_bytes_per_event
            .map_or("-".to_string(), |b| format!("{b:.1}")),
        report.flush_seconds,
    );
}
