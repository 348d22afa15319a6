//! Typed configuration.
//!
//! Layers, later ones win: the embedded `config/default.toml`, an optional file given with
//! `--config`, environment variables `STATSREMOTE__SECTION__KEY`, then the `--listen` and
//! `--data-dir` flags. Every struct denies unknown keys, and [`Config::validate`] checks the
//! values; both produce an error naming the setting, and the server refuses to start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The defaults, compiled in so that the binary needs no file to start.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "STATSREMOTE__";

/// Settings whose environment value is taken verbatim, never parsed as a number or boolean:
/// a token like `007` must stay `007`, and a secret must never be echoed by a type error.
const VERBATIM_SETTINGS: [&str; 8] = [
    "auth.admin_token",
    "server.metrics_token",
    "storage.data_dir",
    "log.level",
    "cold.s3.bucket",
    "cold.s3.prefix",
    "cold.s3.endpoint",
    "cold.s3.region",
];

/// Shortest admin or metrics token accepted in the configuration.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Parsing or type error; figment's message names the key and the source.
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value that parses but makes no sense.
    #[error("invalid configuration: setting `{setting}` = {value}: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: &'static str,
    },
    /// `[cluster]` settings that cannot work together.
    #[error("invalid configuration: {0}")]
    Cluster(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub actors: ActorsConfig,
    pub rollups: RollupsConfig,
    pub cold: ColdConfig,
    pub live: LiveConfig,
    pub reads: ReadsConfig,
    pub tenant_defaults: TenantDefaults,
    pub processing: ProcessingConfig,
    pub enrich: EnrichConfig,
    pub cluster: crate::cluster::ClusterConfig,
    pub benchmark: BenchmarkConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// 0 = one worker per core.
    pub workers: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Only meaningful behind a proxy that sets X-Forwarded-For; otherwise clients could spoof it.
    pub trust_forwarded_for: bool,
    /// A request's headers must arrive within this time of its first byte.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this time of its handler starting.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Open connections across all workers; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Large bodies (decompression and parsing) handled at once; 0 = half the CPU cores.
    pub max_concurrent_large_bodies: usize,
    /// Bodies at least this large (as received) count as large.
    pub large_body_bytes: ByteSize,
    /// Empty: `/metrics` is open. Else it requires `Authorization: Bearer <token>`.
    pub metrics_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Reply after fsync (group commit).
    Fsync,
    /// Reply after the write reached the OS page cache.
    Buffered,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Bounded queue in front of the log writer thread.
    pub queue_capacity: usize,
    /// Upper bound on requests per group commit, so one commit cannot grow without limit.
    pub max_group_requests: usize,
    pub cache_size: ByteSize,
    /// Most memory the in-memory filter of dedup keys may take; 0 turns it off.
    pub dedup_filter_memory: ByteSize,
    /// Below this much free space on the data disk, ingestion is refused (0: never).
    pub min_free_space: ByteSize,
    /// Longest a new dedup key waits before it is written into the dedup tables in a run.
    #[serde(with = "humantime_serde")]
    pub dedup_max_age: Duration,
    /// Log entries received longer ago than this move to the cold tier.
    #[serde(with = "humantime_serde")]
    pub hot_retention: Duration,
}

/// Where cold segments go, and how often the flushers look for work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColdConfig {
    pub store: ColdStoreKind,
    /// How often each tenant's flusher looks for entries to move.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Most events one flush moves (it holds their compressed segments while it writes them).
    pub max_flush_events: usize,
    /// How long superseded or never committed objects wait before they are deleted.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Segments with fewer rows are merged with their neighbours of the same hour.
    pub compact_below_rows: u64,
    /// Most rows of a segment merged by compaction.
    pub compact_max_rows: u64,
    /// Fewest adjacent small segments of an hour merged at once (at least 2).
    pub compact_min_segments: usize,
    /// Where the objects go when `store` is `s3`.
    pub s3: S3Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColdStoreKind {
    /// A folder under the data dir, `<data_dir>/cold/`.
    Local,
    /// An S3-compatible bucket (`cold.s3`).
    S3,
}

