//! virtio-blk (virtio 1.2, section 5.2): a drive backed by a raw image file.
//!
//! [`Block`] opens the image ([`backend`]), offers its size and limits in
//! the configuration space, and serves the request queue on a worker
//! thread ([`device`]). Each request ([`request`]) is parsed and checked
//! against guest memory and the drive's capacity before any I/O: the guest
//! is hostile, and a malformed request gets an error status (or, without a
//! usable status byte, is returned with nothing written).
//!
//! Several drives are several `Block` devices, each with its own transport.
//!
//! The worker checks for a stop before each step: a chain's parsing (at
//! most 257 descriptors read) and each piece of at most 64 KiB of its I/O
//! ([`backend::BOUNCE_SIZE`]). A stop waits for one step at most (one
//! `pread`/`pwrite` of 64 KiB, or one `fdatasync` for a flush), however
//! large the requests the guest queued. The request being served when the
//! stop comes is abandoned: no status, no used buffer (the driver reset the
//! device, or the VM is going away).

pub mod backend;
pub mod device;
pub mod request;

use std::path::PathBuf;

pub use device::Block;

/// Bytes per sector: the unit of the capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request (`seg_max`): the queue minus the header
/// and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the drive ID returned by GET_ID (the guest's serial).
pub const ID_BYTES: usize = 20;
/// The largest data descriptor (segment) the driver may use (`size_max`,
/// offered with VIRTIO_BLK_F_SIZE_MAX). Linux merges pages into segments of
/// at most this; its requests are 1.25 MiB (6.1) to 4 MiB by default.
pub const SEGMENT_MAX_BYTES: u32 = 1 << 20;
/// The most data one request may carry: `seg_max` segments of `size_max`
/// bytes, all a driver that honours the configuration space can send (254
/// MiB). A larger request is failed with VIRTIO_BLK_S_IOERR, so one chain
/// is bounded work, whatever the drive's size.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SEGMENT_MAX_BYTES as u64;

/// Errors from opening a drive's image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {} not found", path.display())]
    NotFound { path: PathBuf },
    /// The image cannot be inspected or opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {} is not a regular file or a block device", path.display())]
    NotAFile { path: PathBuf },
    #[error("disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}", path.display())]
    Size { path: PathBuf, size: u64 },
}
