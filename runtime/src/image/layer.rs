//! Applying an image layer (a tar stream, gzip'd or not) to a root
//! directory, with OCI whiteouts, so that no entry of any layer can read,
//! write or delete anything outside that root.
//!
//! Hand-written rather than the `tar` crate's `unpack`/`unpack_in`: those
//! resolve paths the way the host sees them, so a symlink planted by an
//! earlier entry of the same layer (or by a lower layer) redirects what
//! later entries do (`evil -> /host/dir`, then `evil/.wh..wh..opq` would
//! empty `/host/dir`), and the whiteouts have to be applied by hand anyway.
//! Here the `tar` crate only parses. Every parent directory is resolved with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` on a directory fd of
//! the root, so `..` and symlinks, absolute or relative, resolve as they
//! would for the guest: inside the root. The last component is then only
//! touched with `*at` calls on that parent fd, none of which follows it:
//! `mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` after removing what
//! was there, `symlinkat` (targets stored verbatim: they are only ever
//! resolved inside the root), `linkat` with flags 0 (the source resolved
//! inside the root too, never a directory), `mknodat` (FIFOs), `unlinkat`,
//! and a recursive removal that walks `O_NOFOLLOW` directory fds.
//! Owners, modes (setuid bits included: they stay inside the root, whose
//! work directory only root can enter) and mtimes are kept, set on the
//! opened fd or with `AT_SYMLINK_NOFOLLOW`.
//!
//! Refused, naming the entry and the reason: `..` components, device
//! nodes, sparse files, hardlinks to a missing file or a directory, entry
//! types that are not files, directories, links or FIFOs. FIFOs are created.
//! Bounded by [`Limits`]: decompressed bytes (counted as they come out of
//! the decompressor, tar headers included, so a gzip bomb stops at the
//! bound), entries (with the parent directories created for them), the
//! length of paths and link targets, and the extension headers (long
//! names, pax records) the parser may read for one entry.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{BuildHasher, DefaultHasher, Hasher, RandomState};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FileStat, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{
    fchown, fchownat, geteuid, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags,
};

/// Default [`Limits::bytes`]: 16 GiB.
pub const DEFAULT_BYTES: u64 = 16 << 30;
/// Default [`Limits::entries`].
pub const DEFAULT_ENTRIES: u64 = 1_000_000;
/// Default [`Limits::path_bytes`] (Linux's `PATH_MAX`).
pub const DEFAULT_PATH_BYTES: usize = 4096;
/// What the tar parser may read between two entries: padding, headers,
/// GNU long names and links, pax records.
pub const HEADER_WINDOW: u64 = 1 << 20;
/// Deepest directory tree a removal walks (each level holds one fd).
const MAX_DEPTH: usize = 256;
/// `openat2` answers `EAGAIN` when a rename raced the lookup.
const RESOLVE_TRIES: usize = 16;

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_IN_ROOT.union(ResolveFlag::RESOLVE_NO_MAGICLINKS);
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";
/// aufs bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): not files of the image.
const AUFS_META: &[u8] = b".wh..wh.";

/// Bounds on what one image's layers may unpack to, all layers together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Decompressed bytes, tar headers and padding included.
    pub bytes: u64,
    /// Entries, and the parent directories created for them.
    pub entries: u64,
    /// Longest entry path or link target.
    pub path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            bytes: DEFAULT_BYTES,
            entries: DEFAULT_ENTRIES,
            path_bytes: DEFAULT_PATH_BYTES,
        }
    }
}

/// Errors applying a layer; entry errors name the entry's path.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot open the unpack root {0}")]
    Root(PathBuf, #[source] io::Error),
    #[error("openat2(2) is not available: unpacking images safely needs Linux 5.6 or later")]
    NoOpenat2,
    #[error("cannot read the layer")]
    Read(#[source] io::Error),
    #[error("zstd-compressed layers are not supported")]
    Zstd,
    #[error("the image is larger than the limit of {0} decompressed bytes")]
    TooManyBytes(u64),
    #[error("the image has more than the limit of {0} entries")]
    TooManyEntries(u64),
    #[error("an entry's headers (long names, pax records) exceed the limit of {0} bytes")]
    HeadersTooLong(u64),
    #[error("entry {path}: {what} longer than the limit of {limit} bytes")]
    PathTooLong {
        path: String,
        what: &'static str,
        limit: usize,
    },
    #[error("entry {0}: a `..` component would leave the root")]
    DotDot(PathBuf),
    #[error("entry {path}: {parent} is not a directory, nor a symlink to one in the image")]
    ParentNotDir { path: PathBuf, parent: PathBuf },
    #[error("device node entries are not supported: {0}")]
    Device(PathBuf),
    #[error("sparse file entries are not supported: {0}")]
    Sparse(PathBuf),
    #[error("entry {0}: unsupported entry type {1:?}")]
    Unsupported(PathBuf, char),
    #[error("entry {0}: a whiteout of no file (`.wh.` of an empty name, `.` or `..`)")]
    BadWhiteout(PathBuf),
    #[error("entry {0}: a link without a target")]
    NoLinkTarget(PathBuf),
    #[error("entry {path}: hardlink target {target} does not exist in the image")]
    LinkMissing { path: PathBuf, target: PathBuf },
    #[error("entry {path}: hardlink target {target} is a directory")]
    LinkToDir { path: PathBuf, target: PathBuf },
    #[error(
        "entry {path}: hardlink target {target} has a `..` component that would leave the root"
    )]
    LinkDotDot { path: PathBuf, target: PathBuf },
    #[error("entry {0}: invalid header")]
    Header(PathBuf, #[source] io::Error),
    #[error("entry {path}: {what} {value} is out of range")]
    Range {
        path: PathBuf,
        what: &'static str,
        value: u64,
    },
    #[error("entry {path}: cannot {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, op: &'static str, e: impl Into<io::Error>) -> LayerError {
    LayerError::Io {
        path: path.to_path_buf(),
        op,
        source: e.into(),
    }
}

