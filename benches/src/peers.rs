//! The VMMs side by side and how each is started on the same guest kernel
//! and initramfs: `airlock-vmm`, QEMU `microvm` and Firecracker (when
//! `FIRECRACKER_BIN` names a binary built outside this repository); and a
//! waiter for console lines.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// The kernel argument that makes the agent print [`BOOT_MARKER_LINE`] as
/// soon as it runs as `/init` (the agent's `init::BOOT_MARKER_ARG`).
pub const BOOT_MARKER_ARG: &str = "airlock_boot_marker";
/// The agent's line for [`BOOT_MARKER_ARG`].
pub const BOOT_MARKER_LINE: &str = "airlock-agent: init started";
/// The agent's line once it serves its API (its `init::READY_LINE`).
pub const READY_LINE: &str = "airlock-agent ready";

/// A VMM under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Vmm {
    Airlock,
    Firecracker,
    QemuMicrovm,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Airlock => "Airlock",
            Vmm::Firecracker => "Firecracker",
            Vmm::QemuMicrovm => "QEMU microvm",
        }
    }
}

/// vCPUs and memory of a guest.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.vcpus == 1 { "" } else { "s" };
        write!(f, "{} vCPU{s}, {} MiB", self.vcpus, self.memory_mib)
    }
}

/// A guest kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Guest {
    /// The default guest image that `scripts/setup` builds (the agent as
    /// `/init`), with its links resolved so that every VMM reads the same
    /// files.
    pub fn default_image() -> anyhow::Result<Self> {
        let dir = airlock_vmm::config::default_guest_dir();
        let resolve = |name: &str| {
            let p = dir.join(name);
            p.canonicalize()
                .with_context(|| format!("{} not found: run scripts/setup", p.display()))
        };
        Ok(Guest {
            kernel: resolve("vmlinux")?,
            initrd: resolve("initramfs.cpio")?,
        })
    }

    /// Copies the kernel and initramfs into `dir`: every VMM then reads
    /// them from the page cache of a local filesystem (in the test host,
    /// the caller's files are on 9p, whose reads would dominate).
    pub fn staged(&self, dir: &Path) -> anyhow::Result<Self> {
        let copy = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
            let to = dir.join(name);
            std::fs::copy(from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        Ok(Guest {
            kernel: copy(&self.kernel, "vmlinux")?,
            initrd: copy(&self.initrd, "initramfs.cpio")?,
        })
    }

    /// This kernel with a test guest program (`tests/guest`) as `/init`,
    /// in an initramfs written to `scratch`.
    pub fn with_program(&self, name: &str, scratch: &Path) -> anyhow::Result<Self> {
        let program = Path::new("target/guest/x86_64-unknown-linux-gnu/release").join(name);
        if !program.exists() {
            bail!(
                "{} is missing: build the test guest programs (tests/run does)",
                program.display()
            );
        }
        let out = scratch.join(format!("{name}.cpio"));
        let status = Command::new("guest-image/mkinitramfs")
            .arg("-o")
            .arg(&out)
            .arg("--init")
            .arg(&program)
            .status()
            .context("guest-image/mkinitramfs")?;
        if !status.success() {
            bail!("guest-image/mkinitramfs failed for {}", program.display());
        }
        Ok(Guest {
            kernel: self.kernel.clone(),
            initrd: out,
        })
    }
}

/// Copies a VMM binary into `stage`, beside the staged guest image, and
/// returns the copy's path. Every VMM then starts from the page cache of a
/// local filesystem, as an installed one does: in the test host the
/// checkout (where `airlock-vmm` and usually Firecracker are built) is on
/// 9p without caching, so each start read the binary's pages over 9p,
/// while QEMU came from the cached system share.
fn stage_binary(binary: &Path, stage: &Path) -> anyhow::Result<PathBuf> {
    let name = binary
        .file_name()
        .with_context(|| format!("{} has no file name", binary.display()))?;
    let to = stage.join(name);
    std::fs::copy(binary, &to)
        .with_context(|| format!("cannot copy {} to {}", binary.display(), to.display()))?;
    Ok(to)
}

/// The binaries to compare, and the guest they boot.
#[derive(Debug, Clone)]
pub struct Peers {
    pub airlock_vmm: PathBuf,
    pub firecracker: Option<PathBuf>,
    /// The default guest image, staged in a local directory.
    pub guest: Guest,
}

