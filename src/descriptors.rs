//! The process's file descriptors, shared out between client connections and the storage
//! engine so that neither can starve the other.
//!
//! At start the open-file soft limit is raised to the hard limit. Of what that gives,
//! [`RESERVED`] descriptors, and [`PER_THREAD`] for each worker and arbiter thread (each runs
//! its own event loop), are kept for everything that is neither a client socket nor a cached
//! table file (journals, blob files, listeners, logs); the storage
//! engine gets its table-file cache ([`STORAGE_FILES_WANTED`]); connections get the rest, up to
//! `server.max_connections`. When the limit is too low for all of it, the two share what is
//! spare: the table-file cache keeps at least half (and at least [`MIN_STORAGE_FILES`]), the
//! connections the rest (at least [`MIN_CONNECTIONS`]); below that the server refuses to start.

/// Descriptors for everything but client sockets, cached table files and the threads' event
/// loops.
pub const RESERVED: u64 = 256;
/// Descriptors of each HTTP worker's and actor arbiter's event loop (epoll, its waker), with
/// room for the connection or two a worker may accept past its share of the cap.
pub const PER_THREAD: u64 = 4;
/// Table files the storage engine keeps open when it can (both databases together).
pub const STORAGE_FILES_WANTED: u64 = 900;
/// Fewest cached table files the storage engine runs with.
pub const MIN_STORAGE_FILES: u64 = 100;
/// Fewest connections the server runs with.
pub const MIN_CONNECTIONS: u64 = 64;

/// How the descriptors were shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft limit in force after raising it.
    pub limit: u64,
    /// Open client connections allowed, across all workers.
    pub connections: usize,
    /// Table files the storage engine may keep open.
    pub storage_files: usize,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the open-file limit is {limit}, too low for the storage engine and client connections \
     (at least {needed}); raise it (ulimit -n) or lower server.max_connections"
)]
pub struct TooFewDescriptors {
    pub limit: u64,
    pub needed: u64,
}

/// Raises the soft open-file limit to the hard one (where the system allows it) and shares out
/// the result, for a server of `threads` HTTP workers and actor arbiters.
pub fn raise_and_share(
    max_connections: usize,
    threads: usize,
) -> Result<Budget, TooFewDescriptors> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let current = getrlimit(Resource::Nofile);
    if current.current != current.maximum {
        let raised = rustix::process::Rlimit {
            current: current.maximum,
            maximum: current.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise the open-file soft limit to the hard limit");
        }
    }
    // No limit at all: as good as any number we would ask for.
    let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX / 2);
    share(limit, max_connections, threads)
}

/// Shares out `limit` descriptors.
pub fn share(
    limit: u64,
    max_connections: usize,
    threads: usize,
) -> Result<Budget, TooFewDescriptors> {
    let wanted_connections = max_connections as u64;
    let reserved = RESERVED + PER_THREAD * threads as u64;
    let needed = reserved + MIN_STORAGE_FILES + MIN_CONNECTIONS.min(wanted_connections);
    if limit < needed {
        return Err(TooFewDescriptors { limit, needed });
    }
    let spare = limit - reserved;
    // Half of what is spare at least, more if the connections leave it; never below the floor.
    let storage_share = (spare / 2)
        .max(spare.saturating_sub(wanted_connections))
        .max(MIN_STORAGE_FILES);
    let storage_files = STORAGE_FILES_WANTED.min(storage_share);
    let connections = wanted_connections.min(spare - storage_files);
    Ok(Budget {
        limit,
        connections: usize::try_from(connections).unwrap_or(usize::MAX),
        storage_files: usize::try_from(storage_files).unwrap_or(usize::MAX),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn everyone_gets_what_they_want_under_a_high_limit() {
        let budget = share(1 << 20, 10_000, 0).unwrap();
        assert_eq!((budget.connections, budget.storage_files), (10_000, 900));
    }

    #[test]
    fn a_low_limit_is_shared_and_never_exceeded() {
        // 4096 - 256 = 3840: storage keeps its 900, connections get 2940.
        let budget = share(4096, 10_000, 0).unwrap();
        assert_eq!((budget.connections, budget.storage_files), (2940, 900));
        // 1024 - 256 = 768 with 10k connections wanted: half each.
        let budget = share(1024, 10_000, 0).unwrap();
        assert_eq!((budget.connections, budget.storage_files), (384, 384));
        // Few connections wanted: storage takes what is left, up to what it wants.
        let budget = share(1024, 100, 0).unwrap();
        assert_eq!((budget.connections, budget.storage_files), (100, 668));
        assert!(share(400, 10_000, 0).is_err());
        // Neither ever exceeds the limit.
        for limit in [500, 1000, 2000, 5000] {
            for wanted in [1, 64, 500, 10_000] {
                for threads in [0, 4, 16] {
                    let b = share(limit, wanted, threads).unwrap();
                    let reserved = RESERVED + PER_THREAD * threads as u64;
                    assert!(reserved + (b.connections + b.storage_files) as u64 <= limit);
                    assert!(b.storage_files as u64 >= MIN_STORAGE_FILES);
                }
            }
        }
        // Threads count: 64 of them take 256 more.
        assert!(share(500, 10_000, 64).is_err());
    }
}
