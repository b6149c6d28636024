//! Moves PID 1 off the initramfs onto a tmpfs root, like busybox's
//! `switch_root`.
//!
//! `pivot_root(2)` fails with EINVAL while the caller's root is the
//! initramfs (rootfs cannot be unmounted), and every container's root
//! filesystem setup starts with a `pivot_root`. So before anything else,
//! init copies the initramfs' files to a tmpfs, deletes the originals (which
//! frees their memory), makes the tmpfs the root and re-executes itself from
//! there with [`REEXEC_ARG`].

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// The argument the re-executed init gets.
pub const REEXEC_ARG: &str = "--root-switched";

const NEW_ROOT: &str = "/.airlock-root";

/// Errors switching to the tmpfs root.
#[derive(Debug, thiserror::Error)]
pub enum SwitchRootError {
    /// Cannot create the new root at /.airlock-root
    #[error("Cannot create the new root at {NEW_ROOT}")]
    Create(#[source] std::io::Error),
    /// Cannot mount a tmpfs for the new root
    #[error("Cannot mount a tmpfs for the new root")]
    Mount(#[source] Errno),
    /// Cannot copy {0} to the new root
    #[error("Cannot copy {0} to the new root")]
    Copy(String, #[source] std::io::Error),
    /// Cannot move the new root onto /
    #[error("Cannot move the new root onto /")]
    Move(#[source] Errno),
    /// Cannot re-execute /init from the new root
    #[error("Cannot re-execute /init from the new root")]
    Exec(#[source] Errno),
}

/// Copies the initramfs to a tmpfs, makes it `/` and re-executes `/init`.
/// Returns only on error.
pub fn switch_and_reexec() -> SwitchRootError {
    match switch() {
        Ok(()) => {}
        Err(e) => return e,
    }
    let init = CString::from(c"/init");
    let arg = CString::new(REEXEC_ARG).unwrap_or_default();
    match nix::unistd::execv(&init, &[init.clone(), arg]) {
        Ok(never) => match never {},
        Err(e) => SwitchRootError::Exec(e),
    }
}

fn switch() -> Result<(), SwitchRootError> {
    fs::create_dir_all(NEW_ROOT).map_err(SwitchRootError::Create)?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(SwitchRootError::Mount)?;
    let root_dev = fs::metadata("/").map(|m| m.dev()).ok();
    move_tree(Path::new("/"), Path::new(NEW_ROOT), root_dev)?;
    std::env::set_current_dir(NEW_ROOT).map_err(SwitchRootError::Create)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(SwitchRootError::Move)?;
    nix::unistd::chroot(".").map_err(SwitchRootError::Move)?;
    std::env::set_current_dir("/").map_err(SwitchRootError::Create)?;
    Ok(())
}

/// Copies `src`'s regular files, directories and symlinks into `dst` and
/// deletes them from `src`. Device nodes stay (devtmpfs replaces /dev), and
/// so does anything on another filesystem (such as the new root itself).
fn move_tree(src: &Path, dst: &Path, dev: Option<u64>) -> Result<(), SwitchRootError> {
    let entries =
        fs::read_dir(src).map_err(|e| SwitchRootError::Copy(src.display().to_string(), e))?;
    for entry in entries.flatten() {
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let copy_err = |e| SwitchRootError::Copy(from.display().to_string(), e);
        let meta = fs::symlink_metadata(&from).map_err(copy_err)?;
        if Some(meta.dev()) != dev || from == Path::new(NEW_ROOT) {
            continue;
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(copy_err)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(copy_err)?;
            move_tree(&from, &to, dev)?;
            fs::remove_dir(&from).ok();
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(copy_err)?;
            symlink(target, &to).map_err(copy_err)?;
            fs::remove_file(&from).ok();
        } else if ft.is_file() {
            fs::copy(&from, &to).map_err(copy_err)?;
            fs::remove_file(&from).ok();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_tree_moves_files_dirs_and_links() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("d")).unwrap();
        fs::write(src.path().join("d/f"), b"data").unwrap();
        fs::set_permissions(src.path().join("d/f"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("d/f", src.path().join("l")).unwrap();
        let dev = fs::metadata(src.path()).unwrap().dev();

        move_tree(src.path(), dst.path(), Some(dev)).unwrap();

        assert_eq!(fs::read(dst.path().join("d/f")).unwrap(), b"data");
        let mode = fs::metadata(dst.path().join("d/f")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            fs::read_link(dst.path().join("l")).unwrap(),
            Path::new("d/f")
        );
        assert_eq!(
            fs::read_dir(src.path()).unwrap().count(),
            0,
            "originals are deleted"
        );
    }
}
