//! The agent as PID 1: bring the guest up, then reap and wait for shutdown.

pub mod mounts;
pub mod reaper;
pub mod shutdown;
pub mod switch_root;

use std::convert::Infallible;

use crate::boot_timer::{self, Event as BootEvent};
use crate::cmdline::{Cmdline, CmdlineError};
use crate::console::{self, info, warn, ConsoleError};
use crate::container::cgroup::{self, CgroupError};
use crate::sysinfo::SysInfo;
use airlock_report::chain as error_chain;
use mounts::MountError;
use reaper::{ReaperError, Signals};
use shutdown::ShutdownError;

/// The line that tells whoever watches the console that the agent is up.
pub const READY_LINE: &str = "airlock-agent ready";

/// The kernel argument that asks `/init` to print [`BOOT_MARKER_LINE`] the
/// moment it starts. Without a dot or `=`, the kernel passes it to init as
/// an argument. `airlock-bench` boots the peer VMMs (Firecracker, QEMU
/// `microvm`) with it and times their boot to this line.
pub const BOOT_MARKER_ARG: &str = "airlock_boot_marker";
/// What `/init` prints when it gets [`BOOT_MARKER_ARG`].
pub const BOOT_MARKER_LINE: &str = "airlock-agent: init started";

/// Errors that stop init (and so panic the guest kernel).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Cannot set up signal handling")]
    Signals(#[source] ReaperError),
    #[error("Cannot mount the base filesystems")]
    Mounts(#[source] MountError),
    #[error("Cannot connect stdio to the console")]
    Console(#[source] ConsoleError),
    #[error("Cannot read the agent's settings")]
    Cmdline(#[source] CmdlineError),
    #[error("Waiting for signals failed")]
    Wait(#[source] ReaperError),
    #[error("Shutting down failed")]
    Shutdown(#[source] ShutdownError),
    #[error("Cannot move to a tmpfs root")]
    SwitchRoot(#[source] switch_root::SwitchRootError),
    #[error("Cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("The agent API server failed")]
    Rpc(#[source] crate::rpc::RpcError),
}

/// Runs init. Returns only on a fatal error.
pub fn run() -> Result<Infallible, InitError> {
    boot_timer::signal(BootEvent::InitEntered);
    if std::env::args().any(|a| a == BOOT_MARKER_ARG) {
        info(format_args!("{BOOT_MARKER_LINE}"));
        console::flush();
    }
    // Containers need pivot_root, which the initramfs root refuses.
    switch_root::switch().map_err(InitError::SwitchRoot)?;
    // First, before any child or thread exists: no signal may be lost or
    // kill us, and every thread inherits the mask.
    let mut signals = Signals::block().map_err(InitError::Signals)?;
    // Children may have exited before we listened for SIGCHLD: e.g. those of
    // a wrapper that exec'd us, whose SIGCHLD went to the old program.
    reaper::reap().map_err(InitError::Wait)?;
    mounts::mount_base().map_err(InitError::Mounts)?;
    console::ensure_stdio().map_err(InitError::Console)?;

    let (cmdline, warnings) = Cmdline::read().map_err(InitError::Cmdline)?;
    for w in warnings {
        warn(format_args!("airlock-agent: warning: {w}"));
    }
    // Said once the agent is ready: every console byte is a VM exit, which
    // the boot should not wait for.
    let sysinfo = SysInfo::gather().map_err(|e| error_chain(&e));
    if cmdline.oneshot {
        // A boot that only proves the guest comes up: its console is its
        // whole output.
        announce_ready();
        match &sysinfo {
            Ok(sys) => info(format_args!("airlock-agent: {sys}")),
            Err(e) => warn(format_args!("airlock-agent: warning: {e}")),
        }
        console::flush();
        return shutdown::reboot_now().map_err(InitError::Shutdown);
    }

    // Before any container exists (the launcher's children join it).
    let containers = limit_containers();
    // A serving guest's host is waiting to connect: only the ready line
    // goes to the console, the rest to the kernel log (`dmesg`); warnings
    // still go to the console.
    let announce = move || {
        announce_ready();
        match &sysinfo {
            Ok(sys) => console::log(format_args!("airlock-agent: {sys}")),
            Err(e) => warn(format_args!("airlock-agent: warning: {e}")),
        }
        match containers {
            Ok(limit) => console::log(format_args!(
                "airlock-agent: containers together may use {} MiB",
                limit >> 20
            )),
            Err(e) => warn(format_args!(
                "airlock-agent: warning: containers have no memory limit below the guest's, \
                 so one that allocates without bound can stall the guest: {}",
                error_chain(&e)
            )),
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(InitError::Runtime)?;
    let stop = runtime
        .block_on(crate::rpc::serve(&mut signals, announce))
        .map_err(InitError::Rpc)?;
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    info(format_args!("airlock-agent: {stop}: shutting down"));
    shutdown::stop_all_and_reboot(&mut signals).map_err(InitError::Shutdown)
}

/// Caps all containers' memory below the guest's, leaving the agent room.
fn limit_containers() -> Result<u64, CgroupError> {
    let available = crate::sysinfo::mem_available_kib().map_err(CgroupError::Available)?;
    let limit = cgroup::containers_limit(available).ok_or(CgroupError::NoRoom(available))?;
    let root = std::path::Path::new(cgroup::CGROUP_ROOT);
    cgroup::limit_containers(root, limit).map_err(|e| CgroupError::Write(root.into(), e))?;
    Ok(limit)
}

/// Tells the VMM's boot timer and the console that the agent is up.
fn announce_ready() {
    boot_timer::signal(BootEvent::AgentReady);
    info(format_args!("{READY_LINE}"));
    console::flush();
}
