//! Logging and metrics.
//!
//! Every metric name lives in [`names`]; the functions below are the "internal events" of the
//! server: each emits its metrics (and, where useful, its log line) in one place, once per
//! request or batch, never per event. `/metrics` renders the Prometheus recorder installed by
//! [`install_metrics`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Metric names, all in one place. Each doc names exactly the labels its metric carries; `tenant`
/// is the tenant's id (16 hex digits).
pub mod names {
    /// Cluster mode: partitions this process node owns. No labels.
    pub const CLUSTER_PARTITIONS_OWNED: &str = "statsremote_cluster_partitions_owned";
    /// Cluster mode: partitions this process node took (`change="acquired"`) or stopped owning
    /// (`change="lost"`, `"released"`). Label `change`.
    pub const CLUSTER_LEASE_CHANGES: &str = "statsremote_cluster_lease_changes_total";
    /// Cluster mode: stream messages of an owned partition not processed yet. Label
    /// `partition`.
    pub const CLUSTER_CONSUMER_LAG: &str = "statsremote_cluster_consumer_lag_messages";
    /// Cluster mode: time from publishing a batch to JetStream's acknowledgement, on an ingest
    /// node. No labels.
    pub const CLUSTER_PUBLISH_LATENCY: &str = "statsremote_cluster_publish_seconds";
    /// Cluster mode: publishes that failed or timed out (answered 503). No labels.
    pub const CLUSTER_PUBLISH_FAILURES: &str = "statsremote_cluster_publish_failures_total";
    /// Cluster mode: time since an owned partition's last checkpoint (or since its owner
    /// started on it). Label `partition`.
    pub const CLUSTER_CHECKPOINT_AGE: &str = "statsremote_cluster_checkpoint_age_seconds";
    /// Cluster mode: checkpoints written. No labels.
    pub const CLUSTER_CHECKPOINTS: &str = "statsremote_cluster_checkpoints_total";
    /// Cluster mode: bytes of the checkpoints written. No labels.
    pub const CLUSTER_CHECKPOINT_BYTES: &str = "statsremote_cluster_checkpoint_bytes_total";
    /// Cluster mode: log sequences the shared rollups lost that no owner could write again
    /// (older than the owner's checkpoint). No labels.
    pub const CLUSTER_ROLLUP_GAPS: &str = "statsremote_cluster_rollup_gap_sequences_total";
    /// Cluster mode: cold segments process nodes committed, and the events in them. No labels.
    pub const CLUSTER_COLD_SEGMENTS: &str = "statsremote_cluster_cold_segments_total";
    pub const CLUSTER_COLD_EVENTS: &str = "statsremote_cluster_cold_events_total";
    /// Cluster mode: log sequences a cold flush found missing from the owner's local log (the
    /// cold tier skips them). No labels.
    pub const CLUSTER_COLD_MISSING: &str = "statsremote_cluster_cold_missing_sequences_total";
    /// Cluster mode: events the shared rollups lost that an owner rolled up again from the
    /// cold tier (its log started from a checkpoint after them). No labels.
    pub const CLUSTER_ROLLUP_FROM_COLD: &str = "statsremote_cluster_rollup_cold_events_total";
    /// Cluster mode: log entries a process node deleted from its local store once a
    /// checkpoint and the tenant's window no longer needed them. No labels.
    pub const CLUSTER_LOCAL_ENTRIES_DELETED: &str =
        "statsremote_cluster_local_entries_deleted_total";
    /// Cluster mode: stream messages removed below checkpoints. No labels.
    pub const CLUSTER_STREAM_TRIMMED: &str = "statsremote_cluster_stream_trimmed_total";
    /// Cluster mode: stream messages an owner applied to its log. Label `partition`.
    pub const CLUSTER_MESSAGES_PROCESSED: &str = "statsremote_cluster_messages_processed_total";
    /// Requests answered. Labels `route` (the matched route pattern, or `unmatched`) and
    /// `status` (the HTTP status code).
    pub const HTTP_REQUESTS: &str = "statsremote_http_requests_total";
    /// Events of ingestion requests. Labels `tenant` and `outcome`: `accepted`, `duplicate`,
    /// `rejected`, `rate_limited` or `unavailable`.
    pub const INGEST_EVENTS: &str = "statsremote_ingest_events_total";
    /// Time from request start to the ingestion reply (including the fsync that covers it).
    /// Label `tenant`.
    pub const ACK_LATENCY: &str = "statsremote_ingest_ack_latency_seconds";
    /// Time one ingestion request spent in each stage: `read` (the body), `parse`, `pipeline`
    /// (admission, rate limit, the tenant's actor: validation, sampling, encoding), `log_queue`
    /// (waiting for the log writer), `write` (its group being staged), `fsync`, `reply` (from
    /// durable to the answer). Label `stage`.
    pub const INGEST_STAGE: &str = "statsremote_ingest_stage_seconds";
    /// Requests folded into one group commit. No labels.
    pub const GROUP_COMMIT_REQUESTS: &str = "statsremote_group_commit_requests";
    /// Events written by one group commit. No labels.
    pub const GROUP_COMMIT_EVENTS: &str = "statsremote_group_commit_events";
    /// Duration of one fsync of the log, which covers every group staged before it. No labels.
    pub const FSYNC_LATENCY: &str = "statsremote_log_fsync_seconds";
    /// Groups one fsync covered. No labels.
    pub const GROUPS_PER_SYNC: &str = "statsremote_log_groups_per_sync";
    /// From a group's writes being done to its answer: the fsync it waited for (and the one
    /// running when it was staged). No labels.
    pub const GROUP_COMMIT_WAIT: &str = "statsremote_group_commit_wait_seconds";
    /// Batches waiting for the log writer. No labels.
    pub const LOG_QUEUE_DEPTH: &str = "statsremote_log_queue_depth";
    /// How long the oldest request of a group waited in the writer queue. No labels.
    pub const LOG_QUEUE_WAIT: &str = "statsremote_log_queue_wait_seconds";
    /// Time to write a group (dedup, sequencing, commit) before its fsync. No labels.
    pub const LOG_WRITE: &str = "statsremote_log_write_seconds";
    /// Batches in flight (queued at or being handled by the tenant's actors). Label `tenant`.
    pub const MAILBOX_DEPTH: &str = "statsremote_tenant_mailbox_depth";
    /// Duration of writing one run of dedup keys into the tables (off the log writer). No
    /// labels.
    pub const DEDUP_INGEST: &str = "statsremote_dedup_ingest_seconds";
    /// Dedup keys written into the tables by the ingest thread. No labels.
    pub const DEDUP_INGESTED_KEYS: &str = "statsremote_dedup_ingested_keys_total";
    /// Events dropped as duplicates of an earlier messageId. Label `tenant`.
    pub const DEDUP_HITS: &str = "statsremote_dedup_hits_total";
    /// Events refused because the tenant's rate limit was exceeded. Label `tenant`.
    pub const RATE_LIMITED_EVENTS: &str = "statsremote_rate_limited_events_total";
    /// Child actors rebuilt by a tenant supervisor. Labels `tenant` and `actor` (`ingest`,
    /// `rollup` or `live`).
    pub const ACTOR_RESTARTS: &str = "statsremote_actor_restarts_total";
    /// 1 while the child runs, 0 while it waits to be rebuilt. Labels `tenant` and `actor`.
    pub const ACTOR_RUNNING: &str = "statsremote_actor_running";
    /// Label `tenant`: events moved to the cold tier.
    pub const COLD_FLUSHED_EVENTS: &str = "statsremote_cold_flushed_events_total";
    /// Label `tenant`: segments written and their bytes.
    pub const COLD_SEGMENTS: &str = "statsremote_cold_segments_written_total";
    pub const COLD_BYTES: &str = "statsremote_cold_bytes_written_total";
    /// Label `tenant`: seconds since the oldest entry still in the hot log was received (0 when
    /// the hot log holds none), as of the flusher's last pass.
    pub const COLD_FLUSH_LAG: &str = "statsremote_cold_flush_lag_seconds";
    /// Label `tenant`: flushes (or their recovery) that failed and will be retried.
    pub const COLD_FLUSH_FAILURES: &str = "statsremote_cold_flush_failures_total";
    /// Label `tenant`: what retention passes, compactions and erasures changed in the cold
    /// tier: segments removed from `events/`, segments written, events removed.
    pub const COLD_MAINTENANCE_SEGMENTS_REMOVED: &str =
        "statsremote_cold_maintenance_segments_removed_total";
    pub const COLD_MAINTENANCE_SEGMENTS_WRITTEN: &str =
        "statsremote_cold_maintenance_segments_written_total";
    pub const COLD_MAINTENANCE_EVENTS_REMOVED: &str =
        "statsremote_cold_maintenance_events_removed_total";
    /// Label `tenant`: committed segments, their bytes, and bytes per event in Parquet.
    pub const COLD_SEGMENTS_CURRENT: &str = "statsremote_cold_segments";
    pub const COLD_SEGMENT_BYTES: &str = "statsremote_cold_segment_bytes";
    pub const COLD_BYTES_PER_EVENT: &str = "statsremote_cold_bytes_per_event";
    /// The hot log's size on disk and its bytes per event (all tenants), as of the last scrape.
    pub const HOT_LOG_BYTES: &str = "statsremote_hot_log_bytes";
    pub const HOT_LOG_BYTES_PER_EVENT: &str = "statsremote_hot_log_bytes_per_event";
    /// Tenant supervisors currently running. No labels.
    pub const TENANT_PIPELINES: &str = "statsremote_tenant_pipelines";
    /// Durable events not yet rolled up (log head minus rollup watermark). Label `tenant`.
    pub const ROLLUP_LAG: &str = "statsremote_rollup_lag_events";
    /// Seconds the tenant's stored rollups have been behind its log (0 when caught up). Label
    /// `tenant`.
    pub const WATERMARK_AGE: &str = "statsremote_rollup_watermark_age_seconds";
    /// Duration of a rollup flush (merge into storage + watermark). No labels.
    pub const ROLLUP_FLUSH: &str = "statsremote_rollup_flush_seconds";
    /// Buckets written per flush. No labels.
    pub const ROLLUP_FLUSH_BUCKETS: &str = "statsremote_rollup_flush_buckets";
    /// Log entries the rollup actors read back from the log (catch-up after a start, a restart
    /// or a full mailbox) instead of having them pushed by the ingest actor. No labels.
    pub const ROLLUP_LOG_READS: &str = "statsremote_rollup_log_reads_total";
    /// Events that skipped a resolution because they are older than its retention. Labels
    /// `tenant` and `resolution` (`minute`, `hour` or `day`).
    pub const ROLLUP_SKIPPED: &str = "statsremote_rollup_skipped_events_total";
    /// Query latency. Label `endpoint` (`series`, `events`, `uniques` or `funnel`).
    pub const QUERY_LATENCY: &str = "statsremote_query_latency_seconds";
    /// Query answers served from the cache. Label `endpoint`.
    pub const QUERY_CACHE_HITS: &str = "statsremote_query_cache_hits_total";
    /// WebSocket subscribers of /v1/live. Label `tenant`.
    pub const LIVE_SUBSCRIBERS: &str = "statsremote_live_subscribers";
    /// Ticks a slow subscriber skipped (it got a later one instead). Label `tenant`.
    pub const LIVE_COALESCED: &str = "statsremote_live_coalesced_ticks_total";
    /// Events rolled up under `$other` because their name was over the tenant's cap. Label
    /// `tenant`.
    pub const EVENT_NAMES_OVERFLOW: &str = "statsremote_event_names_overflow_total";
    /// Events checked against a tracking plan that did not pass, by what became of them
    /// (`warned`: stored and flagged; `dead_lettered`) and why (`schema_mismatch`, `unplanned`).
    pub const SCHEMA_VIOLATIONS: &str = "statsremote_schema_violations_total";
    /// Dead letters stored, by reason.
    pub const DEAD_LETTERS: &str = "statsremote_dead_letters_total";
    /// Dead letters replayed, by outcome (`logged`, `duplicate`, `still_refused`).
    pub const DEAD_LETTER_REPLAYS: &str = "statsremote_dead_letter_replays_total";
    /// Dead letters deleted by retention or the size cap.
    pub const DEAD_LETTERS_EXPIRED: &str = "statsremote_dead_letters_expired_total";
    /// Events dropped by the tenant's sampling (label `tenant`).
    pub const SAMPLED_OUT: &str = "statsremote_sampled_out_total";
    /// Bytes a tenant's dead letters take (after the last retention pass).
    pub const DEAD_LETTER_BYTES: &str = "statsremote_dead_letter_bytes";
    /// Identity calls applied by the rollup actors. Labels `tenant`, `kind` (`identify`,
    /// `alias`), `outcome` (`unchanged`, `joined`, `renamed`, `refused`, `full`); see
    /// `crate::identity`.
    pub const IDENTITY_LINKS: &str = "statsremote_identity_links_total";
    /// Storage threads that have died (a panic). Label `thread` (the thread's name).
    pub const STORAGE_THREAD_PANICS: &str = "statsremote_storage_thread_panics_total";
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let latency_buckets = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let size_buckets = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ];
            let event_buckets = [
                1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0, 100000.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::GROUP_COMMIT_REQUESTS.into()),
                        &size_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::GROUP_COMMIT_EVENTS.into()),
                        &event_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::GROUPS_PER_SYNC.into()),
                        &size_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::ROLLUP_FLUSH_BUCKETS.into()),
                        &size_buckets,
                    )
                });
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                // Only fails on empty bucket lists, which are constants above.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // A second install (tests running several servers in one process) keeps the first.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Installs the tracing subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logging(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if result.is_err() {
        tracing::debug!("logging was already initialised");
    }
}

