//! What a VM is made of: the launch configuration that the launcher writes
//! as JSON and `airlock-vmm --config FILE` reads, or that the VMM's own
//! command-line flags build.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::limits::{
    DEFAULT_CONSOLE_MAX_BYTES, MAX_DRIVE_ID_LEN, MAX_VCPUS, MIN_GUEST_CID, VMM_MIN_MEMORY_MIB,
};
use crate::mac::MacAddr;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("invalid memory size {0} MiB: must be at least {VMM_MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("invalid memory size {requested} MiB: this host has only {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("invalid drive {0} (expected path=IMAGE[,ro][,id=SERIAL])")]
    Drive(String),
    #[error("invalid vsock guest CID {0}: must be at least {MIN_GUEST_CID} (0-2 are reserved)")]
    VsockCid(u64),
    #[error("{0} {1}: not an open socket handed to this process")]
    NotASocket(&'static str, i32),
    #[error("invalid net MAC address {0}: it is a multicast address (the first byte is odd); give the NIC a unicast one, like 02:00:00:00:00:01")]
    MacMulticast(MacAddr),
    #[error("net tap_fd {0}: not an open tap descriptor handed to this process (TUNGETIFF refused it); open /dev/net/tun, attach it with TUNSETIFF and pass the descriptor without FD_CLOEXEC")]
    NotATap(i32),
    #[error("net tap_fd {fd}: the tap's flags are {flags:#x}, not IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; open it with TUNSETIFF and exactly those (no IFF_MULTI_QUEUE)")]
    TapFlags { fd: i32, flags: u32 },
}

/// Errors reading a VM configuration file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the VM configuration {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the VM configuration {0} is not valid JSON for this airlock-vmm")]
    Parse(PathBuf, #[source] serde_json::Error),
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// A VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF `vmlinux` (PVH) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel arguments appended to the VMM's base command line.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Serial console destination.
    pub console: ConsoleOutput,
    /// Most bytes of guest output written to a [`ConsoleOutput::File`];
    /// past it, output is dropped after one line saying so (standard
    /// output is not capped: whoever reads it owns its storage).
    #[serde(default = "default_console_max")]
    pub console_max_bytes: u64,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Block devices, in the order the guest sees them (`/dev/vda`, ...).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng device (entropy from the host).
    #[serde(default = "yes")]
    pub rng: bool,
    /// How long the VMM has to stop after SIGTERM before its keeper
    /// SIGKILLs it (the keeper still wipes guest memory then).
    #[serde(default = "default_grace")]
    pub stop_grace_secs: u64,
    /// Jail the VMM before it builds the VM.
    #[serde(default)]
    pub jail: Option<JailConfig>,
    /// A file that the VMM creates (mode 0600) or appends to before it
    /// jails itself, and where it and its keeper write their
    /// [`crate::Event`]s, one JSON line each.
    #[serde(default)]
    pub events: Option<PathBuf>,
    /// A Unix socket that the VMM binds (mode 0600) before it jails
    /// itself, and on which it accepts [`crate::Command`]s.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// The network device, if any.
    #[serde(default)]
    pub net: Option<NetConfig>,
}

/// The virtio-net device: one NIC, backed by a tap that whoever started
/// the VMM opened (`/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`, in the sandbox's network namespace) and handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's descriptor in the VMM process (inherited, not
    /// close-on-exec).
    pub tap_fd: i32,
    /// The NIC's address, as the guest sees it (unicast).
    pub mac: MacAddr,
}

/// The hybrid vsock device: the host reaches the guest through a Unix
/// socket (`CONNECT <port>`), and guest connections to port P reach
/// `<uds>_<P>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The host-side Unix socket.
    pub uds: PathBuf,
    /// Whether the guest may connect to host ports (`<uds>_P` sockets).
    /// Off for sandboxes: the device then opens no socket, and its seccomp
    /// filter allows none.
    #[serde(default)]
    pub guest_connect: bool,
    /// A listening Unix socket, bound at `uds` by whoever started the VMM
    /// and handed over as this descriptor: the VMM then binds nothing, and
    /// `uds` need not be in its jail.
    #[serde(default)]
    pub listen_fd: Option<i32>,
}

/// A block device backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The image.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads (`/sys/block/vdX/serial`), at most
    /// [`MAX_DRIVE_ID_LEN`] ASCII bytes.
    #[serde(default)]
    pub id: String,
}

/// The VMM's jail: a private mount namespace with `root` as its root
/// (holding bind mounts of only what the VM needs), no capabilities,
/// `no_new_privs`, and this user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// A directory of the sandbox's own (created if missing).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// A descriptor of the `cgroup.procs` file that the VMM (not its
    /// keeper) moves itself into after the fork.
    #[serde(default)]
    pub vmm_cgroup_fd: Option<i32>,
}

fn default_console_max() -> u64 {
    DEFAULT_CONSOLE_MAX_BYTES
}

fn default_grace() -> u64 {
    10
}

fn yes() -> bool {
    true
}