/// An S3-compatible bucket for the cold tier. Credentials come from the standard
/// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Folder inside the bucket that plays the store's root ("" = the bucket's root).
    pub prefix: String,
    /// The service's URL ("" = AWS's own endpoint for the region).
    pub endpoint: String,
    pub region: String,
    /// `https://<bucket>.<host>/` addressing; false: path style, `https://<host>/<bucket>/`.
    pub virtual_hosted_style: bool,
    /// Allows an `http://` endpoint.
    pub allow_http: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_body_bytes: ByteSize,
    pub max_event_bytes: ByteSize,
    pub max_events_per_request: usize,
    /// Most top-level members of one event.
    pub max_event_members: usize,
    #[serde(with = "humantime_serde")]
    pub future_tolerance: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsConfig {
    pub mailbox_capacity: usize,
    /// 0 = one per core.
    pub arbiters: usize,
    /// Blocking threads per arbiter; 0 = 4.
    pub blocking_threads: usize,
    #[serde(with = "humantime_serde")]
    pub restart_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupsConfig {
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub minute_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub hour_retention: Duration,
    /// Zero = forever.
    #[serde(with = "humantime_serde")]
    pub day_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub max_minute_range: Duration,
    #[serde(with = "humantime_serde")]
    pub max_hour_range: Duration,
    #[serde(with = "humantime_serde")]
    pub max_day_range: Duration,
    #[serde(with = "humantime_serde")]
    pub max_funnel_range: Duration,
    pub query_cache_entries: usize,
    pub query_cache_series_blocks: usize,
    pub max_concurrent_flushes: usize,
    /// Most ids of one tenant that take part in identity links (held in memory).
    pub max_identity_ids: usize,
}

impl RollupsConfig {
    pub fn retention(&self) -> crate::rollup::Retention {
        crate::rollup::Retention {
            minute: self.minute_retention,
            hour: self.hour_retention,
            day: (!self.day_retention.is_zero()).then_some(self.day_retention),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveConfig {
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
}

/// Per-tenant caps on long-running reads (see `crate::http::slots`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadsConfig {
    pub max_concurrent_exports: usize,
    pub max_concurrent_funnels: usize,
    pub max_live_connections: usize,
    /// An export whose client takes nothing for this long is cut off.
    #[serde(with = "humantime_serde")]
    pub export_stall_timeout: Duration,
    /// A funnel reads events received up to this long after its `to`, no later ones.
    #[serde(with = "humantime_serde")]
    pub funnel_late_arrival: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDefaults {
    pub rate_limit_events_per_second: u32,
    pub rate_limit_burst: u32,
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    pub max_event_names: u32,
    /// Cold segments whose hour ended longer ago than this are deleted (0: kept forever).
    #[serde(with = "humantime_serde")]
    pub raw_retention: Duration,
    pub schema_enforcement: crate::schema::Enforcement,
    pub unplanned_events: crate::schema::Unplanned,
    #[serde(with = "humantime_serde")]
    pub deadletter_retention: Duration,
    pub deadletter_max_bytes: ByteSize,
}

/// What enrichment derives besides the stored event's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// Browser, OS and device type from `context.userAgent`.
    pub user_agent: bool,
    /// Referrer host and UTM parameters from `context.page` and `context.campaign`.
    pub campaign: bool,
    /// A MaxMind-format city database; empty: no GeoIP.
    pub geoip_database: String,
}

/// Tracking plans and dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingConfig {
    /// Largest schema document one version may have.
    pub max_schema_bytes: ByteSize,
    /// Most schema versions (of all its event names, retired ones included) one tenant keeps.
    pub max_schema_versions: usize,
    /// Mismatches listed per event in a reply and a dead letter.
    pub max_violations_per_event: usize,
}

/// Settings that exist only to measure the server. Never for production.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    /// Discard events after parsing and validation (the loadtest's "ceiling" mode).
    pub ceiling_discard_events: bool,
    /// A wait added to every fsync of the event log, to reproduce a slow disk.
    #[serde(with = "humantime_serde")]
    pub fsync_delay: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Empty means "not set here".
    pub admin_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Command-line values that override the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub role: Option<crate::cluster::Role>,
}

impl Config {
    /// Loads the layered configuration and validates it.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(overrides, &env)
    }

    /// Same as [`Config::load`] with an explicit environment (tests use this).
    pub fn load_from(
        overrides: &Overrides,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(path) = &overrides.config_file {
            figment = figment.merge(Toml::file_exact(path));
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key_path = rest
                .split("__")
                .collect::<Vec<_>>()
                .join(".")
                .to_ascii_lowercase();
            let parsed: figment::value::Value = if VERBATIM_SETTINGS.contains(&key_path.as_str()) {
                figment::value::Value::from(value.clone())
            } else {
                value
                    .parse()
                    .unwrap_or_else(|never: std::convert::Infallible| match never {})
            };
            figment = figment.merge(Serialized::default(&key_path, parsed));
        }
        if let Some(listen) = overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(role) = overrides.role {
            figment = figment.merge(Serialized::default("cluster.role", role));
        }
        if let Some(dir) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("storage.data_dir", dir));
        }
        Self::extract(figment)
    }

    /// The embedded defaults with `toml` (a configuration file's text) layered on top.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::extract(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Toml::string(toml)),
        )
    }

    fn extract(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(
            setting: &'static str,
            value: impl ToString,
            reason: &'static str,
        ) -> ConfigError {
            ConfigError::Invalid {
                setting,
                value: value.to_string(),
                reason,
            }
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "\"\"", "must not be empty"));
        }
        if let Err(reason) = self.cluster.check() {
            return Err(ConfigError::Cluster(reason));
        }
        if self.storage.queue_capacity == 0 {
            return Err(invalid("storage.queue_capacity", 0, "must be at least 1"));
        }
        if self.storage.max_group_requests == 0 {
            return Err(invalid(
                "storage.max_group_requests",
                0,
                "must be at least 1",
            ));
        }
        if self.limits.max_event_bytes.as_u64() < 256 {
            return Err(invalid(
                "limits.max_event_bytes",
                self.limits.max_event_bytes,
                "must be at least 256B",
            ));
        }
        if self.limits.max_body_bytes < self.limits.max_event_bytes {
            return Err(invalid(
                "limits.max_body_bytes",
                self.limits.max_body_bytes,
                "must be at least limits.max_event_bytes",
            ));
        }
        if self.limits.max_body_bytes.as_u64() > 1 << 30 {
            return Err(invalid(
                "limits.max_body_bytes",
                self.limits.max_body_bytes,
                "must be at most 1GiB",
            ));
        }
        if self.limits.max_events_per_request == 0 {
            return Err(invalid(
                "limits.max_events_per_request",
                0,
                "must be at least 1",
            ));
        }
        if self.limits.max_event_members == 0 {
            return Err(invalid("limits.max_event_members", 0, "must be at least 1"));
        }
        for (setting, value) in [
            ("server.header_timeout", self.server.header_timeout),
            ("server.body_timeout", self.server.body_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(setting, "0s", "must be positive"));
            }
        }
        for (setting, value) in [
            (
                "reads.max_concurrent_exports",
                self.reads.max_concurrent_exports,
            ),
            (
                "reads.max_concurrent_funnels",
                self.reads.max_concurrent_funnels,
            ),
            (
                "reads.max_live_connections",
                self.reads.max_live_connections,
            ),
        ] {
            if value == 0 {
                return Err(invalid(setting, 0, "must be at least 1"));
            }
        }
        if self.reads.export_stall_timeout.is_zero() {
            return Err(invalid(
                "reads.export_stall_timeout",
                "0s",
                "must be positive",
            ));
        }
        // Requests are sequenced by when their body arrived; a wait longer than a few minutes
        // could exceed the receive-order slack that exports and funnels rely on.
        if self.server.body_timeout > Duration::from_secs(300) {
            return Err(invalid(
                "server.body_timeout",
                humantime::format_duration(self.server.body_timeout),
                "must be at most 5m",
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", 0, "must be at least 1"));
        }
        // Tokens are secrets: the message never echoes them.
        for (setting, token) in [
            ("auth.admin_token", &self.auth.admin_token),
            ("server.metrics_token", &self.server.metrics_token),
        ] {
            if !token.is_empty() && token.chars().count() < MIN_TOKEN_LEN {
                return Err(invalid(
                    setting,
                    "(hidden)",
                    "must be at least 16 characters (or empty)",
                ));
            }
        }
        if self.actors.mailbox_capacity == 0 {
            return Err(invalid("actors.mailbox_capacity", 0, "must be at least 1"));
        }
        if self.actors.restart_backoff_min.is_zero() {
            return Err(invalid(
                "actors.restart_backoff_min",
                "0s",
                "must be positive",
            ));
        }
        if self.actors.restart_backoff_max < self.actors.restart_backoff_min {
            return Err(invalid(
                "actors.restart_backoff_max",
                humantime::format_duration(self.actors.restart_backoff_max),
                "must be at least actors.restart_backoff_min",
            ));
        }
        if self.cold.store == ColdStoreKind::S3 && self.cold.s3.bucket.trim().is_empty() {
            return Err(invalid(
                "cold.s3.bucket",
                "\"\"",
                "must name a bucket when cold.store is \"s3\"",
            ));
        }
        if self.cold.compact_min_segments < 2 {
            return Err(invalid(
                "cold.compact_min_segments",
                self.cold.compact_min_segments,
                "must be at least 2",
            ));
        }
        if self.cold.compact_max_rows < self.cold.compact_below_rows {
            return Err(invalid(
                "cold.compact_max_rows",
                self.cold.compact_max_rows,
                "must be at least cold.compact_below_rows",
            ));
        }
        if self.cold.max_flush_events == 0 {
            return Err(invalid("cold.max_flush_events", "0", "must be positive"));
        }
        if self.actors.heartbeat.is_zero() {
            return Err(invalid("actors.heartbeat", "0s", "must be positive"));
        }
        for (setting, value) in [
            ("rollups.flush_interval", self.rollups.flush_interval),
            ("rollups.minute_retention", self.rollups.minute_retention),
            ("rollups.hour_retention", self.rollups.hour_retention),
            ("rollups.max_minute_range", self.rollups.max_minute_range),
            ("rollups.max_hour_range", self.rollups.max_hour_range),
            ("rollups.max_day_range", self.rollups.max_day_range),
            ("rollups.max_funnel_range", self.rollups.max_funnel_range),
            ("live.tick_interval", self.live.tick_interval),
            ("live.idle_timeout", self.live.idle_timeout),
            ("live.ping_interval", self.live.ping_interval),
            ("storage.dedup_max_age", self.storage.dedup_max_age),
            ("storage.hot_retention", self.storage.hot_retention),
            ("cold.flush_interval", self.cold.flush_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(setting, "0s", "must be positive"));
            }
        }
        if self.rollups.max_concurrent_flushes == 0 {
            return Err(invalid(
                "rollups.max_concurrent_flushes",
                0,
                "must be at least 1",
            ));
        }
        if self.live.tick_interval > Duration::from_secs(1) {
            return Err(invalid(
                "live.tick_interval",
                humantime::format_duration(self.live.tick_interval),
                "must be at most 1s (live metrics are pushed at least once a second)",
            ));
        }
        if self.rollups.hour_retention < self.rollups.minute_retention {
            return Err(invalid(
                "rollups.hour_retention",
                humantime::format_duration(self.rollups.hour_retention),
                "must be at least rollups.minute_retention",
            ));
        }
        if self.tenant_defaults.rate_limit_events_per_second == 0 {
            return Err(invalid(
                "tenant_defaults.rate_limit_events_per_second",
                0,
                "must be at least 1",
            ));
        }
        if self.tenant_defaults.rate_limit_burst == 0 {
            return Err(invalid(
                "tenant_defaults.rate_limit_burst",
                0,
                "must be at least 1",
            ));
        }
        if self.tenant_defaults.max_event_names == 0 {
            return Err(invalid(
                "tenant_defaults.max_event_names",
                0,
                "must be at least 1",
            ));
        }
        if self.tenant_defaults.dedup_window.is_zero() {
            return Err(invalid(
                "tenant_defaults.dedup_window",
                "0s",
                "must be positive",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "not a valid tracing filter",
            ));
        }
        Ok(())
    }

    /// Number of actix-web workers to run.
    pub fn http_workers(&self) -> usize {
        non_zero_or_cores(self.server.workers)
    }

    /// Large bodies decoded and parsed at once: by default half the cores (at least one), so
    /// that large bodies never take every core from small requests.
    pub fn large_body_permits(&self) -> usize {
        match self.server.max_concurrent_large_bodies {
            0 => (non_zero_or_cores(0) / 2).max(1),
            permits => permits,
        }
    }

    /// Number of arbiters hosting tenant actors.
    pub fn actor_arbiters(&self) -> usize {
        non_zero_or_cores(self.actors.arbiters)
    }

    /// Threads of the pool cold-tier passes and erasures run on: two per core.
    pub fn cold_task_threads(&self) -> usize {
        2 * non_zero_or_cores(0)
    }

    /// Most blocking threads of each actor arbiter (0 in the settings: 4).
    pub fn actor_blocking_threads(&self) -> usize {
        match self.actors.blocking_threads {
            0 => DEFAULT_BLOCKING_THREADS,
            threads => threads,
        }
    }

    /// Directory of the fjall database inside the data dir.
    pub fn database_path(&self) -> PathBuf {
        database_path(&self.storage.data_dir)
    }
}

