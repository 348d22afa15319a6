//! The project-local Python environment (`target/python-env`), for tests that use a Python
//! tool: moto's S3-compatible server, DuckDB. `scripts/python-env.sh` creates it; tests running
//! at the same time wait for one another on a lock file rather than install twice.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use crate::Error;

/// The workspace's root (testkit lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// The environment's `bin/` folder, after making sure the environment is installed.
pub fn python_env() -> Result<PathBuf, Error> {
    let root = workspace_root();
    let target = root.join("target");
    std::fs::create_dir_all(&target).map_err(|source| Error::Io {
        what: format!("creating {}", target.display()),
        source,
    })?;
    let lock_path = target.join("python-env.lock");
    let lock = File::create(&lock_path).map_err(|source| Error::Io {
        what: format!("opening {}", lock_path.display()),
        source,
    })?;
    lock.lock().map_err(|source| Error::Io {
        what: format!("locking {}", lock_path.display()),
        source,
    })?;
    let script = root.join("scripts/python-env.sh");
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
    Ok(target.join("python-env/bin"))
}
