//! virtio-blk requests (virtio 1.2, section 5.2.6): parsing a descriptor
//! chain into a checked request, and executing it against the image.
//!
//! A chain is a device-readable header (type, reserved, sector), data
//! descriptors, and a last device-writable status byte. Everything in it
//! is guest-controlled and checked before any I/O.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::{DiskError, DiskFile, BOUNCE_SIZE};
use super::{ID_BYTES, MAX_REQUEST_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::devices::virtio::worker::StopFlag;

/// Size of the request header.
const HEADER_LEN: u32 = 16;
/// Descriptors accepted in one chain (indirect tables can be longer).
const MAX_DESCS: usize = QUEUE_SIZE as usize;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is empty or unreadable.
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain longer than {MAX_DESCS}")]
    TooLong,
    /// The last descriptor is not a device-writable byte in guest memory.
    #[error("no writable status byte")]
    NoStatus,
    #[error("missing request header")]
    NoHeader,
    /// The header is device-writable, too short or outside guest memory.
    #[error("invalid request header")]
    BadHeader,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data descriptor has the wrong direction")]
    Direction,
    #[error("data descriptor {addr:#x}+{len:#x} is empty or outside guest memory")]
    BadData { addr: u64, len: u32 },
    #[error("read or write without data")]
    NoData,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("request of {0} bytes is over the maximum of {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    #[error("sector {sector} + {len} bytes is beyond the end of the drive")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only drive")]
    ReadOnly,
    #[error("I/O failed")]
    Disk(#[source] DiskError),
    #[error("the device was stopped during the request")]
    Stopped,
}

impl RequestError {
    /// The status byte reported for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The kind of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Make writes durable.
    Flush,
    /// Return the drive's ID.
    GetId,
}

impl RequestType {
    fn parse(raw: u32) -> Result<Self, RequestError> {
        match raw {
            VIRTIO_BLK_T_IN => Ok(RequestType::In),
            VIRTIO_BLK_T_OUT => Ok(RequestType::Out),
            VIRTIO_BLK_T_FLUSH => Ok(RequestType::Flush),
            VIRTIO_BLK_T_GET_ID => Ok(RequestType::GetId),
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Whether the device writes the data buffers.
    fn device_writes(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// The first sector.
    pub sector: u64,
    /// The data buffers, each non-empty and inside guest memory.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total data length.
    pub data_len: u64,
}

/// A parsed chain: where its status byte goes (if it has a usable one) and
/// the request, or why it is malformed.
#[derive(Debug)]
pub struct Parsed {
    /// The status byte's address.
    pub status: Option<GuestAddress>,
    /// The request.
    pub request: Result<Request, RequestError>,
}

/// Parses `chain` and checks it against guest memory and the drive's
/// `capacity` in bytes.
pub fn parse<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>, capacity: u64) -> Parsed
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let descs: Vec<Descriptor> = chain.take(MAX_DESCS + 1).collect();
    let failed = |status, e| Parsed {
        status,
        request: Err(e),
    };
    if descs.len() > MAX_DESCS {
        return failed(None, RequestError::TooLong);
    }
    let Some((status, rest)) = descs.split_last() else {
        return failed(None, RequestError::Empty);
    };
    if !status.is_write_only() || status.len() < 1 || !mem.check_range(status.addr(), 1) {
        return failed(None, RequestError::NoStatus);
    }
    let status = Some(status.addr());
    let Some((header, data)) = rest.split_first() else {
        return failed(status, RequestError::NoHeader);
    };
    Parsed {
        status,
        request: check(mem, header, data, capacity),
    }
}

fn check(
    mem: &GuestMemoryMmap,
    header: &Descriptor,
    data: &[Descriptor],
    capacity: u64,
) -> Result<Request, RequestError> {
    let mut raw = [0u8; HEADER_LEN as usize];
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::BadHeader)?;
    let (kind, sector) = match raw {
        [t0, t1, t2, t3, _, _, _, _, s @ ..] => {
            (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
        }
    };
    let kind = RequestType::parse(kind)?;

    let mut data_len = 0u64;
    let mut buffers = Vec::with_capacity(data.len());
    for desc in data {
        if desc.is_write_only() != kind.device_writes() {
            return Err(RequestError::Direction);
        }
        if desc.len() == 0 || !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(RequestError::BadData {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        // At most MAX_DESCS * u32::MAX: no overflow.
        data_len += u64::from(desc.len());
        buffers.push((desc.addr(), desc.len()));
    }
    if matches!(kind, RequestType::In | RequestType::Out) {
        if data_len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(data_len));
        }
        if data_len == 0 {
            return Err(RequestError::NoData);
        }
        if !data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Unaligned(data_len));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(data_len));
        if end.is_none_or(|end| end > capacity) {
            return Err(RequestError::OutOfRange {
                sector,
                len: data_len,
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data: buffers,
        data_len,
    })
}

impl Request {
    /// Executes the request; returns the number of bytes written to the
    /// guest's data buffers.
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut DiskFile,
        id: &[u8; ID_BYTES],
    ) -> Result<u32, RequestError> {
        self.execute_until(mem, disk, id, &StopFlag::new())
    }

    /// [`Request::execute`], checking `stop` before each piece of at most
    /// [`BOUNCE_SIZE`] bytes of I/O: [`RequestError::Stopped`] once it is
    /// raised, with the request partly done.
    pub fn execute_until(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut DiskFile,
        id: &[u8; ID_BYTES],
        stop: &StopFlag,
    ) -> Result<u32, RequestError> {
        match self.kind {
            RequestType::In | RequestType::Out => {
                if self.kind == RequestType::Out && disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                let overflow = || RequestError::Disk(DiskError::Overflow);
                // Checked against the capacity in `parse`.
                let mut offset = self.sector.checked_mul(SECTOR_SIZE).ok_or_else(overflow)?;
                for &(addr, len) in &self.data {
                    let len = len as usize;
                    let mut done = 0usize;
                    while done < len {
                        if stop.should_stop() {
                            return Err(RequestError::Stopped);
                        }
                        let n = (len - done).min(BOUNCE_SIZE);
                        let at = addr.checked_add(done as u64).ok_or_else(overflow)?;
                        let res = if self.kind == RequestType::In {
                            disk.read_to_guest(mem, offset, at, n)
                        } else {
                            disk.write_from_guest(mem, offset, at, n)
                        };
                        res.map_err(RequestError::Disk)?;
                        offset = offset.checked_add(n as u64).ok_or_else(overflow)?;
                        done += n;
                    }
                }
                if self.kind == RequestType::In {
                    u32::try_from(self.data_len).map_err(|_| RequestError::TooLarge(self.data_len))
                } else {
                    Ok(0)
                }
            }
            RequestType::Flush => {
                if !disk.read_only() {
                    disk.flush().map_err(RequestError::Disk)?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let mut left: &[u8] = id;
                for &(addr, len) in &self.data {
                    let n = left.len().min(len as usize);
                    let (chunk, rest) = left.split_at(n);
                    mem.write_slice(chunk, addr)
                        .map_err(|e| RequestError::Disk(DiskError::GuestMemory(e)))?;
                    left = rest;
                }
                Ok((ID_BYTES - left.len()) as u32)
            }
        }
    }
}
