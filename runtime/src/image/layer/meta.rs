//! An entry's owner, mode and mtime, as archived.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fchmod, futimens, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, geteuid, Gid, Uid};

use super::LayerError;

/// An entry's owner, mode and mtime.
pub(super) struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
}

impl Meta {
    pub(super) fn of(header: &tar::Header, path: &Path) -> Result<Self, LayerError> {
        let field = |e| LayerError::Header(path.to_path_buf(), e);
        let id = |what, value: u64| {
            u32::try_from(value).map_err(|_| LayerError::Range {
                path: path.to_path_buf(),
                what,
                value,
            })
        };
        let uid = id("uid", header.uid().map_err(field)?)?;
        let gid = id("gid", header.gid().map_err(field)?)?;
        let mode = header.mode().map_err(field)? & 0o7777;
        let mtime = header.mtime().map_err(field)?;
        Ok(Self {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            mode: Mode::from_bits_truncate(mode),
            mtime: TimeSpec::new(
                libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX),
                0,
            ),
        })
    }

    /// Owner first: `chown` clears setuid and setgid bits, the mode then
    /// sets them.
    pub(super) fn set(&self, fd: BorrowedFd<'_>) -> nix::Result<()> {
        owned(fchown(fd, Some(self.uid), Some(self.gid)))?;
        fchmod(fd, self.mode)?;
        futimens(fd, &self.mtime, &self.mtime)
    }

    /// A symlink's owner and mtime (its mode means nothing).
    pub(super) fn set_link(&self, dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
        owned(fchownat(
            dir,
            name,
            Some(self.uid),
            Some(self.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ))?;
        utimensat(
            dir,
            name,
            &self.mtime,
            &self.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
    }
}

/// Owners as archived; an unprivileged caller (tests) keeps its own, as
/// `tar` does.
pub(super) fn owned(r: nix::Result<()>) -> nix::Result<()> {
    match r {
        Err(Errno::EPERM) if !geteuid().is_root() => Ok(()),
        r => r,
    }
}
