//! `airlock`: run AI agents' code in throwaway microVMs.
//!
//! One file per command: `run.rs`, `create.rs`, `exec.rs`, `cp.rs`,
//! `ls.rs`, `net.rs`, `rm.rs`, `doctor.rs`; `common.rs` has what they share (config,
//! progress, exit statuses, error lines).

mod common;
mod cp;
mod create;
mod doctor;
mod exec;
mod ls;
mod net;
mod rm;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run AI agents' code in fresh, throwaway KVM microVMs.
///
/// Every sandbox is its own microVM; when it ends, its memory and scratch
/// disk are wiped. Exit status: the command's own, or 124 on --timeout,
/// 125 when airlock itself failed, 126 when the command cannot be run,
/// 127 when it is not found.
#[derive(Parser, Debug)]
#[command(name = "airlock", version, propagate_version = true)]
struct Cli {
    /// Runtime config file (TOML); default: $AIRLOCK_CONFIG, else built-in
    /// defaults
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log level on stderr (error, warn, info, debug, trace); env AIRLOCK_LOG
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Run(run::Args),
    Create(create::Args),
    Exec(exec::Args),
    Cp(cp::Args),
    Ls(ls::Args),
    Net(net::Args),
    Rm(rm::Args),
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init_logging(cli.log_level.as_deref());
    if let Command::Doctor(args) = &cli.command {
        return doctor::main(cli.config.as_deref(), args);
    }
    let config = match common::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return common::fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return common::fail(&format!("cannot start the async runtime: {e}")),
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::main(&config, args).await,
            Command::Create(args) => create::main(&config, args).await,
            Command::Exec(args) => exec::main(&config, args).await,
            Command::Cp(args) => cp::main(&config, args).await,
            Command::Ls(args) => ls::main(&config, args).await,
            Command::Net(args) => net::main(&config, args).await,
            Command::Rm(args) => rm::main(&config, args).await,
            Command::Doctor(_) => unreachable!("handled above"),
        }
    });
    // Output tasks may still be parked in blocking reads of our stdin.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
