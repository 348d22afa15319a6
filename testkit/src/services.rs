//! Private instances of the engines cluster mode runs on, for tests: `redis-server` and
//! `nats-server -js` (Debian's packages; `scripts/services-env.sh` installs them when missing),
//! each on a free loopback port with a temporary directory, never the services a machine may
//! already run. A test can kill, restart (same port, same directory: what the engine persisted
//! survives), pause and resume an instance; it is killed when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// Which engine an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Redis,
    Nats,
}

impl Engine {
    fn program(self) -> &'static str {
        match self {
            Engine::Redis => "redis-server",
            Engine::Nats => "nats-server",
        }
    }

    fn args(self, port: u16, dir: &Path) -> Vec<String> {
        let port = port.to_string();
        let name = instance_name(dir);
        let dir = dir.display().to_string();
        let args: Vec<&str> = match self {
            // Append-only file, fsync'd every second: a restart keeps what Redis's own
            // persistence keeps, as in a production setup.
            Engine::Redis => vec![
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            // Named after its directory, so that its greeting tells it from another instance.
            Engine::Nats => vec![
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port,
                "-sd",
                &dir,
                "-n",
                &name,
            ],
        };
        args.into_iter().map(str::to_string).collect()
    }

    /// Whether the instance started as process `pid` in `dir` answers on `port` (not another
    /// process that holds the port).
    fn answers(self, port: u16, pid: u32, dir: &Path) -> bool {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        match self {
            // `INFO server` is a bulk reply whose lines include `process_id:<pid>`.
            Engine::Redis => {
                let mut writer = &stream;
                if writer.write_all(b"INFO server\r\n").is_err() {
                    return false;
                }
                // `$<length>`, then that many bytes; an error (`-LOADING ...`) is not an answer.
                let length = (reader.read_line(&mut line).ok())
                    .and_then(|_| line.trim_end().strip_prefix('$')?.parse().ok());
                let Some(length) = length else {
                    return false;
                };
                let mut info = vec![0u8; length];
                if reader.read_exact(&mut info).is_err() {
                    return false;
                }
                let wanted = format!("process_id:{pid}");
                String::from_utf8_lossy(&info)
                    .lines()
                    .any(|line| line.trim_end() == wanted)
            }
            // The server greets every client with its INFO line, which holds its name.
            Engine::Nats => {
                let wanted = format!("\"server_name\":\"{}\"", instance_name(dir));
                reader.read_line(&mut line).is_ok()
                    && line.starts_with("INFO")
                    && line.contains(&wanted)
            }
        }
    }
}

/// An instance's name: its directory's, unique among the instances running.
fn instance_name(dir: &Path) -> String {
    let base = dir.file_name().unwrap_or_default().to_string_lossy();
    format!("testkit{base}")
}

/// One running (or stopped) instance.
pub struct Service {
    engine: Engine,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Service {
    /// Starts an instance on a free port with a new temporary directory, and waits until it
    /// answers. The port is free when chosen but may be taken before the instance binds it
    /// (by another test's instance): one that exits at once is started again on another port.
    pub fn start(engine: Engine) -> Result<Service, Error> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            what: "creating a temporary directory".into(),
            source,
        })?;
        let mut service = Service {
            engine,
            port: crate::free_port()?,
            dir,
            child: None,
        };
        let mut attempts = 1;
        loop {
            match service.spawn() {
                Err(Error::Exited(_)) if attempts < 3 => {
                    attempts += 1;
                    service.port = crate::free_port()?;
                }
                other => return other.map(|()| service),
            }
        }
    }

    pub fn redis() -> Result<Service, Error> {
        Service::start(Engine::Redis)
    }

    pub fn nats() -> Result<Service, Error> {
        Service::start(Engine::Nats)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let program = self.engine.program();
        let child = Command::new(program)
            .args(self.engine.args(self.port, self.dir.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Io {
                what: format!("starting {program} (scripts/services-env.sh installs it)"),
                source,
            })?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.engine.answers(self.port, pid, self.dir.path()) {
            if self.exited() {
                self.kill();
                return Err(Error::Exited(format!(
                    "{program} exited at start (port {} taken?)",
                    self.port
                )));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(Error::TimedOut(format!(
                    "{program} did not answer on port {} within 30 s",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// True once the started process has ended.
    fn exited(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        !matches!(child.try_wait(), Ok(None))
    }

    /// `redis://127.0.0.1:<port>` or `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        match self.engine {
            Engine::Redis => format!("redis://127.0.0.1:{}", self.port),
            Engine::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running instance's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// SIGKILL: an outage. What the engine had persisted stays in its directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the instance again on the same port and directory.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP: the process stays, but answers nothing until [`Service::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        self.signal("STOP")
    }

    /// SIGCONT after [`Service::pause`].
    pub fn resume(&self) -> Result<(), Error> {
        self.signal("CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), Error> {
        let pid = self.child.as_ref().ok_or(Error::NotRunning)?.id();
        crate::send_signal(pid, signal)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A paused process must be resumed to die promptly of its SIGKILL's effects on wait.
        let _ = self.resume();
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An instance whose port was taken exits; it is reported as such, not mistaken for the
    /// process that answers on the port.
    #[test]
    fn an_instance_that_cannot_bind_is_not_mistaken_for_another() {
        for engine in [Engine::Redis, Engine::Nats] {
            let first = Service::start(engine).unwrap();
            let mut second = Service {
                engine,
                port: first.port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            let started = second.spawn();
            assert!(
                matches!(started, Err(Error::Exited(_))),
                "{engine:?}: {started:?}"
            );
        }
    }
}
