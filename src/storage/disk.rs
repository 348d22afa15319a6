//! The free space of the data disk, checked once a second: below `storage.min_free_space`,
//! ingestion is refused with a reason (and `/readyz` says why) before a write could fail half
//! way for want of space.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The last reading of the data disk's free space.
pub struct DiskSpace {
    path: PathBuf,
    minimum: u64,
    /// Bytes available to the server; `u64::MAX` until the first reading.
    free: AtomicU64,
}

impl DiskSpace {
    /// Watches the file system holding `path`; `minimum` 0 turns the check off.
    pub fn new(path: PathBuf, minimum: u64) -> Arc<DiskSpace> {
        let disk = Arc::new(DiskSpace {
            path,
            minimum,
            free: AtomicU64::new(u64::MAX),
        });
        disk.measure();
        disk
    }

    /// Reads the free space now. Blocking (one `statvfs`). A failed reading keeps the last one.
    pub fn measure(&self) {
        match rustix::fs::statvfs(&self.path) {
            Ok(stats) => {
                let free = stats.f_bavail.saturating_mul(stats.f_frsize);
                self.free.store(free, Ordering::Release);
            }
            Err(error) => {
                tracing::warn!(%error, path = %self.path.display(), "cannot read the data disk's free space")
            }
        }
    }

    /// Why writes are refused, if they are.
    pub fn too_low(&self) -> Option<String> {
        let free = self.free.load(Ordering::Acquire);
        (self.minimum > 0 && free < self.minimum).then(|| {
            format!(
                "the data disk has {} free, under storage.min_free_space ({})",
                bytesize::ByteSize::b(free),
                bytesize::ByteSize::b(self.minimum)
            )
        })
    }

    /// Re-reads the free space every second, on the blocking pool, for as long as the current
    /// actix system runs.
    pub fn watch(self: &Arc<Self>) {
        let disk = Arc::clone(self);
        actix_rt::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticks.tick().await;
                let disk = Arc::clone(&disk);
                let _ = crate::blocking::run(move || disk.measure()).await;
            }
        });
    }
}