impl VmConfig {
    /// A VM of `kernel` alone: 1 vCPU, 128 MiB, no initramfs, console on
    /// standard output, a virtio-rng device and nothing else.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            vcpus: 1,
            memory_mib: 128,
            extra_args: Vec::new(),
            console: ConsoleOutput::Stdout,
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            vsock: None,
            drives: Vec::new(),
            rng: true,
            stop_grace_secs: default_grace(),
            jail: None,
            events: None,
            control: None,
            net: None,
        }
    }

    /// Checks the numbers against [`crate::limits`] and the NIC's address;
    /// files and descriptors
    /// are the VMM's to check when it opens them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < VMM_MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < MIN_GUEST_CID || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.guest_cid));
            }
        }
        for d in &self.drives {
            d.validate()?;
        }
        if let Some(net) = &self.net {
            if net.mac.is_multicast() {
                return Err(ConfigError::MacMulticast(net.mac));
            }
        }
        Ok(())
    }

    /// [`Self::validate`], and no more memory than this host has.
    pub fn validate_on_host(&self) -> Result<(), ConfigError> {
        self.validate()?;
        match crate::limits::host_memory_mib() {
            Some(host) if self.memory_mib > host => Err(ConfigError::MemoryTooLarge {
                requested: self.memory_mib,
                host,
            }),
            _ => Ok(()),
        }
    }

    /// Reads a configuration written as JSON (`airlock-vmm --config`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, LoadError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| LoadError::Read(path.to_path_buf(), e))?;
        serde_json::from_str(&text).map_err(|e| LoadError::Parse(path.to_path_buf(), e))
    }
}

impl DriveConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: &str| ConfigError::Drive(format!("'{}': {why}", self.path.display()));
        if self.path.as_os_str().is_empty() {
            return Err(bad("path=IMAGE is required"));
        }
        if self.id.len() > MAX_DRIVE_ID_LEN || !self.id.is_ascii() {
            return Err(bad(&format!(
                "id must be at most {MAX_DRIVE_ID_LEN} ASCII characters"
            )));
        }
        Ok(())
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
                Some(("id", id)) if id.len() <= MAX_DRIVE_ID_LEN && id.is_ascii() => {
                    drive.id = id.to_string()
                }
                Some(("id", _)) => {
                    return Err(bad(&format!(
                        "id must be at most {MAX_DRIVE_ID_LEN} ASCII characters"
                    )))
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_bad_value() {
        let mut c = VmConfig::new("/vmlinux".into());
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
        assert_eq!(c.validate(), Ok(()));
        assert!(matches!(
            c.validate_on_host(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn reserved_vsock_cids_are_refused() {
        let mut c = VmConfig::new("/vmlinux".into());
        let vsock = |guest_cid| VsockConfig {
            guest_cid,
            uds: "/tmp/v.sock".into(),
            guest_connect: false,
            listen_fd: None,
        };
        c.vsock = Some(vsock(2));
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(2)));
        c.vsock = Some(vsock(1 << 32));
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(1 << 32)));
        c.vsock = Some(vsock(3));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn a_multicast_nic_address_is_refused() {
        let mut c = VmConfig::new("/vmlinux".into());
        let mac = "03:00:00:00:00:01".parse().unwrap();
        c.net = Some(NetConfig { tap_fd: 3, mac });
        assert_eq!(c.validate(), Err(ConfigError::MacMulticast(mac)));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("03:00:00:00:00:01"));
        c.net = Some(NetConfig {
            tap_fd: 3,
            mac: "02:00:00:00:00:01".parse().unwrap(),
        });
        assert_eq!(c.validate(), Ok(()));
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
        // A drive built in code meets the same rules as a parsed one.
        let mut c = VmConfig::new("/vmlinux".into());
        c.drives.push(DriveConfig {
            path: "x".into(),
            read_only: false,
            id: "é".into(),
        });
        assert!(matches!(c.validate(), Err(ConfigError::Drive(_))));
    }

    #[test]
    fn the_json_form_round_trips_and_refuses_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new("/vmlinux".into());
        c.initrd = Some("/initrd".into());
        c.console = ConsoleOutput::File("/con".into());
        c.drives.push("path=/img,ro,id=image".parse().unwrap());
        c.jail = Some(JailConfig {
            root: "/jail".into(),
            uid: 7,
            gid: 8,
            vmm_cgroup_fd: Some(5),
        });
        c.events = Some("/run/events".into());
        c.net = Some(NetConfig {
            tap_fd: 7,
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
        });
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""net":{"tap_fd":7,"mac":"02:00:00:00:00:09"}"#),
            "{json}"
        );
        let path = dir.path().join("vm.json");
        std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
        assert_eq!(VmConfig::from_file(&path).unwrap(), c);
        // Defaults fill what a hand-written file leaves out.
        std::fs::write(
            &path,
            r#"{"kernel":"/k","initrd":null,"vcpus":1,"memory_mib":64,"console":"off"}"#,
        )
        .unwrap();
        let c = VmConfig::from_file(&path).unwrap();
        assert!(c.rng && c.console_max_bytes == DEFAULT_CONSOLE_MAX_BYTES);
        std::fs::write(
            &path,
            r#"{"kernel":"/k","vcpus":1,"memory_mib":64,"console":"off","cpus":2}"#,
        )
        .unwrap();
        let err = VmConfig::from_file(&path).unwrap_err();
        let why = std::error::Error::source(&err).unwrap().to_string();
        assert!(why.contains("unknown field `cpus`"), "{why}");
        let err = VmConfig::from_file(&dir.path().join("none")).unwrap_err();
        assert!(matches!(err, LoadError::Read(..)));
    }
}
