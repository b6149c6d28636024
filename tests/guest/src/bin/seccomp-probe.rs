//! Test guest init for the VMM's seccomp filters: writes the probe value to
//! the boot-timer port. A VMM built with the `seccomp-probe` feature then
//! makes a syscall outside its vCPU filter on that write, and must die of
//! SIGSYS. If the write returns, the VMM survived: the guest says so.

use std::io::Write;

use airlock_test_guest::{finish, init};

/// The boot-timer port and the probe value (vmm/src/devices/pseudo/boot_timer.rs).
const BOOT_TIMER_PORT: u16 = 0x3f0;
const SECCOMP_PROBE: u8 = 0xee;

fn main() {
    init();
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(BOOT_TIMER_PORT.into(), 1, 1) } != 0 {
        finish(&format!("fail ioperm: {}", std::io::Error::last_os_error()));
    }
    println!("PROBE writing {SECCOMP_PROBE:#x} to port {BOOT_TIMER_PORT:#x}");
    let _ = std::io::stdout().flush();
    // SAFETY: ioperm granted this port; the write only reaches the VMM.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT, in("al") SECCOMP_PROBE);
    }
    finish("fail the VMM survived a syscall outside its vCPU seccomp filter")
}
