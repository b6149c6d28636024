//! The runtime's configuration: TOML, every key optional, defaults
//! compiled in, so no file is needed.
//!
//! ```toml
//! vcpus = 2
//! memory_mib = 512
//! [timeouts]
//! agent_connect_secs = 60
//! [limits]
//! max_vcpus = 4
//! max_memory_mib = 4096
//! [jail]
//! uid = 990
//! gid = 990
//! [network]
//! mode = "egress"
//! deny_out = ["0.0.0.0/0"]
//! allow_out = ["api.example.com"]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_vmm_api::limits;
use serde::{Deserialize, Serialize};

/// The fewest MiB of memory a guest gets (the kernel, the initramfs and
/// the agent must fit): `airlock_vmm_api::limits::GUEST_MIN_MEMORY_MIB`.
pub const MIN_MEMORY_MIB: u32 = limits::GUEST_MIN_MEMORY_MIB as u32;
/// The most vCPUs a VM has (`airlock-vmm`'s own limit).
pub use airlock_vmm_api::limits::MAX_VCPUS;
/// Seconds added to a VMM's stop grace beyond its own stop and the wipe.
pub const STOP_GRACE_SLACK_SECS: u64 = 5;

/// Errors loading or checking the configuration, and sizes it refuses.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the config file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("malformed config file {0}: {1}")]
    Malformed(PathBuf, String),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("kernel not found at {0}: run scripts/setup (it builds the guest image), or set `kernel` in the config")]
    NoKernel(PathBuf),
    #[error("initramfs not found at {0}: run scripts/setup (it builds the guest image), or set `initrd` in the config")]
    NoInitrd(PathBuf),
    #[error("airlock-vmm not found at {} nor on $PATH: build it (scripts/setup), or set `vmm_binary` in the config", .0.display())]
    NoVmm(PathBuf),
    #[error("0 vCPUs: a microVM needs at least 1")]
    NoVcpus,
    #[error("{asked} vCPUs is more than runtime config [limits] max_vcpus = {max}")]
    TooManyVcpus { asked: u64, max: u8 },
    #[error("{asked} vCPUs is more than the {MAX_VCPUS} a microVM can have")]
    VcpusOverVmm { asked: u64 },
    #[error("{asked} MiB of memory is less than the {MIN_MEMORY_MIB} MiB a guest needs")]
    TooLittleMemory { asked: u64 },
    #[error("{asked} MiB of memory is more than this host's {host} MiB")]
    MoreThanHost { asked: u64, host: u64 },
    #[error("{asked} MiB of memory is more than runtime config [limits] max_memory_mib = {max}")]
    TooMuchMemory { asked: u64, max: u32 },
}

impl ConfigError {
    /// Whether it refuses a number of vCPUs (else memory, or no size).
    pub fn is_vcpus(&self) -> bool {
        matches!(
            self,
            Self::NoVcpus | Self::VcpusOverVmm { .. } | Self::TooManyVcpus { .. }
        )
    }
}

/// Timeouts, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From starting the VMM to the agent answering.
    pub agent_connect_secs: u64,
    /// What the VMM gives its own stop: from the SIGTERM it forwards to
    /// the VM's process to killing that process (`--stop-grace-secs`).
    pub teardown_secs: u64,
    /// How fast a guest's memory is wiped, at the slowest, in MiB/s
    /// (under software emulation a wipe runs at about 30 MiB/s): the
    /// runtime SIGKILLs a VMM, which skips the wipe, only after
    /// [`Timeouts::stop_grace`].
    pub wipe_mib_per_sec: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            agent_connect_secs: 30,
            teardown_secs: 10,
            wipe_mib_per_sec: 32,
        }
    }
}

