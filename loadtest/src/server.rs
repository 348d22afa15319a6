//! The server under test: started by us (release binary, free port, temporary data dir) or an
//! existing one given by `--url`; its admin API; its CPU time and peak RSS from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// A server we talk to.
pub(crate) struct Target {
    pub(crate) base: String,
    pub(crate) admin_token: String,
    child: Option<Child>,
    _data_dir: Option<tempfile::TempDir>,
}

/// A tenant created for the run.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) id: String,
    pub(crate) write_key: String,
    pub(crate) read_key: String,
}

/// The default server binary: `statsremote` next to this executable (both in target/release).
pub(crate) fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("statsremote")))
        .unwrap_or_else(|| PathBuf::from("target/release/statsremote"))
}

impl Target {
    /// Starts `binary` on 127.0.0.1:0 with a fresh data dir and the given settings.
    pub(crate) fn start(binary: &Path, settings: &[(&str, &str)]) -> Result<Target> {
        let dir = tempfile::tempdir().context("creating a data dir")?;
        let token = "loadtest-admin-token".to_string();
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("STATSREMOTE_ADMIN_TOKEN", &token)
            .env("RUST_LOG", "warn")
            .env(
                "STATSREMOTE__TENANT_DEFAULTS__RATE_LIMIT_EVENTS_PER_SECOND",
                "100000000",
            )
            .env(
                "STATSREMOTE__TENANT_DEFAULTS__RATE_LIMIT_BURST",
                "100000000",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (key, value) in settings {
            command.env(key, value);
        }
        let mut child = command.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release`)",
                binary.display()
            )
        })?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("statsremote listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            anyhow!(
                "the server did not start; see its log in {}",
                dir.path().display()
            )
        })?;
        Ok(Target {
            base,
            admin_token: token,
            child: Some(child),
            _data_dir: Some(dir),
        })
    }

    /// An already running server.
    pub(crate) fn existing(url: &str, admin_token: &str) -> Target {
        Target {
            base: url.trim_end_matches('/').to_string(),
            admin_token: admin_token.to_string(),
            child: None,
            _data_dir: None,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn create_tenant(&self, name: &str) -> Result<Tenant> {
        let reply: Value = ureq::post(&format!("{}/admin/v1/tenants", self.base))
            .set("Authorization", &format!("Bearer {}", self.admin_token))
            .send_json(json!({
                "name": name,
                "settings": {"rate_limit_events_per_second": 100_000_000u32, "rate_limit_burst": 100_000_000u32}
            }))
            .context("creating a tenant")?
            .into_json()?;
        let field = |name: &str| -> Result<String> {
            reply[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("tenant reply lacks {name}: {reply}"))
        };
        Ok(Tenant {
            id: field("id")?,
            write_key: field("write_key")?,
            read_key: field("read_key")?,
        })
    }

    /// GET with the tenant's read key; JSON reply.
    pub(crate) fn query(&self, tenant: &Tenant, path_and_query: &str) -> Result<Value> {
        let reply = ureq::get(&format!("{}{}", self.base, path_and_query))
            .set("Authorization", &format!("Bearer {}", tenant.read_key))
            .timeout(Duration::from_secs(60))
            .call()
            .with_context(|| format!("GET {path_and_query}"))?;
        Ok(reply.into_json()?)
    }

    /// Waits until the tenant's rollups include every durable event.
    pub(crate) fn wait_caught_up(&self, tenant: &Tenant, from: &str, to: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reply = self.query(tenant, &format!("/v1/query/uniques?from={from}&to={to}"))?;
            let as_of = &reply["as_of"];
            if as_of["rolled_up_through_seq"] == as_of["log_seq"] {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("rollups of tenant {} did not catch up: {as_of}", tenant.id);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops a server we started (SIGTERM, then wait).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time (user + system) of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(") ").next()?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in clock ticks, 100 per second on every platform we run on.
    Some(ticks as f64 / 100.0)
}

/// Peak resident set size (VmHWM) of a process, in MiB.
pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
