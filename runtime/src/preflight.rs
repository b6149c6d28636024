//! What a host needs before `airlock run` can start a sandbox, in one place:
//! `airlock doctor` lists every check ([`checks`]); a sandbox's creation
//! checks the config's files and the state dir where it uses them, and the
//! host with [`check_host`], which returns the most basic failure first (no
//! usable KVM before the jail's root and cgroup v2 needs).
//!
//! The host is reached through [`Host`] so that tests can fake KVM, the
//! effective uid and the filesystem under the cgroup parent.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, RuntimeConfig};
use crate::scratch::{self, ScratchError};

/// statfs(2) `f_type` of a cgroup v2 mount.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors of one precondition; the message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "no /dev/kvm: this host has no KVM. Enable VT-x/AMD-V in the firmware (or nested \
         virtualisation on a cloud VM) and load kvm_intel or kvm_amd"
    )]
    NoKvm,
    #[error("Cannot open /dev/kvm read-write: run as root or join the kvm group")]
    KvmAccess(#[source] std::io::Error),
    #[error(
        "/dev/kvm is kvm_pvm, a paravirtual KVM: it cannot boot unmodified Linux guests; use a \
         host with VT-x/AMD-V (on this machine, run airlock inside tests/testhost/run)"
    )]
    KvmPvm,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Cannot create the state dir {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    StateMemory(#[from] ScratchError),
    #[error(
        "the VMM jail needs root: run airlock as root, or set [jail] enabled = false \
         (weaker isolation)"
    )]
    NotRoot,
    #[error("Cannot statfs {0}")]
    Statfs(PathBuf, #[source] nix::Error),
    #[error(
        "{0} is not on a cgroup v2 filesystem (a cgroup v1 host?): boot with \
         systemd.unified_cgroup_hierarchy=1, or set [jail] cgroup_parent to a cgroup v2 directory"
    )]
    NotCgroup2(PathBuf),
    #[error(transparent)]
    Net(Box<crate::net::NetError>),
}

/// The host as the checks see it.
pub trait Host {
    /// `/dev/kvm` exists, opens read-write and is hardware KVM; `Ok` names
    /// the module.
    fn kvm(&self) -> Result<String, PreflightError>;
    /// The effective uid is 0.
    fn is_root(&self) -> bool;
    /// statfs(2) `f_type` of the filesystem holding `path`.
    fn fs_type(&self, path: &Path) -> nix::Result<i64>;
}

/// This machine.
pub struct RealHost;

