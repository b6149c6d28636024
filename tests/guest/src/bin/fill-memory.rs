//! Test guest program, run as the guest's init (`rdinit=/fill-memory`): fills
//! most of guest memory with a marker word derived from the seed on the
//! kernel command line (`airlock.test.seed=N`), then resets the VM *while
//! still holding that memory*, so that the marker is in guest RAM when the
//! VMM wipes it.
//!
//! `airlock.test.fill_percent=P` (default 70) or `airlock.test.fill_mib=N`
//! set how much it fills.
//!
//! The marker is computed at run time so that it appears nowhere in the
//! initramfs or on the command line: finding it in memory means this program
//! wrote it.

use std::io::Write;

fn main() {
    let mut console = std::io::stdout();
    if let Err(e) = std::fs::create_dir_all("/proc").and_then(|_| mount_proc()) {
        let _ = writeln!(console, "fill-memory: cannot mount /proc: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let seed = param(&cmdline, "airlock.test.seed").unwrap_or(1);
    let percent = param(&cmdline, "airlock.test.fill_percent")
        .unwrap_or(70)
        .min(95);
    let available = mem_available_bytes().unwrap_or(64 << 20);
    // `airlock.test.fill_mib=N` asks for a fixed amount instead (capped at
    // 95% of what is available): airlock-bench's teardown benchmark.
    let bytes = match param(&cmdline, "airlock.test.fill_mib") {
        Some(mib) => (mib << 20).min(available / 100 * 95),
        None => available / 100 * percent,
    } as usize
        & !0xfff;
    let marker = airlock_test_guest::marker_word(seed);

    let mut buf: Vec<u64> = Vec::new();
    if buf.try_reserve_exact(bytes / 8).is_err() {
        let _ = writeln!(console, "fill-memory: cannot allocate {} MiB", bytes >> 20);
    } else {
        buf.resize(bytes / 8, marker);
    }
    let _ = writeln!(
        console,
        "fill-memory: wrote {} MiB of marker",
        (buf.len() * 8) >> 20
    );
    let _ = console.flush();
    // Keep `buf` alive (and its pages full of marker) through the reset.
    std::hint::black_box(&buf);
    // SAFETY: reboot(2) takes no pointers; as PID 1 with CAP_SYS_BOOT it
    // resets the machine and does not return.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    let _ = writeln!(
        console,
        "fill-memory: reboot failed: {}",
        std::io::Error::last_os_error()
    );
}

fn mount_proc() -> std::io::Result<()> {
    // SAFETY: all pointers are NUL-terminated literals valid for the call.
    let rc = unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn param(cmdline: &str, key: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn mem_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
