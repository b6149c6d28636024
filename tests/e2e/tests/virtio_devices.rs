//! The virtio devices, driven by the real guest kernel's drivers on real
//! KVM: block (read-only and writable drives), entropy, and vsock in both
//! directions. Each test boots a guest whose init is a test program from
//! `tests/guest` that prints `RESULT ok ...` on the console.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use airlock_e2e::{guest, on_real_kvm, vmm_binary};
use airlock_test_guest::{pattern_block, Fnv};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts airlock-vmm with `program` as the guest's init. Console lines go
/// to the returned channel.
fn start_guest(
    dir: &Path,
    program: &str,
    args: &[String],
    append: &str,
) -> (Child, mpsc::Receiver<String>) {
    let initrd = guest::initramfs_with_init(program, dir);
    let mut child = Command::new(vmm_binary())
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "256", "--vcpus", "2", "--append", append])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start airlock-vmm");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("guest: {line}");
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits for the guest's `RESULT` line and the VMM's exit.
fn result(mut child: Child, rx: &mpsc::Receiver<String>) -> String {
    let line = loop {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(l) if l.starts_with("RESULT ") => break l,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                panic!("no RESULT from the guest: {e}");
            }
        }
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "airlock-vmm exited with {status}");
    line
}

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("guest output");
        if line.contains(needle) {
            return;
        }
    }
}

fn mkfs(image: &Path, from: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(dir) = from {
        cmd.arg("-d").arg(dir);
    }
    let status = cmd.arg(image).arg("16M").status().expect("mkfs.ext4");
    assert!(status.success());
}

#[test]
fn block_devices_read_only_and_writable() {
    on_real_kvm("block_devices_read_only_and_writable", || {
        let dir = scratch("blk");
        let content = dir.join("content");
        std::fs::create_dir_all(&content).unwrap();
        let mut data = vec![0u8; 4 << 20];
        pattern_block(99, 0, &mut data);
        std::fs::write(content.join("data.bin"), &data).unwrap();
        let mut sum = Fnv::default();
        sum.update(&data);
        let (ro, rw) = (dir.join("ro.img"), dir.join("rw.img"));
        mkfs(&ro, Some(&content));
        mkfs(&rw, None);
        let args = vec![
            "--drive".to_string(),
            format!("path={},ro,id=workload", ro.display()),
            "--drive".to_string(),
            format!("path={}", rw.display()),
        ];
        let (child, rx) = start_guest(&dir, "disk-check", &args, "");
        let line = result(child, &rx);
        assert!(line.starts_with("RESULT ok"), "{line}");
        assert!(
            line.contains(&format!("ro_fnv={:016x} ro_len={}", sum.0, data.len())),
            "{line}"
        );
        assert!(line.contains("serial=workload"), "{line}");
        assert!(line.contains("ro_write_refused=true"), "{line}");
        assert!(line.contains("rw_kept=true"), "{line}");
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn entropy_at_boot_and_hwrng() {
    on_real_kvm("entropy_at_boot_and_hwrng", || {
        let dir = scratch("rng");
        let (child, rx) = start_guest(&dir, "rng-check", &[], "");
        let line = result(child, &rx);
        assert!(line.starts_with("RESULT ok"), "{line}");
        assert!(line.contains("hwrng=virtio_rng"), "{line}");
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// Sends `mib` MiB of pattern data on `conn` while reading the echo, then
/// closes it; returns (sent, received) checksums and the bytes received.
/// (The connection is closed, not half-closed: hybrid vsock, like
/// Firecracker's, ends both directions when the host side stops writing.)
fn echo_round_trip(conn: UnixStream, mib: u64, seed: u64) -> (Fnv, Fnv, u64) {
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let (mut sum, mut block) = (Fnv::default(), vec![0u8; 1 << 20]);
        for n in 0..mib {
            pattern_block(seed, n, &mut block);
            sum.update(&block);
            writer.write_all(&block).unwrap();
        }
        sum
    });
    let (mut sum, mut total, mut buf, mut reader) =
        (Fnv::default(), 0u64, vec![0u8; 64 << 10], conn);
    while total < mib << 20 {
        let want = buf.len().min(((mib << 20) - total) as usize);
        let n = reader.read(&mut buf[..want]).unwrap();
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        total += n as u64;
    }
    (sender.join().unwrap(), sum, total)
}

fn connect_host_side(uds: &Path, port: u32) -> UnixStream {
    let mut conn = UnixStream::connect(uds).expect("connect to the vsock socket");
    conn.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8];
    while byte != *b"\n" {
        conn.read_exact(&mut byte).expect("handshake reply");
        reply.push(byte[0]);
    }
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("OK "), "handshake: {reply}");
    conn
}

#[test]
fn vsock_host_initiated_64mib_and_32_concurrent() {
    on_real_kvm("vsock_host_initiated_64mib_and_32_concurrent", || {
        let dir = scratch("vsock-host");
        let uds = dir.join("v.sock");
        let args = vec!["--vsock-uds".to_string(), uds.display().to_string()];
        let (child, rx) = start_guest(
            &dir,
            "vsock-echo",
            &args,
            "airlock.test.vsock=listen:5000:33",
        );
        wait_for(&rx, "vsock-echo: listening on port 5000");
        let (sent, received, total) = echo_round_trip(connect_host_side(&uds, 5000), 64, 1);
        assert_eq!(total, 64 << 20);
        assert_eq!(sent, received, "64 MiB echo corrupted");
        let workers: Vec<_> = (0..32u64)
            .map(|i| {
                let uds = uds.clone();
                std::thread::spawn(move || {
                    echo_round_trip(connect_host_side(&uds, 5000), 1, 100 + i)
                })
            })
            .collect();
        for w in workers {
            let (sent, received, total) = w.join().unwrap();
            assert_eq!((sent, total), (received, 1 << 20));
        }
        let line = result(child, &rx);
        assert!(
            line.starts_with("RESULT ok echoed 33 connections"),
            "{line}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn vsock_guest_initiated_64mib() {
    on_real_kvm("vsock_guest_initiated_64mib", || {
        let dir = scratch("vsock-guest");
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut writer = conn.try_clone().unwrap();
            let mut reader = conn;
            std::io::copy(&mut reader, &mut writer).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        // Guest-initiated connections are off unless asked for.
        let args = vec![
            "--vsock-uds".to_string(),
            uds.display().to_string(),
            "--vsock-guest-connect".to_string(),
        ];
        let (child, rx) = start_guest(
            &dir,
            "vsock-echo",
            &args,
            "airlock.test.vsock=connect:6000:64",
        );
        let line = result(child, &rx);
        assert!(
            line.starts_with("RESULT ok round trip of 67108864 bytes"),
            "{line}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    });
}
