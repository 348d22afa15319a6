//! Background work runs at a lower CPU priority than the request path.
//!
//! On a small machine the storage engine's flushes and compactions and the rollup flushes compete
//! for the same cores as the HTTP workers and the log writer. They can wait; an acknowledgement
//! cannot. Their threads get a nice value of [`BACKGROUND_NICE`] (lowering one's own priority
//! needs no privilege). Linux only; elsewhere this does nothing.

/// Nice value of background threads (0 is the default, 19 the lowest priority).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the priority of the calling thread.
pub fn background_thread() {
    #[cfg(target_os = "linux")]
    {
        // `None` is the calling thread on Linux, where priorities are per thread.
        let _ = lower(None);
    }
}

/// Sets a thread's nice value to [`BACKGROUND_NICE`] unless it is already as low.
#[cfg(target_os = "linux")]
fn lower(thread: Option<rustix::process::Pid>) -> rustix::io::Result<()> {
    if rustix::process::getpriority_process(thread)? >= BACKGROUND_NICE {
        return Ok(());
    }
    rustix::process::setpriority_process(thread, BACKGROUND_NICE)
}

/// Lowers the priority of this process's threads whose name starts with `prefix` (threads a
/// library started, such as the storage engine's workers). Returns how many were found.
pub fn background_threads_named(prefix: &str) -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0;
        };
        let mut lowered = 0;
        for task in tasks.flatten() {
            let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
                continue;
            };
            if !comm.starts_with(prefix) {
                continue;
            }
            let tid = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok());
            if let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) {
                if lower(Some(pid)).is_ok() {
                    lowered += 1;
                }
            }
        }
        lowered
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = prefix;
        0
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn named_threads_get_the_background_priority() {
        let (started, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("prio-test-bg".into())
            .spawn(move || {
                started.send(()).unwrap();
                let _ = stopped.recv();
                rustix::process::getpriority_process(None).unwrap()
            })
            .unwrap();
        ready.recv().unwrap();
        assert_eq!(background_threads_named("prio-test-bg"), 1);
        stop.send(()).unwrap();
        assert!(thread.join().unwrap() >= BACKGROUND_NICE);
        assert_eq!(background_threads_named("no-such-thread"), 0);
    }
}
