//! `airlock-netfilter --config FILE`: one sandbox's DNS forwarder and
//! domain-checking proxy (see `airlock_net::filter`). Prints `ready` once
//! listening; errors before that are one line on stderr and exit status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Enforces a sandbox's egress domain rules: answers its DNS on its gateway
/// address and lets its redirected TCP connections through only to allowed
/// names at their own addresses.
#[derive(Debug, Parser)]
#[command(name = "airlock-netfilter", version)]
struct Args {
    /// The filter's JSON configuration (FilterConfig), written by the runtime.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false) // the runtime sends stderr to a log file
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match airlock_net::filter::daemon::run(&args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-netfilter: {}", airlock_report::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
