//! Test guest init that ends its VM the hard way once the host has seen its
//! marker: a kernel panic or a triple fault, the two exits a tenant cannot
//! reach through the agent.
//!
//! It reads `/seed` and `/mode` (files the test puts in the initramfs),
//! fills `/mib` MiB (default 64) of its memory with the marker word of the
//! seed, and then waits for the host: the test finds the marker through
//! the guest memory file and overwrites the first word of one marked page,
//! which this program sees by polling its own buffer. Then, by mode:
//! * `panic`: init exits, and the kernel panics ("Attempted to kill init");
//! * `triple-fault`: it sets `/sys/kernel/reboot/type` to `triple` and
//!   reboots, and the kernel resets by loading an empty IDT and trapping,
//!   which the CPU turns into a triple fault (`KVM_EXIT_SHUTDOWN`).
//!
//! Waiting for the host, rather than sleeping a while, means the host's
//! check "the marker is there while the VM runs" never races the fault.

use std::io::Write;
use std::time::{Duration, Instant};

use airlock_test_guest::{init, marker_word};

fn main() {
    init();
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    let seed: u64 = read("/seed").trim().parse().unwrap_or(1);
    let mode = read("/mode").trim().to_string();
    let mib: usize = read("/mib").trim().parse().unwrap_or(64);
    let marker = marker_word(seed);
    let buf: Vec<u64> = vec![marker; (mib << 20) / 8];
    say(&format!("marker-init: holding {mib} MiB, then {mode}"));
    // The host overwrites the first word of a page: check the word at the
    // start of every page of the buffer (which itself starts wherever the
    // allocator put it, not at a page boundary).
    let page_words = 4096 / 8;
    let first = (4096 - buf.as_ptr() as usize % 4096) % 4096 / 8;
    let started = Instant::now();
    loop {
        let touched = (first..buf.len())
            .step_by(page_words)
            // Volatile: the host writes it through the guest memory file.
            // SAFETY: `i` is in bounds of `buf`, which outlives the read.
            .any(|i| unsafe { std::ptr::read_volatile(buf.as_ptr().add(i)) } != marker);
        if touched {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            say("marker-init: the host never answered; faulting anyway");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::hint::black_box(&buf);
    match mode.as_str() {
        "triple-fault" => {
            if let Err(e) = std::fs::write("/sys/kernel/reboot/type", "triple") {
                say(&format!("marker-init: /sys/kernel/reboot/type: {e}"));
            }
            say("marker-init: rebooting by triple fault");
            // SAFETY: takes an integer; as init, with CAP_SYS_BOOT.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
            say("marker-init: reboot returned");
        }
        _ => say("marker-init: exiting as init (a kernel panic)"),
    }
    std::process::exit(1);
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
