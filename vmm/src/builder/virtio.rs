//! Placing virtio devices: each gets a 4 KiB virtio-mmio window above the
//! MMIO gap's start, an interrupt line (an irqfd), an ioeventfd per queue on
//! its QueueNotify register, and a `virtio_mmio.device=` kernel argument so
//! the guest finds it without ACPI or a device tree.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::BuildError;
use crate::arch::x86_64::layout::{IRQ_BASE, IRQ_MAX, MMIO_DEVICES_START};
use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::net::{tap::Tap, Net};
use crate::devices::virtio::rng::{RateLimit, Rng};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::vstate::vm::Vm;

/// A transport shared between the MMIO bus and the VMM's teardown.
pub(crate) type SharedTransport = Arc<Mutex<MmioTransport>>;

/// The attached devices.
pub(crate) struct VirtioDevices {
    /// The MMIO bus holding their register windows.
    pub bus: Bus,
    /// Kernel arguments announcing them.
    pub cmdline: Vec<String>,
    /// The transports, to stop the devices at teardown.
    pub transports: Vec<SharedTransport>,
}

/// The devices `config` asks for: the drives first (in order, so the first
/// is `/dev/vda`), then vsock, then rng, then the NIC (last, so that the
/// others keep their places with or without it).
pub(crate) fn devices_from_config(
    config: &VmConfig,
) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let boxed = |e: &dyn std::fmt::Display| BuildError::Virtio(e.to_string().into());
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for drive in &config.drives {
        let block =
            Block::new(&drive.path, drive.read_only, drive.id.clone()).map_err(|e| boxed(&e))?;
        devices.push(Box::new(block));
    }
    if let Some(v) = &config.vsock {
        devices.push(Box::new(
            match v.listen_fd {
                Some(fd) => Vsock::with_listener(
                    v.guest_cid,
                    v.uds.clone(),
                    crate::config::take_listener(fd).map_err(|e| boxed(&e))?,
                    v.guest_connect,
                ),
                None => Vsock::new(v.guest_cid, v.uds.clone(), v.guest_connect),
            }
            .map_err(|e| boxed(&e))?,
        ));
    }
    if config.rng {
        devices.push(Box::new(Rng::new(Some(RateLimit::default()))));
    }
    if let Some(net) = &config.net {
        let fd =
            crate::config::take_tap(net.tap_fd).map_err(|e| BuildError::Virtio(Box::new(e)))?;
        let tap = Tap::new(fd).map_err(|e| BuildError::Virtio(Box::new(e)))?;
        devices.push(Box::new(Net::new(tap, net.mac.bytes())));
    }
    Ok(devices)
}

/// Attaches `devices` to the VM.
pub(crate) fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<VirtioDevices, BuildError> {
    let max = (IRQ_MAX - IRQ_BASE + 1) as usize;
    if devices.len() > max {
        return Err(BuildError::TooManyDevices(devices.len(), max));
    }
    let mut attached = VirtioDevices {
        bus: Bus::new(),
        cmdline: Vec::new(),
        transports: Vec::new(),
    };
    for (i, device) in devices.into_iter().enumerate() {
        let base = MMIO_DEVICES_START + i as u64 * MMIO_WINDOW;
        let irq = IRQ_BASE + i as u32;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        let transport = MmioTransport::new(device, mem.clone(), irq_evt)
            .map_err(|e| BuildError::Virtio(Box::new(e)))?;
        vm.register_irqfd(transport.irq().eventfd(), irq)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|e| BuildError::Virtio(Box::new(e)))?;
        }
        // QueueNotify writes that KVM's ioeventfds do not take (other
        // widths or values) are served without the transport's lock too.
        let notifier = transport.notifier();
        let transport = Arc::new(Mutex::new(transport));
        attached
            .bus
            .insert_with_lock_free_writes(transport.clone(), notifier, base, MMIO_WINDOW)
            .map_err(BuildError::Bus)?;
        attached
            .cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        attached.transports.push(transport);
    }
    Ok(attached)
}

/// Stops a device's worker, so that it no longer touches guest memory.
pub(crate) fn stop(transport: &SharedTransport) {
    transport
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown();
}
