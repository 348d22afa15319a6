//! Runs the real `statsremote` binary for the integration tests and the load generator.
//!
//! A [`Server`] listens on a free port of 127.0.0.1, on a data dir it was given or a temporary one
//! it owns and removes; the process's stderr goes to `server.log` in that dir and every stdout line
//! is kept. Dropping a [`Server`] kills its process; [`Server::stop`] is the graceful way. Tenants
//! and rollup progress go through the HTTP API like any client's: nothing here links the server.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod envs;
pub mod proxy;
pub mod s3;
pub mod services;

/// File name of the server binary.
pub const BINARY_NAME: &str = "statsremote";

/// The environment variable the server reads its admin token from (empty: not set).
pub const ADMIN_TOKEN_ENV: &str = "STATSREMOTE_ADMIN_TOKEN";

/// What the server prints on stdout, followed by its base URL, once it accepts connections.
pub const LISTENING_PREFIX: &str = "statsremote listening on ";

/// How long a start may take until the listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The file in the data dir that receives the process's stderr (its log).
const LOG_FILE: &str = "server.log";

/// `statsremote` in the directory of the running executable: cargo puts every binary of a
/// workspace in the same `target/<profile>` directory. `None` if the executable is unknown.
pub fn binary_beside_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(BINARY_NAME))
}

/// How to start the server: `serve --listen 127.0.0.1:0 --data-dir DIR [args]`, with the admin
/// token in [`ADMIN_TOKEN_ENV`] and then the given environment, in order (a later value of a
/// variable replaces an earlier one, the token included).
#[derive(Debug, Clone)]
pub struct Launch {
    binary: PathBuf,
    admin_token: String,
    data_dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    pub fn new(binary: impl Into<PathBuf>, admin_token: impl Into<String>) -> Launch {
        Launch {
            binary: binary.into(),
            admin_token: admin_token.into(),
            data_dir: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Runs on this data dir (kept afterwards) instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Launch {
        self.data_dir = Some(dir.into());
        self
    }

    /// An argument after `serve --listen … --data-dir …`.
    pub fn arg(mut self, arg: impl Into<String>) -> Launch {
        self.args.push(arg.into());
        self
    }

    /// An environment variable, e.g. a setting as `STATSREMOTE__SECTION__KEY`.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Launch {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Starts the process and waits until it listens.
    pub fn start(&self) -> Result<Server, Error> {
        let (tempdir, data_dir) = match &self.data_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let dir = tempfile::tempdir().map_err(|source| Error::Io {
                    what: "creating a temporary data dir".to_string(),
                    source,
                })?;
                let path = dir.path().to_path_buf();
                (Some(dir), path)
            }
        };
        let running = self.spawn(&data_dir)?;
        Ok(Server {
            launch: Launch {
                data_dir: Some(data_dir.clone()),
                ..self.clone()
            },
            base: running.base,
            data_dir,
            child: Mutex::new(Some(running.child)),
            stdout: running.stdout,
            _tempdir: tempdir,
        })
    }

    fn spawn(&self, data_dir: &Path) -> Result<Running, Error> {
        let log_path = data_dir.join(LOG_FILE);
        // Appended to, so that the log of a restart follows the one before. A data dir the server
        // has yet to create has no room for it: the log is lost, the start goes on.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .ok();
        let mut command = Command::new(&self.binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(&self.args)
            .env(ADMIN_TOKEN_ENV, &self.admin_token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.map(Stdio::from).unwrap_or_else(Stdio::null));
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let Some(stdout) = child.stdout.take() else {
            kill_and_reap(&mut child);
            return Err(Error::NotListening {
                log: read_log(&log_path),
            });
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let collected = Arc::clone(&lines);
        // Reads to the end: a full pipe would block the server's next write to stdout.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(base) = line.strip_prefix(LISTENING_PREFIX) {
                    let _ = tx.send(base.to_string());
                }
                lock(&collected).push(line);
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(base) => Ok(Running {
                child,
                base,
                stdout: lines,
            }),
            Err(_) => {
                kill_and_reap(&mut child);
                Err(Error::NotListening {
                    log: read_log(&log_path),
                })
            }
        }
    }
}

/// A process that printed its listening line.
struct Running {
    child: Child,
    base: String,
    stdout: Arc<Mutex<Vec<String>>>,
}

