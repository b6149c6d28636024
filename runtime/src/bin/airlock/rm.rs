//! `airlock rm`: destroy sandboxes, wiping their memory and scratch disks.

use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::{Sandbox, Teardown, TeardownReport};
use airlock_runtime::state::{SandboxId, StateDir};

use crate::common;

/// Destroy sandboxes: stop the microVM (its memory is wiped), scrub and
/// delete the scratch disk, remove the state.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sandboxes to destroy
    #[arg(required = true)]
    ids: Vec<String>,
    /// Print a JSON report per sandbox
    #[arg(long)]
    json: bool,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for id in &args.ids {
        match remove(config, id).await {
            Ok(report) => {
                if args.json {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                } else {
                    println!("{id}");
                }
                eprintln!(
                    "airlock: {id}: guest memory wiped ({} MiB touched of {} MiB), scratch disk scrubbed ({} bytes) and deleted",
                    report.wiped_mib.map_or("?".into(), |m| m.to_string()),
                    report.guest_mib.map_or("?".into(), |m| m.to_string()),
                    report.scratch_scrubbed_bytes
                );
            }
            Err(e) => code = common::fail(&e),
        }
    }
    code
}

async fn remove(config: &RuntimeConfig, id: &str) -> Result<TeardownReport, String> {
    let id = SandboxId::parse(id).map_err(|e| common::error_line(&e))?;
    match Sandbox::open(config, &id).await {
        Ok(s) => Ok(s.teardown(Teardown::Graceful).await),
        Err(e) => {
            // The agent is unreachable (the VM died, or hangs): tear down
            // what is left on the host all the same.
            let state =
                StateDir::open(&config.state_dir, &id).map_err(|e| common::error_line(&e))?;
            tracing::warn!("{id}: agent unreachable ({e}); stopping the VMM");
            let record = state
                .read_record()
                .inspect_err(|e| {
                    tracing::warn!("{id}: {e}: its VMM, if one runs, cannot be found to stop it")
                })
                .ok();
            Ok(Sandbox::teardown_remains(config, &state, record.as_ref()).await)
        }
    }
}
