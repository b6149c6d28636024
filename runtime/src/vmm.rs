//! The `airlock-vmm` child process of a sandbox: its command line, its
//! start (in its own process group, so that it outlives `airlock create`),
//! its stop (SIGTERM: the VMM wipes guest memory and exits; SIGKILL after a
//! grace period) and the wipe line of its log.
//!
//! The process started is the VMM's keeper, which owns guest memory: on
//! SIGTERM it stops the VM's process (killing it after
//! `--stop-grace-secs`), wipes guest memory and exits. A SIGKILL of the
//! keeper is the one thing that skips the wipe, so the runtime waits the
//! stop grace plus the wipe's time before it sends one. Signals go through
//! a pidfd, and only once the process has been proved to be the sandbox's
//! VMM (its start time), never to a pid that was reused.

use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::state::SandboxRecord;

/// Errors starting or stopping the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Cannot start {0}: {1}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("Cannot open the VMM log {0}: {1}")]
    Log(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("Cannot read the start time of the VMM (pid {0}) from /proc/{0}/stat")]
    StartTime(u32),
    #[error("Cannot open a pidfd for the VMM (pid {0}): {1}")]
    PidFd(u32, #[source] std::io::Error),
    #[error("Cannot signal the VMM (pid {0}): {1}")]
    Signal(u32, #[source] std::io::Error),
    #[error("Cannot wait for the VMM (pid {0}) to exit: {1}")]
    Wait(u32, #[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot bind the VMM's vsock socket {0}")]
    Vsock(PathBuf, #[source] std::io::Error),
}

/// A drive of the VM.
#[derive(Debug, Clone)]
pub struct Drive {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: String,
}

/// What the VMM is asked to run.
#[derive(Debug, Clone)]
pub struct VmmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub vsock_uds: PathBuf,
    pub guest_cid: u32,
    pub drives: Vec<Drive>,
    pub log_path: PathBuf,
    pub console_path: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Stop the VM (SIGTERM: it wipes and exits) if the process that
    /// started it dies; for sandboxes that must not outlive one command.
    pub die_with_parent: bool,
    /// Jail the VMM (namespaces, cgroup, root of its own, no privileges).
    pub jail: Option<crate::jail::JailSpec>,
    /// What the VMM's keeper gives the VM's process to stop after a
    /// SIGTERM before killing it and wiping (`[timeouts] teardown_secs`).
    pub stop_grace_secs: u64,
}

impl VmmSpec {
    /// The VMM's command line.
    pub fn command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(["--vcpus", &self.vcpus.to_string()])
            .args(["--memory", &self.memory_mib.to_string()])
            .arg("--keep-running")
            .arg("--vsock-uds")
            .arg(&self.vsock_uds)
            .args(["--vsock-cid", &self.guest_cid.to_string()])
            .args(["--stop-grace-secs", &self.stop_grace_secs.to_string()])
            .args(["--log-format", "json", "--log-level", "info"]);
        if let Some(c) = &self.console_path {
            cmd.arg("--console").arg(c);
        } else {
            cmd.args(["--console", "off"]);
        }
        for d in &self.drives {
            let mut arg = format!("path={}", d.path.display());
            if d.read_only {
                arg.push_str(",ro");
            }
            arg.push_str(&format!(",id={}", d.id));
            cmd.arg("--drive").arg(arg);
        }
        for a in &self.extra_args {
            cmd.arg("--append").arg(a);
        }
        if let Some(jail) = &self.jail {
            cmd.args(jail.vmm_args());
        }
        cmd
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
    /// error line if it exits at once.
    pub fn spawn(binary: &Path, spec: &VmmSpec) -> Result<Self, VmmError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|e| VmmError::Log(spec.log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Log(spec.log_path.clone(), e))?;
        let pid = match &spec.jail {
            Some(jail) => {
                let procs = crate::jail::create_cgroup(jail)?;
                let cmd = spec.command(binary);
                let mut argv = vec![binary.as_os_str().to_os_string()];
                argv.extend(cmd.get_args().map(|a| a.to_os_string()));
                // Bound here, by root, in a directory the jailed VMM can
                // neither see nor change; the VMM gets the descriptor.
                let listener = bind_vsock(&spec.vsock_uds);
                let spawned = listener.and_then(|l| {
                    crate::jail::spawn(&argv, log, log2, &procs, Some(&l), spec.die_with_parent)
                        .map_err(VmmError::from)
                });
                if spawned.is_err() {
                    let _ = crate::jail::remove_cgroup(&jail.cgroup);
                }
                spawned?
            }
            None => spawn_plain(binary, spec, log, log2)?,
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
        // its one-line reason is the best error there is. Once it logs that
        // the VM runs, setup is over: no need to wait out the deadline.
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline && !logged_running(&spec.log_path) {
            let mut status = 0;
            // SAFETY: waitpid writes one int, which lives across the call.
            if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
                if let Some(jail) = &spec.jail {
                    let _ = crate::jail::remove_cgroup(&jail.cgroup);
                }
                let reason = error_line(&spec.log_path).unwrap_or_else(|| {
                    format!(
                        "airlock-vmm exited at once (wait status {status:#x}); see {}",
                        spec.log_path.display()
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

    /// Its start time, for [`SandboxRecord::vmm_start_time`].
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

/// The wipe the VMM logged as it stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WipeLine {
    pub wiped_mib: u64,
    pub guest_mib: u64,
    pub wipe_ms: f64,
}

/// How a stop went.
#[derive(Debug, Clone)]
pub struct StopReport {
    pub wipe: Option<WipeLine>,
    /// It had to be SIGKILLed (no wipe then).
    pub killed: bool,
}

/// Stops the VMM of `record`: SIGTERM, up to `grace` to exit, then
/// SIGKILL. Both go through a pidfd, and only if the process still is the
/// sandbox's VMM ([`SandboxRecord::is_own_vmm`]); a pid that now names
/// another process is left alone, with a warning. The log at `log` gives
/// the wipe.
pub fn stop(record: &SandboxRecord, grace: Duration, log: &Path) -> Result<StopReport, VmmError> {
    let pid = record.vmm_pid;
    let mut killed = false;
    // Opened before the identity check: whatever the check proves then
    // holds for the process the pidfd names, even if it exits and its pid
    // is reused afterwards.
    if let Some(vmm) = PidFd::open(pid)? {
        if !record.is_own_vmm() {
            tracing::warn!(
                "pid {pid} is no longer sandbox {}'s VMM; not signalling it",
                record.id
            );
        } else {
            vmm.signal(libc::SIGTERM)?;
            if !vmm.wait_exit(grace)? {
                tracing::warn!(
                    id = %record.id,
                    "the VMM (pid {pid}) did not exit within {} s of SIGTERM; killing it: guest memory is not wiped",
                    grace.as_secs()
                );
                vmm.signal(libc::SIGKILL)?;
                killed = true;
                vmm.wait_exit(Duration::from_secs(5))?;
            }
            vmm.reap();
        }
    }
    Ok(StopReport {
        wipe: wipe_from_log(log),
        killed,
    })
}

/// A pidfd: a handle on one process that a reused pid cannot redirect.
struct PidFd {
    pid: u32,
    fd: OwnedFd,
}

impl PidFd {
    /// A pidfd for `pid`; `None` if no such process exists.
    fn open(pid: u32) -> Result<Option<Self>, VmmError> {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return Ok(None);
        };
        if p <= 0 {
            return Ok(None);
        }
        // SAFETY: pidfd_open takes a pid and flags and passes no memory.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(VmmError::PidFd(pid, e)),
            };
        }
        let fd = i32::try_from(fd)
            .map_err(|_| VmmError::PidFd(pid, std::io::Error::from_raw_os_error(libc::EBADF)))?;
        // SAFETY: the kernel just returned this new descriptor, which
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Some(Self { pid, fd }))
    }

    /// Sends `sig`; a process that already exited is no error.
    fn signal(&self, sig: i32) -> Result<(), VmmError> {
        // SAFETY: pidfd_send_signal reads the descriptor and the signal; a
        // null siginfo is allowed (the kernel fills in a kill()'s).
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(VmmError::Signal(self.pid, e));
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit (a zombie has); the
    /// pidfd turns readable then.
    fn wait_exit(&self, timeout: Duration) -> Result<bool, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll writes `revents` of the one pollfd it is given,
            // which lives across the call.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                n if n > 0 => return Ok(true),
                0 => return Ok(false),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(VmmError::Wait(self.pid, e));
                    }
                }
            }
        }
    }

    /// Reaps the process if it is our child and has exited (`airlock run`,
    /// the shim); waitid on the pidfd can reap no other process.
    fn reap(&self) {
        // SAFETY: siginfo_t is plain data, for which zeroes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t, which lives across the call;
        // not our child, it fails with ECHILD and changes nothing.
        unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
    }
}