impl Host for RealHost {
    fn kvm(&self) -> Result<String, PreflightError> {
        let dev = Path::new("/dev/kvm");
        if !dev.exists() {
            return Err(PreflightError::NoKvm);
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(PreflightError::KvmAccess)?;
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        if module("kvm_pvm") {
            return Err(PreflightError::KvmPvm);
        }
        Ok(match (module("kvm_intel"), module("kvm_amd")) {
            (true, _) => "/dev/kvm (kvm_intel)",
            (_, true) => "/dev/kvm (kvm_amd)",
            _ => "/dev/kvm (module unknown; assuming hardware KVM)",
        }
        .into())
    }

    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn fs_type(&self, path: &Path) -> nix::Result<i64> {
        Ok(nix::sys::statfs::statfs(path)?.filesystem_type().0 as i64)
    }
}

/// One precondition's outcome: `Ok` holds what was found.
pub struct Outcome {
    pub name: &'static str,
    pub result: Result<String, PreflightError>,
    /// Passes, with a caveat: isolation is weaker (the jail is off), or
    /// a feature is unavailable (a network mode).
    pub warning: bool,
}

impl Outcome {
    fn new(name: &'static str, result: Result<String, PreflightError>) -> Self {
        Self {
            name,
            result,
            warning: false,
        }
    }
}

/// Every precondition of `airlock run`, most basic first.
pub fn checks(config: &RuntimeConfig, host: &dyn Host) -> Vec<Outcome> {
    vec![
        Outcome::new("kvm", host.kvm()),
        Outcome::new(
            "vmm",
            config
                .vmm_binary_path()
                .map(|p| p.display().to_string())
                .map_err(PreflightError::from),
        ),
        Outcome::new(
            "guest",
            config
                .check_artifacts()
                .map(|()| {
                    format!(
                        "kernel {}, initramfs {}",
                        config.kernel.display(),
                        config.initrd.display()
                    )
                })
                .map_err(PreflightError::from),
        ),
        Outcome::new("state dir", state_dir(&config.state_dir)),
        jail(config, host),
        net(config, "net egress", crate::net::support::check_egress()),
        net(config, "net pods", crate::net::support::check_pods()),
    ]
}

/// A network check's outcome. Networks are optional: unless the config
/// makes `--net egress` the default, a missing piece is a warning that
/// says only `--net none` works.
fn net(
    config: &RuntimeConfig,
    name: &'static str,
    r: Result<String, crate::net::NetError>,
) -> Outcome {
    match r {
        Err(e) if config.network.mode == crate::net::NetMode::None => Outcome {
            name,
            result: Ok(format!("{e}; until then only --net none works")),
            warning: true,
        },
        r => Outcome::new(name, r.map_err(|e| PreflightError::Net(Box::new(e)))),
    }
}

/// Whether this user may start a jailed VMM (root), checked before
/// anything else: a user who is not root may not read what the others
/// need either.
pub fn check_user(config: &RuntimeConfig) -> Result<(), PreflightError> {
    check_user_on(config, &RealHost)
}

/// [`check_user`] on `host`.
pub fn check_user_on(config: &RuntimeConfig, host: &dyn Host) -> Result<(), PreflightError> {
    match config.jail.enabled && !host.is_root() {
        true => Err(PreflightError::NotRoot),
        false => Ok(()),
    }
}

/// The first failed precondition of this host for a sandbox, if any: a
/// usable KVM, then the jail.
pub fn check_host(config: &RuntimeConfig) -> Result<(), PreflightError> {
    check_host_on(config, &RealHost)
}

/// [`check_host`] on `host`.
pub fn check_host_on(config: &RuntimeConfig, host: &dyn Host) -> Result<(), PreflightError> {
    host.kvm()?;
    jail(config, host).result.map(drop)
}

/// Creatable and in memory (scratch disks live there).
fn state_dir(dir: &Path) -> Result<String, PreflightError> {
    std::fs::create_dir_all(dir).map_err(|e| PreflightError::StateDir(dir.into(), e))?;
    scratch::check_memory_backed(dir)?;
    Ok(format!("{} (in memory)", dir.display()))
}

/// The VMM jail: on and able to run (root, cgroup v2 under `cgroup_parent`),
/// or off, a warning.
fn jail(config: &RuntimeConfig, host: &dyn Host) -> Outcome {
    if !config.jail.enabled {
        return Outcome {
            name: "jail",
            result: Ok(
                "disabled ([jail] enabled = false): each VMM runs unjailed, with its \
                        seccomp filters only between a guest that escapes KVM and this host"
                    .into(),
            ),
            warning: true,
        };
    }
    Outcome::new("jail", jail_ready(config, host))
}

fn jail_ready(config: &RuntimeConfig, host: &dyn Host) -> Result<String, PreflightError> {
    if !host.is_root() {
        return Err(PreflightError::NotRoot);
    }
    let parent = &config.jail.cgroup_parent;
    // The parent is created at the first start: its nearest existing
    // ancestor tells the filesystem it will be on.
    let mount = parent
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = host
        .fs_type(mount)
        .map_err(|e| PreflightError::Statfs(mount.into(), e))?;
    if fs != CGROUP2_SUPER_MAGIC {
        return Err(PreflightError::NotCgroup2(mount.into()));
    }
    Ok(format!(
        "uid {}, cgroups under {}",
        config.jail.uid,
        parent.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TMPFS_MAGIC: i64 = 0x0102_1994;

    struct Fake {
        kvm: bool,
        root: bool,
        fs: i64,
    }

    impl Host for Fake {
        fn kvm(&self) -> Result<String, PreflightError> {
            if self.kvm {
                Ok("fake".into())
            } else {
                Err(PreflightError::NoKvm)
            }
        }
        fn is_root(&self) -> bool {
            self.root
        }
        fn fs_type(&self, _: &Path) -> nix::Result<i64> {
            Ok(self.fs)
        }
    }

    /// A config whose kernel, initramfs, VMM and state dir all exist.
    fn config(dir: &Path) -> RuntimeConfig {
        let mut c = RuntimeConfig::default();
        for f in ["vmlinux", "initrd", "airlock-vmm"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        c.kernel = dir.join("vmlinux");
        c.initrd = dir.join("initrd");
        c.vmm_binary = Some(dir.join("airlock-vmm"));
        c.state_dir =
            Path::new("/dev/shm").join(format!("airlock-preflight-{}", std::process::id()));
        c.jail.enabled = true;
        c.jail.cgroup_parent = dir.join("cgroup/airlock");
        c
    }

    #[test]
    fn a_ready_host_passes() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let host = Fake {
            kvm: true,
            root: true,
            fs: CGROUP2_SUPER_MAGIC,
        };
        check_host_on(&c, &host).unwrap();
        std::fs::remove_dir(&c.state_dir).ok();
    }

    #[test]
    fn a_cgroup_v1_host_fails_on_the_cgroup_root() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let host = Fake {
            kvm: true,
            root: true,
            fs: TMPFS_MAGIC,
        };
        let err = check_host_on(&c, &host).unwrap_err();
        std::fs::remove_dir(&c.state_dir).ok();
        match err {
            PreflightError::NotCgroup2(p) => assert_eq!(p, dir.path()),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn no_kvm_comes_before_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.kernel = dir.path().join("missing");
        let host = Fake {
            kvm: false,
            root: false,
            fs: TMPFS_MAGIC,
        };
        let err = check_host_on(&c, &host).unwrap_err();
        assert!(matches!(err, PreflightError::NoKvm), "{err}");
        let all = checks(&c, &host);
        let failed: Vec<_> = all
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| o.name)
            .collect();
        assert_eq!(failed, ["kvm", "guest", "jail"]);
        std::fs::remove_dir(&c.state_dir).ok();
    }

    #[test]
    fn the_jail_needs_root_before_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let host = Fake {
            kvm: true,
            root: false,
            fs: TMPFS_MAGIC,
        };
        let err = check_host_on(&c, &host).unwrap_err();
        std::fs::remove_dir(&c.state_dir).ok();
        assert!(matches!(err, PreflightError::NotRoot), "{err}");
    }

    #[test]
    fn a_disabled_jail_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.jail.enabled = false;
        let host = Fake {
            kvm: true,
            root: false,
            fs: TMPFS_MAGIC,
        };
        let all = checks(&c, &host);
        std::fs::remove_dir(&c.state_dir).ok();
        let jail = all.iter().find(|o| o.name == "jail").unwrap();
        assert!(jail.result.is_ok() && jail.warning);
    }

    /// A host whose /dev/kvm this user cannot open.
    struct NoAccess;

    impl Host for NoAccess {
        fn kvm(&self) -> Result<String, PreflightError> {
            Err(PreflightError::KvmAccess(
                std::io::ErrorKind::PermissionDenied.into(),
            ))
        }
        fn is_root(&self) -> bool {
            false
        }
        fn fs_type(&self, _: &Path) -> nix::Result<i64> {
            Ok(CGROUP2_SUPER_MAGIC)
        }
    }

    #[test]
    fn a_user_who_is_not_root_is_told_so_first_when_the_jail_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        let err = check_user_on(&c, &NoAccess).unwrap_err();
        assert!(matches!(err, PreflightError::NotRoot), "{err}");
        c.jail.enabled = false;
        check_user_on(&c, &NoAccess).unwrap();
        let err = check_host_on(&c, &NoAccess).unwrap_err();
        assert!(matches!(err, PreflightError::KvmAccess(_)), "{err}");
    }
}
