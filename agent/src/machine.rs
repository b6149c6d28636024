//! What the sandbox does to the machine under it, beyond the file API:
//! where its directories are, the guest's hostname and clock, the scratch
//! disk, and containers' root filesystems.
//!
//! PID 1 uses [`Guest`], the real thing. [`Fake`] is the seam for the fuzz
//! target `agent_request` (tests/fuzz), which calls the RPC handlers with
//! hostile requests, as root, on a host that is not a guest:
//! * a directory stands for the guest's `/` (the file API of container
//!   ""), and two others for the scratch disk and the bundles; they are
//!   siblings, so the file API cannot plant symlinks where the sandbox
//!   creates a container's directories;
//! * setting the hostname or the clock and mounting the scratch disk do
//!   nothing (the hostname's length is checked, as the kernel does);
//! * mounting a container's root filesystem checks the options, as the
//!   guest does, then fails. So no container is ever created: nothing
//!   reaches the launcher (which starts processes), a cgroup or a kill, and
//!   every request naming a container gets "no container".
//!
//! The production agent never builds a [`Fake`]: `rpc::serve` makes its
//! sandbox with `Sandbox::new`, which takes [`Guest`].

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::container::rootfs::{self, Layout, RootfsError};

/// The machine-level operations a sandbox needs.
pub trait Machine: Send + Sync {
    /// The guest's `/`: where file API paths of container "" resolve.
    fn root(&self) -> &Path;
    /// Where containers' writable layers live (the scratch disk).
    fn scratch(&self) -> &Path;
    /// Where containers' bundles live.
    fn bundles(&self) -> &Path;
    /// Sets the hostname.
    fn set_hostname(&self, name: &str) -> nix::Result<()>;
    /// Sets the real-time clock.
    fn set_clock(&self, epoch_seconds: i64) -> nix::Result<()>;
    /// Mounts `device` (ext4), or a tmpfs when it is empty, on
    /// [`Machine::scratch`], which exists.
    fn mount_scratch(&self, device: &str) -> nix::Result<()>;
    /// Mounts a container's image and overlay (see [`rootfs::mount_rootfs`]).
    fn mount_rootfs(
        &self,
        source: &str,
        fstype: &str,
        options: &[String],
        layout: &Layout,
    ) -> Result<(), RootfsError>;
    /// Undoes [`Machine::mount_rootfs`], best effort.
    fn unmount_rootfs(&self, layout: &Layout);
}

/// Where the writable layers live in the guest (the scratch disk, or a
/// tmpfs).
const SCRATCH: &str = airlock_protocol::GUEST_SCRATCH_DIR;
/// Where bundles live in the guest.
const BUNDLES: &str = "/run/airlock-agent/bundles";

/// This VM, as PID 1 sees it.
pub struct Guest;

impl Machine for Guest {
    fn root(&self) -> &Path {
        Path::new("/")
    }

    fn scratch(&self) -> &Path {
        Path::new(SCRATCH)
    }

    fn bundles(&self) -> &Path {
        Path::new(BUNDLES)
    }

    fn set_hostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn set_clock(&self, epoch_seconds: i64) -> nix::Result<()> {
        let ts = nix::sys::time::TimeSpec::new(epoch_seconds, 0);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
    }

    fn mount_scratch(&self, device: &str) -> nix::Result<()> {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let dir = self.scratch();
        if device.is_empty() {
            mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some("mode=0700"))
        } else {
            mount(Some(device), dir, Some("ext4"), flags, None::<&str>)
        }
    }

    fn mount_rootfs(
        &self,
        source: &str,
        fstype: &str,
        options: &[String],
        layout: &Layout,
    ) -> Result<(), RootfsError> {
        rootfs::mount_rootfs(source, fstype, options, layout)
    }

    fn unmount_rootfs(&self, layout: &Layout) {
        rootfs::unmount_rootfs(layout);
    }
}

/// A directory standing for the guest, for fuzzing (see the module's
/// comment): it never mounts, launches or signals anything.
pub struct Fake {
    root: PathBuf,
    scratch: PathBuf,
    bundles: PathBuf,
}

/// The kernel's limit on a hostname (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

impl Fake {
    /// A fake guest in `dir`: `dir/root` (the guest's `/`), `dir/scratch`
    /// and `dir/bundles`, created if missing.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let fake = Self {
            root: dir.join("root"),
            scratch: dir.join("scratch"),
            bundles: dir.join("bundles"),
        };
        for d in [&fake.root, &fake.scratch, &fake.bundles] {
            std::fs::create_dir_all(d)?;
        }
        Ok(fake)
    }
}

impl Machine for Fake {
    fn root(&self) -> &Path {
        &self.root
    }

    fn scratch(&self) -> &Path {
        &self.scratch
    }

    fn bundles(&self) -> &Path {
        &self.bundles
    }

    fn set_hostname(&self, name: &str) -> nix::Result<()> {
        if name.len() > HOST_NAME_MAX {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    fn set_clock(&self, _: i64) -> nix::Result<()> {
        Ok(())
    }

    fn mount_scratch(&self, _: &str) -> nix::Result<()> {
        Ok(())
    }

    fn mount_rootfs(
        &self,
        source: &str,
        fstype: &str,
        options: &[String],
        layout: &Layout,
    ) -> Result<(), RootfsError> {
        rootfs::image_flags(options)?;
        Err(RootfsError::Image(
            source.into(),
            fstype.into(),
            layout.lower.clone(),
            Errno::EPERM,
        ))
    }

    fn unmount_rootfs(&self, _: &Layout) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_refuses_every_mount_and_keeps_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(dir.path()).unwrap();
        assert_eq!(fake.root(), dir.path().join("root"));
        assert!(fake.scratch().is_dir() && fake.bundles().is_dir());
        let layout = Layout::new(&fake.bundles.join("c"), &fake.scratch.join("c"));
        let err = fake.mount_rootfs("/", "", &[], &layout).unwrap_err();
        assert!(matches!(err, RootfsError::Image(..)), "{err}");
        let err = fake
            .mount_rootfs("/", "", &["data=journal".into()], &layout)
            .unwrap_err();
        assert!(matches!(err, RootfsError::Option(_)), "{err}");
        // Nothing was created for the container.
        assert!(!layout.lower.exists());
        assert_eq!(fake.set_hostname(&"h".repeat(65)), Err(Errno::EINVAL));
        assert_eq!(fake.set_hostname("h"), Ok(()));
    }
}