/// The start time of process `pid`: field 22 of `/proc/PID/stat`, in clock
/// ticks after boot; with the pid it names one process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_after_name(pid)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether process `pid` has exited (gone, or a zombie).
pub fn exited(pid: u32) -> bool {
    stat_after_name(pid).is_none_or(|s| matches!(s.split_whitespace().next(), Some("Z" | "X")))
}

/// `/proc/PID/stat` from field 3 (the state) on. The command name before
/// it may hold spaces and parentheses: the fields start after the last `)`.
fn stat_after_name(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.to_string())
}

/// The last `guest memory wiped` line of a VMM log.
pub fn wipe_from_log(log: &Path) -> Option<WipeLine> {
    let file = std::fs::File::open(log).ok()?;
    let mut found = None;
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        // The VMM's JSON lines are flat; tracing's default nests `fields`.
        let fields = if v["fields"].is_object() {
            &v["fields"]
        } else {
            &v
        };
        if fields["message"] == "guest memory wiped" {
            found = Some(WipeLine {
                wiped_mib: fields["wiped_mib"].as_u64()?,
                guest_mib: fields["guest_mib"].as_u64()?,
                wipe_ms: fields["wipe_ms"].as_f64().unwrap_or(0.0),
            });
        }
    }
    found
}

/// Whether the VMM has logged that its VM runs (`airlock-vmm`'s
/// `VM_RUNNING` line; this crate does not link the VMM).
pub(crate) fn logged_running(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains("\"VM running\""))
}