/// A server process started by [`Launch::start`]. Its methods take `&self`, so that one thread
/// can kill or signal it while others send requests.
#[derive(Debug)]
pub struct Server {
    /// What started it, with `data_dir` set: what [`Server::restart`] runs again.
    launch: Launch,
    base: String,
    data_dir: PathBuf,
    /// `None` once the process was killed, stopped or waited for.
    child: Mutex<Option<Child>>,
    stdout: Arc<Mutex<Vec<String>>>,
    /// Dropped after [`Drop::drop`] killed the process, which then no longer writes to it.
    _tempdir: Option<tempfile::TempDir>,
}

impl Server {
    /// `http://127.0.0.1:PORT`, as the server printed it.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The token given in [`ADMIN_TOKEN_ENV`] (which the environment of the launch may replace).
    pub fn admin_token(&self) -> &str {
        &self.launch.admin_token
    }

    /// Every line the current process printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        lock(&self.stdout).clone()
    }

    /// The process's stderr, over all its starts on this data dir ("" if there is none).
    pub fn log(&self) -> String {
        read_log(&self.data_dir.join(LOG_FILE))
    }

    /// `None` once the process was killed, stopped or waited for.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    pub fn stats(&self) -> Result<ProcessStats, Error> {
        process_stats(self.pid().ok_or(Error::NotRunning)?)
    }

    /// Sends a signal by name, e.g. "TERM" or "INT".
    pub fn signal(&self, signal: &str) -> Result<(), Error> {
        send_signal(self.pid().ok_or(Error::NotRunning)?, signal)
    }

    /// SIGKILL, no goodbye; nothing if the process is gone already.
    pub fn kill(&self) {
        let child = lock(&self.child).take();
        if let Some(mut child) = child {
            kill_and_reap(&mut child);
        }
    }

    /// Waits for the process to exit by itself (after a signal); kills it after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<ExitStatus, Error> {
        let mut child = lock(&self.child).take().ok_or(Error::NotRunning)?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(source) => {
                    kill_and_reap(&mut child);
                    return Err(Error::Io {
                        what: "waiting for the server".to_string(),
                        source,
                    });
                }
            }
            if Instant::now() > deadline {
                kill_and_reap(&mut child);
                return Err(Error::TimedOut(format!(
                    "the server did not exit within {timeout:?} (killed)"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The graceful stop: SIGTERM, then [`Server::wait`].
    pub fn stop(&self, timeout: Duration) -> Result<ExitStatus, Error> {
        self.signal("TERM")?;
        self.wait(timeout)
    }

    /// Starts the server again on the same data dir with the same settings. A process still
    /// running is killed first, as in a crash; [`Server::stop`] it before for a clean restart.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let running = self.launch.spawn(&self.data_dir)?;
        self.base = running.base;
        self.stdout = running.stdout;
        *lock(&self.child) = Some(running.child);
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A panic elsewhere leaves the data as it was: a poisoned lock is used all the same.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A loopback port free at the time of the call (for a server a test starts).
pub fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|source| Error::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// Sends a signal by name (e.g. "TERM") to a process, with kill(1).
pub fn send_signal(pid: u32, signal: &str) -> Result<(), Error> {
    let what = format!("kill -{signal} {pid}");
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|source| Error::Io {
            what: what.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            what,
            source: io::Error::other(format!("kill {status}")),
        })
    }
}

/// What the kernel says of a process: resident memory, its high-water mark, CPU time.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// User plus system time.
    pub cpu: Duration,
}

/// Reads `/proc/<pid>/status` (VmRSS, VmHWM) and `/proc/<pid>/stat` (utime + stime).
pub fn process_stats(pid: u32) -> Result<ProcessStats, Error> {
    let read = |file: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::read_to_string(&path).map_err(|source| Error::Io { what: path, source })
    };
    let malformed = |what: String| Error::Io {
        what,
        source: io::Error::from(io::ErrorKind::InvalidData),
    };
    let status = read("status")?;
    let kib = |field: &str| -> Result<u64, Error> {
        status
            .lines()
            .find(|line| line.starts_with(field))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| malformed(format!("no {field} in /proc/{pid}/status")))
    };
    let stat = read("stat")?;
    // The fields after the command name (which may hold spaces and parentheses), from field 3 on.
    let ticks = stat
        .rsplit_once(") ")
        .map(|(_, after)| after.split_whitespace().collect::<Vec<_>>())
        .and_then(|fields| {
            let field = |index: usize| fields.get(index)?.parse::<u64>().ok();
            Some(field(11)? + field(12)?)
        })
        .ok_or_else(|| malformed(format!("no utime, stime in /proc/{pid}/stat")))?;
    Ok(ProcessStats {
        rss_bytes: kib("VmRSS:")? * 1024,
        peak_rss_bytes: kib("VmHWM:")? * 1024,
        // Clock ticks; the kernel's USER_HZ is 100 on every Linux architecture we run on.
        cpu: Duration::from_millis(ticks * 10),
    })
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so that the next reading is the
/// peak of what happens from now on.
pub fn reset_peak_rss(pid: u32) -> Result<(), Error> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").map_err(|source| Error::Io { what: path, source })
}

