//! Each sandbox's writable scratch disk: a sparse ext4 image made before
//! boot, and scrubbed (every written extent overwritten with zeros) before
//! it is deleted at teardown: see `check_memory_backed` for why it lives in memory.

use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors making or scrubbing a scratch disk.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("Cannot create the scratch disk {0}: {1}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("mkfs.ext4 not found: apt-get install e2fsprogs")]
    NoMkfs,
    #[error("mkfs.ext4 failed on {0}: {1}")]
    Mkfs(PathBuf, String),
    #[error("Cannot run mkfs.ext4 on {0}: {1}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("Cannot scrub the scratch disk {0}: {1}")]
    Scrub(PathBuf, #[source] std::io::Error),
    #[error(
        "the scratch disk would be kept in {0}, which is not in memory (filesystem type {1:#x}): \
         on a disk, a scrub cannot erase what a sandbox wrote; mount a tmpfs there, or set \
         state_dir to a directory on one"
    )]
    NotInMemory(PathBuf, i64),
}

impl ScratchError {
    /// Whether the scrub found no disk: another teardown has deleted it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ScratchError::Scrub(_, e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Filesystems whose files live only in memory: tmpfs and ramfs.
const MEMORY_FS: [i64; 2] = [0x0102_1994, 0x8584_58f6];

/// Checks that a scratch disk in `dir` would live only in memory.
///
/// A scratch disk holds what a sandbox wrote. On a disk, overwriting it
/// before deletion (the scrub) does not erase it: a copy-on-write
/// filesystem writes the zeros elsewhere, and an SSD remaps its cells. In
/// tmpfs the data is only ever in RAM (never in swap: the VMM's cgroup,
/// which is charged for the pages it writes, has `memory.swap.max` 0), and
/// the scrub overwrites the pages themselves. Airlock chose memory-backed
/// scratch over a per-session encryption key because the guest kernel
/// would then need dm-crypt and the key handling, for the same result.
pub fn check_memory_backed(dir: &Path) -> Result<(), ScratchError> {
    let fs = nix::sys::statfs::statfs(dir)
        .map_err(|e| ScratchError::Create(dir.to_path_buf(), e.into()))?;
    let kind = fs.filesystem_type().0 as i64;
    if MEMORY_FS.contains(&kind) {
        return Ok(());
    }
    Err(ScratchError::NotInMemory(dir.to_path_buf(), kind))
}

/// What a scrub did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes overwritten (the file's data extents).
    pub bytes_scrubbed: u64,
}

/// Makes a sparse ext4 image of `size_mib` at `path`.
pub fn create(path: &Path, size_mib: u64) -> Result<(), ScratchError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ScratchError::Create(path.to_path_buf(), e))?;
    f.set_len(size_mib << 20)
        .map_err(|e| ScratchError::Create(path.to_path_buf(), e))?;
    drop(f);
    mkfs(
        path,
        &[
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
        ],
    )
}

/// Runs `mkfs.ext4 -q -F ARGS PATH`.
pub(crate) fn mkfs(path: &Path, args: &[&str]) -> Result<(), ScratchError> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(args)
        .arg(path)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ScratchError::NoMkfs,
            _ => ScratchError::Spawn(path.to_path_buf(), e),
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        return Err(ScratchError::Mkfs(path.to_path_buf(), msg));
    }
    Ok(())
}

/// Overwrites every data extent of `path` with zeros, syncs, and deletes it.
pub fn scrub_and_delete(path: &Path) -> Result<ScrubReport, ScratchError> {
    let report = scrub(path)?;
    std::fs::remove_file(path).map_err(|e| ScratchError::Scrub(path.to_path_buf(), e))?;
    Ok(report)
}

fn scrub(path: &Path) -> Result<ScrubReport, ScratchError> {
    let err = |e| ScratchError::Scrub(path.to_path_buf(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    let zeros = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(&f, pos, libc::SEEK_DATA).map_err(err)? else {
            break;
        };
        let end = seek(&f, start, libc::SEEK_HOLE)
            .map_err(err)?
            .unwrap_or(len)
            .min(len);
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut at = start;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n]).map_err(err)?;
            at += n as u64;
        }
        total += end - start;
        pos = end;
    }
    f.sync_data().map_err(err)?;
    Ok(ScrubReport {
        bytes_scrubbed: total,
    })
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no more data.
fn seek(f: &std::fs::File, from: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let off = i64::try_from(from).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only reads its arguments; the fd is open for the call.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn scratch_must_be_in_memory() {
        check_memory_backed(Path::new("/dev/shm")).unwrap();
        let err = check_memory_backed(Path::new("/proc")).unwrap_err();
        assert!(err.to_string().contains("mount a tmpfs there"), "{err}");
    }

    #[test]
    fn create_makes_a_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.ext4");
        create(&p, 64).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 16 << 20,
            "sparse: {} bytes allocated",
            meta.blocks() * 512
        );
        let mut magic = [0u8; 2];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut magic, 1024 + 0x38)
            .unwrap();
        assert_eq!(magic, [0x53, 0xef], "ext4 superblock magic");
        assert!(create(&p, 64).is_err(), "never reuses a file");
    }

    #[test]
    fn a_disk_already_deleted_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let err = scrub_and_delete(&dir.path().join("gone")).unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let err = scrub_and_delete(dir.path()).unwrap_err();
        assert!(!err.is_not_found(), "a directory is another failure: {err}");
    }

    #[test]
    fn scrub_overwrites_every_written_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.ext4");
        create(&p, 32).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let marker = b"SECRET-MARKER-0123456789";
        for off in [5u64 << 20, 17 << 20, (32 << 20) - 4096] {
            f.write_all_at(marker, off).unwrap();
        }
        drop(f);
        let report = scrub(&p).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert!(
            data.windows(marker.len()).all(|w| w != marker),
            "a marker survived"
        );
        assert!(
            data.iter().all(|&b| b == 0),
            "ext4 metadata is scrubbed too"
        );
        assert!(report.bytes_scrubbed >= 3 * 4096);
        assert!(report.bytes_scrubbed < 32 << 20, "holes are skipped");
        scrub_and_delete(&p).unwrap();
        assert!(!p.exists());
    }
}
