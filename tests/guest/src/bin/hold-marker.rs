//! Test program run inside a sandbox's container (not as init): fills
//! `MIB` MiB of its memory with the marker word of `SEED`
//! (`hold-marker SEED MIB`), prints `holding N MiB` and keeps that memory
//! until it is killed. The host-side test then ends the VM one way or
//! another and checks that no page of guest memory still holds the marker.
//!
//! The marker is computed at run time, so it appears nowhere in the binary,
//! the image or the command line: finding it in guest memory means this
//! program wrote it.

use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let marker = airlock_test_guest::marker_word(seed);
    let buf: Vec<u64> = vec![marker; (mib << 20) / 8];
    let mut out = std::io::stdout();
    let _ = writeln!(out, "holding {} MiB", (buf.len() * 8) >> 20);
    let _ = out.flush();
    loop {
        std::hint::black_box(&buf);
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
