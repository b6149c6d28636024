//! What the sandbox does to the machine under it, beyond the file API:
//! where its directories are, the guest's hostname and clock, the scratch
//! disk, and containers' root filesystems.
//!
//! PID 1 uses [`Guest`], the real thing. [`Fake`] (`fake.rs`) is the seam
//! for the fuzz target `agent_request` (tests/fuzz), which calls the RPC
//! handlers with hostile requests, as root, on a host that is not a guest,
//! and for the unit tests of the sandbox and the RPC service:
//! * a directory stands for the guest's `/` (the file API of container
//!   ""), and two others for the scratch disk and the bundles; they are
//!   siblings, so the file API cannot plant symlinks where the sandbox
//!   creates a container's directories;
//! * setting the hostname or the clock and mounting the scratch disk do
//!   nothing (the hostname's length is checked, as the kernel does);
//! * configuring the network records the configuration (see
//!   [`Fake::network_log`]) after finding each NIC by its MAC among the
//!   fake's one NIC ([`Fake::NIC_MAC`]) as the guest does; the DNS files
//!   are written for real, in a fourth directory;
//! * mounting a container's root filesystem checks the options, as the
//!   guest does, then fails. So no container is ever created: nothing
//!   reaches the launcher (which starts processes), a cgroup or a kill, and
//!   every request naming a container gets "no container";
//! * unless it was made with [`Fake::with_processes`] (unit tests only):
//!   then a container's rootfs is a plain directory and its processes are
//!   the host's, started from the spec's args without namespaces or
//!   cgroups (see `fake.rs`).
//!
//! The production agent never builds a [`Fake`]: `rpc::serve` makes its
//! sandbox with `Sandbox::new`, which takes [`Guest`].

mod fake;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use nix::mount::{mount, MsFlags};

use crate::container::rootfs::{self, Layout, RootfsError};
use crate::launcher::{self, LaunchError, Reply, Request};
use crate::network::config::Config as NetworkConfig;
use crate::network::link::{self, LinkError};
use crate::process::exits::Exits;

pub use fake::Fake;

/// A launcher operation under way (see [`Machine::launch`]).
pub type Launch<'a> = Pin<Box<dyn Future<Output = Result<Reply, LaunchError>> + Send + 'a>>;

/// The machine-level operations a sandbox needs.
pub trait Machine: Send + Sync {
    /// The guest's `/`: where file API paths of container "" resolve.
    fn root(&self) -> &Path;
    /// Where containers' writable layers live (the scratch disk).
    fn scratch(&self) -> &Path;
    /// Where containers' bundles live.
    fn bundles(&self) -> &Path;
    /// Where the sandbox's `resolv.conf` and `hosts` live (see
    /// `network/dns.rs`), which every container mounts.
    fn net_dir(&self) -> &Path;
    /// Configures the NICs, `lo` and the routes (see `network/link.rs`).
    fn configure_network(&self, config: &NetworkConfig) -> Result<(), LinkError>;
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
    /// Performs one OCI operation (see [`launcher::call`]).
    fn launch<'a>(&'a self, exits: &'a Arc<Exits>, req: Request, fds: Vec<OwnedFd>) -> Launch<'a>;
}

/// Where the writable layers live in the guest (the scratch disk, or a
/// tmpfs).
const SCRATCH: &str = airlock_protocol::GUEST_SCRATCH_DIR;
/// Where bundles live in the guest.
const BUNDLES: &str = "/run/airlock-agent/bundles";
/// Where the DNS files live in the guest.
const NET_DIR: &str = "/run/airlock-agent/net";

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

    fn net_dir(&self) -> &Path {
        Path::new(NET_DIR)
    }

    fn configure_network(&self, config: &NetworkConfig) -> Result<(), LinkError> {
        link::apply(config)
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

    fn launch<'a>(&'a self, exits: &'a Arc<Exits>, req: Request, fds: Vec<OwnedFd>) -> Launch<'a> {
        Box::pin(launcher::call(exits, req, fds))
    }
}
