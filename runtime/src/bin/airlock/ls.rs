//! `airlock ls`: the sandboxes on this host.

use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;

use crate::common;

/// List sandboxes (those made by `airlock create`, and any `run` in
/// progress).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON (an array of objects)
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    #[serde(flatten)]
    record: airlock_runtime::state::SandboxRecord,
    running: bool,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let records = match airlock_runtime::state::list(&config.state_dir) {
        Ok(r) => r,
        Err(e) => return common::fail(&common::error_line(&e)),
    };
    let rows: Vec<Row> = records
        .into_iter()
        .map(|record| Row {
            running: record.is_running(),
            record,
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<14} {:<8} {:<10} {:>4} {:>8}  VMM PID",
        "ID", "STATUS", "IMAGE", "CPUS", "MEMORY"
    );
    for r in rows {
        println!(
            "{:<14} {:<8} {:<10} {:>4} {:>5}MiB  {}",
            r.record.id,
            if r.running { "running" } else { "stopped" },
            r.record.image,
            r.record.vcpus,
            r.record.memory_mib,
            r.record.vmm_pid
        );
    }
    ExitCode::SUCCESS
}
