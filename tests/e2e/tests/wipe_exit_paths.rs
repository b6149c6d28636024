//! Zero persistence on every way a VM ends, on real KVM, through the
//! `airlock` CLI, jailed, with 2 vCPUs.
//!
//! A container fills 64 MiB of guest memory with a marker computed at run
//! time (`hold-marker`). The test opens the guest memory file itself (the
//! keeper's memfd, through `/proc/PID/fd`), so the file outlives the VM,
//! and checks it twice:
//! * while the VM runs, the marker is there (the check can fail);
//! * once the VM has ended one way or another and its keeper is gone, no
//!   page of it holds the marker.
//!
//! A guest kernel panic and a triple fault need a guest that causes them:
//! `marker-init` replaces the agent as init, holds the marker and, once the
//! test has seen it, ends the VM that way (see `fault_after_marking`).
//!
//! A seccomp kill and an abort end the VMM with SIGSYS and SIGABRT; here
//! those signals are sent from outside (`seccomp.rs` proves that the real
//! filter kills with SIGSYS). The keeper sees only the VMM's wait status.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_e2e::guest_memory::*;
use airlock_e2e::{airlock_binary, guest, on_real_kvm};
use airlock_test_guest::marker_word;

const FILL_MIB: usize = 64;

fn airlock(args: &[&str]) -> Output {
    let out = Command::new(airlock_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run airlock");
    airlock_e2e::show(&format!("airlock {}", args.join(" ")), &out);
    out
}

/// A root filesystem with only `/hold-marker`.
fn rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("hold-marker");
    std::fs::copy(guest::program("hold-marker"), &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill takes integers only.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

/// Reads `child`'s stdout until its `holding` line (or fails after 120 s).
fn wait_holding(child: &mut Child) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("hold-marker: {line}");
            if line.starts_with("holding") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("hold-marker never said it holds the marker");
}

/// The one sandbox `airlock ls` lists: its id and its keeper's pid.
fn only_sandbox() -> (String, u32) {
    let out = airlock(&["ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    (id, list[0]["vmm_pid"].as_u64().unwrap() as u32)
}

/// A running sandbox whose container holds the marker.
struct Marked {
    id: String,
    keeper: u32,
    memory: File,
    marker: u64,
    holder: Child,
    _rootfs: tempfile::TempDir,
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `run`: `airlock run` holds the marker (and owns the sandbox);
/// otherwise `airlock create`, then `airlock exec`.
fn marked(run: bool) -> Marked {
    let rootfs = rootfs();
    let root = rootfs.path().to_str().unwrap().to_string();
    let seed = seed();
    let hold = [
        "/hold-marker".to_string(),
        seed.to_string(),
        FILL_MIB.to_string(),
    ];
    let size = ["--cpus", "2", "--memory", "256", "--rootfs", &root];
    let mut cmd = Command::new(airlock_binary());
    if run {
        cmd.arg("run").args(size).arg("--").args(&hold);
    } else {
        let out = airlock(&[&["create"][..], &size[..]].concat());
        assert_eq!(out.status.code(), Some(0));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        cmd.args(["exec", &id, "--"]).args(&hold);
    }
    let mut holder = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_holding(&mut holder);
    let (id, keeper) = only_sandbox();
    let memory = guest_memory_of(keeper);
    let marker = marker_word(seed);
    let before = marked_pages(&memory, marker);
    println!("{before} pages hold the marker before the VM ends");
    assert!(
        before >= (FILL_MIB << 20) / PAGE * 9 / 10,
        "the marker is not in guest memory while the VM runs: {before} pages"
    );
    Marked {
        id,
        keeper,
        memory,
        marker,
        holder,
        _rootfs: rootfs,
    }
}

impl Marked {
    /// Once the keeper is gone: no page holds the marker, the VMM's log
    /// has the wipe line; then the sandbox is removed and nothing is left.
    fn assert_wiped(mut self) {
        wait_ended(self.keeper, "the keeper", Duration::from_secs(180));
        let after = marked_pages(&self.memory, self.marker);
        assert_eq!(after, 0, "{after} pages still hold the marker");
        // The keeper's wipe line, where `rm` has not removed the log yet
        // (`rm` reports the wipe itself).
        let log = Path::new("/run/airlock").join(&self.id).join("vmm.log");
        if let Ok(log) = std::fs::read_to_string(&log) {
            println!("vmm.log:\n{log}");
            assert!(log.contains("guest memory wiped"), "no wipe line");
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if Path::new("/run/airlock").join(&self.id).exists() {
            airlock(&["rm", &self.id]);
        }
        airlock_e2e::assert_no_sandbox_left();
    }
}

#[test]
fn wipe_on_clean_exit() {
    on_real_kvm("wipe_on_clean_exit", || {
        let m = marked(false);
        let out = airlock(&["rm", &m.id]);
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stderr).contains("guest memory wiped"));
        m.assert_wiped();
    });
}

#[test]
fn wipe_on_sigterm() {
    on_real_kvm("wipe_on_sigterm", || {
        let m = marked(false);
        signal(m.keeper, libc::SIGTERM);
        m.assert_wiped();
    });
}

#[test]
fn wipe_on_vmm_sigkill() {
    on_real_kvm("wipe_on_vmm_sigkill", || {
        let m = marked(false);
        signal(vmm_of(m.keeper), libc::SIGKILL);
        m.assert_wiped();
    });
}

#[test]
fn wipe_on_vmm_seccomp_kill() {
    on_real_kvm("wipe_on_vmm_seccomp_kill", || {
        let m = marked(false);
        signal(vmm_of(m.keeper), libc::SIGSYS);
        m.assert_wiped();
    });
}

#[test]
fn wipe_on_vmm_abort() {
    on_real_kvm("wipe_on_vmm_abort", || {
        let m = marked(false);
        signal(vmm_of(m.keeper), libc::SIGABRT);
        m.assert_wiped();
    });
}

#[test]
fn wipe_on_vmm_oom_kill() {
    on_real_kvm("wipe_on_vmm_oom_kill", || {
        let m = marked(false);
        // The VMM's own cgroup (its keeper has another).
        let cg = Path::new("/sys/fs/cgroup/airlock").join(&m.id).join("vmm");
        let current: u64 = std::fs::read_to_string(cg.join("memory.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Below what guest memory already holds: nothing can be reclaimed
        // (no swap), so the OOM killer must act, and the keeper is exempt.
        let limit = current - (32 << 20);
        let _ = std::fs::write(cg.join("memory.max"), limit.to_string());
        let events = || std::fs::read_to_string(cg.join("memory.events")).unwrap_or_default();
        println!("memory.max written; memory.events:\n{}", events());
        wait_ended(m.keeper, "the keeper", Duration::from_secs(180));
        let events = events();
        println!("memory.events:\n{events}");
        assert!(
            events
                .lines()
                .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
            "the OOM killer did not act"
        );
        m.assert_wiped();
    });
}

#[test]
fn wipe_when_the_owning_runtime_dies() {
    on_real_kvm("wipe_when_the_owning_runtime_dies", || {
        let mut m = marked(true);
        // `airlock run` owns the sandbox: SIGKILL it.
        m.holder.kill().unwrap();
        m.holder.wait().unwrap();
        m.assert_wiped();
    });
}

/// A guest whose init (`marker-init`, in place of the agent) fills guest
/// memory with the marker and, once the test has seen it there, ends the VM
/// by `mode` (`panic` or `triple-fault`), which no agent call can do. It
/// runs through `airlock run`, jailed, with 2 vCPUs; the runtime, waiting
/// for an agent that never comes, sees the VM end. Returns what `airlock`
/// printed.
fn fault_after_marking(mode: &str) -> Output {
    let work = tempfile::tempdir().unwrap();
    let seed = seed();
    for (name, value) in [("seed", seed.to_string()), ("mode", mode.to_string())] {
        std::fs::write(work.path().join(name), value).unwrap();
    }
    let initrd = work.path().join("marker-init.cpio");
    let status = Command::new(airlock_e2e::workspace_root().join("guest-image/mkinitramfs"))
        .arg("-o")
        .arg(&initrd)
        .arg("--init")
        .arg(guest::program("marker-init"))
        .arg("--file")
        .arg(format!("/seed={}", work.path().join("seed").display()))
        .arg("--file")
        .arg(format!("/mode={}", work.path().join("mode").display()))
        .status()
        .unwrap();
    assert!(status.success(), "mkinitramfs");
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "initrd = \"{}\"\n[timeouts]\nagent_connect_secs = 600\n",
            initrd.display()
        ),
    )
    .unwrap();
    let runner = Command::new(airlock_binary())
        .args(["--config", config.to_str().unwrap()])
        .args(["run", "--cpus", "2", "--memory", "256", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let keeper = the_keeper(Duration::from_secs(120));
    let memory = guest_memory_of(keeper);
    let marker = marker_word(seed);
    // The guest fills its memory after booting: wait for the whole fill.
    let want = (FILL_MIB << 20) / PAGE * 9 / 10;
    let before = wait_marked(&memory, marker, want, Duration::from_secs(180));
    println!("{before} pages hold the marker before the VM ends");
    assert!(
        before >= want,
        "the marker is not in guest memory while the VM runs: {before} pages"
    );
    // The go-ahead: the first word of the first marked page, changed.
    let go = first_marked_page(&memory, marker).expect("a marked page");
    memory_write(&memory, go, &(!marker).to_le_bytes());
    wait_ended(keeper, "the keeper", Duration::from_secs(180));
    let after = marked_pages(&memory, marker);
    assert_eq!(after, 0, "{after} pages still hold the marker");
    let out = runner.wait_with_output().unwrap();
    airlock_e2e::show(&format!("airlock run (marker-init, {mode})"), &out);
    airlock_e2e::assert_no_sandbox_left();
    out
}

#[test]
fn wipe_on_guest_panic() {
    on_real_kvm("wipe_on_guest_panic", || {
        let out = fault_after_marking("panic");
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("guest kernel panic"), "{err}");
    });
}

#[test]
fn wipe_on_triple_fault() {
    on_real_kvm("wipe_on_triple_fault", || {
        let out = fault_after_marking("triple-fault");
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("triple-faulted"), "{err}");
    });
}