impl Peers {
    /// `target/release/airlock-vmm`, Firecracker when `FIRECRACKER_BIN`
    /// names it, and the default guest image copied into `stage`.
    pub fn from_env(stage: &Path) -> anyhow::Result<Self> {
        let airlock_vmm = PathBuf::from("target/release/airlock-vmm");
        if !airlock_vmm.is_file() {
            bail!("target/release/airlock-vmm is missing: run scripts/setup");
        }
        let firecracker = match std::env::var_os("FIRECRACKER_BIN") {
            Some(p) if !p.is_empty() => {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    bail!("FIRECRACKER_BIN={} is not a file", p.display());
                }
                Some(p)
            }
            _ => None,
        };
        Ok(Peers {
            airlock_vmm: stage_binary(&airlock_vmm, stage)?,
            firecracker: firecracker.map(|p| stage_binary(&p, stage)).transpose()?,
            guest: Guest::default_image()?.staged(stage)?,
        })
    }

    /// Every VMM in this run, Airlock first.
    pub fn vmms(&self) -> Vec<Vmm> {
        let mut v = vec![Vmm::Airlock];
        if self.firecracker.is_some() {
            v.push(Vmm::Firecracker);
        }
        v.push(Vmm::QemuMicrovm);
        v
    }

    /// How the peers are described in reports.
    pub fn note(&self) -> &'static str {
        if self.firecracker.is_some() {
            "Firecracker built from its public source, pointed at with FIRECRACKER_BIN"
        } else {
            "Firecracker not in this run (FIRECRACKER_BIN unset): QEMU microvm is the VM peer"
        }
    }

    /// A peer VMM (not Airlock) booting `guest` with `args` on the kernel
    /// command line after the peers' base line; `vsock` gives the guest a
    /// vsock device (QEMU: vhost-vsock with that CID; Firecracker: its
    /// hybrid vsock on a Unix socket beside `scratch`).
    pub fn peer_command(
        &self,
        vmm: Vmm,
        guest: &Guest,
        shape: Shape,
        args: &str,
        vsock: Option<u32>,
        scratch: &Path,
    ) -> anyhow::Result<Command> {
        // Airlock's own base line, with each VMM's reboot convention: the
        // same kernel does the same work under every VMM.
        match vmm {
            Vmm::QemuMicrovm => {
                let mut c = Command::new("qemu-system-x86_64");
                // No ACPI (the guest kernel has none): QEMU then announces its
                // virtio-mmio devices on the kernel command line.
                c.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"]);
                c.args(["-enable-kvm", "-cpu", "host"]);
                c.args(["-smp", &shape.vcpus.to_string()]);
                c.args(["-m", &shape.memory_mib.to_string()]);
                c.args(["-nodefaults", "-no-user-config", "-display", "none"]);
                c.args(["-no-reboot", "-serial", "stdio"]);
                c.arg("-kernel").arg(&guest.kernel);
                c.arg("-initrd").arg(&guest.initrd);
                if let Some(cid) = vsock {
                    c.args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
                }
                // microvm has no i8042: a reset is a triple fault, which
                // -no-reboot turns into QEMU's exit.
                let line = format!("console=ttyS0 reboot=t panic=-1 pci=off nomodule quiet {args}");
                c.args(["-append", line.trim_end()]);
                Ok(c)
            }
            Vmm::Firecracker => {
                let bin = self
                    .firecracker
                    .as_ref()
                    .context("FIRECRACKER_BIN not set")?;
                let line = format!("console=ttyS0 reboot=k panic=1 pci=off nomodule quiet {args}");
                let mut config = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": guest.kernel,
                        "initrd_path": guest.initrd,
                        "boot_args": line.trim_end(),
                    },
                    "machine-config": {
                        "vcpu_count": shape.vcpus,
                        "mem_size_mib": shape.memory_mib,
                    },
                    "drives": [],
                });
                if let Some(cid) = vsock {
                    config["vsock"] = serde_json::json!({
                        "guest_cid": cid,
                        "uds_path": scratch.join("fc-vsock.sock"),
                    });
                }
                let path = scratch.join("firecracker.json");
                std::fs::write(&path, config.to_string())?;
                let mut c = Command::new(bin);
                c.args(["--no-api", "--level", "Error", "--config-file"])
                    .arg(path);
                Ok(c)
            }
            Vmm::Airlock => bail!("Airlock is started through its runtime, not as a peer"),
        }
    }

    /// `airlock-vmm` booting `guest` with its console on stdout, `args`
    /// appended to its kernel command line and a hybrid vsock on `uds`;
    /// its VM config (`airlock_vmm_api::VmConfig`, the one the runtime
    /// writes) and its events ([`airlock_events`]) go in `scratch`.
    pub fn airlock_command(
        &self,
        guest: &Guest,
        shape: Shape,
        args: &str,
        uds: Option<&Path>,
        scratch: &Path,
    ) -> anyhow::Result<Command> {
        let mut vm = airlock_vmm_api::VmConfig::new(guest.kernel.clone());
        vm.initrd = Some(guest.initrd.clone());
        vm.vcpus = shape.vcpus;
        vm.memory_mib = shape.memory_mib;
        vm.extra_args = args.split_whitespace().map(String::from).collect();
        match uds {
            // Kept running until stopped, as the runtime's VMs are.
            Some(uds) => {
                vm.vsock = Some(airlock_vmm_api::VsockConfig {
                    guest_cid: 3,
                    uds: uds.to_path_buf(),
                    guest_connect: false,
                    listen_fd: None,
                })
            }
            None => vm.extra_args.push("airlock.oneshot".into()),
        }
        vm.events = Some(airlock_events(scratch));
        let path = scratch.join("airlock-vm.json");
        std::fs::write(&path, serde_json::to_vec(&vm)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut c = Command::new(&self.airlock_vmm);
        c.arg("--config").arg(path);
        c.args(["--log-format", "json", "--log-level", "info"]);
        Ok(c)
    }
}