/// Names the failed step of an entry.
trait Op<T> {
    fn op(self, path: &Path, op: &'static str) -> Result<T, LayerError>;
}

impl<T, E: Into<io::Error>> Op<T> for Result<T, E> {
    fn op(self, path: &Path, op: &'static str) -> Result<T, LayerError> {
        self.map_err(|e| io_err(path, op, e))
    }
}

/// Applies one layer to `root` with its own `limits`.
pub fn apply(layer: impl Read, root: &Path, limits: &Limits) -> Result<(), LayerError> {
    Unpacker::new(root, *limits)?.apply(layer)
}

/// Applies an image's layers, in order, to one root, within one budget of
/// [`Limits`].
pub struct Unpacker {
    root: Root,
    budget: Arc<Budget>,
}

impl Unpacker {
    /// `root` must be an existing directory; its own owner and mode stay.
    pub fn new(root: &Path, limits: Limits) -> Result<Self, LayerError> {
        let opened = Root::open(root).map_err(|e| LayerError::Root(root.to_path_buf(), e))?;
        match opened.dir(&[]) {
            Ok(_) => {}
            Err(Errno::ENOSYS) => return Err(LayerError::NoOpenat2),
            Err(e) => return Err(LayerError::Root(root.to_path_buf(), e.into())),
        }
        Ok(Self {
            root: opened,
            budget: Arc::new(Budget::new(limits)),
        })
    }

    /// Applies the next layer: a tar stream, gzip'd or not. Reads `layer`
    /// to its end (also past the tar's end-of-archive blocks) unless it
    /// fails. On an error the root is left half-applied: discard it.
    pub fn apply(&mut self, layer: impl Read) -> Result<(), LayerError> {
        self.apply_stream(layer).map_err(|e| self.budget.explain(e))
    }

    fn apply_stream(&self, layer: impl Read) -> Result<(), LayerError> {
        let input = decompressed(layer)?;
        let meter = Meter {
            inner: input,
            budget: Arc::clone(&self.budget),
        };
        let mut archive = tar::Archive::new(meter);
        Layer::new(&self.root, &self.budget).apply_all(&mut archive)?;
        // What follows the end-of-archive blocks counts too (zeros that
        // decompress without end would otherwise be a free bomb).
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(LayerError::Read)?;
        Ok(())
    }
}

/// `layer`, decompressed if it starts with the gzip magic.
fn decompressed<'a>(mut layer: impl Read + 'a) -> Result<Box<dyn Read + 'a>, LayerError> {
    let mut head = [0u8; 4];
    let n = read_up_to(&mut layer, &mut head).map_err(LayerError::Read)?;
    let head = head.get(..n).unwrap_or_default().to_vec();
    if head.starts_with(ZSTD_MAGIC) {
        return Err(LayerError::Zstd);
    }
    let gzip = head.starts_with(GZIP_MAGIC);
    let input = io::Cursor::new(head).chain(layer);
    if gzip {
        // Several gzip members are one stream, as Go's reader takes them.
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(input)));
    }
    Ok(Box::new(input))
}

/// Fills `buf` unless the input ends first; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What the image has used of its [`Limits`]; shared with the [`Meter`]
/// under the tar parser, which cannot hand back our own error types.
#[derive(Debug)]
struct Budget {
    limits: Limits,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// Bytes the parser may still read for headers; `u64::MAX`: no window.
    window: AtomicU64,
    tripped: AtomicU8,
}

const TRIPPED_NONE: u8 = 0;
const TRIPPED_BYTES: u8 = 1;
const TRIPPED_HEADERS: u8 = 2;
const NO_WINDOW: u64 = u64::MAX;

impl Budget {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            window: AtomicU64::new(NO_WINDOW),
            tripped: AtomicU8::new(TRIPPED_NONE),
        }
    }

    /// Counts `n` decompressed bytes.
    fn spend(&self, n: usize) -> io::Result<()> {
        let n = u64::try_from(n).map_err(|_| self.trip(TRIPPED_BYTES))?;
        let used = self
            .bytes
            .load(Ordering::Relaxed)
            .checked_add(n)
            .filter(|u| *u <= self.limits.bytes)
            .ok_or_else(|| self.trip(TRIPPED_BYTES))?;
        self.bytes.store(used, Ordering::Relaxed);
        let window = self.window.load(Ordering::Relaxed);
        if window != NO_WINDOW {
            let left = window
                .checked_sub(n)
                .ok_or_else(|| self.trip(TRIPPED_HEADERS))?;
            self.window.store(left, Ordering::Relaxed);
        }
        Ok(())
    }

    fn trip(&self, why: u8) -> io::Error {
        self.tripped.store(why, Ordering::Relaxed);
        io::Error::other("a limit of the image was reached")
    }

    /// The parser is about to read the next entry's headers.
    fn open_window(&self) {
        self.window.store(HEADER_WINDOW, Ordering::Relaxed);
    }

    fn close_window(&self) {
        self.window.store(NO_WINDOW, Ordering::Relaxed);
    }

    /// Counts one entry, or a directory created for one.
    fn count_entry(&self) -> Result<(), LayerError> {
        let limit = self.limits.entries;
        let n = self
            .entries
            .load(Ordering::Relaxed)
            .checked_add(1)
            .filter(|n| *n <= limit)
            .ok_or(LayerError::TooManyEntries(limit))?;
        self.entries.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// A limit the meter hit, in place of the error that carried it up.
    fn explain(&self, e: LayerError) -> LayerError {
        match self.tripped.load(Ordering::Relaxed) {
            TRIPPED_BYTES => LayerError::TooManyBytes(self.limits.bytes),
            TRIPPED_HEADERS => LayerError::HeadersTooLong(HEADER_WINDOW),
            _ => e,
        }
    }
}