impl Timeouts {
    /// How long the runtime waits, after its SIGTERM, for the VMM of a
    /// guest of `memory_mib` to exit before SIGKILLing it (which skips the
    /// wipe): the VMM's own stop, the wipe at `wipe_mib_per_sec`, and
    /// [`STOP_GRACE_SLACK_SECS`].
    pub fn stop_grace(&self, memory_mib: u32) -> Duration {
        let wipe = u64::from(memory_mib).div_ceil(self.wipe_mib_per_sec.max(1));
        Duration::from_secs(
            self.teardown_secs
                .saturating_add(wipe)
                .saturating_add(STOP_GRACE_SLACK_SECS),
        )
    }
}

/// What a sandbox may ask for at most, whoever asks: pod annotations, the
/// pod's CRI limits, `airlock --cpus/--memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// vCPUs of one VM (at most 32).
    pub max_vcpus: u8,
    /// Guest memory of one VM, in MiB.
    pub max_memory_mib: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vcpus: 8,
            max_memory_mib: 8192,
        }
    }
}

/// How each VMM is jailed (see `jail.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailSettings {
    /// Jail every VMM: new pid/mount/net/ipc/uts namespaces, a root of its
    /// own, no capabilities, `no_new_privs`, an unprivileged user, a cgroup
    /// and rlimits. Needs root. `false` leaves only the VMM's seccomp
    /// filters between a guest that escapes KVM and the host.
    pub enabled: bool,
    /// The user and group each VMM runs as when `uid_count` is 0.
    pub uid: u32,
    pub gid: u32,
    /// Each VMM (and its keeper) runs as a uid of its own, with the gid of
    /// the same number, from `uid_base` .. `uid_base + uid_count`: no two
    /// sandboxes share the per-user limits of the kernel (pending signals,
    /// locked memory, pipe buffers) or anything else a uid owns. 0: they
    /// all run as `uid`/`gid`.
    pub uid_base: u32,
    pub uid_count: u32,
    /// The cgroup v2 directory under which each VMM gets `<sandbox id>/`.
    pub cgroup_parent: PathBuf,
    /// The VMM's memory.max: guest memory plus this much.
    pub memory_overhead_mib: u64,
    /// The VMM's pids.max (its threads: main, vCPUs, device workers).
    pub pids_max: u32,
}

impl Default for JailSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            uid: 65534,
            gid: 65534,
            uid_base: 524_288,
            uid_count: 65_536,
            cgroup_parent: PathBuf::from("/sys/fs/cgroup/airlock"),
            memory_overhead_mib: 64,
            pids_max: 64,
        }
    }
}

/// The runtime's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The VMM; default: `airlock-vmm` beside this executable, else $PATH.
    pub vmm_binary: Option<PathBuf>,
    /// Guest kernel (vmlinux with the PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent as /init.
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Size of each sandbox's (sparse) scratch disk.
    pub scratch_mib: u64,
    /// Where sandboxes keep their state (`<state_dir>/<id>/`).
    pub state_dir: PathBuf,
    /// Named images (`<image_dir>/<name>.ext4`) and converted ones.
    pub image_dir: PathBuf,
    pub default_image: String,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub jail: JailSettings,
    /// `--net` and the egress policy's defaults ([`crate::net`]).
    pub network: crate::net::NetworkSettings,
}

/// The bounds on a VM's size that hold whatever the config says: 1 to
/// [`MAX_VCPUS`] vCPUs, at least [`MIN_MEMORY_MIB`] and at most this
/// host's memory. [`RuntimeConfig::check_vm_size`] adds the config's own
/// [limits]; the CLI checks its flags with this before any config is read.
pub fn check_size_bounds(vcpus: u64, memory_mib: u64) -> Result<(), ConfigError> {
    if vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if vcpus > u64::from(MAX_VCPUS) {
        return Err(ConfigError::VcpusOverVmm { asked: vcpus });
    }
    if memory_mib < u64::from(MIN_MEMORY_MIB) {
        return Err(ConfigError::TooLittleMemory { asked: memory_mib });
    }
    match limits::host_memory_mib() {
        Some(host) if memory_mib > host => Err(ConfigError::MoreThanHost {
            asked: memory_mib,
            host,
        }),
        _ => Ok(()),
    }
}

