//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register window through which the guest driver discovers a device,
//! negotiates features, sets up its queues and drives its status.
//!
//! Every access is guest-controlled. Registers are 32 bits wide and aligned;
//! other accesses to them are ignored (reads as zero). The configuration
//! space at 0x100 takes any width and is bounds-checked by the device.
//!
//! With two or more vCPUs, one may reset the device (status 0) while
//! another keeps kicking its queues. The reset holds the transport's lock
//! while it stops the device's worker; that stop needs nothing the lock
//! guards (see `worker.rs`), and a kick needs no lock at all: QueueNotify
//! is served by the [`QueueNotifier`] (a [`LockFreeWrite`] on the bus, when
//! KVM's ioeventfd did not already take the write), which only signals a
//! non-blocking eventfd.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueues, IrqTrigger, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::bus::{BusDevice, LockFreeWrite};
use crate::devices::ratelimit::ratelimited;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where KVM's ioeventfds listen.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4c52_4941; // "AIRL"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Errors from creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create an eventfd for a virtio device")]
    EventFd(#[source] std::io::Error),
    #[error("virtio device declares an invalid queue size {0}")]
    QueueSize(u16),
}

/// The queues' eventfds, signalled on QueueNotify without the transport's
/// lock: the eventfds are non-blocking, so a kick never waits.
#[derive(Debug)]
pub struct QueueNotifier {
    evts: Vec<EventFd>,
}

impl QueueNotifier {
    /// Signals queue `queue`'s eventfd; ignores queues that do not exist.
    pub fn notify(&self, queue: u32) {
        if let Some(evt) = usize::try_from(queue).ok().and_then(|q| self.evts.get(q)) {
            // The only failure is a full counter: the worker is woken anyway.
            let _ = evt.write(1);
        }
    }
}

impl LockFreeWrite for QueueNotifier {
    fn write(&self, offset: u64, data: &[u8]) -> bool {
        if offset != QUEUE_NOTIFY {
            return false;
        }
        // Registers are 32 bits wide; other widths are ignored.
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.notify(u32::from_le_bytes(bytes));
        }
        true
    }
}

/// A virtio device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    notifier: Arc<QueueNotifier>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; `irq_evt` is the eventfd KVM injects its interrupt from.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq_evt: EventFd,
    ) -> Result<Self, MmioError> {
        let queues = new_queues(device.queue_max_sizes())?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        Ok(MmioTransport {
            device,
            mem,
            irq: Arc::new(IrqTrigger::new(irq_evt)),
            queues,
            notifier: Arc::new(QueueNotifier { evts: queue_evts }),
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, for KVM ioeventfds on QueueNotify (datamatch
    /// = the queue index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.notifier.evts
    }

    /// What serves QueueNotify without the transport's lock, for
    /// [`crate::devices::bus::Bus::insert_with_lock_free_writes`].
    pub fn notifier(&self) -> Arc<QueueNotifier> {
        self.notifier.clone()
    }

    /// The interrupt, for registering its eventfd as an irqfd.
    pub fn irq(&self) -> &IrqTrigger {
        &self.irq
    }

    /// Whether the device is running.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            return None; // Queues are frozen once the device runs.
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let features = self.device.avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            0x50 => self.notify(value),
            0x64 => self.irq.ack(value),
            0x70 => self.write_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!(offset, value, "virtio-mmio: write to unknown register"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        match self.selected_queue() {
            Some(q) => f(q),
            None => tracing::debug!("virtio-mmio: queue setup refused (no such queue, or running)"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
            return; // Features are fixed once accepted.
        }
        let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        // A driver may only accept what was offered; extra bits are dropped.
        self.acked_features =
            (self.acked_features & !mask) | ((u64::from(value) << shift) & offered);
    }

    fn notify(&self, queue: u32) {
        // Normally KVM's ioeventfd consumes this write, or the bus hands it
        // to the notifier without the lock; otherwise it is served here.
        self.notifier.notify(queue);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        // Bits may only be added, except FAILED which the driver may set.
        if value & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = value,
                "virtio-mmio: status bits cleared"
            );
            return;
        }
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Version 2 of the transport needs VIRTIO_F_VERSION_1.
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self.queues.iter().all(|q| q.is_valid(&self.mem));
        let result = if !valid || self.status & status::FEATURES_OK == 0 {
            Err("queues not valid or features not accepted".to_string())
        } else {
            self.take_active_queues()
                .and_then(|q| self.device.activate(q).map_err(|e| e.to_string()))
        };
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                ratelimited!(
                    warn,
                    device = self.device.device_type(),
                    "virtio device not activated: {e}"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                let _ = self.irq.trigger(INT_CONFIG);
            }
        }
    }

    /// Copies of the queues and their eventfds for the device.
    fn take_active_queues(&self) -> Result<ActiveQueues, String> {
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).map_err(|e| format!("{e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = self
            .notifier
            .evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(ActiveQueues {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            irq: self.irq.clone(),
            acked_features: self.acked_features,
        })
    }

    /// Stops the device for good (VM teardown): its worker no longer runs
    /// and no longer touches guest memory once this returns.
    pub fn shutdown(&mut self) {
        if self.active && !self.device.reset() {
            ratelimited!(
                error,
                device = self.device.device_type(),
                "a virtio device could not be stopped"
            );
        }
        self.active = false;
    }

    fn reset(&mut self) {
        if self.active && !self.device.reset() {
            // The device cannot stop: keep it as it is, and tell the driver.
            self.status |= status::FAILED;
            return;
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.irq.ack(u32::MAX);
        for evt in &self.notifier.evts {
            let _ = evt.read(); // Drop notifications from before the reset.
        }
    }
}

fn new_queues(sizes: &[u16]) -> Result<Vec<Queue>, MmioError> {
    sizes
        .iter()
        .map(|s| Queue::new(*s).map_err(|_| MmioError::QueueSize(*s)))
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.read_config(offset - CONFIG_SPACE, data);
        }
        if let Ok(bytes) = <&mut [u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                *bytes = self.read_register(offset).to_le_bytes();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests;