/// A tenant created through the admin API, with its keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub write_key: String,
    pub read_key: String,
}

/// Creates a tenant: `POST /admin/v1/tenants` with `body` (at least `{"name": …}`), which must
/// answer 201.
pub fn create_tenant(
    agent: &ureq::Agent,
    base: &str,
    admin_token: &str,
    body: &Value,
) -> Result<Tenant, Error> {
    let what = "creating a tenant";
    let request = agent
        .post(&format!("{base}/admin/v1/tenants"))
        .set("Authorization", &format!("Bearer {admin_token}"));
    let (status, reply) = json_reply(what, request.send_json(body))?;
    if status != 201 {
        return Err(http_error(what, format!("status {status}: {reply}")));
    }
    let field = |name: &str| {
        reply[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| http_error(what, format!("the reply lacks {name}: {reply}")))
    };
    Ok(Tenant {
        id: field("id")?,
        write_key: field("write_key")?,
        read_key: field("read_key")?,
    })
}

/// Waits until the tenant's stored rollups include every durable event (`as_of` of a uniques
/// query over `from`..`to`, which describes the tenant, whatever the range); returns that
/// sequence number. `to` must be in the future: an answer over an ended range is cached with
/// the `as_of` it was computed at.
pub fn wait_rollups_caught_up(
    agent: &ureq::Agent,
    base: &str,
    read_key: &str,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Result<u64, Error> {
    let what = "reading the rollups' progress";
    let url = format!("{base}/v1/query/uniques?from={from}&to={to}");
    let deadline = Instant::now() + timeout;
    loop {
        let request = agent
            .get(&url)
            .set("Authorization", &format!("Bearer {read_key}"));
        let (status, reply) = json_reply(what, request.call())?;
        if status != 200 {
            return Err(http_error(what, format!("status {status}: {reply}")));
        }
        let as_of = &reply["as_of"];
        let (Some(rolled), Some(log)) = (
            as_of["rolled_up_through_seq"].as_u64(),
            as_of["log_seq"].as_u64(),
        ) else {
            return Err(http_error(what, format!("no sequence numbers: {reply}")));
        };
        if rolled == log {
            return Ok(log);
        }
        if Instant::now() > deadline {
            return Err(Error::TimedOut(format!(
                "rollups did not catch up within {timeout:?}: {as_of}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Status and JSON body of a reply, error statuses included.
fn json_reply(
    what: &str,
    result: Result<ureq::Response, ureq::Error>,
) -> Result<(u16, Value), Error> {
    let response = match result {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => return Err(http_error(what, error.to_string())),
    };
    let status = response.status();
    let mut body = String::new();
    response
        .into_reader()
        .take(64 << 20)
        .read_to_string(&mut body)
        .map_err(|error| http_error(what, error.to_string()))?;
    let json = serde_json::from_str(&body)
        .map_err(|_| http_error(what, format!("status {status}, not JSON: {body}")))?;
    Ok((status, json))
}

fn http_error(what: &str, detail: String) -> Error {
    Error::Http {
        what: what.to_string(),
        detail,
    }
}

/// Why the kit could not do what it was asked; each message is complete (no `source`).
#[derive(Debug)]
pub enum Error {
    /// The binary could not be run.
    Spawn { binary: PathBuf, source: io::Error },
    /// The process printed no listening line in time, or exited first; it was killed.
    NotListening { log: String },
    /// No process is running: it was killed, stopped or waited for.
    NotRunning,
    /// Something did not happen in time (a process that was to exit has been killed).
    TimedOut(String),
    /// A service instance (redis-server, nats-server) ended as it started.
    Exited(String),
    /// A file, `/proc` or kill(1) failed.
    Io { what: String, source: io::Error },
    /// An HTTP request failed, or its reply was not the expected one.
    Http { what: String, detail: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn { binary, source } => write!(f, "cannot run {}: {source}", binary.display()),
            Error::NotListening { log } => write!(
                f,
                "the server did not start (no listening line within {START_TIMEOUT:?}); its log:\n{log}"
            ),
            Error::NotRunning => f.write_str("the server process is not running"),
            Error::TimedOut(what) | Error::Exited(what) => f.write_str(what),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Http { what, detail } => write!(f, "{what}: {detail}"),
        }
    }
}

impl std::error::Error for Error {}
