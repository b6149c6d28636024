//! Support for Airlock's end-to-end tests: finding the built artifacts, and
//! running a test body where real KVM is, which on a host without hardware
//! virtualisation means inside the test host (`tests/testhost/run`).

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod containerd;
pub mod guest;
pub mod guest_memory;
pub mod internet;
pub mod tiny_guest;

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Whether this machine's `/dev/kvm` can boot an unmodified Linux guest:
/// it must be hardware KVM (kvm_intel or kvm_amd), not the paravirtual
/// kvm_pvm.
pub fn real_kvm() -> bool {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    Path::new("/dev/kvm").exists()
        && !module("kvm_pvm")
        && (module("kvm_intel") || module("kvm_amd"))
}

/// Runs `body` on real KVM. On this machine if it has it; otherwise the test
/// binary re-runs just this test (`--exact name`) inside the test host, and
/// the outer test passes only if the inner one did. `name` is the test
/// function's name.
pub fn on_real_kvm(name: &str, body: impl FnOnce()) {
    if real_kvm() {
        return body();
    }
    assert!(
        std::env::var_os("AIRLOCK_TESTHOST").is_none(),
        "inside the test host but /dev/kvm is not hardware KVM: kvm_amd did not load"
    );
    // One test host at a time: two emulated machines on a 2-core host
    // starve each other (and have been seen to stall together).
    static ONE_TEST_HOST: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_TEST_HOST.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("test binary path");
    let runner = workspace_root().join("tests/testhost/run");
    let out = Command::new(&runner)
        .args(["--timeout", &testhost_timeout(), "--"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", runner.display()));
    // Through print! so that the test harness captures it (and shows it when
    // the test fails), rather than mixing it into the outer run's summary.
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let inner = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "test {name} failed inside the test host ({})",
        out.status
    );
    assert!(
        inner.contains("1 passed"),
        "test {name} did not run inside the test host"
    );
}

/// The test host's time limit for one test: 900 s, or
/// `$AIRLOCK_E2E_TESTHOST_TIMEOUT` (the 200-cycle leak test needs more).
fn testhost_timeout() -> String {
    std::env::var("AIRLOCK_E2E_TESTHOST_TIMEOUT")
        .ok()
        .filter(|t| t.parse::<u64>().is_ok())
        .unwrap_or_else(|| "900".into())
}

/// `rel` under the workspace root, which `how` builds; a clear failure if
/// it is missing.
fn built(rel: &str, how: &str) -> PathBuf {
    let p = workspace_root().join(rel);
    assert!(p.exists(), "{} is missing: {how}", p.display());
    p
}

/// The release `airlock-vmm` binary that `tests/run` builds.
pub fn vmm_binary() -> PathBuf {
    built(
        "target/release/airlock-vmm",
        "build it with `cargo build --release -p airlock-vmm`",
    )
}

/// The `airlock-vmm` built with the test-only `seccomp-probe` feature,
/// which `tests/run` builds into its own target directory.
pub fn seccomp_probe_vmm_binary() -> PathBuf {
    built(
        "target/seccomp-probe/debug/airlock-vmm",
        "tests/run builds it (cargo build -p airlock-vmm --features seccomp-probe --target-dir target/seccomp-probe)",
    )
}

/// The release `airlock-netfilter` that `scripts/setup` builds.
pub fn netfilter_binary() -> PathBuf {
    built(
        "target/release/airlock-netfilter",
        "build it with scripts/setup (or `cargo build --release -p airlock-net`)",
    )
}

/// The release `airlock` CLI that `scripts/setup` builds.
pub fn airlock_binary() -> PathBuf {
    built(
        "target/release/airlock",
        "build it with scripts/setup (or `cargo build --release -p airlock-runtime`)",
    )
}

/// Asserts that `out` failed with `code` and exactly one stderr line,
/// `airlock: ...` containing `needle`: how every bad input must end.
pub fn assert_one_line_error(out: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].starts_with("airlock: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
}

/// Prints a command's outcome (the test harness shows it on failure).
pub fn show(label: &str, out: &std::process::Output) {
    println!(
        "$ {label}\n--- status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that no sandbox is left on the host: no state dir under
/// /run/airlock, no cgroup under /sys/fs/cgroup/airlock, no VMM process.
pub fn assert_no_sandbox_left() {
    let dirs = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.path().display().to_string())
            .collect()
    };
    assert_eq!(
        dirs("/run/airlock"),
        Vec::<String>::new(),
        "state dirs left"
    );
    assert_eq!(
        dirs("/sys/fs/cgroup/airlock"),
        Vec::<String>::new(),
        "cgroups left"
    );
    assert_eq!(
        processes_mentioning("airlock-vmm"),
        Vec::<String>::new(),
        "VMMs left"
    );
}

/// `PID cmdline` of every running VMM: `airlock-vmm` processes other than
/// the keepers of guest memory (one VMM, and one keeper, per VM).
pub fn vmm_processes() -> Vec<String> {
    processes_mentioning("airlock-vmm")
        .into_iter()
        .filter(|p| {
            let pid = p.split(' ').next().unwrap_or_default();
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() != "airlock-keeper")
        })
        .collect()
}

/// `PID cmdline` of every process whose command line mentions `needle`
/// (not the test harness's own re-run of a test).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) && !cmdline.contains("--exact") {
                found.push(format!("{pid} {cmdline}"));
            }
        }
    }
    found
}

/// The value of `key` in `/proc/PID/status`, trimmed (e.g. `CapEff`,
/// `Uid`); fails the test when the process or the key is missing.
pub fn proc_status(pid: impl std::fmt::Display, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}: has the process died?"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}
