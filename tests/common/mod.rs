//! Test harness: the real `statsremote` binary, started through `testkit` on `127.0.0.1:0` with a
//! temporary data dir (or a given one), and an HTTP client that talks to it like any client.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;
pub use testkit::{ProcessStats, Tenant};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// How long a stopping server may take to exit before it is killed and the test fails.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server process, with an HTTP client for it.
pub struct TestServer {
    server: testkit::Server,
    pub base: String,
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

/// How to authenticate a request.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Basic(&'a str),
    Bearer(&'a str),
}

/// The debug binary cargo builds for this package's integration tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_statsremote")
}

fn launch(env: &[(&str, &str)]) -> testkit::Launch {
    testkit::Launch::new(binary(), ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
}

impl TestServer {
    /// A fresh server with a fresh data dir.
    pub fn start() -> TestServer {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> TestServer {
        Self::started(launch(env))
    }

    /// A server on an existing data dir (to test restarts).
    pub fn start_in(data_dir: &Path, env: &[(&str, &str)]) -> TestServer {
        Self::started(launch(env).data_dir(data_dir))
    }

    fn started(launch: testkit::Launch) -> TestServer {
        let server = launch.start().unwrap_or_else(|e| panic!("{e}"));
        TestServer {
            base: server.base().to_string(),
            server,
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
        self.server.pid().expect("running")
    }

    /// Every line the server printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.server.stdout()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Waits for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait(&self) -> ExitStatus {
        self.server
            .wait(EXIT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&self) -> ExitStatus {
        self.server
            .stop(EXIT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
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
        testkit::create_tenant(&self.agent, &self.base, ADMIN_TOKEN, &body)
            .unwrap_or_else(|e| panic!("{e}"))
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
        // `as_of` describes the tenant, not the range; the range ends in the future because an
        // answer over an ended one is cached with the `as_of` it was computed at.
        let at = |offset: i64| {
            let secs = time::OffsetDateTime::now_utc().unix_timestamp() + offset;
            time::OffsetDateTime::from_unix_timestamp(secs)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let (from, to) = (at(-86_400), at(86_400));
        let timeout = Duration::from_secs(60);
        testkit::wait_rollups_caught_up(&self.agent, &self.base, read_key, &from, &to, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics", Auth::None).body
    }

    /// Asks for the erasure of a user's data (`DELETE /admin/v1/tenants/{id}/users/{user}`,
    /// which must answer 202); returns the job as first answered.
    pub fn request_erasure(&self, tenant_id: &str, user: &str) -> Value {
        let path = format!("/admin/v1/tenants/{tenant_id}/users/{user}");
        let reply = self.admin("DELETE", &path, None);
        assert_eq!(reply.status, 202, "{}", reply.body);
        reply.json()
    }

    /// Waits (60 s at most) for an erasure job to end; returns its final record.
    pub fn wait_erasure(&self, job: &Value) -> Value {
        let path = format!(
            "/admin/v1/deletions/{}",
            job["id"].as_str().expect("job id")
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.admin("GET", &path, None).json();
            if state["status"] != "running" {
                return state;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "erasure still running: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's stderr, over all its starts on this data dir.
    pub fn server_log(&self) -> String {
        self.server.log()
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
    testkit::send_signal(pid, signal).unwrap_or_else(|e| panic!("{e}"));
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

/// Resident memory, its high-water mark and CPU time of a process, from `/proc`.
pub fn process_stats(pid: u32) -> ProcessStats {
    testkit::process_stats(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so the next reading is the peak
/// of what happens from now on.
pub fn reset_peak_rss(pid: u32) {
    testkit::reset_peak_rss(pid).unwrap_or_else(|e| panic!("{e}"));
}

/// A single-threaded Tokio runtime, for tests that call the library's async parts directly.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A cold store in `bucket` under `prefix` on a test S3 server (moto: path style, plain HTTP,
/// its fixed credentials).
pub fn s3_store(
    server: &testkit::s3::S3Server,
    bucket: &str,
    prefix: &str,
) -> statsremote::storage::cold::ColdStore {
    let settings = statsremote::config::S3Config {
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: server.endpoint().into(),
        region: "us-east-1".into(),
        virtual_hosted_style: false,
        allow_http: true,
    };
    std::env::set_var("AWS_ACCESS_KEY_ID", testkit::s3::ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", testkit::s3::SECRET_KEY);
    statsremote::storage::cold::ColdStore::s3(&settings).unwrap()
}

/// A WebSocket on `/v1/live{query}`, or the handshake's HTTP status (or error) as text.
pub fn connect(
    server: &TestServer,
    query: &str,
    header_key: Option<&str>,
) -> Result<tungstenite::WebSocket<std::net::TcpStream>, String> {
    let authorization = header_key.map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> = authorization
        .as_deref()
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    connect_with_headers(server, query, &headers).map(|(socket, _)| socket)
}

/// A live WebSocket opened with `headers`; with the handshake's response, or the refusal's
/// status (or what else went wrong).
pub fn connect_with_headers(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        tungstenite::WebSocket<std::net::TcpStream>,
        tungstenite::handshake::client::Response,
    ),
    String,
> {
    let addr = server.base.trim_start_matches("http://").to_string();
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{addr}/v1/live{query}"
    ))
    .unwrap();
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tungstenite::client::client(request, stream) {
        Ok(connected) => Ok(connected),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(format!("{}", response.status().as_u16()))
        }
        Err(other) => Err(other.to_string()),
    }
}

/// Calls `check` every 100 ms until it gives a value, for at most `timeout`, then fails with
/// its last reason: for what the server produces a moment after a change a test can see.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) => assert!(std::time::Instant::now() < deadline, "{why}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sleeps, if need be, until at least `needed` is left in the current UTC minute: a live tick's
/// minute holds that minute's events only, so events sent just before it ends may show in no
/// tick at all.
pub fn clear_of_minute_end(needed: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into_minute = Duration::from_millis((now.as_millis() % 60_000) as u64);
    let left = Duration::from_secs(60) - into_minute;
    if left < needed {
        std::thread::sleep(left + Duration::from_millis(100));
    }
}

/// The next tick (JSON text message) on a live socket.
pub fn next_tick(socket: &mut tungstenite::WebSocket<std::net::TcpStream>) -> Value {
    loop {
        match socket.read().expect("read a tick") {
            tungstenite::Message::Text(text) => {
                return serde_json::from_str(text.as_str()).unwrap()
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}
