//! Shared by the test guest programs and the host-side tests that check
//! their effects.

use std::io::Write;

/// Sets up a minimal guest as init: mounts /proc, /sys and /dev.
pub fn init() {
    for (src, dst, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(dst);
        let (src, dst, fstype) = (cstr(src), cstr(dst), cstr(fstype));
        // SAFETY: NUL-terminated strings that live across the call.
        unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
}

/// A C string from a Rust string without interior NULs.
pub fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

/// The value of `key=value` on the kernel command line.
pub fn param(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|kv| Some(kv.strip_prefix(key)?.strip_prefix('=')?.to_string()))
}

/// Prints `RESULT <line>` on the console and resets the VM (the test reads
/// the console).
pub fn finish(result: &str) -> ! {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "RESULT {result}");
    let _ = out.flush();
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    std::process::exit(1)
}

/// FNV-1a over a byte stream, to compare data that crossed a boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic test data: block `n` of a stream seeded by `seed`.
pub fn pattern_block(seed: u64, n: u64, buf: &mut [u8]) {
    let mut x = marker_word(seed ^ n);
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The marker word for `seed` (SplitMix64 of the seed), so that host and
/// guest agree on it without it appearing in any file.
pub fn marker_word(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #[test]
    fn markers_differ_per_seed_and_are_not_trivial() {
        let (a, b) = (super::marker_word(1), super::marker_word(2));
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_ne!(a.to_le_bytes()[0..4], [0; 4]);
    }
}
