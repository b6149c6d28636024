//! The file API (read, write, list, stat, mkdir, remove) inside a
//! container's root, or the guest's.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` against a
//! directory fd of the root (`/proc/<pid>/root` of the container's init),
//! so `..`, absolute symlinks and magic links planted by the workload stay
//! inside its root: the host's caller cannot be tricked into touching the
//! agent's own files.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{ftruncate, unlinkat, UnlinkatFlags};

/// Largest chunk one ReadFile returns (ttrpc frames are at most 4 MiB).
pub const CHUNK_MAX: usize = 1 << 20;

/// Errors from the file API; the message names the path and the cause.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Sys(String, #[source] Errno),
    #[error("{0}: not a valid path here")]
    BadPath(String),
}

/// What kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    Other,
}

/// One file's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_seconds: i64,
    pub mtime_nanos: u32,
    pub link_target: String,
}

/// A root directory that paths are resolved in.
pub struct Root {
    fd: OwnedFd,
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_IN_ROOT.union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

impl Root {
    /// Opens `dir` (e.g. `/proc/<pid>/root`) as a root.
    pub fn open(dir: &Path) -> Result<Self, FileError> {
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FileError::Sys(dir.display().to_string(), e))?;
        Ok(Self { fd })
    }

    fn open_at(&self, path: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, FileError> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(RESOLVE);
        loop {
            match openat2(self.fd.as_fd(), &relative(path), how) {
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                other => return other.map_err(|e| FileError::Sys(path.into(), e)),
            }
        }
    }

