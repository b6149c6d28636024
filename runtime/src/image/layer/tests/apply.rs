//! What layers are for: applying them as the OCI image spec says.

use super::*;

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
