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
use std::ffi::OsStr;
use std::fs::File;
use std::hash::{BuildHasher, DefaultHasher, Hasher, RandomState};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, ResolveFlag};
use nix::sys::stat::{mkdirat, mknodat, Mode, SFlag};
use nix::unistd::{linkat, symlinkat};

mod input;
mod meta;
mod root;

use input::{decompressed, Budget, Meter};
use meta::Meta;
pub(crate) use root::Root;
use root::{is_dir, names, open_subdir, remove_at, stat_at, too_deep};

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
mod tests;