/// Where [`Peers::airlock_command`] has `airlock-vmm` write its events.
pub fn airlock_events(scratch: &Path) -> PathBuf {
    scratch.join("airlock-events")
}

/// A vsock CID no other guest of this run uses (vhost-vsock CIDs are
/// host-wide).
pub fn unique_cid() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    1000 + (std::process::id() % 100_000) * 16 + n % 16
}

/// A started VMM whose console (stdout) is read line by line.
pub struct Running {
    pub child: Child,
    pub started: Instant,
    lines: Receiver<(Instant, String)>,
    tail: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `cmd`; the clock starts just before the spawn.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut stderr_pipe = child.stderr.take().context("no stderr pipe")?;
        let (tx, lines) = mpsc::channel();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let at = Instant::now();
                if let Ok(mut t) = t.lock() {
                    if t.len() == 20 {
                        t.remove(0);
                    }
                    t.push(line.clone());
                }
                let _ = tx.send((at, line));
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = stderr_pipe.read_to_string(&mut buf);
            if let Ok(mut e) = e.lock() {
                *e = buf;
            }
        });
        Ok(Running {
            child,
            started,
            lines,
            tail,
            stderr,
            stderr_reader: Some(stderr_reader),
        })
    }

    /// When the first console line containing `needle` came, or an error
    /// with the console's tail once `timeout` passes or the VMM exits.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<Instant> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(needle) => return Ok(at),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no {needle:?} line within {timeout:?}{}", self.context())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!("exited ({status:?}) before {needle:?}{}", self.context())
                }
            }
        }
    }

    /// Waits for the process to exit; returns when it did. Blocks in
    /// waitpid rather than polling, which would take CPU time from the VMM
    /// being timed; a watchdog kills it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<(Instant, ExitStatus)> {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = self.child.id();
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + timeout;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if Instant::now() >= until {
                        // SAFETY: kill only reads its arguments; the child is
                        // not reaped yet, so the pid is still ours.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                false
            })
        };
        let status = self.child.wait();
        let at = Instant::now();
        done.store(true, std::sync::atomic::Ordering::Release);
        if watchdog.join().unwrap_or(false) {
            bail!("did not exit within {timeout:?}{}", self.context());
        }
        Ok((at, status?))
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to have exited and returns all it wrote to
    /// stderr.
    pub fn collect_stderr(&mut self) -> String {
        let _ = self.child.wait();
        if let Some(r) = self.stderr_reader.take() {
            let _ = r.join();
        }
        self.stderr()
    }

    /// What the VMM wrote to stderr (complete once it has exited).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn context(&self) -> String {
        let tail = self.tail.lock().map(|t| t.join("\n")).unwrap_or_default();
        format!(
            "\n--- console tail ---\n{tail}\n--- stderr ---\n{}",
            self.stderr().trim_end()
        )
    }

    /// Kills the VMM (boot is what was measured, not its shutdown) and
    /// returns what it wrote to stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        self.collect_stderr()
    }
}

/// A fresh scratch directory for one benchmark, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "airlock-bench-{what}-{}-{}",
            std::process::id(),
            airlock_runtime::state::random_hex(4)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
