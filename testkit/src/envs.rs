//! The project-local tool environments the tests use: Python (`target/python-env`: moto's
//! S3-compatible server, DuckDB, the Python SDKs) and Node (`target/node-env`: the Node and
//! browser SDKs, playwright-core), and Debian's Chromium. `scripts/python-env.sh`,
//! `scripts/node-env.sh` and `scripts/browser-env.sh` create them; tests running at the same time
//! wait for one another on a lock file rather than install twice.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use crate::Error;

/// The workspace's root (testkit lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// The Python environment's `bin/` folder, after making sure it is installed.
pub fn python_env() -> Result<PathBuf, Error> {
    set_up("python-env")?;
    Ok(workspace_root().join("target/python-env/bin"))
}

/// The Node environment's folder (with `node_modules/`), after making sure it is installed.
pub fn node_env() -> Result<PathBuf, Error> {
    set_up("node-env")?;
    Ok(workspace_root().join("target/node-env"))
}

/// The Node environment (see [`node_env`]) and Debian's Chromium for browser tests, installed by
/// `scripts/browser-env.sh` if missing; returns the Node environment's folder.
pub fn browser_env() -> Result<PathBuf, Error> {
    set_up("browser-env")?;
    node_env()
}

/// Prometheus's `promtool`, unpacked from Debian's package by `scripts/promtool-env.sh` if
/// missing (no Prometheus server is installed or started).
pub fn promtool() -> Result<PathBuf, Error> {
    set_up("promtool-env")?;
    Ok(workspace_root().join("target/tools/promtool"))
}

/// Runs `scripts/<name>.sh` under `target/<name>.lock`.
fn set_up(name: &str) -> Result<(), Error> {
    let root = workspace_root();
    let target = root.join("target");
    std::fs::create_dir_all(&target).map_err(|source| Error::Io {
        what: format!("creating {}", target.display()),
        source,
    })?;
    let lock_path = target.join(format!("{name}.lock"));
    let lock = File::create(&lock_path).map_err(|source| Error::Io {
        what: format!("opening {}", lock_path.display()),
        source,
    })?;
    lock.lock().map_err(|source| Error::Io {
        what: format!("locking {}", lock_path.display()),
        source,
    })?;
    let script = root.join(format!("scripts/{name}.sh"));
    let status = Command::new(&script).status().map_err(|source| Error::Io {
        what: format!("running {}", script.display()),
        source,
    })?;
    if !status.success() {
        return Err(Error::Io {
            what: format!("{} failed", script.display()),
            source: std::io::Error::other(status.to_string()),
        });
    }
    Ok(())
}