/// The VMM's `airlock-vmm: error: ...` line, if it wrote one.
pub(crate) fn error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("airlock-vmm: error: "))
        .map(|l| format!("airlock-vmm: {l}"))
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
        VmmSpec {
            kernel: dir.join("no-such-vmlinux"),
            initrd: dir.join("no-such-initrd"),
            vcpus: 1,
            memory_mib: 128,
            vsock_uds: dir.join("v.sock"),
            guest_cid: 7,
            drives: vec![Drive {
                path: dir.join("img"),
                read_only: true,
                id: "image".into(),
            }],
            log_path: dir.join("vmm.log"),
            console_path: None,
            extra_args: vec![],
            die_with_parent: false,
            jail: None,
            stop_grace_secs: 12,
        }
    }

    #[test]
    fn a_jail_adds_its_arguments() {
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
        let args: Vec<String> = spec
            .command(Path::new("/bin/airlock-vmm"))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.ends_with(&format!(
                "--jail-root {}/root --jail-uid 65534 --jail-gid 65534",
                dir.path().display()
            )),
            "{joined}"
        );
    }

    #[test]
    fn command_line() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = spec(dir.path()).command(Path::new("/bin/airlock-vmm"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--vsock-cid 7"), "{joined}");
        assert!(joined.contains(&format!(
            "--drive path={}/img,ro,id=image",
            dir.path().display()
        )));
        assert!(joined.contains("--keep-running"));
        assert!(joined.contains("--stop-grace-secs 12"), "{joined}");
        assert!(joined.contains("--log-format json"));
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

    /// A record of `child` as a sandbox's VMM.
    fn record_of(child: &std::process::Child) -> SandboxRecord {
        SandboxRecord {
            id: "abc".into(),
            vmm_pid: child.id(),
            vmm_start_time: start_time(child.id()),
            created_unix: 1,
            image: "default".into(),
            vcpus: 1,
            memory_mib: 128,
            guest_cid: 3,
        }
    }

    #[test]
    fn stop_terms_and_reaps_a_vmm_that_honours_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let record = record_of(&child);
        assert!(record.vmm_start_time.is_some());
        let started = Instant::now();
        let report = stop(
            &record,
            Duration::from_secs(20),
            &dir.path().join("vmm.log"),
        )
        .unwrap();
        assert!(!report.killed);
        assert!(report.wipe.is_none());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited out the grace"
        );
        // stop() reaped it: nothing is left for us to wait for.
        assert!(child.try_wait().is_err());
    }

    #[test]
    fn stop_terms_then_kills_and_reads_the_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            "{\"fields\":{\"message\":\"booting\"}}\n\
             {\"level\":\"INFO\",\"message\":\"guest memory wiped\",\"wiped_mib\":12,\"guest_mib\":256,\"wipe_ms\":3.5}\n",
        )
        .unwrap();
        // A process that ignores SIGTERM needs the SIGKILL (an ignored
        // signal stays ignored across exec).
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        // Let sh set the trap before the SIGTERM comes.
        std::thread::sleep(Duration::from_millis(100));
        let record = record_of(&child);
        let started = Instant::now();
        let report = stop(&record, Duration::from_millis(300), &log).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(report.killed);
        assert!(child.try_wait().is_err(), "reaped");
        assert_eq!(
            report.wipe,
            Some(WipeLine {
                wiped_mib: 12,
                guest_mib: 256,
                wipe_ms: 3.5
            })
        );
    }

    #[test]
    fn a_process_that_is_not_the_recorded_vmm_is_not_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut record = record_of(&child);
        // The pid was reused: the process there started at another time.
        record.vmm_start_time = record.vmm_start_time.map(|t| t + 1);
        let report = stop(&record, Duration::from_millis(100), &log).unwrap();
        assert!(!report.killed);
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        // A record from before start times were kept: only an airlock-vmm
        // naming the sandbox is its VMM.
        record.vmm_start_time = None;
        stop(&record, Duration::from_millis(100), &log).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_gone_vmm_needs_no_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let record = record_of(&child);
        child.wait().unwrap();
        let report = stop(&record, Duration::from_secs(5), &dir.path().join("vmm.log")).unwrap();
        assert!(!report.killed);
    }

    #[test]
    fn start_times_and_exits_are_read_from_proc() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert!(!exited(me));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        assert!(exited(pid), "a zombie has exited");
        child.wait().unwrap();
        assert!(exited(pid));
    }
}
