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
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_e2e::{airlock_binary, guest, on_real_kvm};
use airlock_test_guest::marker_word;

const FILL_MIB: usize = 64;
const PAGE: usize = 4096;

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

/// Pages of `file` that start with eight marker words.
fn marked_pages(file: &File, marker: u64) -> usize {
    let pattern: Vec<u8> = std::iter::repeat_n(marker.to_le_bytes(), 8)
        .flatten()
        .collect();
    let len = file.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut marked) = (0u64, 0);
    while at < len {
        let n = file.read_at(&mut buf, at).unwrap();
        assert!(n > 0, "short read of guest memory at {at}");
        marked += buf[..n]
            .chunks_exact(PAGE)
            .filter(|p| p[..64] == pattern[..])
            .count();
        at += n as u64;
    }
    marked
}

/// The guest memory file that `keeper` holds, opened anew (root may
/// open it through `/proc/PID/fd`).
fn guest_memory_of(keeper: u32) -> File {
    let fds = PathBuf::from(format!("/proc/{keeper}/fd"));
    for entry in std::fs::read_dir(&fds).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:airlock-guest-ram") {
            // Writable: a guest that waits for the test's go-ahead reads
            // it from its own memory.
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())
                .unwrap();
        }
    }
    panic!("keeper {keeper} holds no guest memory file");
}

/// The keeper's only child: the VMM.
fn vmm_of(keeper: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "keeper {keeper} has children {pids:?}");
    pids[0]
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
        Err(_) => true,
    }
}

fn wait_ended(pid: u32, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !ended(pid) {
        if Instant::now() >= deadline {
            show_stuck(pid);
            panic!("{what} (pid {pid}) did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where `pid` and its children are: state, wait channel and kernel stack
/// of each thread.
fn show_stuck(pid: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for p in std::iter::once(pid.to_string()).chain(children.split_whitespace().map(String::from)) {
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let t = t.path();
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
            println!(
                "pid {p} thread {}: {} wchan={}\n{}",
                t.display(),
                read("stat"),
                read("wchan"),
                read("stack")
            );
        }
    }
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

/// The one keeper on the host (`airlock-keeper` in its comm), waiting up to
/// `timeout` for it to appear.
fn the_keeper(timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let keepers: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "airlock-keeper")
            })
            .collect();
        match keepers[..] {
            [one] => return one,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!("keepers on the host: {keepers:?}"),
        }
    }
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
    let deadline = Instant::now() + Duration::from_secs(180);
    let want = (FILL_MIB << 20) / PAGE * 9 / 10;
    let before = loop {
        let n = marked_pages(&memory, marker);
        if n >= want || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
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

/// The offset of the first page of `file` that starts with eight marker
/// words (as [`marked_pages`] counts them).
fn first_marked_page(file: &File, marker: u64) -> Option<u64> {
    let len = file.metadata().unwrap().len();
    let mut words = [0u8; 64];
    (0..len).step_by(PAGE).find(|&at| {
        file.read_at(&mut words, at).is_ok()
            && words
                .chunks_exact(8)
                .all(|w| w == marker.to_le_bytes().as_slice())
    })
}

fn memory_write(file: &File, at: u64, bytes: &[u8]) {
    file.write_all_at(bytes, at).unwrap();
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
