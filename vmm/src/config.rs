//! What a VM is made of, with defaults that boot the cached guest image.

use std::path::{Path, PathBuf};

use crate::arch::x86_64::MAX_VCPUS;

/// Kernel arguments every Airlock guest gets, before any extra ones:
/// * `reboot=k`: the guest resets through the i8042, which ends the VM;
/// * `reboot=panic_warm` with `panic=-1`: a panic resets at once, and marks
///   the reset warm so the VMM can tell it from a clean reboot;
/// * no PCI, no modules: the guest kernel has all it needs built in.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k,panic_warm panic=-1 pci=off nomodule quiet";

/// Smallest guest the default kernel and initramfs boot in.
pub const MIN_MEMORY_MIB: u64 = 32;

/// Default cap on the console file: 1 MiB, far more than a boot and an
/// agent write, small enough that a guest cannot fill the host's disk.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 1 << 20;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Too few or too many vCPUs.
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    /// Too little memory.
    #[error("invalid memory size {0} MiB: must be at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    /// A `--drive` specification that does not parse.
    #[error("invalid drive {0} (expected path=IMAGE[,ro][,id=SERIAL])")]
    Drive(String),
    /// A vsock CID that is reserved.
    #[error("invalid vsock guest CID {0}: must be at least 3 (0-2 are reserved)")]
    VsockCid(u64),
    /// More memory than the host has.
    #[error("invalid memory size {requested} MiB: this host has only {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("--vsock-listen-fd {0}: not an open socket handed to this process")]
    ListenFd(i32),
}

/// Whether `fd` is an open socket (above stdio).
fn is_socket(fd: i32) -> bool {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat`, which lives across the call.
    fd > 2
        && unsafe { libc::fstat(fd, &mut st) } == 0
        && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Takes the listening socket handed over as `fd` (`VsockConfig::listen_fd`).
/// Called once, when the device is built.
pub fn take_listener(fd: i32) -> Result<std::os::unix::net::UnixListener, ConfigError> {
    use std::os::fd::FromRawFd;
    if !is_socket(fd) {
        return Err(ConfigError::ListenFd(fd));
    }
    // SAFETY: `fd` is an open socket (checked above) that was handed to this
    // process for the vsock device alone, and is taken here once.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// A VM's configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel: an ELF `vmlinux` (PVH) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel arguments appended to [`BASE_CMDLINE`].
    pub extra_args: Vec<String>,
    /// Serial console destination.
    pub console: ConsoleOutput,
    /// Most bytes of guest output written to a [`ConsoleOutput::File`];
    /// past it, output is dropped after one line saying so (standard
    /// output is not capped: whoever reads it owns its storage).
    pub console_max_bytes: u64,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Block devices, in the order the guest sees them (`/dev/vda`, ...).
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng device (entropy from the host).
    pub rng: bool,
}

/// The hybrid vsock device: the host reaches the guest through a Unix
/// socket (`CONNECT <port>`), and guest connections to port P reach
/// `<uds>_<P>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The host-side Unix socket.
    pub uds: PathBuf,
    /// Whether the guest may connect to host ports (`<uds>_P` sockets).
    /// Off for sandboxes: the device then opens no socket, and its seccomp
    /// filter allows none.
    pub guest_connect: bool,
    /// A listening Unix socket, bound at `uds` by whoever started the VMM
    /// and handed over as this descriptor: the VMM then binds nothing, and
    /// `uds` need not be in its jail (airlock-runtime keeps it in a
    /// directory that only root may change).
    pub listen_fd: Option<i32>,
}

/// A block device backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// The image.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The serial the guest reads (`/sys/block/vdX/serial`), at most 20 bytes.
    pub id: String,
}

impl VmConfig {
    /// A configuration that boots the default guest image with 1 vCPU and
    /// 128 MiB.
    pub fn with_defaults() -> Self {
        let dir = default_guest_dir();
        VmConfig {
            kernel: dir.join("vmlinux"),
            initrd: Some(dir.join("initramfs.cpio")),
            vcpus: 1,
            memory_mib: 128,
            extra_args: Vec::new(),
            console: ConsoleOutput::Stdout,
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            vsock: None,
            drives: Vec::new(),
            rng: true,
        }
    }

