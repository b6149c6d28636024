//! virtio devices behind the virtio-mmio transport (version 2).
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] owns it
//! and speaks the register protocol to the guest driver. When the driver
//! sets DRIVER_OK, the transport hands the device its queues, one eventfd
//! per queue (written by KVM through an ioeventfd when the driver notifies
//! the queue) and an [`IrqTrigger`]; the device then runs its own worker
//! thread (crosvm's shape: an epoll loop over a typed token enum) until it
//! is reset.
//!
//! Every byte read from a queue is guest-controlled: devices use
//! `virtio-queue` to walk descriptor chains, check lengths and directions,
//! and answer a malformed request with an error status (or stop the queue),
//! never with a panic.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// Feature bit: the device complies with virtio 1.0 or later (required for
/// virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Avail ring flag: the driver asks for no interrupt when buffers are used
/// (virtio 1.2, 2.7.7; Linux sets it while it drains a queue by polling).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for the used buffers just added
/// to `queue`: not when its avail ring carries
/// [`VRING_AVAIL_F_NO_INTERRUPT`]. With `VIRTIO_F_EVENT_IDX` (which these
/// devices do not offer) `virtio-queue` decides; without it, its
/// `needs_notification` always says yes ("the flag isn't supported yet",
/// virtio-queue 0.18), so the flag is read here. The driver re-checks the
/// used ring when it clears the flag, so honouring it loses no buffer. An
/// avail ring the guest placed outside its memory gets the interrupt.
pub fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used ring's index (written by add_used) must be visible before
    // the flag is read, as in virtio-queue's own check.
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_or(true, |flags| flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

/// Raises the device's interrupt: sets a bit in the transport's
/// InterruptStatus register and signals the irqfd KVM injects from.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger that signals `evt` (registered with KVM as an irqfd).
    pub fn new(evt: EventFd) -> Self {
        IrqTrigger {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in InterruptStatus and interrupts the guest.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd, for registering as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
    #[error("device backend failed: {0}")]
    Backend(String),
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct ActiveQueues {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, set up and validated by the transport, in index order.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies it.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub irq: std::sync::Arc<IrqTrigger>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// The parts of a one-queue activation.
pub struct SingleQueue {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub queue_evt: EventFd,
    pub irq: std::sync::Arc<IrqTrigger>,
}

impl ActiveQueues {
    /// Splits the activation of a device that has exactly one queue.
    pub fn into_single(self) -> Result<SingleQueue, ActivateError> {
        let got = self.queues.len();
        let mut pairs = self.queues.into_iter().zip(self.queue_evts);
        match (pairs.next(), pairs.next()) {
            (Some((queue, queue_evt)), None) => Ok(SingleQueue {
                mem: self.mem,
                queue,
                queue_evt,
                irq: self.irq,
            }),
            _ => Err(ActivateError::QueueCount { expected: 1, got }),
        }
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`. Bytes
    /// beyond the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; devices ignore what they don't allow.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device (its worker thread) with the driver's queues.
    fn activate(&mut self, queues: ActiveQueues) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues, so that it can be activated
    /// again. Returns false if the device cannot be reset.
    fn reset(&mut self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn interrupt_follows_the_avail_ring_flag() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut q = vq.create_queue::<Queue>().unwrap();
        assert!(wants_interrupt(&mut q, &mem));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, vq.avail_addr())
            .unwrap();
        assert!(!wants_interrupt(&mut q, &mem));
        // Other flag bits do not matter.
        mem.write_obj(0xfffe_u16, vq.avail_addr()).unwrap();
        assert!(wants_interrupt(&mut q, &mem));
        // A ring the guest placed outside its memory: interrupt anyway.
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, vq.avail_addr())
            .unwrap();
        q.set_avail_ring_address(Some(0xffff_0000), Some(0));
        assert!(wants_interrupt(&mut q, &mem));
    }
}
