//! vsock stream throughput, host to guest and guest to host, with the same
//! guest kernel and the same guest program (`tests/guest`'s `vsock-echo`):
//! Airlock's hybrid vsock (Unix socket on the host, device model in the
//! VMM), Firecracker's (the same design), and QEMU `microvm` with
//! vhost-vsock (the data path in the host kernel).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::peers::{unique_cid, Guest, Peers, Running, Scratch, Shape, Vmm};
use crate::report::{ratio_to_best, times, Section};
use crate::stats::summarize;

#[derive(clap::Args, Clone)]
pub struct VsockArgs {
    /// MiB per transfer
    #[arg(long, default_value_t = 32)]
    pub mib: u64,
    /// Runs per VMM and direction
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
}

const PORT: u32 = 5000;
const SHAPE: Shape = Shape {
    vcpus: 2,
    memory_mib: 256,
};

#[derive(Debug, Clone, Copy)]
enum Direction {
    HostToGuest,
    GuestToHost,
}

/// A stream to the guest's PORT: `CONNECT` on a hybrid vsock socket, or
/// AF_VSOCK to `cid`.
fn connect(uds: Option<&Path>, cid: u32) -> anyhow::Result<UnixStream> {
    if let Some(uds) = uds {
        let mut conn = UnixStream::connect(uds)?;
        conn.write_all(format!("CONNECT {PORT}\n").as_bytes())?;
        let mut byte = [0u8];
        while byte != *b"\n" {
            conn.read_exact(&mut byte)?;
        }
        return Ok(conn);
    }
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a new socket owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = PORT;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let ptr = (&a as *const libc::sockaddr_vm).cast();
    // SAFETY: `ptr` points at `a`, a valid sockaddr_vm of `len` bytes.
    if unsafe { libc::connect(sock.as_raw_fd(), ptr, len) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(UnixStream::from(sock))
}

/// MiB/s for one transfer.
fn transfer(
    peers: &Peers,
    vmm: Vmm,
    guest: &Guest,
    dir: Direction,
    mib: u64,
) -> anyhow::Result<f64> {
    let scratch = Scratch::new("vsock")?;
    let mode = match dir {
        Direction::HostToGuest => format!("airlock.test.vsock=sink:{PORT}"),
        Direction::GuestToHost => format!("airlock.test.vsock=source:{PORT}:{mib}"),
    };
    let cid = unique_cid();
    let (cmd, uds) = match vmm {
        Vmm::Airlock => {
            let uds = scratch.path().join("v.sock");
            (
                peers.airlock_command(guest, SHAPE, &mode, Some(&uds), scratch.path())?,
                Some(uds),
            )
        }
        Vmm::Firecracker => (
            peers.peer_command(vmm, guest, SHAPE, &mode, Some(cid), scratch.path())?,
            Some(scratch.path().join("fc-vsock.sock")),
        ),
        Vmm::QemuMicrovm => (
            peers.peer_command(vmm, guest, SHAPE, &mode, Some(cid), scratch.path())?,
            None,
        ),
    };
    let mut running = Running::spawn(cmd)?;
    let result = running
        .wait_for_line("listening on port", Duration::from_secs(120))
        .and_then(|_| {
            let mut conn = connect(uds.as_deref(), cid)?;
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
                        left = left.saturating_sub(n as u64);
                    }
                }
            }
            Ok(mib as f64 / start.elapsed().as_secs_f64())
        });
    running.kill();
    result
}

pub fn run(args: &VsockArgs, peers: &Peers) -> anyhow::Result<Section> {
    let scratch = Scratch::new("vsock-guest")?;
    let guest = peers.guest.with_program("vsock-echo", scratch.path())?;
    let vmms = peers.vmms();
    let mut section = Section::new(json!(null));
    section.para(&format!(
        "**vsock stream throughput**, {} MiB per transfer, {} runs, median \
         MiB/s (higher is better), guest {SHAPE}. Airlock and Firecracker: \
         hybrid vsock over a Unix socket; QEMU: vhost-vsock. {}.",
        args.mib,
        args.runs,
        peers.note()
    ));
    let mut headers = vec!["direction".to_string()];
    headers.extend(vmms.iter().map(|v| format!("{} MiB/s", v.name())));
    headers.extend(
        vmms.iter()
            .skip(1)
            .map(|v| format!("Airlock ÷ {}", v.name())),
    );
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for dir in [Direction::HostToGuest, Direction::GuestToHost] {
        let mut medians = Vec::new();
        for &vmm in &vmms {
            let mut rates = Vec::new();
            for run in 0..args.runs {
                let r = transfer(peers, vmm, &guest, dir, args.mib)
                    .with_context(|| format!("{} {dir:?}", vmm.name()))?;
                eprintln!(
                    "vsock: {dir:?} run {}/{}: {}: {r:.0} MiB/s",
                    run + 1,
                    args.runs,
                    vmm.name()
                );
                rates.push(r);
            }
            medians.push(summarize(&rates).context("no samples")?.median_ms);
        }
        let mut row = vec![format!("{dir:?}")];
        row.extend(medians.iter().map(|m| format!("{m:.0}")));
        row.extend(medians.iter().skip(1).map(|m| times(medians[0] / m)));
        rows.push(row);
        for (i, &vmm) in vmms.iter().enumerate() {
            json_rows.push(json!({
                "vmm": vmm, "direction": format!("{dir:?}"), "median_mib_s": medians[i],
                "ratio_to_best": ratio_to_best(medians[i], &medians, true),
            }));
        }
    }
    let heads: Vec<&str> = headers.iter().map(String::as_str).collect();
    section.table(&heads, &rows);
    section.json = json!({ "benchmark": "vsock_throughput", "mib": args.mib, "runs": args.runs, "results": json_rows });
    Ok(section)
}
