//! The receive queue: a frame read from the tap (vnet header first) is
//! written over the guest's posted chains: one chain without
//! `VIRTIO_NET_F_MRG_RXBUF`, as many as it takes with it, the header's
//! `num_buffers` saying how many (virtio 1.2, 5.1.6.4).
//!
//! The tap is read only when the guest has posted a chain. When the posted
//! chains are too few for the frame, they are left in the ring and the
//! frame waits in the worker's buffer for the guest's next notification.
//! A frame that cannot fit even then (larger than the whole ring, than the
//! one chain it may use, or than [`MAX_CHAIN_DESCS`] descriptors hold) is
//! dropped and the chains stay the guest's.
//! A malformed chain (device-readable descriptors, memory outside the
//! guest's, too many descriptors, a loop) drops the frame being written,
//! and every chain taken for it is returned empty.

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::tap::VNET_HDR_LEN;
use super::{NetQueues, Processed, FRAME_BUDGET, MAX_CHAIN_DESCS};
use crate::devices::ratelimit::ratelimited;

/// Offset of `num_buffers` in the `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Why a receive chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum RxError {
    #[error("virtio-net rx chain has a device-readable descriptor")]
    ReadOnly,
    #[error("virtio-net rx buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("virtio-net rx chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error(
        "virtio-net rx chain ends early (a loop, an empty chain, or a next index out of the table)"
    )]
    Truncated,
}

/// Appends the writable regions of `chain` to `regions`; returns their
/// total size. On an error `regions` is left as it was. Public for the
/// fuzz targets (`tests/fuzz`).
pub fn writable_regions<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    regions: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, RxError> {
    let before = regions.len();
    let result = collect(mem, chain, regions);
    if result.is_err() {
        regions.truncate(before);
    }
    result
}

