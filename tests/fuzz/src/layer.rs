//! An OCI image layer as a hostile image would give it (a tar stream,
//! gzip'd when it starts with the gzip magic: the applier sniffs it),
//! applied to a root with a sentinel directory beside it, within small
//! limits. Whatever the layer does, the applier may refuse it but must
//! never touch anything outside the root.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use airlock_runtime::image::layer::{self, Limits};

const SENTINEL: &[u8] = b"outside the root\n";

/// Small enough for libFuzzer's pace, large enough for a few files.
const LIMITS: Limits = Limits {
    bytes: 4 << 20,
    entries: 256,
    path_bytes: 4096,
};

/// The whole input is the layer.
pub fn layer(data: &[u8]) {
    let Ok(tmp) = tempfile::tempdir() else {
        return;
    };
    let root = tmp.path().join("root");
    let sentinel = tmp.path().join("sentinel");
    let file = sentinel.join("file");
    let made = std::fs::create_dir(&root)
        .and_then(|()| std::fs::create_dir(&sentinel))
        .and_then(|()| std::fs::write(&file, SENTINEL));
    if made.is_err() {
        return;
    }
    let before = std::fs::symlink_metadata(&file).map(|m| (m.ino(), m.mode(), m.mtime()));
    let _ = layer::apply(data, &root, &LIMITS);
    assert_eq!(names(tmp.path()), ["root", "sentinel"], "beside the root");
    assert_eq!(names(&sentinel), ["file"], "in the sentinel directory");
    let m = std::fs::symlink_metadata(&file).expect("the sentinel file");
    assert_eq!(std::fs::read(&file).ok().as_deref(), Some(SENTINEL));
    assert_eq!(m.nlink(), 1, "a hardlink to the sentinel file");
    let after = (m.ino(), m.mode(), m.mtime());
    assert_eq!(
        before.ok(),
        Some(after),
        "the sentinel file's inode, mode or mtime"
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/layer");
        std::fs::read(dir.join(name)).unwrap()
    }

    #[test]
    fn the_seeds_get_past_the_first_checks() {
        for name in ["plain", "gzip", "pax"] {
            let root = tempfile::tempdir().unwrap();
            layer::apply(&seed(name)[..], root.path(), &LIMITS).unwrap();
            assert!(
                root.path().join("bin/tool").exists() || name == "pax",
                "{name}"
            );
        }
        let root = tempfile::tempdir().unwrap();
        let err = layer::apply(&seed("escape")[..], root.path(), &LIMITS).unwrap_err();
        assert!(err.to_string().starts_with("entry "), "{err}");
    }
}
