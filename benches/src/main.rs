//! `airlock-bench`: Airlock against its peers, in the same run on the same
//! machine, reported as ratios. Absolute times on shared machines (and in
//! the software-emulated test host) are noise; ratios are not.

mod boot;
mod stats;
mod vsock;

use clap::{Parser, Subcommand};

/// Side-by-side benchmarks. Run them where real KVM is: directly on a host
/// with VT-x/AMD-V, or through `benches/run`, which uses the test host.
#[derive(Parser)]
#[command(name = "airlock-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot to the guest's first userspace line: airlock-vmm against QEMU
    /// `microvm` (and Firecracker when FIRECRACKER_BIN names a binary), same
    /// kernel, same initramfs, same vCPUs and memory.
    Boot(boot::BootArgs),
    /// vsock stream throughput in both directions: airlock-vmm's hybrid
    /// vsock against QEMU `microvm` with vhost-vsock, same guest program.
    Vsock(vsock::VsockArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Boot(args) => boot::run(&args),
        Command::Vsock(args) => vsock::run(&args),
    }
}
