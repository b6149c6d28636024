//! A container rootfs that arrives as a tar archive (the containerd shim
//! sends the rootfs of a container joining a running pod VM this way,
//! through the file API, onto the scratch disk): unpacked into a directory
//! that then serves as the container's read-only lower layer.

use std::path::{Path, PathBuf};

/// Errors unpacking a rootfs archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("rootfs archive {0} must be a file under {1}")]
    Place(String, String),
    #[error("cannot unpack the rootfs archive {0}")]
    Unpack(PathBuf, #[source] std::io::Error),
}

/// Checks that `archive` is a plain path under `scratch` (no `..`).
pub fn check_place(archive: &str, scratch: &str) -> Result<PathBuf, UnpackError> {
    let p = Path::new(archive);
    let plain = p.is_absolute()
        && p.starts_with(scratch)
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !plain {
        return Err(UnpackError::Place(archive.into(), scratch.into()));
    }
    Ok(p.to_path_buf())
}

/// Unpacks `archive` into `dest` with owners, modes and links as archived
/// (the tar crate refuses entries that would land outside `dest`), then
/// deletes the archive.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), UnpackError> {
    let err = |e| UnpackError::Unpack(archive.to_path_buf(), e);
    std::fs::create_dir_all(dest).map_err(err)?;
    let file = std::fs::File::open(archive).map_err(err)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    tar.unpack(dest).map_err(err)?;
    std::fs::remove_file(archive).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_must_sit_on_the_scratch_disk() {
        let s = "/run/airlock-agent/scratch";
        assert!(check_place("/run/airlock-agent/scratch/c1.tar", s).is_ok());
        for bad in [
            "/etc/passwd",
            "relative.tar",
            "/run/airlock-agent/scratch/../x.tar",
        ] {
            assert!(check_place(bad, s).is_err(), "{bad}");
        }
    }

    #[test]
    fn links_modes_and_files_survive() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/busybox"), b"#!/bin/true\n").unwrap();
        std::os::unix::fs::symlink("busybox", src.join("bin/sh")).unwrap();
        std::fs::set_permissions(
            src.join("bin/busybox"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let archive = dir.path().join("root.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        b.follow_symlinks(false);
        b.append_dir_all(".", &src).unwrap();
        b.finish().unwrap();
        drop(b);

        let dest = dir.path().join("dest");
        unpack(&archive, &dest).unwrap();
        assert!(!archive.exists(), "the archive is deleted");
        assert_eq!(
            std::fs::read_link(dest.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dest.join("bin/busybox"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o755);
        assert!(
            unpack(&archive, &dest).is_err(),
            "a missing archive is an error"
        );
    }
}
