//! virtio-net (virtio 1.2, section 5.1): one NIC whose frames go to and
//! come from a tap descriptor handed over by whoever started the VMM
//! ([`tap::Tap`]).
//!
//! Queues: rx (0) and tx (1); no control queue. The device offers what a
//! tap carries without translation: checksum and segmentation offloads
//! both ways and mergeable receive buffers, as Firecracker does (less
//! `VIRTIO_RING_F_EVENT_IDX`, which no device here offers). The guest's
//! `virtio_net_hdr_v1` is the tap's vnet header, so a frame crosses with
//! its header as it is ([`tx`], [`rx`]), copied once through a fixed
//! buffer.
//!
//! One worker thread ([`event_loop`]) waits on the two queue eventfds, the
//! tap and the kill eventfd. It reads the tap only while the guest has
//! posted receive buffers, so a guest that posts none makes the VMM read
//! and hold nothing (the kernel's tap queue bounds the rest). Memory is
//! fixed: one frame buffer each way and, while the guest's buffers are too
//! few for it, the one frame read last.
//!
//! The worker checks for a stop before each frame: a step of at most one
//! frame of [`MAX_FRAME_LEN`] bytes, over at most [`MAX_CHAIN_DESCS`]
//! descriptors (tx) or twice as many (rx: a frame over several chains),
//! whatever the guest queued; and after [`FRAME_BUDGET`] frames of one
//! queue it looks at its events again, so that a tx flood neither starves
//! the rx side nor delays a stop.

pub mod event_loop;
pub mod rx;
pub mod tap;
pub mod tx;

#[cfg(test)]
mod tests;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use self::tap::{Tap, VNET_HDR_LEN};
use super::worker::{Stop, StopFlag, WorkerHandle};
use super::{device_type, ActivateError, ActiveQueues, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::ratelimit::ratelimited;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Descriptors accepted in one chain (an indirect table can hold more).
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// The largest frame either way: a 64 KiB GSO frame, its Ethernet header
/// and the vnet header (Linux's and Firecracker's bound too).
pub const MAX_FRAME_LEN: usize = 65_550 + VNET_HDR_LEN;
/// Frames taken from one queue before the worker looks at its events again.
pub const FRAME_BUDGET: usize = 64;

/// The features offered: what the tap carries as it is.
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_UFO
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_UFO
    | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Errors of the device's worker.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net event loop failed")]
    EventLoop(#[source] std::io::Error),
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    /// Used buffers were added: the guest may want an interrupt.
    pub used: bool,
    /// The budget ran out with work left: come back without waiting.
    pub more: bool,
}

/// The queues, the tap and the buffers, owned by the worker. Public for
/// the fuzz targets (`tests/fuzz`).
pub struct NetQueues {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub tap: Tap,
    /// Whether the driver took `VIRTIO_NET_F_MRG_RXBUF`.
    mrg_rxbuf: bool,
    tx_buf: Box<[u8]>,
    rx_buf: Box<[u8]>,
    /// The length of the frame in `rx_buf` that waits for more guest
    /// buffers (it was read, but the posted ones were too few).
    rx_pending: Option<usize>,
    /// Reading the tap failed: wait for the guest's next rx notification.
    rx_failed: bool,
    /// Scratch for an rx frame: the chains' writable regions, and each
    /// chain's head with the end of its regions (reused; at most
    /// 2 x [`MAX_CHAIN_DESCS`] regions and the queue size of chains).
    regions: Vec<(GuestAddress, usize)>,
    chains: Vec<(u16, usize)>,
    /// Frames dropped either way (malformed, too large, or refused by the
    /// tap).
    dropped: u64,
    /// Checked before each frame.
    stop: StopFlag,
}

impl NetQueues {
    /// The worker's state for a driver that accepted `acked_features`.
    pub fn new(mem: GuestMemoryMmap, rx: Queue, tx: Queue, tap: Tap, acked_features: u64) -> Self {
        NetQueues {
            mem,
            rx,
            tx,
            tap,
            mrg_rxbuf: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            tx_buf: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            rx_buf: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            rx_pending: None,
            rx_failed: false,
            regions: Vec::new(),
            chains: Vec::new(),
            dropped: 0,
            stop: StopFlag::new(),
        }
    }

    /// Frames dropped so far, either way.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Counts a dropped frame; returns the count so far.
    fn drop_frame(&mut self) -> u64 {
        self.dropped = self.dropped.saturating_add(1);
        self.dropped
    }
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    /// Present while inactive; the worker owns it while active.
    tap: Option<Tap>,
    worker: Option<WorkerHandle<Tap>>,
}

impl Net {
    /// A NIC with address `mac` on `tap`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            mac,
            tap: Some(tap),
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// `struct virtio_net_config`: the MAC only (no status, no MTU).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.mac.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// The MAC is the device's (virtio 1.x drivers do not write it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        self.reset();
        let got = active.queues.len();
        let mut queues = active.queues.into_iter();
        let mut evts = active.queue_evts.into_iter();
        let (Some(rx), Some(tx), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let (Some(rx_evt), Some(tx_evt), None) = (evts.next(), evts.next(), evts.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let tap = self.tap.take().ok_or_else(|| {
            ActivateError::Backend("virtio-net's tap was lost after a worker panic".into())
        })?;
        let (mem, irq, acked) = (active.mem, active.irq, active.acked_features);
        let worker = WorkerHandle::spawn("airlock-net", move |kill: Stop| {
            if let Err(e) = tap.set_offload(acked) {
                // The tap keeps its offloads (none, as opened): it then
                // sends the guest plain frames, which it can always take.
                ratelimited!(error, "virtio-net: cannot set the tap's offloads: {e}");
            }
            let mut q = NetQueues::new(mem, rx, tx, tap, acked);
            q.stop = kill.flag().clone();
            if let Err(e) = event_loop::run(&mut q, &rx_evt, &tx_evt, &irq, &kill) {
                ratelimited!(error, "virtio-net worker stopped: {e}");
            }
            q.tap
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(worker) = self.worker.take() {
            self.tap = worker.stop();
        }
        true
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}