/// `${AIRLOCK_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/airlock}`, as the
/// setup scripts use it.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AIRLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("airlock")
}

fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/airlock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => Path::new(&d).join("airlock"),
        None => PathBuf::from(format!("/tmp/airlock-{uid}")),
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let cache = cache_dir();
        Self {
            vmm_binary: None,
            kernel: cache.join("guest/default/vmlinux"),
            initrd: cache.join("guest/default/initramfs.cpio"),
            vcpus: 1,
            memory_mib: 256,
            scratch_mib: 1024,
            state_dir: default_state_dir(),
            image_dir: cache.join("images"),
            default_image: "default".into(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            jail: JailSettings::default(),
            network: crate::net::NetworkSettings::default(),
        }
    }
}

impl RuntimeConfig {
    /// Loads `path`, else `$AIRLOCK_CONFIG`, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = path.map(Path::to_path_buf).or_else(|| {
            std::env::var_os("AIRLOCK_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        });
        let config = match path {
            None => Self::default(),
            Some(p) => {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| ConfigError::Read(p.clone(), e))?;
                Self::parse(&text).map_err(|msg| ConfigError::Malformed(p, msg))?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML; the error is one line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {msg}")
                }
                None => msg,
            }
        })
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Invalid(format!(
                "vcpus = {}: use 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=65536).contains(&self.memory_mib) {
            return Err(ConfigError::Invalid(format!(
                "memory_mib = {}: use {MIN_MEMORY_MIB} to 65536",
                self.memory_mib
            )));
        }
        if !(self.vcpus..=MAX_VCPUS).contains(&self.limits.max_vcpus) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_vcpus = {}: use {} (vcpus, the default size) to {MAX_VCPUS}",
                self.limits.max_vcpus, self.vcpus
            )));
        }
        if self.limits.max_memory_mib < self.memory_mib {
            return Err(ConfigError::Invalid(format!(
                "limits.max_memory_mib = {}: use at least {} (memory_mib, the default size)",
                self.limits.max_memory_mib, self.memory_mib
            )));
        }
        self.network
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[network]: {e}")))?;
        if !(16..=1 << 20).contains(&self.scratch_mib) {
            return Err(ConfigError::Invalid(format!(
                "scratch_mib = {}: use 16 to 1048576",
                self.scratch_mib
            )));
        }
        // A sandbox's vsock socket is <state_dir>/<12-hex id>/root/vsock.sock,
        // and a Unix socket's path holds at most 107 bytes.
        let socket_len = self.state_dir.as_os_str().len() + "/0123456789ab/vsock.sock".len();
        if socket_len > 107 {
            return Err(ConfigError::Invalid(format!(
                "state_dir = {:?} is too long: a sandbox's vsock socket under it would be a {socket_len}-byte path, and Unix socket paths hold at most 107; use a shorter state_dir",
                self.state_dir
            )));
        }
        let (base, count) = (self.jail.uid_base, self.jail.uid_count);
        if count > 0 && (base == 0 || base.checked_add(count).is_none_or(|end| end == u32::MAX)) {
            return Err(ConfigError::Invalid(format!(
                "jail.uid_base = {base}, jail.uid_count = {count}: the range must start above 0 \
                 and end below 4294967295 (uid_count = 0 runs every VMM as jail.uid)"
            )));
        }
        if self.jail.enabled && self.jail.pids_max < 8 {
            return Err(ConfigError::Invalid(format!(
                "jail.pids_max = {}: the VMM needs at least 8 (main, vCPUs, device workers)",
                self.jail.pids_max
            )));
        }
        if self.timeouts.agent_connect_secs == 0 {
            return Err(ConfigError::Invalid(
                "timeouts.agent_connect_secs must be at least 1".into(),
            ));
        }
        if self.timeouts.wipe_mib_per_sec == 0 {
            return Err(ConfigError::Invalid(
                "timeouts.wipe_mib_per_sec must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Checks a VM size that a pod, its annotations or the command line
    /// ask for against `[limits]` (the one definition of what a sandbox
    /// may have); returns it as the VMM takes it.
    pub fn check_vm_size(&self, vcpus: u64, memory_mib: u64) -> Result<(u8, u32), ConfigError> {
        // The config's limits first: they are within the bounds, and the
        // operator's own number is the one to name.
        let max = self.limits.max_vcpus;
        let Some(fit_vcpus) = u8::try_from(vcpus).ok().filter(|n| *n <= max) else {
            return Err(ConfigError::TooManyVcpus { asked: vcpus, max });
        };
        let max = self.limits.max_memory_mib;
        let Some(fit_memory) = u32::try_from(memory_mib).ok().filter(|m| *m <= max) else {
            return Err(ConfigError::TooMuchMemory {
                asked: memory_mib,
                max,
            });
        };
        // Then what holds whatever the config says: no 0 vCPUs, enough
        // memory for a guest, no more than the host has.
        check_size_bounds(vcpus, memory_mib)?;
        Ok((fit_vcpus, fit_memory))
    }

    /// Checks that the guest kernel and initramfs exist.
    pub fn check_artifacts(&self) -> Result<(), ConfigError> {
        if !self.kernel.is_file() {
            return Err(ConfigError::NoKernel(self.kernel.clone()));
        }
        if !self.initrd.is_file() {
            return Err(ConfigError::NoInitrd(self.initrd.clone()));
        }
        Ok(())
    }

    /// The VMM binary to start.
    pub fn vmm_binary_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(p) = &self.vmm_binary {
            return if p.is_file() {
                Ok(p.clone())
            } else {
                Err(ConfigError::Invalid(format!(
                    "vmm_binary {} does not exist",
                    p.display()
                )))
            };
        }
        crate::procs::find_binary("airlock-vmm").map_err(ConfigError::NoVmm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = RuntimeConfig::parse("").unwrap();
        assert_eq!(c, RuntimeConfig::default());
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        assert_eq!((c.limits.max_vcpus, c.limits.max_memory_mib), (8, 8192));
        assert_eq!(c.timeouts.wipe_mib_per_sec, 32);
        assert!(c.kernel.ends_with("guest/default/vmlinux"));
        c.validate().unwrap();
    }

    #[test]
    fn limits_are_read_and_checked_at_load() {
        let c = RuntimeConfig::parse("[limits]\nmax_vcpus = 2\nmax_memory_mib = 1024\n").unwrap();
        assert_eq!((c.limits.max_vcpus, c.limits.max_memory_mib), (2, 1024));
        c.validate().unwrap();
        for (toml, needle) in [
            (
                "[limits]\nmax_vcpus = 0\n",
                "limits.max_vcpus = 0: use 1 (vcpus",
            ),
            (
                "vcpus = 4\n[limits]\nmax_vcpus = 2\n",
                "limits.max_vcpus = 2: use 4 (vcpus",
            ),
            (
                "[limits]\nmax_vcpus = 33\n",
                "limits.max_vcpus = 33: use 1 (vcpus, the default size) to 32",
            ),
            (
                "[limits]\nmax_memory_mib = 0\n",
                "limits.max_memory_mib = 0: use at least 256 (memory_mib",
            ),
            (
                "memory_mib = 2048\n[limits]\nmax_memory_mib = 1024\n",
                "limits.max_memory_mib = 1024: use at least 2048",
            ),
            (
                "[timeouts]\nwipe_mib_per_sec = 0\n",
                "timeouts.wipe_mib_per_sec must be at least 1",
            ),
        ] {
            let err = RuntimeConfig::parse(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{toml:?}: {err}");
        }
    }

    #[test]
    fn vm_sizes_are_held_to_the_limits() {
        let c = RuntimeConfig::default();
        assert_eq!(c.check_vm_size(1, 256).unwrap(), (1, 256));
        assert_eq!(c.check_vm_size(8, 8192).unwrap(), (8, 8192));
        let err = |v, m| c.check_vm_size(v, m).unwrap_err();
        assert_eq!(
            err(0, 256).to_string(),
            "0 vCPUs: a microVM needs at least 1"
        );
        assert!(err(0, 256).is_vcpus());
        assert_eq!(
            err(9, 256).to_string(),
            "9 vCPUs is more than runtime config [limits] max_vcpus = 8"
        );
        assert!(err(1000, 256).is_vcpus());
        assert!(err(u64::MAX, 256)
            .to_string()
            .starts_with("18446744073709551615 vCPUs"));
        assert_eq!(
            err(1, 0).to_string(),
            "0 MiB of memory is less than the 64 MiB a guest needs"
        );
        assert!(!err(1, 0).is_vcpus());
        assert_eq!(
            err(1, 8193).to_string(),
            "8193 MiB of memory is more than runtime config [limits] max_memory_mib = 8192"
        );
        assert!(err(1, 1 << 40)
            .to_string()
            .contains("max_memory_mib = 8192"));
    }

    #[test]
    fn the_stop_grace_covers_the_wipe() {
        let t = Timeouts::default();
        // 10 s for the VMM's stop, 256 MiB at 32 MiB/s, 5 s to spare.
        assert_eq!(t.stop_grace(256), Duration::from_secs(10 + 8 + 5));
        assert_eq!(t.stop_grace(257), Duration::from_secs(10 + 9 + 5));
        let slow = Timeouts {
            teardown_secs: 3,
            wipe_mib_per_sec: 1,
            ..Default::default()
        };
        assert_eq!(slow.stop_grace(8192), Duration::from_secs(3 + 8192 + 5));
    }

    #[test]
    fn keys_override_defaults() {
        let c =
            RuntimeConfig::parse("vcpus = 2\nmemory_mib = 512\n[timeouts]\nteardown_secs = 3\n")
                .unwrap();
        assert_eq!(
            (c.vcpus, c.memory_mib, c.timeouts.teardown_secs),
            (2, 512, 3)
        );
        assert_eq!(c.timeouts.agent_connect_secs, 30);
    }

    #[test]
    fn malformed_files_give_one_line_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for bad in [
            "vcpus = \"two\"\n",
            "[timeouts\n",
            "no_such_key = 1\n",
            "vcpus = 1\nvcpus = 2\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            let err = RuntimeConfig::load(Some(&p)).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("malformed config file {}: line ", p.display())),
                "{bad:?}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
        std::fs::write(&p, "vcpus = 0\n").unwrap();
        assert!(RuntimeConfig::load(Some(&p))
            .unwrap_err()
            .to_string()
            .contains("vcpus = 0"));
        let missing = dir.path().join("missing.toml");
        assert!(RuntimeConfig::load(Some(&missing))
            .unwrap_err()
            .to_string()
            .contains("missing.toml"));
    }

    #[test]
    fn a_state_dir_too_long_for_the_vsock_socket_is_refused() {
        let long = format!("/run/{}", "x".repeat(80));
        let c = RuntimeConfig {
            state_dir: long.clone().into(),
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(&long) && err.contains("at most 107"), "{err}");
        let fits = RuntimeConfig {
            state_dir: format!("/run/{}", "x".repeat(70)).into(),
            ..Default::default()
        };
        fits.validate().unwrap();
    }

    #[test]
    fn the_jail_needs_a_few_pids() {
        let mut c = RuntimeConfig::default();
        c.jail.pids_max = 4;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("jail.pids_max = 4"));
        c.jail.enabled = false;
        c.validate().unwrap();
    }

    #[test]
    fn missing_artifacts_are_named() {
        let c = RuntimeConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        assert_eq!(
            c.check_artifacts().unwrap_err().to_string(),
            "kernel not found at /nonexistent/vmlinux: run scripts/setup (it builds the guest image), or set `kernel` in the config"
        );
    }
}
