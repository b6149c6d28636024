//! The guest NIC's host end: a tap opened in the sandbox's network
//! namespace. Its descriptor goes to the VMM (which opens nothing itself);
//! the tap is not persistent, so it disappears with the last descriptor,
//! i.e. with the VMM.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::netns::Netns;
use super::NetError;

/// The tap's name inside the sandbox's namespace.
pub const TAP_NAME: &CStr = c"tap0";

/// `TUNSETIFF` (linux/if_tun.h: `_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (linux/if_tun.h): Ethernet frames,
/// no packet-info prefix, each frame led by a virtio-net header, which is
/// what the VMM's virtio-net device expects.
const TAP_FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000;

/// Opens the tap `tap0` in `ns` and returns its descriptor (close-on-exec,
/// non-blocking; the VMM spawn clears close-on-exec for it).
pub fn open(ns: &Netns) -> Result<OwnedFd, NetError> {
    ns.run_in(|| {
        let path = PathBuf::from("/dev/net/tun");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| NetError::io("open (is the tun module loaded?)", path.clone(), e))?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(TAP_NAME.to_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across
        // the call; the descriptor is open.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
            return Err(NetError::io(
                "create the tap (TUNSETIFF)",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(OwnedFd::from(file))
    })
}
