//! The layer applier's tests: hostile layers against a sentinel outside
//! the root, and what ordinary layers must do.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use tar::{Builder, EntryType, Header};

use nix::unistd::geteuid;

use super::*;

mod apply;

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
        airlock_report::chain(&err)
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
                let err = airlock_report::chain(&applied.unwrap_err());
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