    /// Checks the numbers; files are checked when they are loaded.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(fd) = self.vsock.as_ref().and_then(|v| v.listen_fd) {
            if !is_socket(fd) {
                return Err(ConfigError::ListenFd(fd));
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.guest_cid));
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(host) = host_memory_mib(Path::new("/proc/meminfo")) {
            if self.memory_mib > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: self.memory_mib,
                    host,
                });
            }
        }
        Ok(())
    }

    /// The full kernel command line.
    pub fn cmdline_parts(&self) -> Vec<&str> {
        std::iter::once(BASE_CMDLINE)
            .chain(self.extra_args.iter().map(String::as_str))
            .collect()
    }
}

impl std::str::FromStr for DriveConfig {
    type Err = ConfigError;

    /// Parses `path=IMAGE[,ro][,id=SERIAL]`.
    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Drive(format!("'{spec}': {why}"));
        let mut drive = DriveConfig {
            path: PathBuf::new(),
            read_only: false,
            id: String::new(),
        };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => drive.path = PathBuf::from(p),
                Some(("id", id)) if id.len() <= 20 && id.is_ascii() => drive.id = id.to_string(),
                Some(("id", _)) => return Err(bad("id must be at most 20 ASCII characters")),
                None if part == "ro" => drive.read_only = true,
                None if part == "rw" => drive.read_only = false,
                _ => return Err(bad(&format!("unknown option '{part}'"))),
            }
        }
        if drive.path.as_os_str().is_empty() {
            return Err(bad("path=IMAGE is required"));
        }
        Ok(drive)
    }
}

/// Airlock's cache: `$AIRLOCK_CACHE_DIR`, else `$XDG_CACHE_HOME/airlock`,
/// else `~/.cache/airlock`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AIRLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("airlock");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/airlock")
}

/// Where `guest-image/build` links the current default kernel and initramfs.
pub fn default_guest_dir() -> PathBuf {
    cache_dir().join("guest/default")
}

fn host_memory_mib(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_bad_value() {
        let mut c = VmConfig::with_defaults();
        assert_eq!(c.validate(), Ok(()));
        c.vcpus = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            format!("invalid vCPU count 0: must be between 1 and {MAX_VCPUS}")
        );
        c.vcpus = 1000;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(1000)));
        c.vcpus = 2;
        c.memory_mib = 0;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(0)));
        c.memory_mib = u64::MAX / 2;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn the_console_file_is_capped_at_1_mib_by_default() {
        assert_eq!(VmConfig::with_defaults().console_max_bytes, 1 << 20);
    }

    #[test]
    fn cmdline_starts_with_the_base() {
        let mut c = VmConfig::with_defaults();
        c.extra_args = vec!["airlock.oneshot".into()];
        assert_eq!(c.cmdline_parts(), vec![BASE_CMDLINE, "airlock.oneshot"]);
    }

    #[test]
    fn drive_specs() {
        let d: DriveConfig = "path=/img/a.ext4,ro,id=root".parse().unwrap();
        assert_eq!(
            d,
            DriveConfig {
                path: "/img/a.ext4".into(),
                read_only: true,
                id: "root".into()
            }
        );
        let d: DriveConfig = "path=b.img".parse().unwrap();
        assert!(!d.read_only && d.id.is_empty());
        for bad in [
            "",
            "ro",
            "path=",
            "path=x,bogus",
            "path=x,id=123456789012345678901",
            "path=x,ro=1",
        ] {
            assert!(bad.parse::<DriveConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_handed_over_listener_must_be_an_open_socket() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let dir = std::env::temp_dir().join(format!("airlock-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut c = VmConfig::with_defaults();
        for (fd, ok) in [
            (listener.as_raw_fd(), true),
            (file.as_raw_fd(), false),
            (9999, false),
        ] {
            c.vsock = Some(VsockConfig {
                guest_cid: 3,
                uds: sock.clone(),
                guest_connect: false,
                listen_fd: Some(fd),
            });
            assert_eq!(c.validate().is_ok(), ok, "fd {fd}");
        }
        assert!(take_listener(file.as_raw_fd()).is_err());
        let taken = take_listener(listener.into_raw_fd()).unwrap();
        drop(taken);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reserved_vsock_cids_are_refused() {
        let mut c = VmConfig::with_defaults();
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds: "/tmp/v.sock".into(),
            guest_connect: false,
            listen_fd: None,
        });
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(2)));
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds: "/tmp/v.sock".into(),
            guest_connect: false,
            listen_fd: None,
        });
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn meminfo_is_parsed() {
        let p = std::env::temp_dir().join(format!("airlock-meminfo-{}", std::process::id()));
        std::fs::write(&p, "MemTotal:       24554740 kB\nMemFree: 1 kB\n").unwrap();
        assert_eq!(host_memory_mib(&p), Some(23979));
        std::fs::remove_file(p).unwrap();
    }
}
