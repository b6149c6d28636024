//! `airlock-bench`: Airlock against its peers, in the same run on the same
//! machine, reported as ratios. Absolute times on shared machines (and in
//! the software-emulated test host) are noise; ratios are not.
//!
//! Files: `peers.rs` (how each VMM is started, the console-line waiter),
//! `containerd.rs` (a private containerd for the runc and shim peers), one
//! file per benchmark (`boot.rs`, `memory.rs`, `exec.rs`, `lifecycle.rs`,
//! `teardown.rs`, `wipe.rs`, `vsock.rs`), `report.rs` (markdown and JSON),
//! `stats.rs` (medians).

mod boot;
mod containerd;
mod exec;
mod lifecycle;
mod memory;
mod peers;
mod report;
mod series;
mod stats;
mod teardown;
mod vsock;
mod wipe;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use peers::Peers;
use report::{Machine, Section};

/// Side-by-side benchmarks. Run them where real KVM is: directly on a host
/// with VT-x/AMD-V, or through `benches/run`, which uses the test host.
/// Firecracker joins when FIRECRACKER_BIN names a binary built outside
/// this repository. Prints markdown tables on stdout, progress on stderr,
/// and writes the results as JSON.
#[derive(Parser)]
#[command(name = "airlock-bench", version)]
struct Cli {
    /// Write the results as JSON to this file
    #[arg(long, global = true, value_name = "PATH")]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every benchmark in turn (the README's table)
    All {
        /// A short configuration that proves the harness works (CI)
        #[arg(long)]
        short: bool,
    },
    /// Cold boot to ready against Firecracker and QEMU microvm
    Boot(boot::BootArgs),
    /// VMM memory overhead of an idle guest
    Memory(memory::MemoryArgs),
    /// Exec round trip: CLI, agent ttrpc, and containerd with runc as peer
    Exec(exec::ExecArgs),
    /// Sandboxes created, run and destroyed per second, against runc
    Lifecycle(lifecycle::LifecycleArgs),
    /// Teardown-with-wipe time against guest memory size, then the wipe alone
    Teardown(teardown::TeardownArgs),
    /// The wipe alone (teardown's second part): no VM, so no KVM needed;
    /// Airlock's memfd against the anonymous mapping it replaced
    Wipe(teardown::TeardownArgs),
    /// vsock stream throughput in both directions
    Vsock(vsock::VsockArgs),
}

fn all(short: bool, peers: &Peers) -> anyhow::Result<Vec<Section>> {
    use clap::FromArgMatches;
    // Each benchmark's defaults come from its own flags; --short overrides
    // a few to finish in minutes.
    fn parse<T: clap::Args + FromArgMatches>(argv: &[&str]) -> anyhow::Result<T> {
        let cmd = T::augment_args(clap::Command::new("x"));
        let m = cmd.try_get_matches_from(std::iter::once("x").chain(argv.iter().copied()))?;
        Ok(T::from_arg_matches(&m)?)
    }
    // Flags per benchmark: boot, memory, exec, lifecycle, teardown, vsock.
    let short_flags: [&[&str]; 6] = [
        &["--runs", "2", "--shape", "1:128"],
        &["--runs", "1", "--settle-secs", "1"],
        &["--runs", "3"],
        &["--jobs", "2", "--parallel", "1", "--parallel", "2"],
        &["--runs", "1", "--memory", "128", "--memory", "256"],
        &["--mib", "8", "--runs", "1"],
    ];
    let [b, m, e, l, t, v] = if short { short_flags } else { [&[][..]; 6] };
    Ok(vec![
        boot::run(&parse(b)?, peers)?,
        memory::run(&parse(m)?, peers)?,
        exec::run(&parse(e)?)?,
        lifecycle::run(&parse(l)?)?,
        teardown::run(&parse(t)?, peers)?,
        vsock::run(&parse(v)?, peers)?,
    ])
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let machine = Machine::here();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Command::Wipe(a) = &cli.command {
        // No VM: neither the VMM binaries nor a guest image are needed.
        println!("Machine: {}.\n", machine.describe_without_vm());
        let section = wipe::run(a)?;
        print!("{}", section.markdown);
        let doc = serde_json::json!({
            "started_unix": started, "machine": machine, "benchmarks": [section.json],
        });
        return write_json(cli.json.as_deref(), &doc);
    }
    let stage = peers::Scratch::new("guest")?;
    let peers = Peers::from_env(stage.path())?;
    let sections = match &cli.command {
        Command::All { short } => all(*short, &peers)?,
        Command::Boot(a) => vec![boot::run(a, &peers)?],
        Command::Memory(a) => vec![memory::run(a, &peers)?],
        Command::Exec(a) => vec![exec::run(a)?],
        Command::Lifecycle(a) => vec![lifecycle::run(a)?],
        Command::Teardown(a) => vec![teardown::run(a, &peers)?],
        Command::Vsock(a) => vec![vsock::run(a, &peers)?],
        Command::Wipe(a) => vec![wipe::run(a)?], // Returned early, above.
    };
    println!("Machine: {}.\n", machine.describe());
    for s in &sections {
        print!("{}", s.markdown);
    }
    let doc = serde_json::json!({
        "started_unix": started,
        "machine": machine,
        "firecracker": peers.firecracker,
        "benchmarks": sections.iter().map(|s| &s.json).collect::<Vec<_>>(),
    });
    write_json(cli.json.as_deref(), &doc)
}

/// Writes `doc` to `path`, if one was given.
fn write_json(path: Option<&std::path::Path>, doc: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("airlock-bench: results written to {}", path.display());
    }
    Ok(())
}
