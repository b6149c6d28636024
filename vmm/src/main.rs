//! `airlock-vmm`: boot one microVM and run it until it stops.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_report::chain as error_chain;
use airlock_vmm::config::{default_guest_dir, DEFAULT_CONSOLE_MAX_BYTES};
use airlock_vmm::config::{DriveConfig, JailConfig, MacAddr, NetConfig, VsockConfig};
use airlock_vmm::keeper::{self, Role};
use airlock_vmm::vstate::memory;
use airlock_vmm::{events, ConsoleOutput, VmConfig, Vmm};
use airlock_vmm_api::Event;
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
    /// The whole VM configuration as JSON (`airlock_vmm_api::VmConfig`), as
    /// airlock-runtime writes it; the VM flags below build the same
    /// configuration by hand, and cannot be mixed with it
    #[arg(long, value_name = "PATH", conflicts_with_all = [
        "kernel", "initrd", "no_initrd", "vcpus", "memory", "append", "keep_running",
        "vsock_uds", "vsock_listen_fd", "vsock_guest_connect", "drives", "no_rng", "console",
        "net_tap_fd", "net_mac",
        "console_max_bytes", "jail_root", "vmm_cgroup_fd", "stop_grace_secs", "events", "control",
    ])]
    config: Option<PathBuf>,
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
    /// Attach a virtio-net device backed by this tap descriptor, opened
    /// by whoever starts the VMM (`/dev/net/tun`, `TUNSETIFF` with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and inherited: the VMM opens
    /// nothing
    #[arg(long, value_name = "FD", requires = "net_mac")]
    net_tap_fd: Option<i32>,
    /// The guest NIC's MAC address (unicast), like 02:00:00:00:00:01
    #[arg(long, value_name = "MAC", requires = "net_tap_fd")]
    net_mac: Option<MacAddr>,
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
    /// Append the VM's events (running, agent ready, wiped, exited, error)
    /// to this file as JSON lines, for programs to read
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// Accept commands (`{"command":"stop"}`) on a Unix socket bound here
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
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

/// The VM configuration: the `--config` file, or the flags.
fn config_from(cli: &Cli) -> Result<VmConfig, airlock_vmm::config::LoadError> {
    if let Some(path) = &cli.config {
        return VmConfig::from_file(path);
    }
    let dir = default_guest_dir();
    let mut extra_args = cli.append.clone();
    if !cli.keep_running {
        extra_args.push("airlock.oneshot".into());
    }
    Ok(VmConfig {
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
        stop_grace_secs: cli.stop_grace_secs,
        jail: cli.jail_root.clone().map(|root| JailConfig {
            root,
            uid: cli.jail_uid,
            gid: cli.jail_gid,
            vmm_cgroup_fd: cli.vmm_cgroup_fd,
        }),
        events: cli.events.clone(),
        control: cli.control.clone(),
        net: cli
            .net_tap_fd
            .zip(cli.net_mac)
            .map(|(tap_fd, mac)| NetConfig { tap_fd, mac }),
    })
}

