//! Hostile guests on real KVM: each case must end the sandbox with a clear,
//! documented status or stay contained in it, with the VMM intact (no
//! panic, no crash, no hang), guest memory wiped and nothing left on the
//! host. The garbage guest, which drives the virtio devices with random
//! rings, is in garbage_guest.rs.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_e2e::on_real_kvm;

/// Runs `airlock` with `args`; fails the test if it takes over `secs`.
fn airlock(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(airlock_e2e::airlock_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("airlock {args:?} took over {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    airlock_e2e::show(&format!("airlock {}", args.join(" ")), &out);
    out
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_fork_bomb_stays_in_its_sandbox() {
    on_real_kvm("a_fork_bomb_stays_in_its_sandbox", || {
        let out = airlock(
            &[
                "run",
                "--timeout",
                "20",
                "--",
                "sh",
                "-c",
                "f() { f | f & }; f; sleep 100",
            ],
            240,
        );
        assert_eq!(out.status.code(), Some(124), "stopped by --timeout");
        airlock_e2e::assert_no_sandbox_left();
        // The host still runs sandboxes.
        let out = airlock(&["run", "--", "echo", "after"], 120);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");
    });
}

#[test]
fn allocating_all_guest_memory_kills_only_the_process() {
    on_real_kvm("allocating_all_guest_memory_kills_only_the_process", || {
        // dd reads 96 MiB at a time into one buffer in a 128 MiB guest
        // (a larger buffer than the guest has fails to allocate). The
        // containers' memory limit, below the guest's, has the memory
        // cgroup's OOM killer take dd at once; the agent goes on.
        let out = airlock(
            &[
                "run",
                "--memory",
                "128",
                "--",
                "sh",
                "-c",
                "dd if=/dev/zero of=/dev/null bs=96M count=4; echo status $?; \
                 echo after; cat /sys/fs/cgroup/memory.events 2>/dev/null",
            ],
            300,
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("status 137\nafter\n"),
            "the OOM killer took dd, and the shell went on: {stdout}"
        );
        airlock_e2e::assert_no_sandbox_left();
    });
}

#[test]
fn a_gibibyte_of_stdout_arrives_whole_in_bounded_memory() {
    on_real_kvm(
        "a_gibibyte_of_stdout_arrives_whole_in_bounded_memory",
        || {
            const GIB: u64 = 1 << 30;
            let mut child = Command::new(airlock_e2e::airlock_binary())
                // One zeroed MiB written 1024 times: the guest's CPU goes to
                // the stream, not to making its bytes (the test host emulates
                // it, and reading /dev/zero costs a fifth of the stream).
                .args([
                    "run",
                    "--image",
                    "python",
                    "--",
                    "python3",
                    "-c",
                    "import os\nb = bytes(1 << 20)\nfor _ in range(1024):\n    \
                 v = memoryview(b)\n    while v:\n        v = v[os.write(1, v):]",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let counter = std::thread::spawn(move || {
                let (mut buf, mut total, mut nonzero) = (vec![0u8; 1 << 20], 0u64, false);
                loop {
                    match stdout.read(&mut buf) {
                        Ok(0) => return (total, nonzero),
                        Ok(n) => {
                            // Spot checks: every byte would cost the test host
                            // (one emulated CPU) more than the stream itself.
                            nonzero |= buf[0] != 0 || buf[n - 1] != 0;
                            total += n as u64;
                        }
                        Err(e) => panic!("reading airlock's stdout: {e}"),
                    }
                }
            });
            let mut stderr_pipe = child.stderr.take().unwrap();
            let errors = std::thread::spawn(move || {
                let mut text = String::new();
                stderr_pipe.read_to_string(&mut text).ok();
                text
            });
            // The runtime relays the stream in bounded chunks, never holding it:
            // its peak resident memory stays small.
            let (started, mut peak_kib) = (Instant::now(), 0u64);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
                    let hwm = text
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
                    peak_kib = peak_kib.max(hwm.unwrap_or(0));
                }
                if started.elapsed() > Duration::from_secs(900) {
                    let _ = child.kill();
                    panic!("1 GiB of stdout took over 900 s");
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            let (total, nonzero) = counter.join().unwrap();
            let errors = errors.join().unwrap();
            println!(
                "1 GiB of stdout in {:?}, airlock peak RSS {peak_kib} KiB",
                started.elapsed()
            );
            assert_eq!(status.code(), Some(0), "{errors}");
            assert_eq!(total, GIB, "every byte arrived: {errors}");
            assert!(!nonzero, "the stream's bytes are the guest's zeros");
            assert!(peak_kib < 64 << 10, "airlock's peak RSS {peak_kib} KiB");
            airlock_e2e::assert_no_sandbox_left();
        },
    );
}

#[test]
fn filling_the_scratch_disk_is_contained() {
    on_real_kvm("filling_the_scratch_disk_is_contained", || {
        // The default scratch disk (1 GiB, in tmpfs, counted in the VMM's
        // memory.max): the tenant meets ENOSPC, the VMM is not OOM-killed
        // (airlock run would then fail) and the sandbox goes on.
        let out = airlock(
            &[
                "run",
                "--",
                "sh",
                "-c",
                "dd if=/dev/zero of=/fill bs=1M 2>&1 | grep -o 'No space left on device'; \
                 rm /fill; echo still writable > /after; cat /after",
            ],
            300,
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("No space left on device"), "{stdout}");
        assert!(stdout.contains("still writable"), "{stdout}");
        airlock_e2e::assert_no_sandbox_left();
    });
}

#[test]
fn a_vsock_connection_flood_is_contained() {
    on_real_kvm("a_vsock_connection_flood_is_contained", || {
        // 3000 connections to host ports nobody serves, up to 900 kept
        // open at once (the container's open-file limit is 1024): the VMM
        // answers each with a reset.
        let flood = [
            "import socket",
            "socks = []",
            "for i in range(3000):",
            "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)",
            "    s.setblocking(False)",
            "    s.connect_ex((2, 20000 + i))",
            "    socks.append(s)",
            "    if len(socks) > 900:",
            "        socks.pop(0).close()",
            "print('flooded', i + 1)",
        ]
        .join("\n");
        let out = airlock(
            &["run", "--image", "python", "--", "python3", "-c", &flood],
            300,
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "flooded 3000\n");
        airlock_e2e::assert_no_sandbox_left();
    });
}

#[test]
fn a_host_side_connection_flood_meets_the_handshake_and_connection_caps() {
    on_real_kvm(
        "a_host_side_connection_flood_meets_the_handshake_and_connection_caps",
        || {
            // 200 clients of the sandbox's vsock socket that never send
            // CONNECT: the VMM keeps 64 handshakes pending and refuses the rest
            // at once (the handshake timeout, 2 s, closes the 64 later); the
            // sandbox goes on.
            let out = airlock(&["create"], 300);
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let sock = std::path::Path::new("/run/airlock")
                .join(&id)
                .join("vsock.sock");
            let idle: Vec<std::os::unix::net::UnixStream> = (0..200)
                .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
                .collect();
            assert_eq!(idle.len(), 200, "the listener's backlog refused clients");
            std::thread::sleep(Duration::from_millis(500));
            let closed = |s: &std::os::unix::net::UnixStream| {
                s.set_nonblocking(true).unwrap();
                let mut b = [0u8; 1];
                let mut r = s;
                match r.read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                    Ok(_) => false,
                }
            };
            let refused = idle.iter().filter(|s| closed(s)).count();
            println!("{refused} of 200 idle clients closed after 0.5 s");
            assert!(refused >= 136, "only {refused} refused: no handshake cap");
            drop(idle);
            // Then full connections to the agent's port, one after another
            // (under the handshake cap): the VMM answers OK up to its
            // connection cap (1024) and refuses the rest; the sandbox goes
            // on once they close.
            raise_open_file_limit(4096);
            let (mut open, mut refused) = (Vec::new(), 0);
            for _ in 0..1100 {
                match connect_to_agent_port(&sock) {
                    Some(s) => open.push(s),
                    None => refused += 1,
                }
            }
            println!("{} connections answered, {refused} refused", open.len());
            assert!(
                (1000..=1024).contains(&open.len()),
                "{} connections answered: no connection cap at 1024",
                open.len()
            );
            assert!(refused >= 76, "only {refused} refused");
            drop(open);
            std::thread::sleep(Duration::from_secs(1));
            let out = airlock(&["exec", &id, "--", "echo", "still here"], 120);
            assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
            assert_eq!(airlock(&["rm", &id], 120).status.code(), Some(0));
            airlock_e2e::assert_no_sandbox_left();
        },
    );
}

/// Lifts this process's soft open-file limit to `n` (root may).
fn raise_open_file_limit(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// A connection to the agent's vsock port through the sandbox's socket
/// (`CONNECT 1024` → `OK <port>`), or None when the VMM refuses it.
fn connect_to_agent_port(sock: &std::path::Path) -> Option<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"CONNECT 1024\n").ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    line.starts_with(b"OK ").then_some(s)
}

#[test]
fn a_guest_that_never_answers_the_agent_handshake_is_given_up_on() {
    on_real_kvm(
        "a_guest_that_never_answers_the_agent_handshake_is_given_up_on",
        || {
            let work = tempfile::tempdir().unwrap();
            let initrd = airlock_e2e::guest::initramfs_with_init("silent", work.path());
            let config = work.path().join("config.toml");
            std::fs::write(
                &config,
                format!(
                    "initrd = \"{}\"\n[timeouts]\nagent_connect_secs = 10\n",
                    initrd.display()
                ),
            )
            .unwrap();
            let out = airlock(
                &["--config", config.to_str().unwrap(), "run", "--", "true"],
                180,
            );
            airlock_e2e::assert_one_line_error(
                &out,
                125,
                "the agent did not answer on vsock port 1024 within 10s",
            );
            airlock_e2e::assert_no_sandbox_left();
        },
    );
}
