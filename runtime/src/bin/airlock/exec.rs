//! `airlock exec`: run a command in a sandbox made by `airlock create`.

use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::io::Attach;
use airlock_runtime::sandbox::{spec, Sandbox};
use airlock_runtime::state::SandboxId;

use crate::common::{self, ProcessFlags};

/// Run a command in an existing sandbox; exits with its status. Files it
/// writes stay for later `exec`s and `cp`s, until `airlock rm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sandbox (from `airlock create`, listed by `airlock ls`)
    id: String,
    #[command(flatten)]
    process: ProcessFlags,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let id = match SandboxId::parse(&args.id) {
        Ok(id) => id,
        Err(e) => return common::fail(&common::error_line(&e)),
    };
    let popts = match args.process.options(args.command.clone()) {
        Ok(p) => p,
        Err(e) => return common::fail(&e),
    };
    let sandbox = match Sandbox::open(config, &id).await {
        Ok(s) => s,
        Err(e) => return common::fail_sandbox(&e),
    };
    let process = match sandbox
        .container_spec()
        .and_then(|c| spec::exec_process(&c, &popts, &Default::default()).map_err(Into::into))
    {
        Ok(p) => p,
        Err(e) => return common::fail_sandbox(&e),
    };
    let exec_id = exec_id();
    let process = match sandbox.exec(&exec_id, &process).await {
        Ok(p) => p,
        Err(e) => return common::fail_sandbox(&e),
    };
    let how = Attach {
        interactive: args.process.interactive,
        tty: args.process.tty,
    };
    match process.attach(how).await {
        Ok(exit) => common::exit_status(exit),
        Err(e) => common::fail_sandbox(&e),
    }
}

/// A fresh exec id.
fn exec_id() -> String {
    format!("exec-{}", airlock_runtime::state::random_hex(6))
}
