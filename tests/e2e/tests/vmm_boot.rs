//! The `airlock-vmm` binary boots the real guest image on real KVM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use airlock_e2e::{on_real_kvm, vmm_binary};

fn run_vmm(args: &[&str]) -> Output {
    let out = Command::new(vmm_binary())
        .args(args)
        .output()
        .expect("run airlock-vmm");
    println!("--- stdout\n{}", String::from_utf8_lossy(&out.stdout));
    println!("--- stderr\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn boots_default_guest_with_two_cpus() {
    on_real_kvm("boots_default_guest_with_two_cpus", || {
        let out = run_vmm(&["--vcpus", "2", "--memory", "256"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            stdout
                .lines()
                .filter(|l| *l == "airlock-agent ready")
                .count(),
            1
        );
        assert!(
            stdout.contains("airlock-agent: 2 CPUs online (0-1)"),
            "{stdout}"
        );
        assert!(stderr.contains("boot timing: process start to guest kernel entry and to /init"));
        assert!(stderr.contains("kernel_entry_ms=") && stderr.contains("init_ms="));
        assert!(stderr.contains("guest memory wiped"), "{stderr}");
    });
}

#[test]
fn a_stop_command_ends_the_vm_and_its_events_say_so() {
    use airlock_vmm_api::command::{send, Command as VmmCommand};
    use airlock_vmm_api::{Event, EventLog};
    on_real_kvm("a_stop_command_ends_the_vm_and_its_events_say_so", || {
        let dir = tempfile::tempdir().unwrap();
        let (events, control) = (dir.path().join("events"), dir.path().join("control.sock"));
        let mut child = Command::new(vmm_binary())
            .args(["--keep-running", "--console", "off", "--events"])
            .arg(&events)
            .arg("--control")
            .arg(&control)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start airlock-vmm");
        let mut log = EventLog::new(&events);
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while !log.agent_ready() {
            assert!(std::time::Instant::now() < deadline, "{:?}", log.events());
            assert!(child.try_wait().unwrap().is_none(), "{:?}", log.events());
            std::thread::sleep(Duration::from_millis(100));
            log.refresh();
        }
        let sent = send(&control, &VmmCommand::Stop, Duration::from_secs(10));
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        println!("--- stderr\n{stderr}");
        sent.unwrap();
        assert_eq!(status.code(), Some(0), "{stderr}");
        let events = EventLog::read(&events);
        let has = |f: &dyn Fn(&Event) -> bool| events.iter().any(f);
        assert!(has(&|e| matches!(e, Event::Running { .. })), "{events:?}");
        assert!(
            has(&|e| matches!(e, Event::KernelEntered { .. })),
            "{events:?}"
        );
        assert!(
            has(&|e| matches!(e, Event::InitStarted { .. })),
            "{events:?}"
        );
        assert!(
            has(
                &|e| matches!(e, Event::Exited { status: 0, reason } if reason == "stopped by a command")
            ),
            "{events:?}"
        );
        // The keeper's wipe, after the VMM is gone.
        assert!(
            has(
                &|e| matches!(e, Event::Wiped { total_mib: 128, touched_mib, .. } if *touched_mib > 0)
            ),
            "{events:?}"
        );
        assert!(!has(&|e| matches!(e, Event::Error { .. })), "{events:?}");
    });
}

#[test]
fn guest_panic_exits_nonzero() {
    on_real_kvm("guest_panic_exits_nonzero", || {
        // No such init: the guest kernel panics ("No working init found").
        let out = run_vmm(&["--append", "rdinit=/does-not-exist"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr.contains("airlock-vmm: error: guest kernel panic"),
            "{stderr}"
        );
        assert!(stderr.contains("guest memory wiped"));
        assert!(String::from_utf8_lossy(&out.stdout).contains("Kernel panic"));
    });
}

#[test]
fn sigterm_stops_the_vm_cleanly_and_wipes() {
    on_real_kvm("sigterm_stops_the_vm_cleanly_and_wipes", || {
        let mut child = Command::new(vmm_binary())
            .args(["--keep-running", "--vcpus", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn airlock-vmm");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // Both pipes are drained all along, so the VMM never blocks on them;
        // lines are read as bytes, so no odd byte stops the reading.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches('\r');
                println!("guest: {line}");
                if line == "airlock-agent ready" {
                    let _ = tx.send(());
                }
            }
        });
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let ready = rx.recv_timeout(Duration::from_secs(120));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if !exits_within(&mut child, Duration::from_secs(60)) {
            let threads = thread_report(child.id());
            let _ = child.kill();
            panic!("airlock-vmm did not stop within 60 s of SIGTERM; its threads:\n{threads}");
        }
        let status = child.wait().expect("wait for airlock-vmm");
        let stderr = err_reader.join().expect("stderr reader");
        println!("--- stderr\n{stderr}");
        assert!(ready.is_ok(), "the guest never became ready");
        assert_eq!(status.code(), Some(0));
        assert!(stderr.contains("termination signal received"));
        assert!(stderr.contains("guest memory wiped"));
    });
}

fn exits_within(child: &mut std::process::Child, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Where each thread of `pid` is blocked, for a hang's failure message.
fn thread_report(pid: u32) -> String {
    let mut report = String::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    for task in tasks {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        report.push_str(&format!(
            "{} {} wchan={} syscall={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("syscall").trim(),
            read("stack")
        ));
    }
    report
}

#[test]
fn missing_kernel_is_a_clear_error() {
    // The files are checked before KVM is opened, so this runs anywhere.
    let out = run_vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kernel not found at /nonexistent/vmlinux"),
        "{stderr}"
    );
}

#[test]
fn missing_drive_image_is_a_clear_error() {
    // Device backends are opened before KVM, so this runs anywhere.
    let out = run_vmm(&["--drive", "path=/nonexistent/disk.img,ro"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/disk.img"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    for (args, expect) in [
        (&["--vcpus", "0"][..], "invalid vCPU count 0"),
        (&["--vcpus", "1000"][..], "invalid vCPU count 1000"),
        (&["--memory", "0"][..], "invalid memory size 0 MiB"),
        (&["--drive", "ro"][..], "invalid drive 'ro'"),
        (
            &["--vsock-uds", "/tmp/x.sock", "--vsock-cid", "2"][..],
            "invalid vsock guest CID 2",
        ),
    ] {
        let out = run_vmm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}
