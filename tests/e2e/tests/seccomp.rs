//! The VMM's seccomp filters on real KVM: every thread of a running VMM is
//! filtered, and a syscall outside a thread's filter kills the VMM with
//! SIGSYS (shown with a VMM built with the test-only `seccomp-probe`
//! feature, whose vCPU thread makes such a call when the guest asks).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use airlock_e2e::{guest, on_real_kvm, seccomp_probe_vmm_binary, vmm_binary};

/// `(thread name, Seccomp: value)` of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

#[test]
fn every_vmm_thread_runs_under_a_seccomp_filter() {
    on_real_kvm("every_vmm_thread_runs_under_a_seccomp_filter", || {
        let mut child = Command::new(vmm_binary())
            .args(["--vcpus", "2", "--keep-running", "--console", "off"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start airlock-vmm");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                println!("vmm: {line}");
                if line.contains("process start to agent ready") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        if rx.recv_timeout(Duration::from_secs(300)).is_err() {
            let _ = child.kill();
            panic!("the agent never became ready");
        }
        // The process started is the keeper of guest memory; the VMM is
        // its only child.
        let keeper = thread_seccomp(child.id());
        println!("keeper threads: {keeper:?}");
        assert_eq!(
            keeper,
            vec![("airlock-keeper".to_string(), "2".to_string())]
        );
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
        let vmm: u32 = children.trim().parse().expect("the keeper has one child");
        let threads = thread_seccomp(vmm);
        println!("threads: {threads:?}");
        // SAFETY: kill only reads its arguments.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = reader.join().unwrap();

        assert!(
            threads.iter().all(|(_, mode)| mode == "2"),
            "a thread without a filter: {threads:?}"
        );
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        for expected in ["airlock-vmm", "vcpu0", "vcpu1"] {
            assert!(names.contains(&expected), "no {expected} in {names:?}");
        }
        // The default guest has rng, vsock-less: the rng worker's pool thread.
        assert!(names.len() >= 4, "no device worker thread in {names:?}");
        assert_eq!(status.code(), Some(0), "{log}");
        assert!(log.contains("guest memory wiped"), "{log}");
    });
}

#[test]
fn a_syscall_outside_the_vcpu_filter_kills_the_vmm_with_sigsys() {
    on_real_kvm(
        "a_syscall_outside_the_vcpu_filter_kills_the_vmm_with_sigsys",
        || {
            let dir = tempfile::tempdir().unwrap();
            let initrd = guest::initramfs_with_init("seccomp-probe", dir.path());
            let out = Command::new(seccomp_probe_vmm_binary())
                .arg("--initrd")
                .arg(&initrd)
                .output()
                .expect("run the seccomp-probe airlock-vmm");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            println!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
            assert!(stdout.contains("PROBE writing 0xee"), "the probe never ran");
            assert!(stderr.contains("seccomp probe: calling getppid"));
            assert!(!stdout.contains("RESULT"), "the VMM survived the probe");
            // The keeper outlives the VMM, wipes guest memory and reports
            // the kill in its exit status (128 + SIGSYS).
            assert_eq!(
                out.status.code(),
                Some(128 + libc::SIGSYS),
                "the VMM was not killed by SIGSYS: {}",
                out.status
            );
            assert!(
                stderr.contains("the VMM process was killed by SIGSYS"),
                "{stderr}"
            );
            assert!(stderr.contains("guest memory wiped"), "{stderr}");
        },
    );
}
