//! `airlock create`: a long-lived sandbox that takes `exec`s and `cp`s
//! until `rm`.

use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::{spec, Sandbox, Teardown};

use crate::common::{self, SandboxFlags};

/// Create a sandbox that stays up for `airlock exec` and `airlock cp`;
/// prints its ID. `airlock rm ID` destroys it.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    sandbox: SandboxFlags,
    /// Print a JSON object instead of the bare ID
    #[arg(long)]
    json: bool,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let base = match args.sandbox.validate() {
        Ok(b) => b,
        Err(e) => return common::fail(&e),
    };
    let opts = match args.sandbox.options(config) {
        Ok(o) => o,
        Err(e) => return common::fail(&e),
    };
    let mut progress = common::progress();
    let sandbox = match Sandbox::create(config, &opts, &mut progress).await {
        Ok(s) => s,
        Err(e) => return common::fail_sandbox(&e),
    };
    let defaults = common::image_defaults(sandbox.image_config.as_ref());
    let created = match spec::pause_spec(base, &sandbox.id.to_string(), &defaults) {
        Ok(spec) => sandbox.create_container(&spec).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = created {
        let code = common::fail_sandbox(&e);
        sandbox.teardown(Teardown::Kill).await;
        return code;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&sandbox.record).unwrap_or_default()
        );
    } else {
        println!("{}", sandbox.id);
    }
    ExitCode::SUCCESS
}