/// Counts the decompressed bytes as the tar parser reads them.
struct Meter<R> {
    inner: R,
    budget: Arc<Budget>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.spend(n)?;
        Ok(n)
    }
}

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
    fn resolve(&self, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
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
    fn dir(&self, comps: &[&OsStr]) -> nix::Result<OwnedFd> {
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

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// `name` in `dir`, not followed; `None` if there is none.
fn stat_at(dir: impl AsFd, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory `name` in `dir`, never through a symlink.
fn open_subdir(dir: impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The names in `dir`, without `.` and `..`.
fn names(dir: impl AsFd) -> nix::Result<Vec<OsString>> {
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

fn too_deep() -> io::Error {
    io::Error::other(format!("directory tree deeper than {MAX_DEPTH} levels"))
}

/// Removes `name` from `dir` if it is there: a directory with everything
/// in it, walked with `O_NOFOLLOW` directory fds (a symlink is removed,
/// never followed).
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
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

/// An entry path split into names: no empty or `.` components; `None` if
/// one is `..`.
fn components(path: &[u8]) -> Option<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            name => out.push(OsStr::from_bytes(name)),
        }
    }
    Some(out)
}

/// A path for a message: at most 256 bytes of it.
fn shown(raw: &[u8]) -> String {
    let cut = raw.get(..256).unwrap_or(raw);
    let more = if cut.len() < raw.len() { "..." } else { "" };
    format!("{}{more}", String::from_utf8_lossy(cut))
}

/// The paths this layer created, by a keyed hash: whiteouts hide what
/// lower layers left, never the layer's own entries (OCI image spec), also
/// when an opaque whiteout comes after its siblings in the archive.
struct Seen {
    state: RandomState,
    keys: HashSet<u64>,
}

impl Seen {
    fn new() -> Self {
        Self {
            state: RandomState::new(),
            keys: HashSet::new(),
        }
    }

    fn prefix(&self, comps: &[&OsStr]) -> DefaultHasher {
        let mut h = self.state.build_hasher();
        for c in comps {
            Self::push(&mut h, c);
        }
        h
    }

    /// `/` ends every name: no name holds one, so the keys are unambiguous.
    fn push(h: &mut DefaultHasher, name: &OsStr) {
        h.write(name.as_bytes());
        h.write_u8(b'/');
    }

    fn child(prefix: &DefaultHasher, name: &OsStr) -> DefaultHasher {
        let mut h = prefix.clone();
        Self::push(&mut h, name);
        h
    }

    fn insert(&mut self, parent: &[&OsStr], name: &OsStr) {
        let key = Self::child(&self.prefix(parent), name).finish();
        self.keys.insert(key);
    }

    fn contains(&self, parent: &[&OsStr], name: &OsStr) -> bool {
        self.has(&Self::child(&self.prefix(parent), name))
    }

    fn has(&self, key: &DefaultHasher) -> bool {
        self.keys.contains(&key.finish())
    }
}

/// An entry's owner, mode and mtime.
struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
}

impl Meta {
    fn of(header: &tar::Header, path: &Path) -> Result<Self, LayerError> {
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
    fn set(&self, fd: BorrowedFd<'_>) -> nix::Result<()> {
        owned(fchown(fd, Some(self.uid), Some(self.gid)))?;
        fchmod(fd, self.mode)?;
        futimens(fd, &self.mtime, &self.mtime)
    }

    /// A symlink's owner and mtime (its mode means nothing).
    fn set_link(&self, dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
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
fn owned(r: nix::Result<()>) -> nix::Result<()> {
    match r {
        Err(Errno::EPERM) if !geteuid().is_root() => Ok(()),
        r => r,
    }
}

/// One entry's place: its path (for messages), parent names and name.
struct Place<'a> {
    path: &'a Path,
    parent: &'a [&'a OsStr],
    name: &'a OsStr,
}

/// One layer being applied.
struct Layer<'a> {
    root: &'a Root,
    budget: &'a Budget,
    seen: Seen,
    buf: Vec<u8>,
}

impl<'a> Layer<'a> {
    fn new(root: &'a Root, budget: &'a Budget) -> Self {
        Self {
            root,
            budget,
            seen: Seen::new(),
            buf: vec![0; 64 << 10],
        }
    }

    fn apply_all<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), LayerError> {
        let mut entries = archive.entries().map_err(LayerError::Read)?;
        loop {
            self.budget.open_window();
            let next = entries.next();
            self.budget.close_window();
            let Some(entry) = next else {
                return Ok(());
            };
            let mut entry = entry.map_err(LayerError::Read)?;
            self.budget.count_entry()?;
            self.entry(&mut entry)?;
            // The parser must find the next header right after this one's
            // data: the header window holds no file data.
            io::copy(&mut entry, &mut io::sink()).map_err(LayerError::Read)?;
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        self.check_len(&raw, &raw, "path")?;
        let path = PathBuf::from(OsStr::from_bytes(&raw));
        let comps = components(&raw).ok_or_else(|| LayerError::DotDot(path.clone()))?;
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the root itself: its owner and mode stay ours
        };
        let place = Place {
            path: &path,
            parent,
            name,
        };
        let n = name.as_bytes();
        if n == OPAQUE {
            return self.opaque(&place);
        }
        if n.starts_with(AUFS_META) {
            return Ok(());
        }
        if let Some(hidden) = n.strip_prefix(WHITEOUT) {
            return self.whiteout(&place, hidden);
        }
        self.create(&place, entry, raw.ends_with(b"/"))
    }

    fn check_len(&self, path: &[u8], value: &[u8], what: &'static str) -> Result<(), LayerError> {
        let limit = self.budget.limits.path_bytes;
        if value.len() > limit {
            return Err(LayerError::PathTooLong {
                path: shown(path),
                what,
                limit,
            });
        }
        Ok(())
    }

    fn create<R: Read>(
        &mut self,
        place: &Place<'_>,
        entry: &mut tar::Entry<'_, R>,
        slash: bool,
    ) -> Result<(), LayerError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let path = place.path;
        match kind {
            // Old tars mark directories with a trailing slash only.
            T::Regular if slash => self.directory(place, &Meta::of(entry.header(), path)?),
            T::Directory => self.directory(place, &Meta::of(entry.header(), path)?),
            T::Regular | T::Continuous => {
                let meta = Meta::of(entry.header(), path)?;
                self.file(place, &meta, entry)
            }
            T::Symlink => {
                let meta = Meta::of(entry.header(), path)?;
                let target = self.link_target(place, entry)?;
                self.symlink(place, &meta, &target)
            }
            T::Link => {
                let target = self.link_target(place, entry)?;
                self.hardlink(place, &target)
            }
            T::Fifo => self.fifo(place, &Meta::of(entry.header(), path)?),
            T::Char | T::Block => Err(LayerError::Device(path.to_path_buf())),
            T::GNUSparse => Err(LayerError::Sparse(path.to_path_buf())),
            // A pax global header: defaults that nothing here uses.
            T::XGlobalHeader => Ok(()),
            other => Err(LayerError::Unsupported(
                path.to_path_buf(),
                char::from(other.as_byte()),
            )),
        }
    }

    fn link_target<R: Read>(
        &self,
        place: &Place<'_>,
        entry: &tar::Entry<'_, R>,
    ) -> Result<Vec<u8>, LayerError> {
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| LayerError::NoLinkTarget(place.path.to_path_buf()))?
            .into_owned();
        self.check_len(place.path.as_os_str().as_bytes(), &target, "link target")?;
        Ok(target)
    }

    /// The entry's parent directory, resolved inside the root; missing
    /// directories are created (0755, counted as entries), as `tar` does.
    /// A symlink to a directory that does not exist is an error, not
    /// followed to create its target.
    fn parent_dir(&mut self, place: &Place<'_>) -> Result<OwnedFd, LayerError> {
        let path = place.path;
        let not_dir = |upto: &[&OsStr]| LayerError::ParentNotDir {
            path: path.to_path_buf(),
            parent: upto.iter().collect(),
        };
        match self.root.dir(place.parent) {
            Err(Errno::ENOENT) => {}
            Err(Errno::ENOTDIR) => return Err(not_dir(place.parent)),
            other => return other.op(path, "open its parent directory"),
        }
        let mut fd = self.root.dir(&[]).op(path, "open the root")?;
        for (i, name) in place.parent.iter().enumerate() {
            let upto = place.parent.get(..=i).unwrap_or(place.parent);
            fd = match self.root.dir(upto) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    self.budget.count_entry()?;
                    match mkdirat(&fd, *name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) => {}
                        Err(Errno::EEXIST) => return Err(not_dir(upto)),
                        Err(e) => return Err(io_err(path, "create a parent directory", e)),
                    }
                    let above = place.parent.get(..i).unwrap_or_default();
                    self.seen.insert(above, name);
                    open_subdir(&fd, name).op(path, "open a parent directory")?
                }
                Err(Errno::ENOTDIR) => return Err(not_dir(upto)),
                Err(e) => return Err(io_err(path, "open a parent directory", e)),
            };
        }
        Ok(fd)
    }

    /// The existing parent directory, or `None`: nothing there to hide.
    fn existing_parent(&self, place: &Place<'_>) -> Result<Option<OwnedFd>, LayerError> {
        match self.root.dir(place.parent) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(io_err(place.path, "open its parent directory", e)),
        }
    }

    /// Removes whatever is at the entry's name, to put the entry there.
    fn make_room(&self, parent: &OwnedFd, place: &Place<'_>) -> Result<(), LayerError> {
        remove_at(parent.as_fd(), place.name, 0).op(place.path, "remove the file it replaces")
    }

    fn directory(&mut self, place: &Place<'_>, meta: &Meta) -> Result<(), LayerError> {
        let path = place.path;
        let parent = self.parent_dir(place)?;
        let old = stat_at(&parent, place.name).op(path, "look at what is there")?;
        if !old.as_ref().is_some_and(is_dir) {
            self.make_room(&parent, place)?;
            mkdirat(&parent, place.name, Mode::from_bits_truncate(0o700))
                .op(path, "create the directory")?;
        }
        let dir = open_subdir(&parent, place.name).op(path, "open the directory")?;
        meta.set(dir.as_fd())
            .op(path, "set the directory's owner, mode and time")?;
        self.seen.insert(place.parent, place.name);
        Ok(())
    }

    fn file(
        &mut self,
        place: &Place<'_>,
        meta: &Meta,
        data: &mut impl Read,
    ) -> Result<(), LayerError> {
        let path = place.path;
        let parent = self.parent_dir(place)?;
        self.make_room(&parent, place)?;
        let fd = openat(
            &parent,
            place.name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .op(path, "create the file")?;
        let mut file = File::from(fd);
        self.copy(data, &mut file, path)?;
        meta.set(file.as_fd())
            .op(path, "set the file's owner, mode and time")?;
        self.seen.insert(place.parent, place.name);
        Ok(())
    }

    fn copy(&mut self, from: &mut impl Read, to: &mut File, path: &Path) -> Result<(), LayerError> {
        loop {
            let n = match from.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LayerError::Read(e)),
            };
            let chunk = self.buf.get(..n).unwrap_or_default();
            to.write_all(chunk).op(path, "write the file")?;
        }
    }

    fn symlink(&mut self, place: &Place<'_>, meta: &Meta, target: &[u8]) -> Result<(), LayerError> {
        let path = place.path;
        let parent = self.parent_dir(place)?;
        self.make_room(&parent, place)?;
        symlinkat(OsStr::from_bytes(target), &parent, place.name).op(path, "create the symlink")?;
        meta.set_link(parent.as_fd(), place.name)
            .op(path, "set the symlink's owner and time")?;
        self.seen.insert(place.parent, place.name);
        Ok(())
    }

    fn hardlink(&mut self, place: &Place<'_>, target: &[u8]) -> Result<(), LayerError> {
        let path = place.path;
        let target_path = PathBuf::from(OsStr::from_bytes(target));
        let missing = || LayerError::LinkMissing {
            path: path.to_path_buf(),
            target: target_path.clone(),
        };
        let to_dir = || LayerError::LinkToDir {
            path: path.to_path_buf(),
            target: target_path.clone(),
        };
        let comps = components(target).ok_or_else(|| LayerError::LinkDotDot {
            path: path.to_path_buf(),
            target: target_path.clone(),
        })?;
        let Some((src_name, src_parent)) = comps.split_last() else {
            return Err(to_dir()); // the root
        };
        let src_dir = match self.root.dir(src_parent) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(missing()),
            Err(e) => return Err(io_err(path, "open the hardlink target's directory", e)),
        };
        let src = stat_at(&src_dir, src_name)
            .op(path, "look at the hardlink target")?
            .ok_or_else(missing)?;
        if is_dir(&src) {
            return Err(to_dir());
        }
        let parent = self.parent_dir(place)?;
        let old = stat_at(&parent, place.name).op(path, "look at what is there")?;
        let same = old.is_some_and(|o| (o.st_dev, o.st_ino) == (src.st_dev, src.st_ino));
        if !same {
            self.make_room(&parent, place)?;
            linkat(&src_dir, *src_name, &parent, place.name, AtFlags::empty())
                .op(path, "create the hardlink")?;
        }
        self.seen.insert(place.parent, place.name);
        Ok(())
    }

    fn fifo(&mut self, place: &Place<'_>, meta: &Meta) -> Result<(), LayerError> {
        let path = place.path;
        let parent = self.parent_dir(place)?;
        self.make_room(&parent, place)?;
        mknodat(
            &parent,
            place.name,
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .op(path, "create the FIFO")?;
        // Read-only and non-blocking: opens at once, with no writer.
        let fd = openat(
            &parent,
            place.name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .op(path, "open the FIFO")?;
        meta.set(fd.as_fd())
            .op(path, "set the FIFO's owner, mode and time")?;
        self.seen.insert(place.parent, place.name);
        Ok(())
    }

    /// `.wh.NAME`: NAME goes (a directory with everything in it); a
    /// missing NAME is fine.
    fn whiteout(&mut self, place: &Place<'_>, hidden: &[u8]) -> Result<(), LayerError> {
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(LayerError::BadWhiteout(place.path.to_path_buf()));
        }
        let hidden = OsStr::from_bytes(hidden);
        if self.seen.contains(place.parent, hidden) {
            return Ok(()); // this layer's own entry
        }
        let Some(dir) = self.existing_parent(place)? else {
            return Ok(());
        };
        remove_at(dir.as_fd(), hidden, 0).op(place.path, "remove the whited-out file")
    }

    /// `.wh..wh..opq`: the directory stays, what lower layers put in it goes.
    fn opaque(&mut self, place: &Place<'_>) -> Result<(), LayerError> {
        let Some(dir) = self.existing_parent(place)? else {
            return Ok(());
        };
        let prefix = self.seen.prefix(place.parent);
        self.empty_lower(&dir, &prefix, 0)
            .op(place.path, "empty the directory")
    }

    /// Removes from `dir` all that this layer did not create; walks into
    /// this layer's directories for what lower layers left there.
    fn empty_lower(&self, dir: &OwnedFd, prefix: &DefaultHasher, depth: usize) -> io::Result<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        for name in names(dir)? {
            let key = Seen::child(prefix, &name);
            if !self.seen.has(&key) {
                remove_at(dir.as_fd(), &name, depth)?;
                continue;
            }
            if stat_at(dir, &name)?.as_ref().is_some_and(is_dir) {
                let sub = open_subdir(dir, &name)?;
                self.empty_lower(&sub, &key, depth + 1)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    use tar::{Builder, EntryType, Header};

    use super::*;

    const SENTINEL: &[u8] = b"outside the root\n";
    const MTIME: u64 = 1_600_000_000;

    /// `<tmp>/root`, empty, and `<tmp>/sentinel/file` beside it.
    struct Scene {
        tmp: tempfile::TempDir,
    }

    impl Scene {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir(tmp.path().join("root")).unwrap();
            std::fs::create_dir(tmp.path().join("sentinel")).unwrap();
            std::fs::write(tmp.path().join("sentinel/file"), SENTINEL).unwrap();
            Self { tmp }
        }

        fn root(&self) -> PathBuf {
            self.tmp.path().join("root")
        }

        /// The sentinel directory's absolute path.
        fn sentinel(&self) -> String {
            self.tmp.path().join("sentinel").display().to_string()
        }

        fn apply(&self, layer: &[u8]) -> Result<(), LayerError> {
            self.apply_with(layer, &Limits::default())
        }

        fn apply_with(&self, layer: &[u8], limits: &Limits) -> Result<(), LayerError> {
            apply(layer, &self.root(), limits)
        }

        /// The error of applying `layer`, as the user sees it.
        fn refused(&self, layer: &[u8]) -> String {
            let err = self.apply(layer).unwrap_err();
            chain(&err)
        }

        /// Nothing outside the root changed: the sentinel file is there
        /// with its content, mode and one link, and nothing new appeared.
        fn untouched(&self) {
            assert_eq!(listing(self.tmp.path()), ["root", "sentinel"]);
            let sentinel = self.tmp.path().join("sentinel");
            assert_eq!(listing(&sentinel), ["file"]);
            let file = sentinel.join("file");
            assert_eq!(std::fs::read(&file).unwrap(), SENTINEL);
            let m = std::fs::symlink_metadata(&file).unwrap();
            assert!(m.file_type().is_file());
            assert_eq!(m.nlink(), 1, "no hardlink to the host file");
            assert_eq!(m.mode() & 0o7777, 0o644 & !umask());
        }

        fn at(&self, rel: &str) -> PathBuf {
            self.root().join(rel)
        }
    }

    fn umask() -> u32 {
        let probe = tempfile::tempdir().unwrap();
        let f = probe.path().join("f");
        std::fs::write(&f, b"").unwrap();
        0o666 & !std::fs::metadata(&f).unwrap().mode() & 0o777
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(e) = source {
            text.push_str(": ");
            text.push_str(&e.to_string());
            source = e.source();
        }
        text
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_uid(u64::from(geteuid().as_raw()));
        h.set_gid(u64::from(nix::unistd::getegid().as_raw()));
        h.set_mtime(MTIME);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h
    }

    /// A layer being written.
    struct Tar(Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Self(Builder::new(Vec::new()))
        }

        fn dir(self, path: &str) -> Self {
            self.dir_mode(path, 0o755)
        }

        fn dir_mode(mut self, path: &str, mode: u32) -> Self {
            let mut h = header(EntryType::Directory, mode, 0);
            self.0.append_data(&mut h, path, &[][..]).unwrap();
            self
        }

        fn file(self, path: &str, data: &[u8]) -> Self {
            self.file_mode(path, data, 0o644)
        }

        fn file_mode(mut self, path: &str, data: &[u8], mode: u32) -> Self {
            let mut h = header(EntryType::Regular, mode, data.len() as u64);
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }

        fn whiteout(self, path: &str) -> Self {
            self.file(path, b"")
        }

        fn link(mut self, kind: EntryType, path: &str, target: &str) -> Self {
            let mut h = header(kind, 0o777, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        fn symlink(self, path: &str, target: &str) -> Self {
            self.link(EntryType::Symlink, path, target)
        }

        fn hardlink(self, path: &str, target: &str) -> Self {
            self.link(EntryType::Link, path, target)
        }

        /// An entry whose name and link name go into the header as they
        /// are (the builder refuses `..`).
        fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
            let mut h = header(kind, 0o644, data.len() as u64);
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// Symlink targets that would leave the root if followed on the host,
    /// and where each one lands inside the root instead.
    fn escapes(s: &Scene) -> Vec<(String, String)> {
        let abs = s.sentinel();
        vec![
            (abs.clone(), abs.trim_start_matches('/').to_string()),
            ("../sentinel".into(), "sentinel".into()),
            ("../../../../../../sentinel".into(), "sentinel".into()),
        ]
    }

    // Hostile layers: each must fail clearly, or be harmless once confined;
    // either way the sentinel beside the root is untouched.

    #[test]
    fn a_whiteout_through_a_symlink_stays_in_the_root() {
        for opaque in [false, true] {
            let s = Scene::new();
            for (target, _) in escapes(&s) {
                let name = if opaque { ".wh..wh..opq" } else { ".wh.file" };
                let layer = Tar::new()
                    .symlink("evil", &target)
                    .whiteout(&format!("evil/{name}"))
                    .bytes();
                s.apply(&layer).unwrap();
                s.untouched();
            }
        }
    }

    #[test]
    fn an_opaque_whiteout_through_a_nested_relative_symlink_stays_in_the_root() {
        let s = Scene::new();
        let layer = Tar::new()
            .dir("a/")
            .dir("a/b/")
            .symlink("a/b/up", "../../../sentinel")
            .whiteout("a/b/up/.wh..wh..opq")
            .whiteout("a/b/up/.wh.file")
            .bytes();
        s.apply(&layer).unwrap();
        s.untouched();
    }

    #[test]
    fn a_file_through_a_symlink_lands_in_the_root() {
        for (exists, write) in [(false, "file"), (true, "file"), (true, "new")] {
            let s = Scene::new();
            for (target, inside) in escapes(&s) {
                let mut layer = Tar::new();
                if exists {
                    layer = layer.dir(&format!("{inside}/"));
                }
                let layer = layer
                    .symlink("evil", &target)
                    .file(&format!("evil/{write}"), b"planted")
                    .bytes();
                let applied = s.apply(&layer);
                s.untouched();
                if !exists {
                    // Its target is missing inside the root.
                    let err = chain(&applied.unwrap_err());
                    let why = "entry evil/file: evil is not a directory, nor a symlink to one";
                    assert!(err.contains(why), "{err}");
                    continue;
                }
                applied.unwrap();
                let landed = s.at(&inside).join(write);
                assert_eq!(std::fs::read(landed).unwrap(), b"planted");
            }
        }
    }

    #[test]
    fn a_directory_replaced_through_a_symlink_is_replaced_in_the_root() {
        let s = Scene::new();
        let tmp = s.tmp.path().display().to_string();
        for target in [tmp.as_str(), "..", "../../..", "/"] {
            // `up/sentinel` is the host's sentinel directory if followed:
            // a file replacing it, then a directory replacing that file,
            // and a directory replacing the file in it.
            let layer = Tar::new()
                .dir(&format!("{}/", tmp.trim_start_matches('/')))
                .symlink("up", target)
                .dir("up/sentinel/")
                .file("up/sentinel/file", b"lower")
                .file("up/sentinel", b"not a directory")
                .dir("up/sentinel/")
                .dir("up/sentinel/file/")
                .bytes();
            s.apply(&layer).unwrap();
            s.untouched();
        }
        assert!(s.at("sentinel/file").is_dir());
    }

    #[test]
    fn a_symlink_in_the_way_is_replaced_not_followed() {
        let s = Scene::new();
        let file = format!("{}/file", s.sentinel());
        let lower = Tar::new()
            .symlink("evil", &file)
            .symlink("evildir", &s.sentinel())
            .bytes();
        let upper = Tar::new()
            .file("evil", b"replaces the link")
            .dir("evildir/")
            .hardlink("evil2", "evil")
            .bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&lower[..]).unwrap();
        u.apply(&upper[..]).unwrap();
        s.untouched();
        assert_eq!(std::fs::read(s.at("evil")).unwrap(), b"replaces the link");
        assert!(s.at("evildir").symlink_metadata().unwrap().is_dir());
    }

    #[test]
    fn hardlinks_to_host_files_are_refused() {
        let s = Scene::new();
        let host_file = format!("{}/file", s.sentinel());
        let cases = [
            (Tar::new().hardlink("x", &host_file), "does not exist"),
            (
                Tar::new().raw(EntryType::Link, b"x", b"../sentinel/file", b""),
                "`..` component",
            ),
            (
                Tar::new()
                    .symlink("s", &s.sentinel())
                    .hardlink("x", "s/file"),
                "does not exist",
            ),
            (
                Tar::new()
                    .symlink("r", "../sentinel")
                    .hardlink("x", "r/file"),
                "does not exist",
            ),
        ];
        for (layer, why) in cases {
            let err = s.refused(&layer.bytes());
            assert!(err.contains("entry x: hardlink target"), "{err}");
            assert!(err.contains(why), "{err}");
            s.untouched();
        }
    }

    #[test]
    fn dot_dot_names_are_refused() {
        let s = Scene::new();
        for name in [
            &b"../escape"[..],
            b"a/../../escape",
            b"./../sentinel/file",
            b"../sentinel/.wh.file",
            b"../sentinel/.wh..wh..opq",
        ] {
            let layer = Tar::new().raw(EntryType::Regular, name, b"", b"x").bytes();
            let err = s.refused(&layer);
            assert!(err.contains("`..` component would leave the root"), "{err}");
            let named = format!("entry {}", String::from_utf8_lossy(name));
            assert!(err.contains(&named), "{err}");
            s.untouched();
        }
        let layer = Tar::new()
            .raw(EntryType::Symlink, b"../evil", b"/", b"")
            .bytes();
        assert!(s.refused(&layer).contains("`..`"));
        s.untouched();
    }

    #[test]
    fn whiteouts_of_dot_and_dot_dot_are_refused() {
        let s = Scene::new();
        for name in ["a/.wh..", "a/.wh...", ".wh."] {
            let layer = Tar::new().dir("a/").whiteout(name).bytes();
            let err = s.refused(&layer);
            assert!(err.contains("a whiteout of no file"), "{err}");
            assert!(s.at("a").is_dir() || name == ".wh.", "{name}");
            s.untouched();
        }
    }

    #[test]
    fn device_nodes_are_refused() {
        let s = Scene::new();
        for kind in [EntryType::Char, EntryType::Block] {
            let mut h = header(kind, 0o666, 0);
            h.set_device_major(8).unwrap();
            h.set_device_minor(0).unwrap();
            let mut b = Builder::new(Vec::new());
            b.append_data(&mut h, "dev/sda", &[][..]).unwrap();
            let err = s.refused(&b.into_inner().unwrap());
            assert!(
                err.contains("device node entries are not supported: dev/sda"),
                "{err}"
            );
            assert!(!s.at("dev/sda").exists());
            s.untouched();
        }
    }

    #[test]
    fn other_entry_types_are_refused() {
        let s = Scene::new();
        let layer = Tar::new()
            .raw(EntryType::new(b'V'), b"label", b"", b"")
            .bytes();
        let err = s.refused(&layer);
        assert!(
            err.contains("entry label: unsupported entry type 'V'"),
            "{err}"
        );
        let mut h = header(EntryType::GNUSparse, 0o644, 0);
        h.as_gnu_mut().unwrap().set_real_size(0);
        let mut b = Builder::new(Vec::new());
        b.append_data(&mut h, "sparse", &[][..]).unwrap();
        let err = s.refused(&b.into_inner().unwrap());
        assert!(
            err.contains("sparse file entries are not supported"),
            "{err}"
        );
        s.untouched();
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_byte_limit() {
        let limits = Limits {
            bytes: 1 << 20,
            ..Limits::default()
        };
        // 64 MiB of zeros as 64 gzip members of 1 MiB each (one stream,
        // as Go's reader and ours take it): about 64 KiB compressed.
        let mib = gzip(&vec![0u8; 1 << 20]);
        let zeros: Vec<u8> = std::iter::repeat_n(&mib[..], 64)
            .flatten()
            .copied()
            .collect();
        assert!(zeros.len() < 1 << 20);
        // As one file's data, and as zeros after the end of the archive.
        let mut file = header(EntryType::Regular, 0o644, 64 << 20);
        file.set_path("zeros").unwrap();
        file.set_cksum();
        let mut as_file = gzip(file.as_bytes());
        as_file.extend_from_slice(&zeros);
        for layer in [as_file, zeros] {
            let s = Scene::new();
            let err = s.apply_with(&layer, &limits).unwrap_err();
            assert!(matches!(err, LayerError::TooManyBytes(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("limit of 1048576 decompressed bytes"), "{msg}");
            s.untouched();
        }
    }

    #[test]
    fn too_many_entries_are_refused() {
        let s = Scene::new();
        let limits = Limits {
            entries: 10,
            ..Limits::default()
        };
        let mut t = Tar::new();
        for i in 0..20 {
            t = t.file(&format!("f{i}"), b"x");
        }
        let err = s.apply_with(&t.bytes(), &limits).unwrap_err().to_string();
        assert!(err.contains("more than the limit of 10 entries"), "{err}");
        // Parent directories made for an entry count too.
        let s = Scene::new();
        let layer = Tar::new().file("a/b/c/d/e/f/g/h/i/j/k", b"x").bytes();
        let err = s.apply_with(&layer, &limits).unwrap_err().to_string();
        assert!(err.contains("more than the limit of 10 entries"), "{err}");
        s.untouched();
    }

    #[test]
    fn the_limits_hold_for_the_image_not_each_layer() {
        let s = Scene::new();
        let limits = Limits {
            entries: 3,
            ..Limits::default()
        };
        let layer = Tar::new().file("a", b"x").file("b", b"x").bytes();
        let mut u = Unpacker::new(&s.root(), limits).unwrap();
        u.apply(&layer[..]).unwrap();
        let err = u.apply(&layer[..]).unwrap_err().to_string();
        assert!(err.contains("limit of 3 entries"), "{err}");
    }

    #[test]
    fn long_paths_and_link_targets_are_refused() {
        let s = Scene::new();
        let long = "d/".repeat(2100) + "f";
        let err = s.refused(&Tar::new().file(&long, b"x").bytes());
        assert!(
            err.contains("path longer than the limit of 4096 bytes"),
            "{err}"
        );
        let target = "t".repeat(5000);
        let err = s.refused(&Tar::new().symlink("l", &target).bytes());
        assert!(
            err.contains("entry l: link target longer than the limit of 4096 bytes"),
            "{err}"
        );
        s.untouched();
    }

    #[test]
    fn huge_long_names_are_stopped_before_they_are_read_whole() {
        let s = Scene::new();
        let name = "n".repeat(2 << 20);
        let err = s.refused(&Tar::new().file(&name, b"x").bytes());
        assert!(err.contains("exceed the limit of 1048576 bytes"), "{err}");
        s.untouched();
    }

    #[test]
    fn zstd_layers_are_refused() {
        let s = Scene::new();
        let err = s.refused(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]);
        assert!(err.contains("zstd"), "{err}");
    }

    #[test]
    fn garbage_is_a_read_error() {
        let s = Scene::new();
        let err = s.refused(&[7u8; 700]);
        assert!(err.starts_with("cannot read the layer"), "{err}");
        let err = s.refused(&gzip(b"not a tar, but long enough to hold a header? no")[..20]);
        assert!(err.starts_with("cannot read the layer"), "{err}");
        s.untouched();
    }

    // What layers are for.

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let s = Scene::new();
        let l1 = Tar::new()
            .dir("./")
            .dir("bin/")
            .file("bin/tool", b"v1")
            .dir("etc/")
            .file("etc/old", b"x")
            .dir("etc/gone/")
            .file("etc/gone/deep", b"y")
            .bytes();
        let l2 = Tar::new()
            .file("bin/tool", b"v2")
            .whiteout("etc/.wh.old")
            .whiteout("etc/.wh.gone")
            .whiteout("etc/.wh.never-was")
            .bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&gzip(&l1)[..]).unwrap();
        u.apply(&l2[..]).unwrap();
        assert_eq!(std::fs::read(s.at("bin/tool")).unwrap(), b"v2");
        assert_eq!(listing(&s.at("etc")), Vec::<String>::new());
        s.untouched();
    }

    #[test]
    fn parent_directories_are_created_and_symlinked_ones_followed_inside() {
        let s = Scene::new();
        let layer = Tar::new()
            .file("usr/lib/x/libx.so", b"elf")
            .symlink("lib", "usr/lib")
            .symlink("abs", "/usr")
            .file("lib/y/liby.so", b"elf")
            .file("abs/share/doc", b"txt")
            .bytes();
        s.apply(&layer).unwrap();
        assert_eq!(std::fs::read(s.at("usr/lib/y/liby.so")).unwrap(), b"elf");
        assert_eq!(std::fs::read(s.at("usr/share/doc")).unwrap(), b"txt");
        assert!(s.at("usr/lib").symlink_metadata().unwrap().is_dir());
        assert_eq!(
            s.at("usr").metadata().unwrap().mode() & 0o777,
            0o755 & !umask()
        );
        s.untouched();
    }

    #[test]
    fn whiteouts_resolve_symlinks_inside_the_root() {
        let s = Scene::new();
        let lower = Tar::new()
            .file("real/x", b"x")
            .file("real/y", b"y")
            .symlink("link", "/real")
            .bytes();
        let upper = Tar::new().whiteout("link/.wh.x").bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&lower[..]).unwrap();
        u.apply(&upper[..]).unwrap();
        assert_eq!(listing(&s.at("real")), ["y"]);
        assert!(s.at("link").symlink_metadata().unwrap().is_symlink());
    }

    #[test]
    fn an_opaque_whiteout_empties_the_directory_but_keeps_it() {
        let s = Scene::new();
        let lower = Tar::new()
            .dir("d/")
            .file("d/a", b"a")
            .dir("d/sub/")
            .file("d/sub/b", b"b")
            .symlink("d/link", "/")
            .file("e/keep", b"k")
            .bytes();
        let upper = Tar::new()
            .dir_mode("d/", 0o750)
            .whiteout("d/.wh..wh..opq")
            .file("d/new", b"n")
            .bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&lower[..]).unwrap();
        u.apply(&upper[..]).unwrap();
        assert_eq!(listing(&s.at("d")), ["new"]);
        assert_eq!(s.at("d").metadata().unwrap().mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read(s.at("e/keep")).unwrap(), b"k");
        s.untouched();
    }

    #[test]
    fn an_opaque_whiteout_spares_its_own_layer() {
        let s = Scene::new();
        let lower = Tar::new().file("d/old", b"o").file("d/sub/b", b"b").bytes();
        // The whiteout after its siblings: it hides the lower layer only.
        let upper = Tar::new()
            .file("d/new", b"n")
            .dir("d/sub/")
            .file("d/sub/c", b"c")
            .whiteout("d/.wh..wh..opq")
            .whiteout("d/.wh.new")
            .bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&lower[..]).unwrap();
        u.apply(&upper[..]).unwrap();
        assert_eq!(listing(&s.at("d")), ["new", "sub"]);
        assert_eq!(listing(&s.at("d/sub")), ["c"]);
    }

    #[test]
    fn a_file_replaces_a_directory_and_a_directory_a_file() {
        let s = Scene::new();
        let lower = Tar::new()
            .file("x/inner/deep", b"1")
            .file("y", b"was a file")
            .bytes();
        let upper = Tar::new()
            .file("x", b"now a file")
            .dir("y/")
            .file("y/inner", b"2")
            .bytes();
        let mut u = Unpacker::new(&s.root(), Limits::default()).unwrap();
        u.apply(&lower[..]).unwrap();
        u.apply(&upper[..]).unwrap();
        assert_eq!(std::fs::read(s.at("x")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(s.at("y/inner")).unwrap(), b"2");
        s.untouched();
    }

    #[test]
    fn hardlinks_inside_the_root_work() {
        let s = Scene::new();
        let layer = Tar::new()
            .file_mode("usr/bin/tool", b"elf", 0o755)
            .hardlink("usr/bin/alias", "usr/bin/tool")
            .hardlink("usr/bin/abs", "/usr/bin/tool")
            .symlink("bin", "usr/bin")
            .hardlink("via-symlink", "bin/tool")
            .hardlink("usr/bin/tool", "usr/bin/tool")
            .bytes();
        s.apply(&layer).unwrap();
        let ino = s.at("usr/bin/tool").metadata().unwrap().ino();
        for l in ["usr/bin/alias", "usr/bin/abs", "via-symlink"] {
            assert_eq!(s.at(l).symlink_metadata().unwrap().ino(), ino, "{l}");
        }
        assert_eq!(s.at("usr/bin/tool").metadata().unwrap().nlink(), 4);
    }

    #[test]
    fn hardlinks_to_nothing_or_directories_are_refused() {
        let s = Scene::new();
        let err = s.refused(&Tar::new().hardlink("x", "missing").bytes());
        assert!(
            err.contains("entry x: hardlink target missing does not exist in the image"),
            "{err}"
        );
        let err = s.refused(&Tar::new().dir("d/").hardlink("x", "d").bytes());
        assert!(
            err.contains("entry x: hardlink target d is a directory"),
            "{err}"
        );
        let err = s.refused(&Tar::new().hardlink("x", "/").bytes());
        assert!(err.contains("is a directory"), "{err}");
        s.untouched();
    }

    #[test]
    fn symlinks_are_stored_verbatim() {
        let s = Scene::new();
        let targets = ["/etc/passwd", "../../../x", "rel/target", "/", "dangling"];
        let mut t = Tar::new();
        for (i, target) in targets.iter().enumerate() {
            t = t.symlink(&format!("l/{i}"), target);
        }
        s.apply(&t.bytes()).unwrap();
        for (i, target) in targets.iter().enumerate() {
            let got = std::fs::read_link(s.at(&format!("l/{i}"))).unwrap();
            assert_eq!(got, Path::new(target));
        }
        s.untouched();
    }

    #[test]
    fn modes_owners_and_times_are_kept() {
        let s = Scene::new();
        let layer = Tar::new()
            .file_mode("setuid", b"x", 0o4755)
            .file_mode("setgid", b"x", 0o2711)
            .file_mode("private", b"x", 0o600)
            .dir_mode("tmp/", 0o1777)
            .raw(EntryType::Fifo, b"fifo", b"", b"")
            .bytes();
        s.apply(&layer).unwrap();
        for (name, mode) in [
            ("setuid", 0o4755),
            ("setgid", 0o2711),
            ("private", 0o600),
            ("tmp", 0o1777),
            ("fifo", 0o644),
        ] {
            let m = s.at(name).symlink_metadata().unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, mode, "{name}");
            assert_eq!(m.mtime(), MTIME as i64, "{name}");
        }
        assert!(s
            .at("fifo")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_fifo());
        if geteuid().is_root() {
            // Owners as archived, and setuid survives the chown.
            let mut h = header(EntryType::Regular, 0o4750, 1);
            h.set_uid(1234);
            h.set_gid(5678);
            let mut b = Builder::new(Vec::new());
            b.append_data(&mut h, "owned", &b"x"[..]).unwrap();
            let mut l = header(EntryType::Symlink, 0o777, 0);
            l.set_uid(4321);
            l.set_gid(8765);
            b.append_link(&mut l, "sym", "owned").unwrap();
            s.apply(&b.into_inner().unwrap()).unwrap();
            let m = s.at("owned").metadata().unwrap();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o4750));
            let m = s.at("sym").symlink_metadata().unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 8765));
        }
        s.untouched();
    }

    #[test]
    fn the_root_entry_leaves_the_root_as_it_is() {
        let s = Scene::new();
        std::fs::set_permissions(s.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let layer = Tar::new()
            .dir_mode("./", 0o700)
            .raw(EntryType::Directory, b"/", b"", b"")
            .raw(EntryType::Directory, b"//.", b"", b"")
            .bytes();
        s.apply(&layer).unwrap();
        assert_eq!(s.root().metadata().unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn blobs_of_a_layout_are_opened_inside_it_and_only_regular_files() {
        let s = Scene::new();
        let layer = Tar::new()
            .symlink("up", &format!("{}/file", s.sentinel()))
            .symlink("rel", "../sentinel/file")
            .raw(EntryType::Fifo, b"fifo", b"", b"")
            .file("plain", b"p")
            .bytes();
        s.apply(&layer).unwrap();
        let root = Root::open(&s.root()).unwrap();
        for name in ["up", "rel"] {
            let err = root.open_file(Path::new(name)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{name}: {err}");
        }
        let err = root.open_file(Path::new("fifo")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let mut data = String::new();
        root.open_file(Path::new("../root/plain"))
            .unwrap_err()
            .kind()
            .eq(&io::ErrorKind::NotFound)
            .then_some(())
            .unwrap();
        root.open_file(Path::new("plain"))
            .unwrap()
            .read_to_string(&mut data)
            .unwrap();
        assert_eq!(data, "p");
        s.untouched();
    }
}