    /// The parent directory of `path` (opened) and its last component.
    fn parent(&self, path: &str) -> Result<(OwnedFd, PathBuf), FileError> {
        let p = Path::new(path);
        let name = match p.components().next_back() {
            Some(Component::Normal(n)) => PathBuf::from(n),
            _ => return Err(FileError::BadPath(path.into())),
        };
        let parent = p
            .parent()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fd = self.open_at(&parent, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    /// Reads up to `len` bytes (at most [`CHUNK_MAX`]) at `offset`; the flag
    /// says the end of the file was reached.
    pub fn read(&self, path: &str, offset: u64, len: usize) -> Result<(Vec<u8>, bool), FileError> {
        // O_NONBLOCK: opening a FIFO without a writer would otherwise wait
        // forever (a workload can make one anywhere in its root); open, it
        // fails pread with ESPIPE. Regular files ignore the flag.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        let fd = self.open_at(path, flags, Mode::empty())?;
        let err = |e| FileError::Sys(path.into(), e);
        let size = fstat(&fd).map_err(err)?.st_size as u64;
        let mut buf = vec![0u8; len.min(CHUNK_MAX)];
        let off = i64::try_from(offset).map_err(|_| FileError::Sys(path.into(), Errno::EINVAL))?;
        let n = pread(&fd, &mut buf, off).map_err(err)?;
        buf.truncate(n);
        let eof = n == 0 || offset.saturating_add(n as u64) >= size;
        Ok((buf, eof))
    }

    /// Writes `data` at `offset`, creating (with `mode`) and truncating to
    /// `offset` first when asked. Returns the bytes written.
    pub fn write(
        &self,
        path: &str,
        offset: u64,
        data: &[u8],
        create: bool,
        truncate: bool,
        mode: u32,
    ) -> Result<u64, FileError> {
        // O_NONBLOCK: as for `read`, a FIFO without a reader fails (ENXIO)
        // instead of blocking the open forever.
        let mut flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        if create {
            flags |= OFlag::O_CREAT;
        }
        // openat2 refuses a mode without O_CREAT.
        let mode = match (create, mode) {
            (false, _) => Mode::empty(),
            (true, 0) => Mode::from_bits_truncate(0o644),
            (true, m) => Mode::from_bits_truncate(m & 0o7777),
        };
        let fd = self.open_at(path, flags, mode)?;
        let err = |e| FileError::Sys(path.into(), e);
        let off = i64::try_from(offset).map_err(|_| err(Errno::EINVAL))?;
        if truncate {
            ftruncate(&fd, off).map_err(err)?;
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = off.checked_add(done as i64).ok_or(err(Errno::EFBIG))?;
            match pwrite(&fd, &data[done..], at) {
                Ok(0) => return Err(err(Errno::EIO)),
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Ok(done as u64)
    }

    /// Lists a directory (without `.` and `..`), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Info>, FileError> {
        let fd = self.open_at(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())?;
        let err = |e| FileError::Sys(path.into(), e);
        let dup = fd.try_clone().map_err(|e| {
            FileError::Sys(path.into(), Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        })?;
        let mut dir = Dir::from_fd(dup).map_err(err)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = Path::new(std::ffi::OsStr::from_bytes(name));
            match info_at(&fd, name) {
                Ok(info) => out.push(info),
                // Deleted between readdir and stat.
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(FileError::Sys(format!("{path}/{}", name.display()), e)),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Describes one file; `follow` describes a symlink's target instead.
    pub fn stat(&self, path: &str, follow: bool) -> Result<Info, FileError> {
        let err = |e| FileError::Sys(path.into(), e);
        let is_root = relative(path).as_os_str().is_empty();
        let mut info = if follow || is_root {
            let fd = self.open_at(path, OFlag::O_PATH, Mode::empty())?;
            to_info(String::new(), &fstat(&fd).map_err(err)?, String::new())
        } else {
            let (dir, name) = self.parent(path)?;
            info_at(&dir, &name).map_err(err)?
        };
        info.name = path.to_string();
        Ok(info)
    }

    /// Creates a directory; `parents` creates missing parents and accepts
    /// an existing directory (`mkdir -p`).
    pub fn mkdir(&self, path: &str, mode: u32, parents: bool) -> Result<(), FileError> {
        let mode = Mode::from_bits_truncate(if mode == 0 { 0o755 } else { mode & 0o7777 });
        if !parents {
            let (dir, name) = self.parent(path)?;
            return mkdirat(&dir, &name, mode).map_err(|e| FileError::Sys(path.into(), e));
        }
        let mut sofar = PathBuf::from("/");
        for comp in Path::new(path).components() {
            match comp {
                Component::Normal(c) => sofar.push(c),
                Component::RootDir | Component::CurDir => continue,
                _ => return Err(FileError::BadPath(path.into())),
            }
            let p = sofar.to_string_lossy().into_owned();
            let (dir, name) = self.parent(&p)?;
            match mkdirat(&dir, &name, mode) {
                Ok(()) => {}
                Err(Errno::EEXIST) => {
                    self.open_at(&p, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
                }
                Err(e) => return Err(FileError::Sys(p, e)),
            }
        }
        Ok(())
    }

    /// Removes a file or an empty directory; `recursive` removes a
    /// directory with everything in it (never following symlinks).
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        let (dir, name) = self.parent(path)?;
        let err = |e| FileError::Sys(path.into(), e);
        let st = fstatat(&dir, &name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return unlinkat(&dir, &name, UnlinkatFlags::NoRemoveDir).map_err(err);
        }
        if recursive {
            remove_tree(&dir, &name).map_err(err)?;
        }
        unlinkat(&dir, &name, UnlinkatFlags::RemoveDir).map_err(err)
    }
}

/// Empties directory `name` in `parent`, depth first, without following
/// symlinks (`O_NOFOLLOW` on every directory it opens).
fn remove_tree(parent: &OwnedFd, name: &Path) -> Result<(), Errno> {
    let fd = nix::fcntl::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let dup = fd.try_clone().map_err(|_| Errno::EMFILE)?;
    let mut dir = Dir::from_fd(dup)?;
    let names: Vec<(PathBuf, Option<Type>)> = dir
        .iter()
        .filter_map(Result::ok)
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .map(|e| {
            (
                PathBuf::from(std::ffi::OsStr::from_bytes(e.file_name().to_bytes())),
                e.file_type(),
            )
        })
        .collect();
    for (child, ty) in names {
        let is_dir = match ty {
            Some(t) => t == Type::Directory,
            None => {
                let st = fstatat(&fd, &child, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
            }
        };
        if is_dir {
            remove_tree(&fd, &child)?;
            unlinkat(&fd, &child, UnlinkatFlags::RemoveDir)?;
        } else {
            unlinkat(&fd, &child, UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
}

fn info_at(dir: &OwnedFd, name: &Path) -> Result<Info, Errno> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let target = if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
        nix::fcntl::readlinkat(dir, name)?
            .to_string_lossy()
            .into_owned()
    } else {
        String::new()
    };
    Ok(to_info(name.to_string_lossy().into_owned(), &st, target))
}

fn to_info(name: String, st: &FileStat, link_target: String) -> Info {
    let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => Kind::Regular,
        SFlag::S_IFDIR => Kind::Directory,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    Info {
        name,
        kind,
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_seconds: st.st_mtime,
        mtime_nanos: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        link_target,
    }
}

/// `path` relative to the root: `/a/b` and `a/b` are the same; `/` is `.`.
fn relative(path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(rel)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn write_read_in_chunks() {
        let (_d, root) = root();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        root.write("/f", 0, &data[..1_000_000], true, true, 0o600)
            .unwrap();
        root.write("/f", 1_000_000, &data[1_000_000..], false, false, 0)
            .unwrap();
        let mut got = Vec::new();
        loop {
            let (chunk, eof) = root.read("f", got.len() as u64, 5 << 20).unwrap();
            assert!(chunk.len() <= CHUNK_MAX);
            got.extend(chunk);
            if eof {
                break;
            }
        }
        assert_eq!(got, data);
        let info = root.stat("/f", false).unwrap();
        assert_eq!(
            (info.kind, info.size, info.mode),
            (Kind::Regular, 3_000_000, 0o600)
        );
        // Truncating write.
        root.write("/f", 2, b"xy", false, true, 0).unwrap();
        assert_eq!(
            root.read("/f", 0, 100).unwrap(),
            (vec![0, 1, b'x', b'y'], true)
        );
    }

    #[test]
    fn symlinks_and_dotdot_stay_inside_the_root() {
        let (d, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host").unwrap();
        symlink(outside.path().join("secret"), d.path().join("abs")).unwrap();
        symlink("../../../../../../etc/hostname", d.path().join("rel")).unwrap();
        // An absolute symlink resolves inside the root, where there is no such file.
        assert!(matches!(
            root.read("/abs", 0, 10),
            Err(FileError::Sys(_, _))
        ));
        assert!(root.read("/../../../etc/hostname", 0, 10).is_err());
        assert!(root.write("/abs", 0, b"x", true, false, 0).is_err());
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"host"
        );
        let info = root.stat("/rel", false).unwrap();
        assert_eq!(info.kind, Kind::Symlink);
        assert_eq!(info.link_target, "../../../../../../etc/hostname");
    }

    #[test]
    fn mkdir_list_remove() {
        let (d, root) = root();
        root.mkdir("/a/b/c", 0o700, true).unwrap();
        root.mkdir("/a/b/c", 0, true).unwrap();
        assert!(root.mkdir("/a/b/c", 0, false).is_err());
        root.write("/a/b/file", 0, b"1", true, false, 0).unwrap();
        symlink("/", d.path().join("a/link")).unwrap();
        let names: Vec<_> = root
            .list("/a")
            .unwrap()
            .into_iter()
            .map(|i| (i.name, i.kind))
            .collect();
        assert_eq!(
            names,
            vec![
                ("b".into(), Kind::Directory),
                ("link".into(), Kind::Symlink)
            ]
        );
        assert!(root.remove("/a", false).is_err(), "not empty");
        root.remove("/a", true).unwrap();
        assert!(!d.path().join("a").exists());
        assert!(matches!(root.remove("/", true), Err(FileError::BadPath(_))));
        assert!(matches!(
            root.remove("/x/..", true),
            Err(FileError::BadPath(_))
        ));
    }

    #[test]
    fn a_fifo_fails_at_once_instead_of_blocking_the_open() {
        let (d, root) = root();
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        // On another thread, so that a regression fails the test rather
        // than hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = root.read("/fifo", 0, 10).map(|_| ());
            let write = root.write("/fifo", 0, b"x", false, false, 0).map(|_| ());
            tx.send((read, write)).ok();
        });
        let (read, write) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("ReadFile/WriteFile on a FIFO blocked");
        assert!(
            matches!(read, Err(FileError::Sys(_, Errno::ESPIPE))),
            "{read:?}"
        );
        assert!(
            matches!(write, Err(FileError::Sys(_, Errno::ENXIO))),
            "{write:?}"
        );
    }
}
