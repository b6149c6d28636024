//! The `airlock-vmm` child process of a sandbox: its launch configuration
//! (`airlock_vmm_api::VmConfig`, written as JSON for `airlock-vmm
//! --config`), its start (in its own process group, so that it outlives
//! `airlock create`), its events, and its stop (`stop.rs`).
//!
//! The process started is the VMM's keeper, which owns guest memory: on
//! SIGTERM it stops the VM's process (killing it after the VM config's
//! `stop_grace_secs`), wipes guest memory and exits. A SIGKILL of the
//! keeper is the one thing that skips the wipe, so the runtime waits the
//! stop grace plus the wipe's time before it sends one. Signals go through
//! a pidfd, and only once the process has been proved to be the sandbox's
//! VMM (its start time), never to a pid that was reused.
//!
//! What the VMM did is read from its event file (`events`, one JSON line
//! per `airlock_vmm_api::Event`), never from its log, which is for people.

mod stop;

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::procs::{exited, start_time};
pub use airlock_vmm_api::{ConsoleOutput, DriveConfig, EventLog, NetConfig, VmConfig, VsockConfig};
pub use stop::{stop, StopReport};

/// Errors starting or stopping the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("cannot open the VMM log {0}")]
    Log(PathBuf, #[source] std::io::Error),
    #[error("cannot write the VMM's files in {0}")]
    Files(PathBuf, #[source] std::io::Error),
    #[error("airlock-vmm: {0}")]
    Failed(String),
    #[error("cannot read the start time of the VMM (pid {0}) from /proc/{0}/stat")]
    StartTime(u32),
    #[error("cannot open a pidfd for the VMM (pid {0})")]
    PidFd(u32, #[source] std::io::Error),
    #[error("cannot signal the VMM (pid {0})")]
    Signal(u32, #[source] std::io::Error),
    #[error("cannot wait for the VMM (pid {0}) to exit")]
    Wait(u32, #[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot bind the VMM's vsock socket {0}")]
    Vsock(PathBuf, #[source] std::io::Error),
}

/// What the runtime starts: the VM, and how its process runs.
#[derive(Debug, Clone)]
pub struct VmmSpec {
    /// The VM. Its `events` and `control` paths, its jail and its
    /// descriptors are filled in by [`VmmProcess::spawn`].
    pub vm: VmConfig,
    /// The directory of the VMM's files (a sandbox's state dir): its log,
    /// its VM config, its events, its control socket.
    pub dir: PathBuf,
    /// Stop the VM (SIGTERM: it wipes and exits) if the process that
    /// started it dies; for sandboxes that must not outlive one command.
    pub die_with_parent: bool,
    /// Jail the VMM (namespaces, cgroup, root of its own, no privileges).
    pub jail: Option<crate::jail::JailSpec>,
}

/// The VMM's log (for people) in `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("vmm.log")
}

/// The VMM's event file in `dir`.
pub fn events_path(dir: &Path) -> PathBuf {
    dir.join("events")
}

/// The VM config the VMM was started with, in `dir`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("vmm.json")
}

/// The VMM's control socket in `dir`.
pub fn control_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

impl VmmSpec {
    /// The VMM's command line: its configuration file, and logs as JSON.
    pub fn command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(config_path(&self.dir)).args([
            "--log-format",
            "json",
            "--log-level",
            "info",
        ]);
        cmd
    }

    /// The VM as the VMM gets it, with the descriptors handed over.
    fn launch_config(&self, listen_fd: Option<i32>, vmm_cgroup_fd: Option<i32>) -> VmConfig {
        let mut vm = self.vm.clone();
        vm.events = Some(events_path(&self.dir));
        vm.control = Some(control_path(&self.dir));
        if let Some(v) = vm.vsock.as_mut() {
            v.listen_fd = listen_fd;
        }
        vm.jail = self.jail.as_ref().map(|j| airlock_vmm_api::JailConfig {
            root: j.root.clone(),
            uid: j.uid,
            gid: j.gid,
            vmm_cgroup_fd,
        });
        vm
    }

    /// Writes the VM config and an empty event file, both root's alone.
    fn write_files(&self, vm: &VmConfig) -> Result<(), VmmError> {
        let err = |e| VmmError::Files(self.dir.clone(), e);
        let json = serde_json::to_vec_pretty(vm).map_err(|e| err(e.into()))?;
        for (path, bytes) in [
            (config_path(&self.dir), json),
            (events_path(&self.dir), vec![]),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(err)?;
            std::io::Write::write_all(&mut f, &bytes).map_err(err)?;
        }
        Ok(())
    }
}

/// A started VMM.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    start_time: u64,
}

impl VmmProcess {
    /// Starts the VMM with its output in the log; fails with the VMM's own
    /// error (its `Error` event) if it exits at once.
    pub fn spawn(binary: &Path, spec: &VmmSpec) -> Result<Self, VmmError> {
        let log_path = log_path(&spec.dir);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| VmmError::Log(log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Log(log_path.clone(), e))?;
        let pid = match &spec.jail {
            Some(jail) => {
                let procs = crate::jail::create_cgroup(jail)?;
                // Bound here, by root, in a directory the jailed VMM can
                // neither see nor change; the VMM gets the descriptor.
                let spawned = spec
                    .vm
                    .vsock
                    .as_ref()
                    .map(|v| bind_vsock(&v.uds))
                    .transpose()
                    .and_then(|listener| {
                        let listen_fd = listener.as_ref().map(|l| l.as_raw_fd());
                        let vm = spec.launch_config(listen_fd, Some(procs.vmm.as_raw_fd()));
                        spec.write_files(&vm)?;
                        let cmd = spec.command(binary);
                        let mut argv = vec![binary.as_os_str().to_os_string()];
                        argv.extend(cmd.get_args().map(|a| a.to_os_string()));
                        crate::jail::spawn(
                            &argv,
                            log,
                            log2,
                            &procs,
                            listen_fd,
                            vm.net.as_ref().map(|n| n.tap_fd),
                            spec.die_with_parent,
                        )
                        .map_err(VmmError::from)
                    });
                if spawned.is_err() {
                    let _ = crate::jail::remove_cgroup(&jail.cgroup);
                }
                spawned?
            }
            None => {
                spec.write_files(&spec.launch_config(None, None))?;
                spawn_plain(binary, spec, log, log2)?
            }
        };
        // Our child, not yet waited for: the pid is still its own, and its
        // start time is what proves it is the sandbox's VMM later on.
        let Some(start_time) = start_time(pid) else {
            // SAFETY: kill and waitpid only read their arguments; `pid` is
            // our child, not reaped, so it names no other process.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
            if let Some(jail) = &spec.jail {
                let _ = crate::jail::remove_cgroup(&jail.cgroup);
            }
            return Err(VmmError::StartTime(pid));
        };
        // A setup error (no KVM, bad kernel) ends it within milliseconds;
        // its `Error` event is the best error there is. Once it reports
        // that the VM runs, setup is over: no need to wait out the deadline.
        let mut events = EventLog::new(&events_path(&spec.dir));
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            events.refresh();
            if events.running() {
                break;
            }
            let mut status = 0;
            // SAFETY: waitpid writes one int, which lives across the call.
            if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
                if let Some(jail) = &spec.jail {
                    let _ = crate::jail::remove_cgroup(&jail.cgroup);
                }
                events.refresh();
                let reason = events.failure().unwrap_or_else(|| {
                    format!(
                        "exited at once (wait status {status:#x}); see {}",
                        log_path.display()
                    )
                });
                return Err(VmmError::Failed(reason));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // It keeps running without us: whoever stops it reaps it, or init
        // does once we exit.
        Ok(Self { pid, start_time })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its start time, for [`crate::state::SandboxRecord::vmm_start_time`].
    pub fn start_time(&self) -> u64 {
        self.start_time
    }
}

/// Binds the VMM's vsock socket at `path`, replacing a socket left there
/// by an earlier VMM (never anything else).
fn bind_vsock(path: &Path) -> Result<std::os::unix::net::UnixListener, VmmError> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(|e| VmmError::Vsock(path.to_path_buf(), e))?;
    }
    std::os::unix::net::UnixListener::bind(path).map_err(|e| VmmError::Vsock(path.to_path_buf(), e))
}

