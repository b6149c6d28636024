//! Moves PID 1 off the initramfs onto a tmpfs root.
//!
//! `pivot_root(2)` fails with EINVAL while the caller's root is the
//! initramfs (rootfs cannot be unmounted), and every container's root
//! filesystem setup starts with a `pivot_root`. So before anything else,
//! init mounts a tmpfs, recreates the initramfs's directories and symlinks
//! in it, bind-mounts its regular files (the agent itself, test programs)
//! into place, moves the tmpfs onto `/` and chroots into it.
//!
//! Nothing is copied and init is not re-executed: the files stay where the
//! kernel unpacked them, underneath. (Copying the agent, deleting the
//! original and re-executing it cost a tenth of the guest's boot.)

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

const NEW_ROOT: &str = "/.airlock-root";

/// Errors switching to the tmpfs root.
#[derive(Debug, thiserror::Error)]
pub enum SwitchRootError {
    #[error("Cannot create the new root at {NEW_ROOT}")]
    Create(#[source] std::io::Error),
    #[error("Cannot mount a tmpfs for the new root")]
    Mount(#[source] Errno),
    #[error("Cannot read the initramfs at {0}")]
    Read(String, #[source] std::io::Error),
    #[error("Cannot place {0} in the new root")]
    Place(String, #[source] std::io::Error),
    #[error("Cannot move the new root onto /")]
    Move(#[source] Errno),
}

/// What recreating one initramfs entry in the new root takes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A directory with this mode.
    Dir { to: PathBuf, mode: u32 },
    /// A symlink to `target`.
    Symlink { to: PathBuf, target: PathBuf },
    /// A regular file, bind-mounted from `from`.
    Bind { from: PathBuf, to: PathBuf },
}

/// Makes a tmpfs holding the initramfs's files the root. Returns once init
/// runs in it.
pub fn switch() -> Result<(), SwitchRootError> {
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
    let mut steps = Vec::new();
    plan(Path::new("/"), Path::new(NEW_ROOT), root_dev, &mut steps)?;
    for step in &steps {
        apply(step)?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(SwitchRootError::Create)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(SwitchRootError::Move)?;
    nix::unistd::chroot(".").map_err(SwitchRootError::Move)?;
    std::env::set_current_dir("/").map_err(SwitchRootError::Create)?;
    Ok(())
}

/// The steps that recreate `src`'s directories, symlinks and regular files
/// under `dst`, parents first. Device nodes are left out (devtmpfs replaces
/// /dev), and so is anything on another filesystem than `dev` (such as the
/// new root itself).
fn plan(
    src: &Path,
    dst: &Path,
    dev: Option<u64>,
    steps: &mut Vec<Step>,
) -> Result<(), SwitchRootError> {
    let read_err = |e| SwitchRootError::Read(src.display().to_string(), e);
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(read_err)?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for from in entries {
        let Some(name) = from.file_name() else {
            continue;
        };
        let to = dst.join(name);
        let meta = fs::symlink_metadata(&from)
            .map_err(|e| SwitchRootError::Read(from.display().to_string(), e))?;
        if Some(meta.dev()) != dev || from == Path::new(NEW_ROOT) {
            continue;
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            steps.push(Step::Dir {
                to: to.clone(),
                mode: meta.mode() & 0o7777,
            });
            plan(&from, &to, dev, steps)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from)
                .map_err(|e| SwitchRootError::Read(from.display().to_string(), e))?;
            steps.push(Step::Symlink { to, target });
        } else if ft.is_file() {
            steps.push(Step::Bind { from, to });
        }
    }
    Ok(())
}

fn apply(step: &Step) -> Result<(), SwitchRootError> {
    let place_err = |p: &Path| {
        let p = p.display().to_string();
        move |e| SwitchRootError::Place(p, e)
    };
    match step {
        Step::Dir { to, mode } => {
            fs::create_dir_all(to).map_err(place_err(to))?;
            fs::set_permissions(to, fs::Permissions::from_mode(*mode)).map_err(place_err(to))
        }
        Step::Symlink { to, target } => symlink(target, to).map_err(place_err(to)),
        Step::Bind { from, to } => {
            fs::File::create(to).map_err(place_err(to))?;
            mount(
                Some(from.as_path()),
                to.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| SwitchRootError::Place(to.display().to_string(), e.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_recreates_dirs_and_links_and_binds_files() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("d")).unwrap();
        fs::set_permissions(src.path().join("d"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(src.path().join("d/f"), b"data").unwrap();
        fs::write(src.path().join("init"), b"agent").unwrap();
        symlink("d/f", src.path().join("l")).unwrap();
        let dev = fs::metadata(src.path()).unwrap().dev();
        let dst = Path::new("/new");

        let mut steps = Vec::new();
        plan(src.path(), dst, Some(dev), &mut steps).unwrap();

        let s = src.path();
        assert_eq!(
            steps,
            vec![
                Step::Dir {
                    to: dst.join("d"),
                    mode: 0o750
                },
                Step::Bind {
                    from: s.join("d/f"),
                    to: dst.join("d/f")
                },
                Step::Bind {
                    from: s.join("init"),
                    to: dst.join("init")
                },
                Step::Symlink {
                    to: dst.join("l"),
                    target: "d/f".into()
                },
            ]
        );
        assert_eq!(
            fs::read(s.join("init")).unwrap(),
            b"agent",
            "nothing is moved"
        );
    }

    #[test]
    fn plan_skips_other_filesystems() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("f"), b"x").unwrap();
        let mut steps = Vec::new();
        plan(src.path(), Path::new("/new"), Some(u64::MAX), &mut steps).unwrap();
        assert!(steps.is_empty());
    }
}
