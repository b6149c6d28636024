//! Test guest init for virtio-rng: right at boot, `getrandom()` must not
//! block (GRND_NONBLOCK must succeed), and `/dev/hwrng` (backed by
//! virtio-rng) must deliver bytes.
//!
//! Prints `RESULT ok ...` or `RESULT fail ...` and resets the VM.

use std::io::Read;

use airlock_test_guest::{finish, init};

fn run() -> Result<String, String> {
    let mut buf = [0u8; 32];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n != buf.len() as isize {
        return Err(format!(
            "getrandom would block at boot: {}",
            std::io::Error::last_os_error()
        ));
    }
    let current =
        std::fs::read_to_string("/sys/class/misc/hw_random/rng_current").unwrap_or_default();
    let mut hw = [0u8; 64];
    std::fs::File::open("/dev/hwrng")
        .and_then(|mut f| f.read_exact(&mut hw))
        .map_err(|e| format!("/dev/hwrng: {e}"))?;
    if hw.iter().all(|b| *b == 0) {
        return Err("/dev/hwrng gave only zeros".into());
    }
    Ok(format!(
        "getrandom=nonblocking hwrng={} bytes=64",
        current.trim()
    ))
}

fn main() {
    init();
    match run() {
        Ok(msg) => finish(&format!("ok {msg}")),
        Err(msg) => finish(&format!("fail {msg}")),
    }
}
