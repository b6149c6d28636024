//! What a VM is made of: the launch configuration of `airlock-vmm-api`
//! (defined there once, for the VMM and whoever starts it), the defaults
//! that boot the cached guest image, and the checks only the VMM's own
//! process can make (its descriptors, this host's memory).

use std::path::PathBuf;

pub use airlock_vmm_api::config::{
    ConfigError, ConsoleOutput, DriveConfig, JailConfig, LoadError, NetConfig, VmConfig,
    VsockConfig,
};
pub use airlock_vmm_api::limits::{DEFAULT_CONSOLE_MAX_BYTES, VMM_MIN_MEMORY_MIB};
pub use airlock_vmm_api::mac::MacAddr;

/// Kernel arguments every Airlock guest gets, before any extra ones:
/// * `reboot=k`: the guest resets through the i8042, which ends the VM;
/// * `reboot=panic_warm` with `panic=-1`: a panic resets at once, and marks
///   the reset warm so the VMM can tell it from a clean reboot;
/// * no PCI, no modules: the guest kernel has all it needs built in.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k,panic_warm panic=-1 pci=off nomodule quiet";

/// Whether `fd` is an open socket (above stdio).
fn is_socket(fd: i32) -> bool {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd <= 2 {
        return false;
    }
    // SAFETY: fstat writes one `stat`, which lives across the call.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Takes the listening socket handed over as `fd` (`VsockConfig::listen_fd`).
/// Called once, when the device is built.
pub fn take_listener(fd: i32) -> Result<std::os::unix::net::UnixListener, ConfigError> {
    use std::os::fd::FromRawFd;
    if !is_socket(fd) {
        return Err(ConfigError::NotASocket("vsock listen_fd", fd));
    }
    // SAFETY: `fd` is an open socket (checked above) that was handed to this
    // process for the vsock device alone, and is taken here once.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// Checks that `fd` (`NetConfig::tap_fd`) is an open tap with the flags
/// the net device needs (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not
/// multi-queue).
pub fn check_tap(fd: i32) -> Result<(), ConfigError> {
    use crate::devices::virtio::net::tap;
    if fd <= 2 {
        return Err(ConfigError::NotATap(fd));
    }
    let flags = tap::tap_flags(fd).map_err(|_| ConfigError::NotATap(fd))?;
    if !tap::flags_ok(flags) {
        return Err(ConfigError::TapFlags {
            fd,
            flags: u32::from(flags),
        });
    }
    Ok(())
}

/// Takes the tap handed over as `fd` (`NetConfig::tap_fd`), once checked
/// by [`check_tap`]. Called once, when the device is built.
pub fn take_tap(fd: i32) -> Result<std::os::fd::OwnedFd, ConfigError> {
    use std::os::fd::FromRawFd;
    check_tap(fd)?;
    // SAFETY: `fd` is an open tap (checked above) that was handed to this
    // process for the net device alone, and is taken here once.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A configuration that boots the default guest image with 1 vCPU and
/// 128 MiB.
pub fn with_defaults() -> VmConfig {
    let dir = default_guest_dir();
    let mut config = VmConfig::new(dir.join("vmlinux"));
    config.initrd = Some(dir.join("initramfs.cpio"));
    config
}

/// [`VmConfig::validate`] with what only this process can see: this
/// host's memory and the descriptors it was handed (the vsock listener,
/// the tap).
pub fn validate(config: &VmConfig) -> Result<(), ConfigError> {
    config.validate_on_host()?;
    if let Some(fd) = config.vsock.as_ref().and_then(|v| v.listen_fd) {
        if !is_socket(fd) {
            return Err(ConfigError::NotASocket("vsock listen_fd", fd));
        }
    }
    if let Some(net) = &config.net {
        check_tap(net.tap_fd)?;
    }
    Ok(())
}

/// The full kernel command line.
pub fn cmdline_parts(config: &VmConfig) -> Vec<&str> {
    std::iter::once(BASE_CMDLINE)
        .chain(config.extra_args.iter().map(String::as_str))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_and_too_much_memory_does_not() {
        let mut c = with_defaults();
        assert_eq!(validate(&c), Ok(()));
        assert_eq!(c.console_max_bytes, 1 << 20);
        c.memory_mib = u64::MAX / 2;
        assert!(matches!(
            validate(&c),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_starts_with_the_base() {
        let mut c = with_defaults();
        c.extra_args = vec!["airlock.oneshot".into()];
        assert_eq!(cmdline_parts(&c), vec![BASE_CMDLINE, "airlock.oneshot"]);
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
        let mut c = with_defaults();
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
            assert_eq!(validate(&c).is_ok(), ok, "fd {fd}");
        }
        assert!(take_listener(file.as_raw_fd()).is_err());
        let taken = take_listener(listener.into_raw_fd()).unwrap();
        drop(taken);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_handed_over_tap_must_be_an_open_tap() {
        use std::os::fd::AsRawFd;
        let (sock, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut c = with_defaults();
        for fd in [sock.as_raw_fd(), file.as_raw_fd(), 9999, 0, -1] {
            c.net = Some(NetConfig {
                tap_fd: fd,
                mac: "02:00:00:00:00:01".parse().unwrap(),
            });
            let err = validate(&c).unwrap_err();
            assert_eq!(err, ConfigError::NotATap(fd));
            assert!(err.to_string().contains("TUNSETIFF"), "{err}");
            assert!(take_tap(fd).is_err());
        }
    }
}