/// Outcome of one ingestion request, emitted once it is answered.
pub struct IngestReplied<'a> {
    pub tenant: &'a str,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub latency: Duration,
}

impl IngestReplied<'_> {
    pub fn emit(&self) {
        let tenant = self.tenant.to_string();
        counter!(names::INGEST_EVENTS, "tenant" => tenant.clone(), "outcome" => "accepted")
            .increment(self.accepted as u64);
        if self.duplicates > 0 {
            counter!(names::INGEST_EVENTS, "tenant" => tenant.clone(), "outcome" => "duplicate")
                .increment(self.duplicates as u64);
            counter!(names::DEDUP_HITS, "tenant" => tenant.clone())
                .increment(self.duplicates as u64);
        }
        if self.rejected > 0 {
            counter!(names::INGEST_EVENTS, "tenant" => tenant.clone(), "outcome" => "rejected")
                .increment(self.rejected as u64);
        }
        histogram!(names::ACK_LATENCY, "tenant" => tenant).record(self.latency.as_secs_f64());
    }
}

/// Events of a request refused before they reached the pipeline.
pub fn ingest_refused(tenant: &str, events: usize, outcome: &'static str) {
    counter!(names::INGEST_EVENTS, "tenant" => tenant.to_string(), "outcome" => outcome)
        .increment(events as u64);
    if outcome == "rate_limited" {
        counter!(names::RATE_LIMITED_EVENTS, "tenant" => tenant.to_string())
            .increment(events as u64);
    }
}