fn collect<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    regions: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, RxError> {
    let mut total = 0usize;
    let mut count = 0usize;
    let mut chained = true; // An empty chain is a truncated one.
    for desc in chain.take(MAX_CHAIN_DESCS + 1) {
        count += 1;
        if count > MAX_CHAIN_DESCS {
            return Err(RxError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(RxError::ReadOnly);
        }
        let out_of_range = || RxError::OutOfRange {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let len = usize::try_from(desc.len()).map_err(|_| out_of_range())?;
        if !mem.check_range(desc.addr(), len) {
            return Err(out_of_range());
        }
        // At most 2^32 bytes a chain (the iterator stops there).
        total = total.checked_add(len).ok_or_else(out_of_range)?;
        regions.push((desc.addr(), len));
        chained = desc.has_next();
    }
    if chained {
        return Err(RxError::Truncated);
    }
    Ok(total)
}

/// What became of a frame offered to the guest.
enum Delivery {
    /// Written and its chains used.
    Done,
    /// The posted chains are too few: it waits for more.
    Wait,
    /// Dropped; `used` if chains were returned (empty).
    Dropped { used: bool },
}

impl NetQueues {
    /// Whether the worker should read the tap: the guest has posted a
    /// chain, no frame already waits for chains, and the last read did not
    /// fail.
    pub fn rx_wants_frames(&self) -> bool {
        self.rx_pending.is_none() && !self.rx_failed && self.rx_has_chains()
    }

    /// The guest notified the rx queue: a failed read may be retried.
    pub fn rx_notified(&mut self) {
        self.rx_failed = false;
    }

    fn rx_has_chains(&self) -> bool {
        self.rx
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.rx.next_avail())
    }

    /// Passes up to [`FRAME_BUDGET`] frames from the tap to the guest,
    /// checking for a stop before each; the frame that waits for chains
    /// goes first.
    pub fn process_rx(&mut self) -> Processed {
        let mut done = Processed::default();
        for _ in 0..FRAME_BUDGET {
            if self.stop.should_stop() {
                return done;
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None if !self.rx_wants_frames() => return done,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    // End of file: a tap never gives it; a frame socket
                    // whose far end closed does, at every read.
                    Ok(0) => {
                        ratelimited!(error, "virtio-net: the tap is closed");
                        self.rx_failed = true;
                        return done;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return done,
                    Err(e) => {
                        ratelimited!(error, "virtio-net: cannot read the tap: {e}");
                        self.rx_failed = true;
                        return done;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                let n = self.drop_frame();
                ratelimited!(
                    warn,
                    "virtio-net: a {len}-byte frame from the tap dropped ({n} so far)"
                );
                continue;
            }
            match self.deliver(len) {
                Delivery::Done => done.used = true,
                Delivery::Wait => {
                    self.rx_pending = Some(len);
                    return done;
                }
                Delivery::Dropped { used } => done.used |= used,
            }
        }
        done.more = true;
        done
    }

    /// Writes the `len`-byte frame in `rx_buf` over the guest's chains.
    fn deliver(&mut self, len: usize) -> Delivery {
        let start = self.rx.next_avail();
        let max_chains = if self.mrg_rxbuf {
            usize::from(self.rx.size())
        } else {
            1
        };
        self.regions.clear();
        self.chains.clear();
        let mut capacity = 0usize;
        while capacity < len {
            // Bounds the step too: at most 2 x MAX_CHAIN_DESCS descriptors.
            if self.chains.len() >= max_chains || self.regions.len() >= MAX_CHAIN_DESCS {
                self.rx.set_next_avail(start);
                let n = self.drop_frame();
                ratelimited!(
                    warn,
                    "virtio-net: a {len}-byte frame does not fit the guest's rx buffers ({capacity} bytes in {} chains, {} descriptors): dropped ({n} so far)",
                    self.chains.len(),
                    self.regions.len()
                );
                return Delivery::Dropped { used: false };
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                self.rx.set_next_avail(start);
                return Delivery::Wait;
            };
            let head = chain.head_index();
            match writable_regions(&self.mem, chain, &mut self.regions) {
                Ok(size) => {
                    capacity = capacity.saturating_add(size);
                    self.chains.push((head, self.regions.len()));
                }
                Err(e) => {
                    self.chains.push((head, self.regions.len()));
                    let n = self.drop_frame();
                    ratelimited!(warn, "virtio-net: rx frame dropped ({n} so far): {e}");
                    return Delivery::Dropped {
                        used: self.return_chains(|_| 0),
                    };
                }
            }
        }
        // At most the queue size (256) chains.
        let num_buffers = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        if let Some(field) = self
            .rx_buf
            .get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2)
        {
            field.copy_from_slice(&num_buffers.to_le_bytes());
        }
        match self.write_frame(len) {
            Ok(()) => {
                self.return_chains(|written| written);
                Delivery::Done
            }
            Err(e) => {
                let n = self.drop_frame();
                ratelimited!(warn, "virtio-net: rx frame dropped ({n} so far): {e}");
                Delivery::Dropped {
                    used: self.return_chains(|_| 0),
                }
            }
        }
    }

    /// Copies the first `len` bytes of `rx_buf` into `regions`, in order,
    /// and records in `chains` how much each chain got (in place of the end
    /// of its regions, which is no longer needed).
    fn write_frame(&mut self, len: usize) -> Result<(), vm_memory::GuestMemoryError> {
        let mut offset = 0usize;
        let mut region = 0usize;
        for (_, end) in self.chains.iter_mut() {
            let mut written = 0usize;
            for (addr, size) in self.regions.get(region..*end).unwrap_or_default() {
                let n = (*size).min(len.saturating_sub(offset));
                let Some(bytes) = self.rx_buf.get(offset..offset + n) else {
                    break;
                };
                if n > 0 {
                    self.mem.write_slice(bytes, *addr)?;
                }
                offset += n;
                written += n;
            }
            region = *end;
            *end = written;
        }
        Ok(())
    }

    /// Adds every chain in `chains` to the used ring with the length
    /// `len_of(its entry)`; returns whether any was added.
    fn return_chains(&mut self, len_of: impl Fn(usize) -> usize) -> bool {
        let mut used = false;
        for &(head, entry) in &self.chains {
            // A chain holds at most 2^32 bytes (writable_regions checks).
            let len = u32::try_from(len_of(entry)).unwrap_or(0);
            if let Err(e) = self.rx.add_used(&self.mem, head, len) {
                ratelimited!(error, "virtio-net: cannot return an rx buffer: {e}");
                break;
            }
            used = true;
        }
        self.chains.clear();
        used
    }
}
