//! `airlock run`: a fresh sandbox for one command, torn down and wiped
//! when it ends.

use std::process::ExitCode;
use std::time::Duration;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::io::Attach;
use airlock_runtime::sandbox::{spec, Sandbox, Teardown, CONTAINER_ID};

use crate::common::{self, ProcessFlags, SandboxFlags, EXIT_TIMEOUT};

/// Run a command in a new sandbox, then destroy it (memory and scratch
/// disk wiped). Exits with the command's status.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    sandbox: SandboxFlags,
    #[command(flatten)]
    process: ProcessFlags,
    /// Stop the command after SECS seconds and exit with 124
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The command and its arguments (default: the image's)
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let base = match args.sandbox.validate() {
        Ok(b) => b,
        Err(e) => return common::fail(&e),
    };
    let popts = match args.process.options(args.command.clone()) {
        Ok(p) => p,
        Err(e) => return common::fail(&e),
    };
    let mut opts = match args.sandbox.options(config) {
        Ok(o) => o,
        Err(e) => return common::fail(&e),
    };
    let mut progress = common::progress();
    opts.ephemeral = true;
    // Ctrl-C, SIGTERM or SIGHUP while booting or running: destroy the
    // sandbox, then exit 128 + the signal, as a shell would.
    let mut signals = match common::Interrupts::new() {
        Ok(s) => s,
        Err(e) => return common::fail(&e),
    };
    let mut creating = {
        let config = config.clone();
        tokio::spawn(async move { Sandbox::create(&config, &opts, &mut progress).await })
    };
    let created = tokio::select! {
        created = &mut creating => created,
        sig = signals.recv() => {
            // Let the boot finish (it is bounded), then destroy it.
            if let Ok(Ok(sandbox)) = creating.await {
                sandbox.teardown(Teardown::Kill).await;
            }
            return common::interrupted(sig);
        }
    };
    let sandbox = match created {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return common::fail_sandbox(&e),
        Err(e) => return common::fail(&format!("sandbox creation failed: {e}")),
    };
    let (code, timed_out) = tokio::select! {
        r = run_in(&sandbox, base, &popts, &args) => r,
        sig = signals.recv() => (common::interrupted(sig), true),
    };
    let report = if timed_out {
        // The command is still running: no clean shutdown to wait for.
        sandbox.teardown(Teardown::Kill).await
    } else {
        sandbox.teardown(Teardown::Graceful).await
    };
    tracing::info!(?report, "sandbox removed");
    code
}

async fn run_in(
    sandbox: &Sandbox,
    base: Option<oci_spec::runtime::Spec>,
    popts: &spec::ProcessOptions,
    args: &Args,
) -> (ExitCode, bool) {
    let defaults = common::image_defaults(sandbox.image_config.as_ref());
    let spec = match spec::container_spec(base, &sandbox.id.to_string(), popts, &defaults) {
        Ok(s) => s,
        Err(e) => return (common::fail(&common::error_line(&e)), false),
    };
    // Output waits in the agent's pipes until it is read: nothing is lost
    // between the start and the attach.
    if let Err(e) = sandbox.create_container(&spec).await {
        return (common::fail_sandbox(&e), false);
    }
    let how = Attach {
        interactive: args.process.interactive,
        tty: args.process.tty,
    };
    let init = sandbox.process(CONTAINER_ID, "");
    let attached = init.attach(how);
    let result = match args.timeout {
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), attached).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!("airlock: timed out after {secs} s: the sandbox was destroyed");
                return (ExitCode::from(EXIT_TIMEOUT), true);
            }
        },
        None => attached.await,
    };
    match result {
        Ok(exit) => (common::exit_status(exit), false),
        Err(e) => (common::fail_sandbox(&e), false),
    }
}
