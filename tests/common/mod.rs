//! Test harness: runs the real `statsremote` binary on `127.0.0.1:0` with a temporary data dir,
//! and talks HTTP to it like any client.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running server process.
pub struct TestServer {
    child: std::sync::Mutex<Option<Child>>,
    pub base: String,
    pub data_dir: PathBuf,
    /// Owns the temporary dir when the server created it.
    _tempdir: Option<tempfile::TempDir>,
    /// Everything the server printed on stdout.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    agent: ureq::Agent,
}

/// What a request returned.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error reply is problem+json with this status, and returns its detail.
    pub fn problem(&self, status: u16) -> String {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "not problem+json: {self:?}"
        );
        let body = self.json();
        assert_eq!(body["status"], status);
        assert!(body["type"].as_str().is_some());
        assert!(body["title"].as_str().is_some());
        body["detail"].as_str().expect("detail").to_string()
    }
}

/// A tenant created through the admin API.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub write_key: String,
    pub read_key: String,
}

/// How to authenticate a request.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Basic(&'a str),
    Bearer(&'a str),
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_statsremote")
}

impl TestServer {
    /// A fresh server with a fresh data dir.
    pub fn start() -> TestServer {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in(&path, env);
        server._tempdir = Some(dir);
        server
    }

    /// A server on an existing data dir (to test restarts).
    pub fn start_in(data_dir: &Path, env: &[(&str, &str)]) -> TestServer {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .ok();
        let mut command = Command::new(binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("STATSREMOTE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.map(Stdio::from).unwrap_or_else(Stdio::null));
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn statsremote");
        let stdout = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let collected = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("statsremote listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                collected.lock().unwrap().push(line);
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                panic!("server did not start; log:\n{log}");
            }
        };
        TestServer {
            child: std::sync::Mutex::new(Some(child)),
            base,
            data_dir: data_dir.to_path_buf(),
            _tempdir: None,
            stdout: lines,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A new connection to the server that has sent `bytes` (raw HTTP, maybe unfinished).
    pub fn raw_connection(&self, bytes: &[u8]) -> std::net::TcpStream {
        use std::io::Write;
        let addr = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(bytes).expect("send");
        stream
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().expect("running").id()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&self) {
        let child = self.child.lock().map(|mut c| c.take()).unwrap_or(None);
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait(&self) -> ExitStatus {
        let mut child = self.child.lock().unwrap().take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&self) -> ExitStatus {
        send_signal(self.pid(), "TERM");
        self.wait()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut request = self.agent.request(method, &self.url(path));
        match auth {
            Auth::None => {}
            Auth::Basic(user) => {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
                request = request.set("Authorization", &format!("Basic {encoded}"));
            }
            Auth::Bearer(token) => {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
        }
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(bytes) => request.send_bytes(bytes),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => panic!("{method} {path}: transport error: {error}"),
        };
        to_reply(response)
    }

    /// Like [`TestServer::request`], but transport errors (server gone) are `None`.
    pub fn try_post(&self, path: &str, auth: Auth<'_>, body: &[u8]) -> Option<Reply> {
        let mut request = self
            .agent
            .post(&self.url(path))
            .set("Content-Type", "application/json");
        if let Auth::Bearer(token) = auth {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        match request.send_bytes(body) {
            Ok(response) | Err(ureq::Error::Status(_, response)) => Some(to_reply(response)),
            Err(_) => None,
        }
    }

    pub fn post_json(&self, path: &str, auth: Auth<'_>, body: &Value) -> Reply {
        self.request(
            "POST",
            path,
            auth,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn get(&self, path: &str, auth: Auth<'_>) -> Reply {
        self.request("GET", path, auth, &[], None)
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.request(
            method,
            path,
            Auth::Bearer(ADMIN_TOKEN),
            &[("Content-Type", "application/json")],
            bytes.as_deref(),
        )
    }

    pub fn create_tenant(&self, name: &str) -> Tenant {
        self.create_tenant_with(serde_json::json!({ "name": name }))
    }

    pub fn create_tenant_with(&self, body: Value) -> Tenant {
        let reply = self.admin("POST", "/admin/v1/tenants", Some(&body));
        assert_eq!(reply.status, 201, "{}", reply.body);
        let json = reply.json();
        Tenant {
            id: json["id"].as_str().unwrap().to_string(),
            write_key: json["write_key"].as_str().unwrap().to_string(),
            read_key: json["read_key"].as_str().unwrap().to_string(),
        }
    }

    /// Every stored event of the tenant, via the export endpoint.
    pub fn export(&self, read_key: &str, query: &str) -> Vec<Value> {
        let reply = self.get(&format!("/v1/events/export{query}"), Auth::Bearer(read_key));
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply
            .body
            .lines()
            .map(|line| serde_json::from_str(line).expect("NDJSON line"))
            .collect()
    }

    /// Waits until the tenant's stored rollups include every durable event; returns that
    /// sequence.
    pub fn wait_rollups_caught_up(&self, read_key: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Any range works: `as_of` describes the tenant, not the range.
        let path = "/v1/query/uniques?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z";
        loop {
            let reply = self.get(path, Auth::Bearer(read_key));
            assert_eq!(reply.status, 200, "{}", reply.body);
            let as_of = &reply.json()["as_of"];
            let rolled = as_of["rolled_up_through_seq"].as_u64().unwrap();
            let log = as_of["log_seq"].as_u64().unwrap();
            if rolled == log {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "rollups never caught up: {as_of}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics", Auth::None).body
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn to_reply(response: ureq::Response) -> Reply {
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|name| {
            response
                .header(&name)
                .map(|value| (name.clone(), value.to_string()))
        })
        .collect();
    let status = response.status();
    let mut body = String::new();
    let _ = response
        .into_reader()
        .take(64 << 20)
        .read_to_string(&mut body);
    Reply {
        status,
        headers,
        body,
    }
}

/// Sends a signal (by name, e.g. "TERM") with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A track event with a chosen messageId.
pub fn track(message_id: &str, user: &str, event: &str) -> Value {
    serde_json::json!({
        "type": "track",
        "messageId": message_id,
        "userId": user,
        "event": event,
        "properties": { "plan": "pro", "n": 1 },
        "timestamp": "2026-01-02T03:04:05.000Z",
    })
}

/// `{"batch": [...]}` of the given events.
pub fn batch(events: Vec<Value>) -> Value {
    serde_json::json!({ "batch": events })
}

/// messageIds of exported events.
pub fn message_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect()
}

/// What the kernel says of a process: resident memory, its high-water mark, CPU time.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub cpu: Duration,
}

/// Reads `/proc/<pid>/status` (VmRSS, VmHWM) and `/proc/<pid>/stat` (utime + stime).
pub fn process_stats(pid: u32) -> ProcessStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find(|line| line.starts_with(field))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on Linux.
    ProcessStats {
        rss_bytes: kib("VmRSS:") * 1024,
        peak_rss_bytes: kib("VmHWM:") * 1024,
        cpu: Duration::from_millis(ticks * 10),
    }
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so the next reading is the peak
/// of what happens from now on.
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
}
