//! Test guest init for virtio-blk: mounts `/dev/vda` (ext4) read-only and
//! checksums `/data.bin` on it; then, if `/dev/vdb` exists, mounts it
//! read-write, writes a note, unmounts, mounts again and reads the note back.
//! Also reports `/dev/vda`'s serial and that writing the read-only disk fails.
//!
//! Prints `RESULT ok ...` or `RESULT fail ...` and resets the VM.

use std::io::Read;

use airlock_test_guest::{cstr, finish, init, Fnv};

fn mount(dev: &str, dir: &str, read_only: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    let (d, m, t) = (cstr(dev), cstr(dir), cstr("ext4"));
    // SAFETY: NUL-terminated strings that live across the call.
    let rc = unsafe { libc::mount(d.as_ptr(), m.as_ptr(), t.as_ptr(), flags, std::ptr::null()) };
    if rc != 0 {
        return Err(format!("mount {dev}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn umount(dir: &str) -> Result<(), String> {
    let m = cstr(dir);
    // SAFETY: a NUL-terminated string that lives across the call.
    if unsafe { libc::umount(m.as_ptr()) } != 0 {
        return Err(format!("umount {dir}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn checksum(path: &str) -> Result<(u64, u64), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let (mut sum, mut len, mut buf) = (Fnv::default(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            return Ok((sum.0, len));
        }
        sum.update(&buf[..n]);
        len += n as u64;
    }
}

fn run() -> Result<String, String> {
    mount("/dev/vda", "/ro", true)?;
    let (sum, len) = checksum("/ro/data.bin")?;
    let serial = std::fs::read_to_string("/sys/block/vda/serial").unwrap_or_default();
    let ro_write_refused = std::fs::write("/ro/x", b"x").is_err();
    let mut out = format!(
        "ro_fnv={sum:016x} ro_len={len} serial={} ro_write_refused={ro_write_refused}",
        serial.trim()
    );
    if std::path::Path::new("/dev/vdb").exists() {
        mount("/dev/vdb", "/rw", false)?;
        let note = format!("written by the guest, {len} bytes");
        std::fs::write("/rw/note.txt", &note).map_err(|e| e.to_string())?;
        umount("/rw")?;
        mount("/dev/vdb", "/rw", false)?;
        let back = std::fs::read_to_string("/rw/note.txt").map_err(|e| e.to_string())?;
        umount("/rw")?;
        out.push_str(&format!(" rw_kept={}", back == note));
    }
    Ok(out)
}

fn main() {
    init();
    match run() {
        Ok(msg) => finish(&format!("ok {msg}")),
        Err(msg) => finish(&format!("fail {msg}")),
    }
}