/// Reports a failure to build or run the VM: on stderr for people (the
/// log), as an `Error` event for programs; the exit status is 2.
fn fail(message: String) -> ExitCode {
    eprintln!("airlock-vmm: error: {message}");
    events::emit(Event::Error { message });
    ExitCode::from(2)
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
    let mut config = match config_from(&cli) {
        Ok(c) => c,
        Err(e) => return fail(error_chain(&e)),
    };
    // First, so that every later failure is reported there too.
    if let Some(path) = &config.events {
        if let Err(e) = events::open(path) {
            return fail(error_chain(&e));
        }
    }
    // Checked here too, with the host's /proc/meminfo still in sight.
    if let Err(e) = airlock_vmm::config::validate(&config) {
        return fail(error_chain(&e));
    }
    let control = match config.control.as_deref().map(airlock_vmm::control::bind) {
        Some(Err(e)) => return fail(error_chain(&e)),
        Some(Ok(l)) => Some(l),
        None => None,
    };
    let memfd = match memory::guest_memfd(config.memory_mib) {
        Ok(f) => f,
        Err(e) => return fail(error_chain(&e)),
    };
    let jail = config.jail.clone();
    let vmm_cgroup = match jail
        .as_ref()
        .and_then(|j| j.vmm_cgroup_fd)
        .map(airlock_vmm::jail::cgroup_procs_from_fd)
    {
        Some(Err(e)) => return fail(error_chain(&e)),
        Some(Ok(f)) => Some(f),
        None => None,
    };
    // Opened while /proc is in sight; the keeper writes it after the fork.
    let oom = keeper::oom_score_file();
    let prepared = match &jail {
        Some(jail) => match airlock_vmm::jail::prepare(jail, &mut config) {
            Ok(p) => Some(p),
            Err(e) => return fail(error_chain(&e)),
        },
        None => None,
    };
    // Every VMM thread, and the keeper, runs under its seccomp filter;
    // nothing turns this off. Device threads may open Unix sockets only
    // for a guest that may connect to host ports.
    airlock_vmm::seccomp::enable();
    let guest_connect = config.vsock.as_ref().is_some_and(|v| v.guest_connect);
    airlock_vmm::seccomp::allow_device_connect(guest_connect);
    // Guest memory gets its keeper before the VMM reads any guest input.
    let bytes = config.memory_mib << 20; // validate() bounds it.
    let grace = Duration::from_secs(config.stop_grace_secs);
    let role = match keeper::split(memfd, bytes, grace, oom) {
        Ok(role) => role,
        Err(e) => return fail(error_chain(&e)),
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
            if let Some(fd) = config.vsock.as_ref().and_then(|v| v.listen_fd) {
                // The VMM's listener: the keeper must not keep it open.
                // SAFETY: close on a descriptor this process does not use.
                unsafe { libc::close(fd) };
            }
            if let Some(net) = &config.net {
                // Nor the VMM's tap: the NIC goes away with the VMM.
                // SAFETY: close on a descriptor this process does not use.
                unsafe { libc::close(net.tap_fd) };
            }
            // Nor the control socket: commands are the VMM's.
            drop(control);
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
        return fail(error_chain(&e));
    }
    let jailed_as = match jailed {
        Ok(Some(jailed)) => {
            if let Some(why) = &jailed.kept_root {
                tracing::warn!("{why}");
            }
            tracing::info!(
                root = %jail.as_ref().map_or(Path::new("/"), |j| &j.root).display(),
                uid = jailed.uid,
                gid = jailed.gid,
                "jailed"
            );
            Some(jailed)
        }
        Ok(None) => None,
        Err(e) => return fail(error_chain(&e)),
    };
    let mut vmm = Vmm::new(config, start).with_keeper(memfd, keeper);
    if let Some(listener) = control {
        vmm = vmm.with_control(listener);
    }
    match vmm.run() {
        Ok(report) => {
            let status = report.exit.exit_code();
            let reason = report.exit.to_string();
            if report.exit.is_clean() {
                tracing::info!("VM stopped: {reason}");
            } else {
                eprintln!("airlock-vmm: error: {reason}");
            }
            events::emit(Event::Exited { reason, status });
            ExitCode::from(status as u8)
        }
        Err(e) => {
            let msg = error_chain(&e);
            fail(match &jailed_as {
                Some(jailed) => jailed.explain(&msg),
                None => msg,
            })
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

    #[test]
    fn the_net_flags_build_the_nic_and_come_together() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("airlock-vmm").chain(args.iter().copied()))
        };
        let cli = parse(&["--net-tap-fd", "5", "--net-mac", "02:00:00:00:00:01"]).unwrap();
        let net = config_from(&cli).unwrap().net.unwrap();
        assert_eq!(net.tap_fd, 5);
        assert_eq!(net.mac.to_string(), "02:00:00:00:00:01");
        assert_eq!(config_from(&parse(&[]).unwrap()).unwrap().net, None);
        for bad in [
            &["--net-tap-fd", "5"][..],
            &["--net-mac", "02:00:00:00:00:01"],
            &["--net-tap-fd", "5", "--net-mac", "02:00"],
            &[
                "--config",
                "/c.json",
                "--net-tap-fd",
                "5",
                "--net-mac",
                "02:00:00:00:00:01",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
