//! The root a layer is applied to, and the `*at` helpers that touch one
//! name in a directory fd without following it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::{MAX_DEPTH, RESOLVE, RESOLVE_TRIES};

/// A directory that paths are resolved in, as if it were `/`.
pub(crate) struct Root {
    fd: OwnedFd,
}

impl Root {
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// Opens `path` resolved inside the root: `..` and symlinks, absolute
    /// or relative, never leave it; magic links are refused.
    pub(super) fn resolve(&self, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(RESOLVE);
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let mut last = Errno::EAGAIN;
        for _ in 0..RESOLVE_TRIES {
            match openat2(self.fd.as_fd(), path, how) {
                Err(e @ (Errno::EAGAIN | Errno::EINTR)) => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    /// The directory `comps` (the root itself when empty), for reading and
    /// as the parent fd of `*at` calls.
    pub(super) fn dir(&self, comps: &[&OsStr]) -> nix::Result<OwnedFd> {
        let path: PathBuf = comps.iter().collect();
        self.resolve(&path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
    }

    /// Opens the regular file `rel` (resolved inside the root) for reading;
    /// anything else (a FIFO, a device) is refused without blocking.
    pub(crate) fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.resolve(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)?;
        if file_type(&fstat(&fd)?) != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        Ok(File::from(fd))
    }
}

pub(super) fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub(super) fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// `name` in `dir`, not followed; `None` if there is none.
pub(super) fn stat_at(dir: impl AsFd, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory `name` in `dir`, never through a symlink.
pub(super) fn open_subdir(dir: impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The names in `dir`, without `.` and `..`.
pub(super) fn names(dir: impl AsFd) -> nix::Result<Vec<OsString>> {
    // A fresh open file description: the listing starts at the beginning.
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for e in d.iter() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    Ok(out)
}

pub(super) fn too_deep() -> io::Error {
    io::Error::other(format!("directory tree deeper than {MAX_DEPTH} levels"))
}

/// Removes `name` from `dir` if it is there: a directory with everything
/// in it, walked with `O_NOFOLLOW` directory fds (a symlink is removed,
/// never followed).
pub(super) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if !is_dir(&st) {
        return Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?);
    }
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let child = open_subdir(dir, name)?;
    for n in names(&child)? {
        remove_at(child.as_fd(), &n, depth + 1)?;
    }
    Ok(unlinkat(dir, name, UnlinkatFlags::RemoveDir)?)
}
