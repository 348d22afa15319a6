//! Private instances of the engines cluster mode runs on, for tests: `redis-server` and
//! `nats-server -js` (Debian's packages; `scripts/services-env.sh` installs them when missing),
//! each on a free loopback port with a temporary directory, never the services a machine may
//! already run. A test can kill, restart (same port, same directory: what the engine persisted
//! survives), pause and resume an instance; it is killed when dropped.

use std::io::{BufRead, BufReader, Write};
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
            Engine::Nats => vec!["-js", "-a", "127.0.0.1", "-p", &port, "-sd", &dir],
        };
        args.into_iter().map(str::to_string).collect()
    }

    /// Whether the instance on `port` answers its protocol's greeting.
    fn answers(self, port: u16) -> bool {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        match self {
            Engine::Redis => {
                let mut writer = &stream;
                if writer.write_all(b"PING\r\n").is_err() {
                    return false;
                }
                reader.read_line(&mut line).is_ok() && line.starts_with("+PONG")
            }
            // The server greets every client with its INFO line.
            Engine::Nats => reader.read_line(&mut line).is_ok() && line.starts_with("INFO"),
        }
    }
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
    /// answers.
    pub fn start(engine: Engine) -> Result<Service, Error> {
        let port = crate::free_port()?;
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            what: "creating a temporary directory".into(),
            source,
        })?;
        let mut service = Service {
            engine,
            port,
            dir,
            child: None,
        };
        service.spawn()?;
        Ok(service)
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
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.engine.answers(self.port) {
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
