//! Test guest program, run as init: prints the kernel log with its
//! timestamps (from /dev/kmsg), then powers the VM off. For profiling the
//! guest kernel's boot without the console's cost: with `quiet` nothing
//! is printed while the kernel boots, and this prints it all afterwards.
//!
//! `airlock-vmm --initrd <initramfs with kmsg-dump as /init>`; lines are
//! `[seconds] message`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

fn main() {
    airlock_test_guest::init();
    let mut out = std::io::stdout().lock();
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        Ok(mut kmsg) => {
            // One record per read; EAGAIN at the end of the buffer.
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = kmsg.read(&mut buf) {
                let rec = String::from_utf8_lossy(&buf[..n]);
                // "prio,seq,usec,flags;message\n"
                let Some((head, msg)) = rec.split_once(';') else {
                    continue;
                };
                let usec: u64 = head
                    .split(',')
                    .nth(2)
                    .and_then(|u| u.parse().ok())
                    .unwrap_or(0);
                let _ = write!(
                    out,
                    "[{:>5}.{:06}] {}",
                    usec / 1_000_000,
                    usec % 1_000_000,
                    msg
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "kmsg-dump: cannot open /dev/kmsg: {e}");
        }
    }
    let _ = out.flush();
    // SAFETY: reboot(2) takes no pointers; as PID 1 it resets the machine.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
}
