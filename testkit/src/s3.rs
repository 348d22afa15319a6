//! An S3-compatible server for tests: moto's, from the project-local Python environment, on a
//! free loopback port, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{envs::python_env, http_error, Error};

/// Credentials moto accepts (it checks none); set them for the server under test.
pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";

pub struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    /// Starts the server and waits until it answers.
    pub fn start() -> Result<S3Server, Error> {
        let bin = python_env()?;
        let port = crate::free_port()?;
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Io {
                what: "starting moto_server".into(),
                source,
            })?;
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&server.endpoint).call().is_err() {
            if Instant::now() > deadline {
                return Err(Error::TimedOut(
                    "moto_server did not answer within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates a bucket (moto takes an unsigned request).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), Error> {
        ureq::put(&format!("{}/{bucket}", self.endpoint))
            .call()
            .map_err(|error| http_error("creating a bucket", error.to_string()))?;
        Ok(())
    }

    /// The server's environment for a store in `bucket` under `prefix`: endpoint, path style,
    /// plain HTTP, credentials.
    pub fn server_env(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        [
            ("STATSREMOTE__COLD__STORE", "s3"),
            ("STATSREMOTE__COLD__S3__BUCKET", bucket),
            ("STATSREMOTE__COLD__S3__PREFIX", prefix),
            ("STATSREMOTE__COLD__S3__ENDPOINT", &self.endpoint),
            ("STATSREMOTE__COLD__S3__ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: the server keeps its objects but answers nothing until [`S3Server::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        crate::send_signal(self.child.id(), "STOP")
    }

    /// SIGCONT after [`S3Server::pause`].
    pub fn resume(&self) -> Result<(), Error> {
        crate::send_signal(self.child.id(), "CONT")
    }

    /// Stops the server (an outage); [`S3Server::start`] a new one for a fresh, empty store.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill();
    }
}
