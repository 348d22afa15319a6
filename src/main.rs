//! The `statsremote` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use statsremote::config::{Config, Overrides};

/// mimalloc instead of the system allocator: the pipeline allocates per request and per event on
/// several threads, where glibc's arenas cost CPU (lock and consolidate) and fragment (RSS).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve {
        config,
        listen,
        data_dir,
    } = cli.command;
    let overrides = Overrides {
        config_file: config,
        listen,
        data_dir,
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
