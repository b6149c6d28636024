//! `airlock-vmm`: boot one microVM and run it until it stops.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_vmm::config::{default_guest_dir, DEFAULT_CONSOLE_MAX_BYTES};
use airlock_vmm::config::{DriveConfig, VsockConfig};
use airlock_vmm::jail::JailConfig;
use airlock_vmm::keeper::{self, Role};
use airlock_vmm::vstate::memory;
use airlock_vmm::{ConsoleOutput, VmConfig, Vmm};
use clap::{Parser, ValueEnum};

/// Boot an Airlock microVM on KVM and run it until the guest stops.
///
/// With no arguments it boots the default guest image built by
/// `guest-image/build` once: the agent starts, says it is ready, and the guest
/// powers off. Guest memory is wiped when the VM ends, whatever the reason:
/// it lives in a memory file that a keeper process (the one started; the
/// VMM is its child) holds and overwrites once the VMM process has ended,
/// even by SIGKILL, the OOM killer or a crash.
///
/// Exit status: 0 when the guest shut down cleanly (or on SIGTERM/SIGINT);
/// 1 on a guest panic, triple fault or KVM error; 2 on bad arguments or a
/// VM that could not be built; 128+N when signal N killed the VMM process.
#[derive(Parser, Debug)]
#[command(name = "airlock-vmm", version)]
struct Cli {
    /// Guest kernel: an ELF vmlinux (PVH entry) or a bzImage
    /// [default: <cache>/guest/default/vmlinux]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs to load [default: <cache>/guest/default/initramfs.cpio]
    #[arg(long, value_name = "PATH", conflicts_with = "no_initrd")]
    initrd: Option<PathBuf>,
    /// Boot without an initramfs
    #[arg(long)]
    no_initrd: bool,
    /// Number of vCPUs (1-32)
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    memory: u64,
    /// Extra kernel command-line arguments (repeatable)
    #[arg(long = "append", value_name = "ARGS")]
    append: Vec<String>,
    /// Keep the guest running until it stops itself or the VMM gets SIGTERM.
    /// Without it, the guest agent is asked to power off once ready
    /// (`airlock.oneshot`).
    #[arg(long)]
    keep_running: bool,
    /// Attach a hybrid vsock device whose host side is this Unix socket
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context ID
    #[arg(long, default_value_t = 3, value_name = "CID", requires = "vsock_uds")]
    vsock_cid: u64,
    /// A Unix socket already bound at --vsock-uds and listening, handed
    /// over as this descriptor: the VMM binds nothing (airlock-runtime
    /// passes it with the jail, and keeps the socket out of the jail root)
    #[arg(long, value_name = "FD", requires = "vsock_uds")]
    vsock_listen_fd: Option<i32>,
    /// Let the guest connect to host ports: a guest connection to port P
    /// reaches the Unix socket `<vsock-uds>_P`. Off by default: the vsock
    /// device then opens no socket for the guest (its seccomp filter allows
    /// none), and airlock-runtime never turns it on
    #[arg(long, requires = "vsock_uds")]
    vsock_guest_connect: bool,
    /// Attach a block device: `path=IMAGE[,ro][,id=SERIAL]` (repeatable;
    /// the first is /dev/vda)
    #[arg(long = "drive", value_name = "SPEC")]
    drives: Vec<DriveConfig>,
    /// Do not give the guest a virtio-rng device
    #[arg(long)]
    no_rng: bool,
    /// Where the serial console goes: `stdout`, `off`, or a file path
    #[arg(long, default_value = "stdout", value_name = "stdout|off|PATH")]
    console: String,
    /// Most bytes of guest output written to the `--console` file; past
    /// it, output is dropped after one line saying so (stdout is not capped)
    #[arg(long, default_value_t = DEFAULT_CONSOLE_MAX_BYTES, value_name = "BYTES")]
    console_max_bytes: u64,
    /// Jail the VMM in this directory before it builds the VM: a private
    /// mount namespace, the directory as its root (holding bind mounts of
    /// only the kernel, initrd, drives, console and /dev/kvm; the vsock
    /// socket must be inside it), no capabilities, `no_new_privs`, and
    /// the `--jail-uid`/`--jail-gid` user. Needs root. airlock-runtime
    /// passes it, after starting the VMM in new pid/net/ipc/uts/mount
    /// namespaces and a cgroup.
    #[arg(long, value_name = "DIR")]
    jail_root: Option<PathBuf>,
    /// The user the jailed VMM runs as
    #[arg(
        long,
        value_name = "UID",
        default_value_t = 65534,
        requires = "jail_root"
    )]
    jail_uid: u32,
    /// The group the jailed VMM runs as
    #[arg(
        long,
        value_name = "GID",
        default_value_t = 65534,
        requires = "jail_root"
    )]
    jail_gid: u32,
    /// A descriptor of the `cgroup.procs` file that the VMM (not its
    /// keeper) moves itself into after the fork; airlock-runtime passes it
    /// with the jail, so that the keeper never shares the VMM's memory limit
    #[arg(long, value_name = "FD")]
    vmm_cgroup_fd: Option<i32>,
    /// How long the VMM has to stop after SIGTERM before its keeper
    /// SIGKILLs it (the keeper still wipes guest memory then)
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    stop_grace_secs: u64,
    /// Log format on stderr
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing syntax), e.g. `debug` [env: AIRLOCK_LOG]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(cli: &Cli) {
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("AIRLOCK_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(&filter)))
        .with_ansi(std::io::stderr().is_terminal())
        // A log that cannot be written (EFBIG past the jail's RLIMIT_FSIZE,
        // a full disk) loses the line. With internal errors logged, the
        // subscriber would report it with eprintln!, which panics when
        // stderr fails: an abort in release builds.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The filter in effect: `filter`, with the `virtio_queue` crate silenced
/// unless `filter` names it. That crate logs at ERROR whatever a guest
/// gets wrong (a bad avail index on every kick, a bad QueueNum on every
/// write), past the rate limit our devices put on guest-triggered lines
/// (`ratelimited!`), so a guest could fill the VMM's log. What is lost: a
/// queue that the crate refuses looks empty to its device, silently; name
/// the crate in the filter (`--log-level info,virtio_queue=error`) to see
/// why.
fn log_filter(filter: &str) -> String {
    if filter.contains("virtio_queue") {
        filter.to_string()
    } else {
        format!("{filter},virtio_queue=off")
    }
}

fn config_from(cli: &Cli) -> VmConfig {
    let dir = default_guest_dir();
    let mut extra_args = cli.append.clone();
    if !cli.keep_running {
        extra_args.push("airlock.oneshot".into());
    }
    VmConfig {
        kernel: cli.kernel.clone().unwrap_or_else(|| dir.join("vmlinux")),
        initrd: match (&cli.initrd, cli.no_initrd) {
            (_, true) => None,
            (Some(p), false) => Some(p.clone()),
            (None, false) => Some(dir.join("initramfs.cpio")),
        },
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        extra_args,
        console: match cli.console.as_str() {
            "stdout" => ConsoleOutput::Stdout,
            "off" => ConsoleOutput::Off,
            path => ConsoleOutput::File(path.into()),
        },
        console_max_bytes: cli.console_max_bytes,
        vsock: cli.vsock_uds.clone().map(|uds| VsockConfig {
            guest_cid: cli.vsock_cid,
            uds,
            guest_connect: cli.vsock_guest_connect,
            listen_fd: cli.vsock_listen_fd,
        }),
        drives: cli.drives.clone(),
        rng: !cli.no_rng,
    }
}

/// The error and its causes, joined the way `anyhow` prints them.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        source = e.source();
    }
    msg
}

