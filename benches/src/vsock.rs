//! vsock stream throughput, host to guest and guest to host, through
//! Airlock's hybrid vsock (Unix socket on the host, device model in the
//! VMM) against QEMU `microvm` with vhost-vsock (the data path in the host
//! kernel), same guest kernel and the same guest program
//! (`tests/guest`'s `vsock-echo`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::stats::summarize;

#[derive(clap::Args)]
pub struct VsockArgs {
    /// MiB per transfer
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// Runs per VMM and direction
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const PORT: u32 = 5000;
const GUEST_CID: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Airlock,
    QemuVhostVsock,
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    HostToGuest,
    GuestToHost,
}

struct Setup {
    kernel: PathBuf,
    initrd: PathBuf,
    scratch: PathBuf,
}

fn guest_program_initrd(scratch: &Path) -> anyhow::Result<PathBuf> {
    let program = Path::new("target/guest/x86_64-unknown-linux-gnu/release/vsock-echo");
    if !program.exists() {
        bail!(
            "{} is missing: build the test guest programs (tests/run does)",
            program.display()
        );
    }
    let out = scratch.join("vsock-echo.cpio");
    let status = Command::new("guest-image/mkinitramfs")
        .arg("-o")
        .arg(&out)
        .arg("--init")
        .arg(program)
        .status()
        .context("guest-image/mkinitramfs")?;
    if !status.success() {
        bail!("mkinitramfs failed");
    }
    Ok(out)
}

fn start(setup: &Setup, peer: Peer, mode: &str) -> anyhow::Result<(Child, PathBuf)> {
    let uds = setup.scratch.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let append = format!("airlock.test.vsock={mode}");
    let mut cmd = match peer {
        Peer::Airlock => {
            let mut c = Command::new("target/release/airlock-vmm");
            c.arg("--kernel")
                .arg(&setup.kernel)
                .arg("--initrd")
                .arg(&setup.initrd);
            c.args(["--memory", "256", "--vcpus", "2", "--log-level", "warn"]);
            c.arg("--vsock-uds").arg(&uds).args(["--append", &append]);
            c
        }
        Peer::QemuVhostVsock => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                // No ACPI (the guest kernel has none): QEMU then announces the
                // virtio-mmio device on the kernel command line.
                "microvm,x-option-roms=off,rtc=off,acpi=off",
                "-enable-kvm",
                "-cpu",
                "host",
            ]);
            c.args(["-smp", "2", "-m", "256", "-nodefaults", "-no-user-config"]);
            c.args(["-display", "none", "-no-reboot", "-serial", "stdio"]);
            c.arg("-kernel")
                .arg(&setup.kernel)
                .arg("-initrd")
                .arg(&setup.initrd);
            c.args([
                "-device",
                &format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
            ]);
            c.args([
                "-append",
                &format!("console=ttyS0 reboot=k panic=-1 quiet {append}"),
            ]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on port") => break,
            Some(Ok(_)) if Instant::now() < deadline => continue,
            _ => {
                let _ = child.kill();
                bail!("{peer:?}: the guest never listened");
            }
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, uds))
}

/// A stream to the guest's PORT: through the hybrid socket, or AF_VSOCK.
fn connect(peer: Peer, uds: &Path) -> anyhow::Result<UnixStream> {
    match peer {
        Peer::Airlock => {
            let mut conn = UnixStream::connect(uds)?;
            conn.write_all(format!("CONNECT {PORT}\n").as_bytes())?;
            let mut byte = [0u8];
            while byte != *b"\n" {
                conn.read_exact(&mut byte)?;
            }
            Ok(conn)
        }
        Peer::QemuVhostVsock => {
            // SAFETY: socket(2) takes no pointers; the result is checked.
            let fd =
                unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            // SAFETY: `fd` is a new socket owned here.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_vm is plain data; all-zero is valid.
            let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            a.svm_cid = GUEST_CID;
            a.svm_port = PORT;
            let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            use std::os::fd::AsRawFd;
            let ptr = (&a as *const libc::sockaddr_vm).cast();
            // SAFETY: `ptr` points at `a`, a valid sockaddr_vm of `len` bytes.
            if unsafe { libc::connect(sock.as_raw_fd(), ptr, len) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(UnixStream::from(sock))
        }
    }
}

/// MiB/s for one transfer.
fn transfer(setup: &Setup, peer: Peer, dir: Direction, mib: u64) -> anyhow::Result<f64> {
    let mode = match dir {
        Direction::HostToGuest => format!("sink:{PORT}"),
        Direction::GuestToHost => format!("source:{PORT}:{mib}"),
    };
    let (mut child, uds) = start(setup, peer, &mode)?;
    let result = (|| {
        let mut conn = connect(peer, &uds)?;
        let start = Instant::now();
        let mut buf = vec![0x33u8; 1 << 20];
        match dir {
            Direction::HostToGuest => {
                conn.write_all(&(mib << 20).to_le_bytes())?;
                for _ in 0..mib {
                    conn.write_all(&buf)?;
                }
                conn.read_exact(&mut buf[..1])?;
            }
            Direction::GuestToHost => {
                let mut left = mib << 20;
                while left > 0 {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        bail!("stream ended early");
                    }
                    left -= n as u64;
                }
            }
        }
        Ok(mib as f64 / start.elapsed().as_secs_f64())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn run(args: &VsockArgs) -> anyhow::Result<()> {
    let guest = airlock_vmm::config::default_guest_dir();
    let scratch = std::env::temp_dir().join(format!("airlock-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let setup = Setup {
        kernel: guest.join("vmlinux"),
        initrd: guest_program_initrd(&scratch)?,
        scratch,
    };
    println!(
        "vsock stream throughput, {} MiB per transfer, {} runs (MiB/s, higher is better)\n",
        args.mib, args.runs
    );
    println!(
        "| direction | Airlock (hybrid vsock) | QEMU microvm + vhost-vsock | Airlock ÷ QEMU |"
    );
    println!("|---|---:|---:|---:|");
    for dir in [Direction::HostToGuest, Direction::GuestToHost] {
        let mut rates = [Vec::new(), Vec::new()];
        for run in 0..args.runs {
            for (i, peer) in [Peer::Airlock, Peer::QemuVhostVsock]
                .into_iter()
                .enumerate()
            {
                let r = transfer(&setup, peer, dir, args.mib)
                    .with_context(|| format!("{peer:?} {dir:?}"))?;
                eprintln!(
                    "vsock: run {}/{} {peer:?} {dir:?}: {r:.0} MiB/s",
                    run + 1,
                    args.runs
                );
                rates[i].push(r);
            }
        }
        let a = summarize(&rates[0]).context("no samples")?.median_ms;
        let q = summarize(&rates[1]).context("no samples")?.median_ms;
        println!("| {dir:?} | {a:.0} | {q:.0} | {:.2}× |", a / q);
    }
    let _ = std::fs::remove_dir_all(&setup.scratch);
    Ok(())
}
