//! Host processes and the files that stand for them, for the modules that
//! start and find them (the VMM, the network filter, the jail): process
//! start times and exits from `/proc` (`procfs`), executables beside this
//! one or on $PATH, and numbered slots reserved by exclusive creation.
//! Depends on nothing else of the runtime, so that those modules do not
//! depend on each other through it.

use std::path::{Path, PathBuf};

/// The start time of process `pid`: field 22 of `/proc/PID/stat`, in clock
/// ticks after boot; with the pid it names one process.
pub fn start_time(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    Some(
        procfs::process::Process::new(pid)
            .ok()?
            .stat()
            .ok()?
            .starttime,
    )
}

/// Whether process `pid` has exited (gone, or a zombie).
pub fn exited(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return true;
    };
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map_or(true, |s| matches!(s.state, 'Z' | 'X' | 'x'))
}

/// `name` beside this executable, else on $PATH; `Err` holds where it was
/// looked for beside this executable.
pub fn find_binary(name: &str) -> Result<PathBuf, PathBuf> {
    let exe = std::env::current_exe().unwrap_or_default();
    let beside = exe.with_file_name(name);
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(beside)
}

/// Reserves one of `count` numbered slots for sandbox `id` by creating
/// `<root>/.<prefix>-<n>` (holding the id) exclusively, trying from a
/// point that the id's hash picks; `Ok(None)` when every slot is held.
/// Jail uids and network address slots are reserved this way; their
/// owners remove the file at teardown.
pub fn reserve_slot(
    root: &Path,
    prefix: &str,
    id: &str,
    count: u32,
) -> Result<Option<u32>, (PathBuf, std::io::Error)> {
    use sha2::Digest;
    use std::io::Write;
    if count == 0 {
        return Ok(None);
    }
    let hash = sha2::Sha256::digest(id.as_bytes());
    let first = u32::from_le_bytes([hash[0], hash[1], hash[2], hash[3]]) % count;
    for i in 0..count {
        let slot = (first + i) % count;
        let path = root.join(format!(".{prefix}-{slot}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(id.as_bytes()).map_err(|e| (path.clone(), e))?;
                return Ok(Some(slot));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err((path, e)),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    #[test]
    fn start_times_and_exits_are_read_from_proc() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert!(!exited(me));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        assert!(exited(pid), "a zombie has exited");
        child.wait().unwrap();
        assert!(exited(pid));
    }

    #[test]
    fn slots_are_reserved_once_until_their_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let a = reserve_slot(dir.path(), "x", "a", 2).unwrap().unwrap();
        let b = reserve_slot(dir.path(), "x", "b", 2).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(reserve_slot(dir.path(), "x", "c", 2).unwrap(), None);
        std::fs::remove_file(dir.path().join(format!(".x-{a}"))).unwrap();
        assert_eq!(reserve_slot(dir.path(), "x", "c", 2).unwrap(), Some(a));
        assert_eq!(reserve_slot(dir.path(), "x", "d", 0).unwrap(), None);
    }
}
