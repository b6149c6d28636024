//! A container's root filesystem: the workload image mounted read-only,
//! under an overlay whose writable layer lives on the sandbox's scratch
//! disk (or in guest memory when there is none).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors mounting or unmounting a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("Cannot create {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("Cannot mount the workload image {0} ({1}) at {2}")]
    Image(String, String, PathBuf, #[source] Errno),
    #[error("Cannot mount the overlay at {0}")]
    Overlay(PathBuf, #[source] Errno),
    #[error("unsupported rootfs mount option {0:?}")]
    Option(String),
}

/// Where a container's layers live.
pub struct Layout {
    /// The image, read-only.
    pub lower: PathBuf,
    /// The overlay's writable layer and its work dir.
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The merged root the container sees.
    pub rootfs: PathBuf,
}

impl Layout {
    /// Layers of a container whose bundle is `bundle`, with writable layers
    /// under `writable` (a directory on the scratch disk or a tmpfs).
    pub fn new(bundle: &Path, writable: &Path) -> Self {
        Self {
            lower: bundle.join("lower"),
            upper: writable.join("upper"),
            work: writable.join("work"),
            rootfs: bundle.join("rootfs"),
        }
    }
}

/// The mount flags of the workload image given the runtime's `options`;
/// an option the agent does not know is refused.
pub fn image_flags(options: &[String]) -> Result<MsFlags, RootfsError> {
    let mut flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
    for opt in options {
        match opt.as_str() {
            "ro" | "rw" => {} // the image is always read-only
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => return Err(RootfsError::Option(other.to_string())),
        }
    }
    Ok(flags)
}

/// Mounts `source` (a block device with `fstype`, or a directory when
/// `fstype` is empty) read-only at `layout.lower` and the overlay at
/// `layout.rootfs`.
pub fn mount_rootfs(
    source: &str,
    fstype: &str,
    options: &[String],
    layout: &Layout,
) -> Result<(), RootfsError> {
    for dir in [&layout.lower, &layout.upper, &layout.work, &layout.rootfs] {
        std::fs::create_dir_all(dir).map_err(|e| RootfsError::Dir(dir.clone(), e))?;
    }
    let flags = image_flags(options)?;
    let image_err = |e| RootfsError::Image(source.into(), fstype.into(), layout.lower.clone(), e);
    if fstype.is_empty() {
        mount(
            Some(source),
            &layout.lower,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(image_err)?;
        mount(
            None::<&str>,
            &layout.lower,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
            None::<&str>,
        )
        .map_err(image_err)?;
    } else {
        mount(
            Some(source),
            &layout.lower,
            Some(fstype),
            flags,
            None::<&str>,
        )
        .map_err(image_err)?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        layout.lower.display(),
        layout.upper.display(),
        layout.work.display()
    );
    if let Err(e) = mount(
        Some("overlay"),
        &layout.rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    ) {
        umount2(&layout.lower, MntFlags::MNT_DETACH).ok();
        return Err(RootfsError::Overlay(layout.rootfs.clone(), e));
    }
    Ok(())
}

/// Unmounts what [`mount_rootfs`] mounted and deletes the writable layer.
/// Best effort: teardown goes on whatever fails.
pub fn unmount_rootfs(layout: &Layout) {
    for dir in [&layout.rootfs, &layout.lower] {
        umount2(dir, MntFlags::MNT_DETACH).ok();
    }
    std::fs::remove_dir_all(&layout.upper).ok();
    std::fs::remove_dir_all(&layout.work).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_options_are_refused_before_mounting() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("b"), &dir.path().join("w"));
        let err = mount_rootfs("/dev/null", "ext4", &["data=journal".into()], &layout).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported rootfs mount option \"data=journal\""
        );
        assert_eq!(layout.rootfs, dir.path().join("b/rootfs"));
        assert_eq!(layout.upper, dir.path().join("w/upper"));
    }
}
