//! The `airlock-vmm` child process of a sandbox: its command line, its
//! start (in its own process group, so that it outlives `airlock create`),
//! its stop (SIGTERM: the VMM wipes guest memory and exits; SIGKILL after a
//! grace period) and the wipe line of its log.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting or stopping the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Cannot start {0}: {1}
    #[error("Cannot start {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
    /// Cannot open the VMM log {0}: {1}
    #[error("Cannot open the VMM log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    /// {0}
    #[error("{0}")]
    Failed(String),
    /// Cannot signal the VMM (pid {0}): {1}
    #[error("Cannot signal the VMM (pid {0}): {1}")]
    Signal(u32, std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
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
                let spawned = crate::jail::spawn(&argv, log, log2, &procs, spec.die_with_parent);
                if spawned.is_err() {
                    let _ = crate::jail::remove_cgroup(&jail.cgroup);
                }
                spawned?
            }
            None => spawn_plain(binary, spec, log, log2)?,
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
        Ok(Self { pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
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

/// Stops VMM `pid`: SIGTERM, up to `grace` to exit, then SIGKILL. The log
/// at `log` gives the wipe.
pub fn stop(pid: u32, grace: Duration, log: &Path) -> Result<StopReport, VmmError> {
    let mut killed = false;
    if alive(pid) {
        signal(pid, libc::SIGTERM)?;
        if !wait_gone(pid, grace) {
            signal(pid, libc::SIGKILL)?;
            killed = true;
            wait_gone(pid, Duration::from_secs(5));
        }
    }
    Ok(StopReport {
        wipe: wipe_from_log(log),
        killed,
    })
}

fn signal(pid: u32, sig: i32) -> Result<(), VmmError> {
    let p = i32::try_from(pid)
        .map_err(|_| VmmError::Signal(pid, std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: kill only reads its arguments.
    if unsafe { libc::kill(p, sig) } == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(VmmError::Signal(pid, e));
        }
    }
    Ok(())
}

/// Whether `pid` is running (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone, reaping it if it is our child.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int, which lives across the call.
        unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
        ));
        let jail = spec.jail.as_ref().unwrap();
        assert_eq!(jail.cgroup, Path::new("/sys/fs/cgroup/airlock/abc"));
        assert_eq!(jail.memory_max, (128 + 64) << 20);
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
        // A process that ignores SIGTERM needs the SIGKILL.
        #[allow(clippy::zombie_processes, reason = "stop() reaps it")]
        let child = Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let report = stop(child.id(), Duration::from_millis(300), &log).unwrap();
        assert!(report.killed);
        assert!(!alive(child.id()));
        assert_eq!(
            report.wipe,
            Some(WipeLine {
                wiped_mib: 12,
                guest_mib: 256,
                wipe_ms: 3.5
            })
        );
    }
}
