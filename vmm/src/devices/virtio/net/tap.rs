//! The net device's backend: a tap descriptor that whoever started the VMM
//! opened (`/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, in the sandbox's network namespace) and handed over. The
//! jailed VMM opens nothing; it only sets the vnet header size (once, when
//! the device is built) and the offloads the guest driver negotiated (on
//! the worker thread, under the device seccomp filter, which allows that
//! one ioctl).
//!
//! Each `read` gives one frame and each `write` takes one, both prefixed by
//! the 12-byte `virtio_net_hdr_v1`: the tap speaks the guest's own header,
//! so frames pass between the two without translation.
//!
//! [`Tap::frame_fd`] wraps any other descriptor that keeps frame boundaries
//! (one end of a `SOCK_DGRAM` socketpair): the same device code, with no
//! tap ioctls, for tests and fuzzing.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
};

/// Size of the `virtio_net_hdr_v1` in front of every frame (with
/// `VIRTIO_F_VERSION_1` it always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// The tap flags a handed-over tap must have, and the ones it must not.
pub const TAP_FLAGS: u16 = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
const TAP_FLAGS_MASK: u16 = TAP_FLAGS | (libc::IFF_TUN | libc::IFF_MULTI_QUEUE) as u16;

/// Errors setting up the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot set the tap's vnet header size to {VNET_HDR_LEN} (TUNSETVNETHDRSZ); was it opened with IFF_VNET_HDR?")]
    VnetHdrSize(#[source] io::Error),
    #[error("cannot make the tap descriptor non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// `struct ifreq`: the name, then a union whose first member TUNGETIFF
/// fills is `short ifr_flags`.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// The tap flags of `fd` (TUNGETIFF): fails on a descriptor that is not
/// an attached tun/tap.
pub fn tap_flags(fd: RawFd) -> io::Result<u16> {
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq` (40 bytes, the size of
    // IfReq), which lives across the call; on any other kind of
    // descriptor the ioctl fails without writing.
    let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut IfReq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.flags as u16)
}

/// Whether `flags` (from [`tap_flags`]) are those of a tap the device can
/// use: [`TAP_FLAGS`], neither tun nor multi-queue.
pub fn flags_ok(flags: u16) -> bool {
    flags & TAP_FLAGS_MASK == TAP_FLAGS
}

/// The tap offloads (`TUN_F_*`) that match the features the driver
/// accepted: which partial checksums and GSO frames the guest can take.
pub fn offload_flags(acked_features: u64) -> u32 {
    let has = |bit: u32| acked_features & (1u64 << bit) != 0;
    // The kernel takes segmentation offloads only with checksum offload.
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if has(bit) {
            flags |= flag;
        }
    }
    flags
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the descriptor's status flags.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A frame descriptor: the tap, or (tests) another frame-keeping socket.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    /// Whether `fd` is a real tap (that takes TUNSETOFFLOAD).
    is_tap: bool,
}

impl Tap {
    /// The device's tap, checked by `config::take_tap`: sets its vnet
    /// header size and makes it non-blocking. Call before the seccomp
    /// filters are installed.
    pub fn new(fd: OwnedFd) -> Result<Tap, TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives across the
        // call; `fd` is an open descriptor this process owns.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::VnetHdrSize(io::Error::last_os_error()));
        }
        set_nonblocking(fd.as_raw_fd()).map_err(TapError::NonBlocking)?;
        Ok(Tap { fd, is_tap: true })
    }

    /// A backend on a descriptor that is not a tap but keeps frame
    /// boundaries (a `SOCK_DGRAM` or `SOCK_SEQPACKET` socket): frames, vnet
    /// header included, are read and written as they are; offloads are
    /// not set. Made non-blocking.
    pub fn frame_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        set_nonblocking(fd.as_raw_fd()).map_err(TapError::NonBlocking)?;
        Ok(Tap { fd, is_tap: false })
    }

    /// Sets the tap's offloads to match `acked_features` (TUNSETOFFLOAD).
    /// A frame descriptor has none to set.
    pub fn set_offload(&self, acked_features: u64) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        let flags = libc::c_uint::from(offload_flags(acked_features));
        // SAFETY: TUNSETOFFLOAD takes its argument by value; `fd` is an
        // open tap this process owns.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame into `buf` (a longer one is cut to `buf`'s size).
    /// `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for
            // the duration of the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n.unsigned_abs());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Writes `frame` (vnet header first) as one frame. `WouldBlock` when
    /// the backend cannot take it now.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `frame` is valid for reads of `frame.len()` bytes for
            // the duration of the call.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(n.unsigned_abs());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(offload_flags(0), 0);
        // Segmentation without checksum offload is not asked for.
        assert_eq!(offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
            libc::TUN_F_CSUM
        );
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            offload_flags(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn only_a_single_queue_tap_with_vnet_headers_passes() {
        let tap = TAP_FLAGS;
        assert!(flags_ok(tap));
        // Other flags (IFF_PERSIST, IFF_ONE_QUEUE) do not matter.
        assert!(flags_ok(tap | 0x0800 | 0x2000));
        assert!(!flags_ok(tap | libc::IFF_MULTI_QUEUE as u16));
        assert!(!flags_ok(tap & !(libc::IFF_VNET_HDR as u16)));
        assert!(!flags_ok(tap & !(libc::IFF_NO_PI as u16)));
        let tun = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        assert!(!flags_ok(tun));
    }

    #[test]
    fn a_socket_is_not_a_tap() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(tap_flags(a.as_raw_fd()).is_err());
        assert!(tap_flags(-1).is_err());
        let tap = Tap::frame_fd(OwnedFd::from(a)).unwrap();
        // Nothing to set on a frame descriptor, and nothing is read.
        tap.set_offload(u64::MAX).unwrap();
        let err = tap.read_frame(&mut [0; 16]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
