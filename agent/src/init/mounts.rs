//! The base filesystems every guest gets.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// One mount of the base layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseMount {
    /// Filesystem type, also used as the source name.
    pub fstype: &'static str,
    /// Mount point; created (mode 0755) if missing.
    pub target: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// The base layout, in mount order (each target's parent comes first).
pub const BASE_MOUNTS: &[BaseMount] = &[
    BaseMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    BaseMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    BaseMount {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    BaseMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Errors setting up the base mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("Cannot create mount point {0}")]
    MountPoint(&'static str, #[source] std::io::Error),
    #[error("Cannot mount {0} on {1}")]
    Mount(&'static str, &'static str, #[source] Errno),
}

/// Mounts [`BASE_MOUNTS`]. A target that is already a mount point is left
/// alone (the kernel may have mounted devtmpfs, or a VMM-specific init ran).
pub fn mount_base() -> Result<(), MountError> {
    BASE_MOUNTS.iter().try_for_each(BaseMount::apply)
}

impl BaseMount {
    fn apply(&self) -> Result<(), MountError> {
        std::fs::create_dir_all(self.target).map_err(|e| MountError::MountPoint(self.target, e))?;
        if is_mount_point(Path::new(self.target)) {
            return Ok(());
        }
        match mount(
            Some(self.fstype),
            self.target,
            Some(self.fstype),
            self.flags,
            self.data,
        ) {
            Ok(()) | Err(Errno::EBUSY) => Ok(()),
            Err(e) => Err(MountError::Mount(self.fstype, self.target, e)),
        }
    }
}

/// Whether `path` is the root of a mount: its device differs from its
/// parent's. (Good enough here; bind mounts of the same device look alike.)
fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_first() {
        for (i, m) in BASE_MOUNTS.iter().enumerate() {
            for later in &BASE_MOUNTS[i + 1..] {
                assert!(
                    !Path::new(m.target).starts_with(later.target),
                    "{} is mounted before its parent {}",
                    m.target,
                    later.target
                );
            }
        }
    }

    #[test]
    fn mount_points_on_this_machine() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }
}