fn main() -> ExitCode {
    let start = Instant::now();
    // One malloc arena for every thread. glibc gives threads arenas of
    // their own and, when one shrinks, reads /proc/sys/vm/overcommit_memory:
    // an openat(2) that the device and vCPU seccomp filters rightly refuse.
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = Cli::parse();
    init_logging(&cli);
    let mut config = config_from(&cli);
    // Checked here too, with the host's /proc/meminfo still in sight.
    if let Err(e) = config.validate() {
        eprintln!("airlock-vmm: error: {}", error_chain(&e));
        return ExitCode::from(2);
    }
    let memfd = match memory::guest_memfd(config.memory_mib) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("airlock-vmm: error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let vmm_cgroup = match cli
        .vmm_cgroup_fd
        .map(airlock_vmm::jail::cgroup_procs_from_fd)
    {
        Some(Err(e)) => {
            eprintln!("airlock-vmm: error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
        Some(Ok(f)) => Some(f),
        None => None,
    };
    // Opened while /proc is in sight; the keeper writes it after the fork.
    let oom = keeper::oom_score_file();
    let prepared = match &cli.jail_root {
        Some(root) => {
            let jail = JailConfig {
                root: root.clone(),
                uid: cli.jail_uid,
                gid: cli.jail_gid,
            };
            match airlock_vmm::jail::prepare(&jail, &mut config) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("airlock-vmm: error: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    // Every VMM thread, and the keeper, runs under its seccomp filter;
    // nothing turns this off. Device threads may open Unix sockets only
    // for a guest that may connect to host ports.
    airlock_vmm::seccomp::enable();
    airlock_vmm::seccomp::allow_device_connect(cli.vsock_guest_connect);
    // Guest memory gets its keeper before the VMM reads any guest input.
    let bytes = config.memory_mib << 20; // validate() bounds it.
    let grace = Duration::from_secs(cli.stop_grace_secs);
    let role = match keeper::split(memfd, bytes, grace, oom) {
        Ok(role) => role,
        Err(e) => {
            eprintln!("airlock-vmm: error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    // The VMM leaves the keeper's cgroup for its own before it touches
    // guest memory: the pages it faults in are charged there.
    let joined = match (&role, vmm_cgroup) {
        (Role::Vmm { .. }, Some(procs)) => airlock_vmm::jail::join_cgroup(procs),
        _ => Ok(()),
    };
    let jailed = prepared.map(|p| p.drop_privileges()).transpose();
    let (keeper, memfd) = match role {
        Role::Keeper(k) => {
            if let Some(fd) = cli.vsock_listen_fd {
                // The VMM's listener: the keeper must not keep it open.
                // SAFETY: close on a descriptor this process does not use.
                unsafe { libc::close(fd) };
            }
            if let Err(e) = &jailed {
                // The VMM fails the same step and exits; the keeper still
                // waits for it and wipes.
                tracing::error!("keeper: {}", error_chain(e));
            }
            k.run();
        }
        Role::Vmm { keeper, memfd } => (keeper, memfd),
    };
    if let Err(e) = joined {
        eprintln!("airlock-vmm: error: {}", error_chain(&e));
        return ExitCode::from(2);
    }
    let jailed_as = match jailed {
        Ok(Some(jailed)) => {
            if let Some(why) = &jailed.kept_root {
                tracing::warn!("{why}");
            }
            tracing::info!(
                root = %cli.jail_root.as_deref().unwrap_or(Path::new("/")).display(),
                uid = jailed.uid,
                gid = jailed.gid,
                "jailed"
            );
            Some(jailed)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("airlock-vmm: error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    match Vmm::new(config, start).with_keeper(memfd, keeper).run() {
        Ok(report) if report.exit.is_clean() => {
            tracing::info!("VM stopped: {}", report.exit);
            ExitCode::from(report.exit.exit_code() as u8)
        }
        Ok(report) => {
            eprintln!("airlock-vmm: error: {}", report.exit);
            ExitCode::from(report.exit.exit_code() as u8)
        }
        Err(e) => {
            let msg = error_chain(&e);
            let msg = match &jailed_as {
                Some(jailed) => jailed.explain(&msg),
                None => msg,
            };
            eprintln!("airlock-vmm: error: {msg}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_crate_is_silenced_unless_named() {
        assert_eq!(log_filter("info"), "info,virtio_queue=off");
        assert_eq!(log_filter("debug"), "debug,virtio_queue=off");
        assert_eq!(
            log_filter("info,virtio_queue=error"),
            "info,virtio_queue=error"
        );
        // The result parses as a filter.
        let _ = tracing_subscriber::EnvFilter::try_new(log_filter("warn")).unwrap();
    }
}
