//! The server under test: started through `testkit` (release binary, free port, temporary data
//! dir, rate limits out of the way) or an existing one given by `--url`; its admin and query API;
//! its CPU time and peak RSS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use testkit::{Launch, ProcessStats};

pub(crate) use testkit::Tenant;

/// How long a stopping server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// A server we talk to.
pub(crate) struct Target {
    /// Where admin and query requests go.
    pub(crate) base: String,
    /// Where the load goes, spread over the connections (several: a cluster's ingest nodes).
    pub(crate) bases: Vec<String>,
    /// A cluster's ingest nodes: the rollups are the shared ones, whose answers say how far
    /// they are rolled up but not how much the stream still holds.
    pub(crate) cluster: bool,
    pub(crate) admin_token: String,
    agent: ureq::Agent,
    /// `None` for a server given by `--url`.
    server: Option<testkit::Server>,
}

/// The default server binary: `statsremote` next to this executable (both in target/release).
pub(crate) fn default_binary() -> PathBuf {
    testkit::binary_beside_current_exe()
        .unwrap_or_else(|| PathBuf::from("target/release/statsremote"))
}

/// The admin token of the servers the load generator starts.
pub(crate) const ADMIN_TOKEN: &str = "loadtest-admin-token";

/// How the load generator starts a server: quiet, with rate limits out of the way.
pub(crate) fn launch(binary: &Path) -> Launch {
    Launch::new(binary, ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .env(
            "STATSREMOTE__TENANT_DEFAULTS__RATE_LIMIT_EVENTS_PER_SECOND",
            "100000000",
        )
        .env(
            "STATSREMOTE__TENANT_DEFAULTS__RATE_LIMIT_BURST",
            "100000000",
        )
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

impl Target {
    /// Starts `binary` on 127.0.0.1:0 with a fresh data dir and the given settings.
    pub(crate) fn start(binary: &Path, settings: &[(&str, &str)]) -> Result<Target> {
        let server = launch(binary)
            .envs(settings.iter().copied())
            .start()
            .map_err(|error| match error {
                error @ testkit::Error::Spawn { .. } => anyhow!(error).context(format!(
                    "starting {} (build it with `cargo build --release`)",
                    binary.display()
                )),
                error => anyhow!(error),
            })?;
        Ok(Target {
            base: server.base().to_string(),
            bases: vec![server.base().to_string()],
            cluster: false,
            admin_token: server.admin_token().to_string(),
            agent: agent(),
            server: Some(server),
        })
    }

    /// An already running server.
    /// An already running server, or several (`url` a comma-separated list: a cluster's ingest
    /// nodes, which the load is spread over).
    pub(crate) fn existing(url: &str, admin_token: &str) -> Target {
        let bases: Vec<String> = url
            .split(',')
            .map(|base| base.trim().trim_end_matches('/').to_string())
            .filter(|base| !base.is_empty())
            .collect();
        let base = bases.first().cloned().unwrap_or_default();
        let agent = agent();
        // A cluster's ingest node says so in its readiness answer.
        let cluster = agent
            .get(&format!("{base}/readyz"))
            .call()
            .ok()
            .and_then(|reply| reply.into_json::<Value>().ok())
            .is_some_and(|ready| ready["role"] == "ingest");
        Target {
            base,
            cluster,
            bases,
            admin_token: admin_token.to_string(),
            agent,
            server: None,
        }
    }

    /// CPU time and memory of a server we started (and still run).
    pub(crate) fn stats(&self) -> Option<ProcessStats> {
        self.server.as_ref()?.stats().ok()
    }

    /// A tenant whose rate limits are out of the way.
    pub(crate) fn create_tenant(&self, name: &str) -> Result<Tenant> {
        let body = json!({
            "name": name,
            "settings": {"rate_limit_events_per_second": 100_000_000u32, "rate_limit_burst": 100_000_000u32}
        });
        Ok(testkit::create_tenant(
            &self.agent,
            &self.base,
            &self.admin_token,
            &body,
        )?)
    }

    /// An admin request with a JSON body; JSON reply.
    pub(crate) fn admin_json(&self, method: &str, path: &str, body: &Value) -> Result<Value> {
        let reply = self
            .agent
            .request(method, &format!("{}{}", self.base, path))
            .set("Authorization", &format!("Bearer {}", self.admin_token))
            .send_json(body.clone())
            .with_context(|| format!("{method} {path}"))?;
        Ok(reply.into_json().unwrap_or(Value::Null))
    }

    /// GET with the tenant's read key; JSON reply.
    pub(crate) fn query(&self, tenant: &Tenant, path_and_query: &str) -> Result<Value> {
        let reply = self
            .agent
            .get(&format!("{}{}", self.base, path_and_query))
            .set("Authorization", &format!("Bearer {}", tenant.read_key))
            .call()
            .with_context(|| format!("GET {path_and_query}"))?;
        Ok(reply.into_json()?)
    }

    /// Waits until every node the load goes to knows the tenant (a cluster's nodes learn of a
    /// new tenant from the shared directory, within milliseconds).
    pub(crate) fn wait_known(&self, tenant: &Tenant) -> Result<()> {
        let started = std::time::Instant::now();
        for base in &self.bases {
            loop {
                let reply = self
                    .agent
                    .get(&format!("{base}/admin/v1/tenants/{}", tenant.id))
                    .set("Authorization", &format!("Bearer {}", self.admin_token))
                    .call();
                if reply.is_ok() {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(anyhow!(
                        "{base} does not know tenant {} after 30 s",
                        tenant.id
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// An admin request (no body); JSON reply, or null for an empty one.
    pub(crate) fn admin(&self, method: &str, path: &str) -> Result<Value> {
        let reply = self
            .agent
            .request(method, &format!("{}{}", self.base, path))
            .set("Authorization", &format!("Bearer {}", self.admin_token))
            .call()
            .with_context(|| format!("{method} {path}"))?;
        Ok(reply.into_json().unwrap_or(Value::Null))
    }

    /// The server's `/metrics` text.
    pub(crate) fn metrics(&self) -> Result<String> {
        Ok(self
            .agent
            .get(&format!("{}/metrics", self.base))
            .call()
            .context("GET /metrics")?
            .into_string()?)
    }

    /// Waits until the tenant's rollups include every durable event.
    /// Cluster mode: waits until the shared rollups count `acked` events over the range, or
    /// stop changing for 10 s; returns the last count.
    pub(crate) fn wait_counted(
        &self,
        tenant: &Tenant,
        from: &str,
        to: &str,
        acked: u64,
    ) -> Result<u64> {
        let started = std::time::Instant::now();
        let (mut last, mut changed) = (u64::MAX, std::time::Instant::now());
        loop {
            let events = self.query(
                tenant,
                &format!("/v1/query/events?from={from}&to={to}&limit=10000"),
            )?;
            let counted: u64 = events["events"]
                .as_array()
                .map(|list| list.iter().filter_map(|e| e["count"].as_u64()).sum())
                .unwrap_or(0);
            if counted != last {
                (last, changed) = (counted, std::time::Instant::now());
            }
            if counted >= acked
                || changed.elapsed() > Duration::from_secs(10)
                || started.elapsed() > Duration::from_secs(300)
            {
                return Ok(counted);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn wait_caught_up(&self, tenant: &Tenant, from: &str, to: &str) -> Result<()> {
        let timeout = Duration::from_secs(120);
        testkit::wait_rollups_caught_up(
            &self.agent,
            &self.base,
            &tenant.read_key,
            from,
            to,
            timeout,
        )
        .with_context(|| format!("tenant {}", tenant.id))?;
        Ok(())
    }

    /// Stops a server we started (SIGTERM, then wait).
    pub(crate) fn stop(&mut self) {
        if let Some(server) = &self.server {
            if let Err(error) = server.stop(STOP_TIMEOUT) {
                eprintln!("stopping the server: {error}");
            }
        }
    }
}