/// Starts the VMM unjailed (`[jail] enabled = false`); returns its pid.
fn spawn_plain(
    binary: &Path,
    spec: &VmmSpec,
    log: std::fs::File,
    log2: std::fs::File,
) -> Result<u32, VmmError> {
    let mut cmd = spec.command(binary);
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    if let Some(tap) = spec.vm.net.as_ref().map(|n| n.tap_fd) {
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(tap, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if spec.die_with_parent {
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // std does not wait for a dropped Child: the pid is all we keep.
    let child = cmd
        .spawn()
        .map_err(|e| VmmError::Spawn(binary.to_path_buf(), e))?;
    Ok(child.id())
}

/// What the VMM in `dir` reported of its wipe: (touched MiB, guest MiB).
pub fn wiped(dir: &Path) -> Option<(u64, u64)> {
    let mut log = EventLog::new(&events_path(dir));
    log.refresh();
    log.wiped().map(|(touched, total, _)| (touched, total))
}

/// Whether the VMM in `dir` got as far as running its VM.
pub fn ran(dir: &Path) -> bool {
    let mut log = EventLog::new(&events_path(dir));
    log.refresh();
    log.running()
}

/// Why the VMM in `dir` could not run its VM or ended badly, as it said.
pub fn failure(dir: &Path) -> Option<String> {
    let mut log = EventLog::new(&events_path(dir));
    log.refresh();
    log.failure()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm_binary() -> Option<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        ["target/release/airlock-vmm", "target/debug/airlock-vmm"]
            .iter()
            .map(|p| root.join(p))
            .find(|p| p.is_file())
    }

    fn spec(dir: &Path) -> VmmSpec {
        let mut vm = VmConfig::new(dir.join("no-such-vmlinux"));
        vm.initrd = Some(dir.join("no-such-initrd"));
        vm.vsock = Some(VsockConfig {
            guest_cid: 7,
            uds: dir.join("v.sock"),
            guest_connect: false,
            listen_fd: None,
        });
        vm.drives.push("path=img,ro,id=image".parse().unwrap());
        vm.console = ConsoleOutput::Off;
        vm.stop_grace_secs = 12;
        VmmSpec {
            vm,
            dir: dir.to_path_buf(),
            die_with_parent: false,
            jail: None,
        }
    }

    #[test]
    fn the_launch_config_carries_the_jail_files_and_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        let settings = crate::config::JailSettings::default();
        spec.jail = Some(crate::jail::JailSpec::new(
            &settings,
            "abc",
            &dir.path().join("root"),
            128,
            1024,
        ));
        let jail = spec.jail.as_ref().unwrap();
        assert_eq!(jail.cgroup, Path::new("/sys/fs/cgroup/airlock/abc"));
        // Guest memory, overhead, scratch disk and logs.
        assert_eq!(jail.memory_max, (128 + 64 + 1024 + 16) << 20);
        let vm = spec.launch_config(Some(5), Some(6));
        assert_eq!(
            vm.jail,
            Some(airlock_vmm_api::JailConfig {
                root: dir.path().join("root"),
                uid: 65534,
                gid: 65534,
                vmm_cgroup_fd: Some(6),
            })
        );
        assert_eq!(vm.vsock.as_ref().and_then(|v| v.listen_fd), Some(5));
        assert_eq!(vm.events, Some(dir.path().join("events")));
        assert_eq!(vm.control, Some(dir.path().join("control.sock")));
        assert_eq!(vm.extra_args, Vec::<String>::new(), "no airlock.oneshot");
        // The VMM reads back what was written, from a file only root reads.
        spec.write_files(&vm).unwrap();
        let path = config_path(dir.path());
        assert_eq!(VmConfig::from_file(&path).unwrap(), vm);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(events_path(dir.path())).unwrap(), b"");
    }

    #[test]
    fn command_line() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = spec(dir.path()).command(Path::new("/bin/airlock-vmm"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            format!(
                "--config {}/vmm.json --log-format json --log-level info",
                dir.path().display()
            )
        );
    }

    #[test]
    fn events_answer_what_the_vmm_did() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ran(dir.path()) && wiped(dir.path()).is_none());
        let lines = [
            airlock_vmm_api::Event::Running { ms: 3.0 },
            airlock_vmm_api::Event::Wiped {
                touched_mib: 4,
                total_mib: 128,
                ms: 1.0,
            },
            airlock_vmm_api::Event::Exited {
                reason: "vCPU 0 triple-faulted".into(),
                status: 1,
            },
        ]
        .map(|e| e.to_line())
        .concat();
        std::fs::write(events_path(dir.path()), lines).unwrap();
        assert!(ran(dir.path()));
        assert_eq!(wiped(dir.path()), Some((4, 128)));
        assert_eq!(
            failure(dir.path()).as_deref(),
            Some("vCPU 0 triple-faulted")
        );
    }

    #[test]
    fn a_setup_error_surfaces_as_the_vmms_line() {
        let bin = vmm_binary().expect("build airlock-vmm first (cargo build -p airlock-vmm)");
        let dir = tempfile::tempdir().unwrap();
        let err = VmmProcess::spawn(&bin, &spec(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("airlock-vmm: "), "{err}");
        assert!(err.contains("no-such-vmlinux"), "{err}");
    }
}
