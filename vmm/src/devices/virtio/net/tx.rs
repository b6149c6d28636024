//! The transmit queue: each chain is one frame (vnet header, then the
//! Ethernet frame), gathered from guest memory into the worker's fixed
//! buffer and written to the tap in one `write`.
//!
//! A chain that is not a frame the tap can take (device-writable
//! descriptors, memory outside the guest's, more than [`MAX_CHAIN_DESCS`]
//! descriptors, a loop, more than [`MAX_FRAME_LEN`] bytes, less than a
//! header) is dropped and returned to the guest; so is a frame the tap
//! refuses or cannot take now (its queue is full): the device never holds
//! a transmit frame back, as a NIC whose link is busy drops it.

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::tap::VNET_HDR_LEN;
use super::{NetQueues, Processed, FRAME_BUDGET, MAX_CHAIN_DESCS, MAX_FRAME_LEN};
use crate::devices::ratelimit::ratelimited;

/// Why a transmit chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("virtio-net tx chain has a device-writable descriptor")]
    WriteOnly,
    #[error("virtio-net tx buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("virtio-net tx chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("virtio-net tx chain ends early (a loop, or a next index out of the table)")]
    Truncated,
    #[error("virtio-net tx frame is larger than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("virtio-net tx frame of {0} bytes is shorter than its {VNET_HDR_LEN}-byte header")]
    TooShort(usize),
    #[error("cannot read a virtio-net tx frame from guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Copies the frame that `chain` holds into `buf` (at most its length);
/// returns the frame's length, vnet header included. Public for the fuzz
/// targets (`tests/fuzz`).
pub fn gather_frame<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, TxError> {
    let mut len = 0usize;
    let mut count = 0usize;
    let mut chained = false;
    for desc in chain.take(MAX_CHAIN_DESCS + 1) {
        count += 1;
        if count > MAX_CHAIN_DESCS {
            return Err(TxError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        let out_of_range = || TxError::OutOfRange {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let dlen = usize::try_from(desc.len()).map_err(|_| out_of_range())?;
        let end = len.checked_add(dlen).ok_or(TxError::TooLong)?;
        let dst = buf.get_mut(len..end).ok_or(TxError::TooLong)?;
        if !mem.check_range(desc.addr(), dlen) {
            return Err(out_of_range());
        }
        mem.read_slice(dst, desc.addr())
            .map_err(TxError::GuestMemory)?;
        len = end;
        chained = desc.has_next();
    }
    // The iterator stops early, without an error, at a loop (its
    // time-to-live) or at a next index outside the table.
    if chained {
        return Err(TxError::Truncated);
    }
    if len < VNET_HDR_LEN {
        return Err(TxError::TooShort(len));
    }
    Ok(len)
}

impl NetQueues {
    /// Sends up to [`FRAME_BUDGET`] frames from the tx queue, checking for
    /// a stop before each.
    ///
    /// While it works the driver is told not to notify the queue
    /// (`VRING_USED_F_NO_NOTIFY`, which Linux checks before each kick): a
    /// busy sender then costs no VM exit per frame. The flag is cleared
    /// when the queue is found empty, and the queue looked at once more, so
    /// that a frame queued just before the driver saw the flag cleared is
    /// not left waiting for a kick that will not come. With work left
    /// (the budget ran out) the flag stays: the worker comes back at once.
    pub fn process_tx(&mut self) -> Processed {
        let mut done = Processed::default();
        // A ring outside guest memory fails here and in `pop`: nothing to do.
        let _ = self.tx.disable_notification(&self.mem);
        for _ in 0..FRAME_BUDGET {
            if self.stop.should_stop() {
                return done;
            }
            let chain = match self.tx.pop_descriptor_chain(&self.mem) {
                Some(chain) => chain,
                None => match self.tx.enable_notification(&self.mem) {
                    Ok(true) => match self.tx.pop_descriptor_chain(&self.mem) {
                        Some(chain) => {
                            let _ = self.tx.disable_notification(&self.mem);
                            chain
                        }
                        // An avail index the queue refuses: notifications
                        // stay on and the worker waits for the next kick.
                        None => return done,
                    },
                    _ => return done,
                },
            };
            let head = chain.head_index();
            match gather_frame(&self.mem, chain, &mut self.tx_buf) {
                Ok(len) => {
                    let frame = self.tx_buf.get(..len).unwrap_or_default();
                    if let Err(e) = self.tap.write_frame(frame) {
                        let n = self.drop_frame();
                        ratelimited!(
                            warn,
                            "virtio-net: the tap refused a {len}-byte frame ({n} frames dropped): {e}"
                        );
                    }
                }
                Err(e) => {
                    let n = self.drop_frame();
                    ratelimited!(warn, "virtio-net: tx frame dropped ({n} so far): {e}");
                }
            }
            if let Err(e) = self.tx.add_used(&self.mem, head, 0) {
                ratelimited!(error, "virtio-net: cannot return a tx buffer: {e}");
                return done;
            }
            done.used = true;
        }
        done.more = true;
        done
    }
}