/// One HTTP request answered.
pub fn http_request(route: String, status: u16) {
    counter!(names::HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// One group commit of the log writer answered, `waited` after its writes were done (its
/// own fsync, and the one before it when it was staged during that one).
pub fn group_committed(requests: usize, events: usize, waited: Duration) {
    histogram!(names::GROUP_COMMIT_REQUESTS).record(requests as f64);
    histogram!(names::GROUP_COMMIT_EVENTS).record(events as f64);
    histogram!(names::GROUP_COMMIT_WAIT).record(waited.as_secs_f64());
}

/// One fsync of the log (or, buffered, one pass of the sync thread), covering `groups`.
pub fn log_synced(groups: usize, took: Duration) {
    histogram!(names::FSYNC_LATENCY).record(took.as_secs_f64());
    histogram!(names::GROUPS_PER_SYNC).record(groups as f64);
}

/// One run of dedup keys written into the tables.
pub fn dedup_ingested(keys: usize, took: Duration) {
    histogram!(names::DEDUP_INGEST).record(took.as_secs_f64());
    counter!(names::DEDUP_INGESTED_KEYS).increment(keys as u64);
}

/// Where one ingestion request's time went, stage by stage (see `http::ingest::RequestTimes`).
pub fn ingest_stages(stages: &[(&'static str, Duration)]) {
    for (stage, took) in stages {
        histogram!(names::INGEST_STAGE, "stage" => *stage).record(took.as_secs_f64());
    }
}

pub fn log_queue_wait(wait: Duration) {
    histogram!(names::LOG_QUEUE_WAIT).record(wait.as_secs_f64());
}

pub fn log_write(took: Duration) {
    histogram!(names::LOG_WRITE).record(took.as_secs_f64());
}

pub fn log_queue_depth(depth: usize) {
    gauge!(names::LOG_QUEUE_DEPTH).set(depth as f64);
}

pub fn mailbox_depth(tenant: &str, depth: usize) {
    gauge!(names::MAILBOX_DEPTH, "tenant" => tenant.to_string()).set(depth as f64);
}

/// A supervisor rebuilt a child actor.
pub fn actor_restarted(tenant: &str, actor: &'static str, backoff: Duration) {
    counter!(names::ACTOR_RESTARTS, "tenant" => tenant.to_string(), "actor" => actor).increment(1);
    tracing::warn!(
        tenant,
        actor,
        backoff_ms = backoff.as_millis() as u64,
        "restarted failed actor"
    );
}

pub fn child_running(tenant: &str, actor: &'static str, running: bool) {
    gauge!(names::ACTOR_RUNNING, "tenant" => tenant.to_string(), "actor" => actor)
        .set(if running { 1.0 } else { 0.0 });
}

pub fn cold_flushed(tenant: &str, events: u64, segments: usize, bytes: u64) {
    counter!(names::COLD_FLUSHED_EVENTS, "tenant" => tenant.to_string()).increment(events);
    counter!(names::COLD_SEGMENTS, "tenant" => tenant.to_string()).increment(segments as u64);
    counter!(names::COLD_BYTES, "tenant" => tenant.to_string()).increment(bytes);
}

pub fn cold_flush_lag(tenant: &str, lag_micros: i64) {
    gauge!(names::COLD_FLUSH_LAG, "tenant" => tenant.to_string()).set(lag_micros as f64 / 1e6);
}

pub fn cold_flush_failed(tenant: &str) {
    counter!(names::COLD_FLUSH_FAILURES, "tenant" => tenant.to_string()).increment(1);
}

/// A cold maintenance task (`task`: retention, compaction, erasure) changed the tier.
pub fn cold_maintained(
    tenant: &str,
    task: &'static str,
    segments_removed: u64,
    segments_written: u64,
    events_removed: u64,
) {
    let labels = [("tenant", tenant.to_string()), ("task", task.to_string())];
    counter!(names::COLD_MAINTENANCE_SEGMENTS_REMOVED, &labels).increment(segments_removed);
    counter!(names::COLD_MAINTENANCE_SEGMENTS_WRITTEN, &labels).increment(segments_written);
    counter!(names::COLD_MAINTENANCE_EVENTS_REMOVED, &labels).increment(events_removed);
}

/// The tenant's committed segments, as of its flusher's last pass.
pub fn cold_segments(tenant: &str, segments: usize, bytes: u64, rows: u64) {
    gauge!(names::COLD_SEGMENTS_CURRENT, "tenant" => tenant.to_string()).set(segments as f64);
    gauge!(names::COLD_SEGMENT_BYTES, "tenant" => tenant.to_string()).set(bytes as f64);
    if rows > 0 {
        gauge!(names::COLD_BYTES_PER_EVENT, "tenant" => tenant.to_string())
            .set(bytes as f64 / rows as f64);
    }
}

/// The hot log's bytes on disk and the events it holds.
pub fn hot_log_size(bytes: u64, events: u64) {
    gauge!(names::HOT_LOG_BYTES).set(bytes as f64);
    if events > 0 {
        gauge!(names::HOT_LOG_BYTES_PER_EVENT).set(bytes as f64 / events as f64);
    }
}

pub fn tenant_pipelines(count: usize) {
    gauge!(names::TENANT_PIPELINES).set(count as f64);
}

/// A rollup flush reached storage.
pub fn rollup_flushed(tenant: &str, buckets: usize, took: Duration, skipped: &[u64; 3]) {
    histogram!(names::ROLLUP_FLUSH).record(took.as_secs_f64());
    histogram!(names::ROLLUP_FLUSH_BUCKETS).record(buckets as f64);
    for (resolution, count) in ["minute", "hour", "day"].iter().zip(skipped) {
        if *count > 0 {
            counter!(names::ROLLUP_SKIPPED, "tenant" => tenant.to_string(), "resolution" => *resolution)
                .increment(*count);
        }
    }
}

/// Log entries a rollup actor read back from the log.
pub fn rollup_log_reads(entries: usize) {
    counter!(names::ROLLUP_LOG_READS).increment(entries as u64);
}

/// Cluster mode: the partitions owned after a lease round, and how ownership changed in it.
pub fn cluster_leases(owned: usize, acquired: usize, lost: usize, released: usize) {
    gauge!(names::CLUSTER_PARTITIONS_OWNED).set(owned as f64);
    for (change, n) in [
        ("acquired", acquired),
        ("lost", lost),
        ("released", released),
    ] {
        if n > 0 {
            counter!(names::CLUSTER_LEASE_CHANGES, "change" => change).increment(n as u64);
        }
    }
}

/// Cluster mode: messages of `partition` applied, and the messages it still has to read.
pub fn cluster_partition_progress(partition: u16, processed: usize, lag: u64) {
    let partition = partition.to_string();
    if processed > 0 {
        counter!(names::CLUSTER_MESSAGES_PROCESSED, "partition" => partition.clone())
            .increment(processed as u64);
    }
    gauge!(names::CLUSTER_CONSUMER_LAG, "partition" => partition).set(lag as f64);
}

/// Cluster mode: how long ago the partition's last checkpoint was written.
pub fn cluster_checkpoint_age(partition: u16, age: Duration) {
    gauge!(names::CLUSTER_CHECKPOINT_AGE, "partition" => partition.to_string())
        .set(age.as_secs_f64());
}

/// Cluster mode: this node stopped working on `partition`; its gauges go back to 0.
pub fn cluster_partition_left(partition: u16) {
    let partition = partition.to_string();
    gauge!(names::CLUSTER_CONSUMER_LAG, "partition" => partition.clone()).set(0.0);
    gauge!(names::CLUSTER_CHECKPOINT_AGE, "partition" => partition).set(0.0);
}

/// Cluster mode: a checkpoint of `bytes` written.
pub fn cluster_checkpoint_written(bytes: usize) {
    counter!(names::CLUSTER_CHECKPOINTS).increment(1);
    counter!(names::CLUSTER_CHECKPOINT_BYTES).increment(bytes as u64);
}

/// Cluster mode: `sequences` lost from the shared rollups for good.
pub fn cluster_rollup_gap(sequences: u64) {
    counter!(names::CLUSTER_ROLLUP_GAPS).increment(sequences);
}

/// Cluster mode: a flush committed `segments` holding `events`.
pub fn cluster_cold_flushed(segments: u64, events: u64) {
    counter!(names::CLUSTER_COLD_SEGMENTS).increment(segments);
    counter!(names::CLUSTER_COLD_EVENTS).increment(events);
}

/// Cluster mode: `sequences` a cold flush found missing from the local log.
pub fn cluster_cold_missing(sequences: u64) {
    counter!(names::CLUSTER_COLD_MISSING).increment(sequences);
}

/// Cluster mode: `events` rolled up again from the cold tier.
pub fn cluster_rollup_from_cold(events: u64) {
    counter!(names::CLUSTER_ROLLUP_FROM_COLD).increment(events);
}

/// Cluster mode: `entries` deleted from a process node's local log.
pub fn cluster_local_entries_deleted(entries: u64) {
    counter!(names::CLUSTER_LOCAL_ENTRIES_DELETED).increment(entries);
}

/// Cluster mode: `messages` removed from the stream below a checkpoint.
pub fn cluster_stream_trimmed(messages: u64) {
    counter!(names::CLUSTER_STREAM_TRIMMED).increment(messages);
}

/// Cluster mode: one publish to the stream answered (or failed) after `took`.
pub fn cluster_published(took: Duration, ok: bool) {
    if ok {
        histogram!(names::CLUSTER_PUBLISH_LATENCY).record(took.as_secs_f64());
    } else {
        counter!(names::CLUSTER_PUBLISH_FAILURES).increment(1);
    }
}

/// Where a tenant's rollups stand.
pub fn rollup_lag(tenant: &str, events: u64, since_flush: Duration) {
    gauge!(names::ROLLUP_LAG, "tenant" => tenant.to_string()).set(events as f64);
    gauge!(names::WATERMARK_AGE, "tenant" => tenant.to_string()).set(since_flush.as_secs_f64());
}

/// One query answered.
pub fn query_answered(endpoint: &'static str, took: Duration, cached: bool) {
    histogram!(names::QUERY_LATENCY, "endpoint" => endpoint).record(took.as_secs_f64());
    if cached {
        counter!(names::QUERY_CACHE_HITS, "endpoint" => endpoint).increment(1);
    }
}

/// A live subscriber joined (+1) or left (-1).
pub fn live_subscribers(tenant: &str, delta: f64) {
    gauge!(names::LIVE_SUBSCRIBERS, "tenant" => tenant.to_string()).increment(delta);
}

/// Events of one batch rolled up as `$other` (over the tenant's cap on event names).
pub fn event_names_overflowed(tenant: &str, events: u64) {
    counter!(names::EVENT_NAMES_OVERFLOW, "tenant" => tenant.to_string()).increment(events);
}

/// An identity call applied, with its outcome.
pub fn identity_linked(tenant: &str, kind: crate::identity::LinkKind, outcome: &'static str) {
    counter!(names::IDENTITY_LINKS, "tenant" => tenant.to_string(), "kind" => kind.as_str(), "outcome" => outcome)
        .increment(1);
}

/// A storage thread died.
pub fn storage_thread_panicked(thread: &'static str) {
    counter!(names::STORAGE_THREAD_PANICS, "thread" => thread).increment(1);
}

/// A subscriber skipped ticks.
pub fn live_coalesced(tenant: &str, ticks: u64) {
    counter!(names::LIVE_COALESCED, "tenant" => tenant.to_string()).increment(ticks);
}

/// Events of one batch that did not pass the tenant's plan.
pub fn schema_violations(
    tenant: &str,
    outcome: &'static str,
    reason: crate::deadletter::ReasonKind,
    events: u64,
) {
    counter!(names::SCHEMA_VIOLATIONS, "tenant" => tenant.to_string(), "outcome" => outcome, "reason" => reason.as_str())
        .increment(events);
    if outcome == "dead_lettered" {
        counter!(names::DEAD_LETTERS, "tenant" => tenant.to_string(), "reason" => reason.as_str())
            .increment(events);
    }
}

/// Dead letters replayed, by outcome.
pub fn dead_letters_replayed(tenant: &str, outcome: &'static str, letters: u64) {
    counter!(names::DEAD_LETTER_REPLAYS, "tenant" => tenant.to_string(), "outcome" => outcome)
        .increment(letters);
}

/// Dead letters deleted by retention or the size cap.
pub fn dead_letters_expired(tenant: &str, letters: u64) {
    counter!(names::DEAD_LETTERS_EXPIRED, "tenant" => tenant.to_string()).increment(letters);
}

/// Events dropped by a tenant's sampling.
pub fn sampled_out(tenant: &str, events: usize) {
    if events > 0 {
        counter!(names::SAMPLED_OUT, "tenant" => tenant.to_string()).increment(events as u64);
    }
}

/// Bytes a tenant's dead letters take.
pub fn dead_letter_bytes(tenant: &str, bytes: u64) {
    gauge!(names::DEAD_LETTER_BYTES, "tenant" => tenant.to_string()).set(bytes as f64);
}
