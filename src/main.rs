//! The `statsremote` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use statsremote::config::{Config, Overrides};

/// mimalloc instead of the system allocator: the pipeline allocates per request and per event on
/// several threads, where glibc's arenas cost CPU (lock and consolidate) and fragment (RSS)
/// (docs/decisions/0019).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before it gives it back to the operating system.
/// mimalloc 3 waits a second by default. Under ingestion, request bodies, log entries, memtables
/// and rollup flushes free and take many MiB a second on several threads, and every page freed
/// within the delay still counts in the RSS; 10 ms (mimalloc 2's default) keeps that small at
/// no throughput cost beyond the noise (docs/decisions/0019). The environment variable
/// `MIMALLOC_PURGE_DELAY` still overrides it.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// `mi_option_purge_delay` in mimalloc 3.3's `mi_option_t` (libmimalloc-sys names no constant
/// for it). The test `purge_delay_option_index` checks the index against the linked library.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// No transparent huge pages for this process. mimalloc asks for them on its arenas, and where
/// the kernel grants them on request (`madvise`, Debian's default) one touched byte makes 2 MiB
/// resident and a purge of less than 2 MiB returns nothing: the RSS grows by hundreds of MiB
/// past the live heap, for up to 10% of one tenant's throughput (docs/decisions/0040). The flag
/// is the process's, checked at every page fault, so it covers the arena mimalloc mapped before
/// `main`.
/// `MIMALLOC_ALLOW_THP=1` (read by mimalloc at load) keeps them: this runs unless it is set to a
/// non-zero value.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let asked = std::env::var("MIMALLOC_ALLOW_THP").is_ok_and(|value| value.trim() != "0");
        if !asked {
            if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
                eprintln!("statsremote: could not turn transparent huge pages off: {error}");
            }
        }
    }
}

#[allow(unsafe_code)] // the only unsafe code outside tests: mimalloc has no safe setter
fn tune_allocator() {
    // SAFETY: plain C call with a valid option index; it runs first in `main`, before any other
    // thread exists (mimalloc's option setters are not thread-safe).
    unsafe {
        libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS)
    }
}

#[derive(Parser)]
#[command(
    name = "statsremote",
    version,
    about = "Multi-tenant event ingestion and live product metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML file layered over the embedded defaults (config/default.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides server.listen).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Data directory (overrides storage.data_dir).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// `all` (the single node, default), `ingest` or `process` (cluster mode; overrides
        /// cluster.role).
        #[arg(long, value_name = "ROLE")]
        role: Option<statsremote::cluster::Role>,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let Command::Serve {
        config,
        listen,
        data_dir,
        role,
    } = cli.command;
    let overrides = Overrides {
        config_file: config,
        listen,
        data_dir,
        role,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("statsremote: {error}");
            return ExitCode::from(2);
        }
    };
    statsremote::telemetry::init_logging(&config.log);
    let system = actix_rt::System::new();
    match system.block_on(statsremote::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "statsremote failed");
            eprintln!("statsremote: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index 15 must be the purge delay: mimalloc 3 defaults it to 1000 ms, a value no
    /// neighbouring option has, and reads `MIMALLOC_PURGE_DELAY` into it.
    #[test]
    fn purge_delay_option_index() {
        let expected = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        // SAFETY: reads an option with a valid index.
        #[allow(unsafe_code)]
        let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, expected);
    }
}