/// Where the local cold store lives inside a data dir.
pub fn cold_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cold")
}

/// Where the fjall database lives inside a data dir.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

/// Blocking threads per actor arbiter by default. There is an arbiter per core already, so a
/// constant keeps the total proportional to the cores.
const DEFAULT_BLOCKING_THREADS: usize = 4;

fn non_zero_or_cores(value: usize) -> usize {
    if value > 0 {
        return value;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_load() {
        let config = Config::load_from(&Overrides::default(), &[]).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(config.storage.durability, Durability::Fsync);
        assert_eq!(
            config.tenant_defaults.dedup_window,
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn environment_overrides_nested_settings() {
        let config = Config::load_from(
            &Overrides::default(),
            &env(&[
                ("STATSREMOTE__STORAGE__DURABILITY", "buffered"),
                ("STATSREMOTE__LIMITS__MAX_EVENT_BYTES", "128KiB"),
                ("STATSREMOTE__TENANT_DEFAULTS__RATE_LIMIT_BURST", "7"),
                ("STATSREMOTE_ADMIN_TOKEN", "not a setting"),
            ]),
        )
        .unwrap();
        assert_eq!(config.storage.durability, Durability::Buffered);
        assert_eq!(config.limits.max_event_bytes.as_u64(), 128 * 1024);
        assert_eq!(config.tenant_defaults.rate_limit_burst, 7);
    }

    #[test]
    fn unknown_environment_key_names_the_setting() {
        let err = Config::load_from(
            &Overrides::default(),
            &env(&[("STATSREMOTE__STORAGE__DURABILTY", "buffered")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("durabilty"), "{err}");
    }

    #[test]
    fn bad_value_names_the_setting() {
        let err = Config::load_from(
            &Overrides::default(),
            &env(&[("STATSREMOTE__STORAGE__DURABILITY", "sometimes")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("durability"), "{err}");
        let err = Config::load_from(
            &Overrides::default(),
            &env(&[("STATSREMOTE__ACTORS__MAILBOX_CAPACITY", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("actors.mailbox_capacity"), "{err}");
    }

    #[test]
    fn secrets_and_paths_are_taken_verbatim() {
        let config = Config::load_from(
            &Overrides::default(),
            &env(&[
                ("STATSREMOTE__AUTH__ADMIN_TOKEN", "0070000000000000"),
                ("STATSREMOTE__SERVER__METRICS_TOKEN", "1234567890123456"),
                ("STATSREMOTE__STORAGE__DATA_DIR", "123"),
            ]),
        )
        .unwrap();
        assert_eq!(config.auth.admin_token, "0070000000000000");
        assert_eq!(config.server.metrics_token, "1234567890123456");
        assert_eq!(config.storage.data_dir, PathBuf::from("123"));
    }

    #[test]
    fn short_tokens_are_refused_without_being_echoed() {
        for setting in ["AUTH__ADMIN_TOKEN", "SERVER__METRICS_TOKEN"] {
            let err = Config::load_from(
                &Overrides::default(),
                &env(&[(&format!("STATSREMOTE__{setting}"), "secret007")]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("at least 16 characters"), "{err}");
            assert!(!err.contains("secret007"), "{err}");
        }
    }

    #[test]
    fn flags_override_environment() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(PathBuf::from("/tmp/x")),
            ..Overrides::default()
        };
        let config = Config::load_from(
            &overrides,
            &env(&[("STATSREMOTE__SERVER__LISTEN", "127.0.0.1:9")]),
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 0);
        assert_eq!(config.storage.data_dir, PathBuf::from("/tmp/x"));
    }
}
