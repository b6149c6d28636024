//! The virtio-mmio transport: a guest driver's register accesses, of any
//! width and at any offset, on the bus in front of a transport over a real
//! device (virtio-rng, with or without a rate limit, a read-only virtio-blk
//! drive, or virtio-vsock). The script includes status transitions, queue
//! setup, notifications, interrupt acknowledgements, configuration space
//! accesses and resets; when the driver sets DRIVER_OK with valid queues,
//! the device starts its worker (on the worker pool, as in the VMM) and
//! serves whatever the script put in guest memory, until a reset or the
//! end of the input stops it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_vmm::devices::bus::Bus;
use airlock_vmm::devices::virtio::block::Block;
use airlock_vmm::devices::virtio::mmio::{status, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use airlock_vmm::devices::virtio::rng::{RateLimit, Rng};
use airlock_vmm::devices::virtio::vsock::Vsock;
use airlock_vmm::devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::driver::Input;
use crate::workers;

/// Where the transport's window lies on the bus.
pub const BASE: u64 = 0xd000_0000;
/// Guest memory.
const MEM_SIZE: usize = 0x1_0000;
/// Actions per input at most.
const MAX_ACTIONS: usize = 256;
/// Sleeps (to let an active device's worker run) per input at most.
const MAX_WAITS: usize = 2;

/// The registers, for the script's "register" offsets.
const REGISTERS: [u64; 22] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4,
];
/// Access widths: the registers' (4), the configuration space's others,
/// and lengths no driver uses.
const WIDTHS: [usize; 7] = [4, 1, 2, 8, 4, 3, 0];

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// The device's type, as the DeviceID register reads.
    pub device_id: u32,
    /// Times the transport was seen active after an action.
    pub active_seen: usize,
    /// Status register values read, in order.
    pub status_reads: Vec<u32>,
    /// The transport's last status.
    pub final_status: u32,
}

/// The cargo fuzz target `mmio_transport`.
pub fn mmio_transport(data: &[u8]) {
    let _ = mmio_trace(data);
}

/// The device picked by `pick`, and its directory (for the vsock socket).
fn device(pick: u8) -> Option<(Box<dyn VirtioDevice>, Option<tempfile::TempDir>)> {
    Some(match pick % 4 {
        0 => (Box::new(Rng::new(None)), None),
        1 => {
            let limit = RateLimit {
                bytes_per_sec: 4096,
                burst: 512,
            };
            (Box::new(Rng::new(Some(limit))), None)
        }
        2 => (
            Box::new(Block::new(crate::blk_dev::image(1), true, "mmio".into()).ok()?),
            None,
        ),
        _ => {
            let dir = tempfile::tempdir().ok()?;
            let vsock = Vsock::new(3, dir.path().join("v.sock"), false).ok()?;
            (Box::new(vsock), Some(dir))
        }
    })
}

/// Runs the script in `data`: a byte picks the device, then actions.
pub fn mmio_trace(data: &[u8]) -> Trace {
    let mut input = Input::new(data);
    let mut trace = Trace::default();
    workers::start();
    let Some((dev, _dir)) = device(input.u8()) else {
        return trace;
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return trace;
    };
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else {
        return trace;
    };
    let Ok(transport) = MmioTransport::new(dev, mem.clone(), irq) else {
        return trace;
    };
    let notifier = transport.notifier();
    let transport = Arc::new(Mutex::new(transport));
    let mut bus = Bus::new();
    if bus
        .insert_with_lock_free_writes(transport.clone(), notifier, BASE, MMIO_WINDOW)
        .is_err()
    {
        return trace;
    }
    let mut guest = Guest {
        bus: &bus,
        mem: &mem,
        transport: &transport,
        waits: 0,
    };
    trace.device_id = guest.read32(0x08);
    for _ in 0..MAX_ACTIONS {
        if input.is_empty() {
            break;
        }
        guest.step(&mut input, &mut trace);
        if transport.lock().is_ok_and(|t| t.is_active()) {
            trace.active_seen += 1;
        }
    }
    trace.final_status = guest.read32(0x70);
    // VM teardown: the worker stops and no longer touches guest memory.
    if let Ok(mut t) = transport.lock() {
        t.shutdown();
    }
    trace
}

struct Guest<'a> {
    bus: &'a Bus,
    mem: &'a GuestMemoryMmap,
    transport: &'a Mutex<MmioTransport>,
    waits: usize,
}

impl Guest<'_> {
    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(BASE + offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&self, offset: u64, value: u32) {
        self.bus.write(BASE + offset, &value.to_le_bytes());
    }

    /// The offset an action names: a register, the configuration space,
    /// or anywhere (also past the window).
    fn offset(input: &mut Input) -> u64 {
        let sel = input.u8();
        match sel >> 6 {
            0 | 1 => REGISTERS[usize::from(sel) % REGISTERS.len()],
            2 => 0x100 + u64::from(sel & 0x3f),
            _ => u64::from(input.u16()) % (MMIO_WINDOW + 0x100),
        }
    }

    fn step(&mut self, input: &mut Input, trace: &mut Trace) {
        match input.u8() % 8 {
            // A read of any width at any offset.
            0 => {
                let offset = Self::offset(input);
                let width = WIDTHS[usize::from(input.u8()) % WIDTHS.len()];
                let mut buf = [0u8; 8];
                self.bus.read(BASE + offset, &mut buf[..width]);
                if offset == 0x70 && width == 4 {
                    trace
                        .status_reads
                        .push(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
            // A write of any width at any offset.
            1 => {
                let offset = Self::offset(input);
                let width = WIDTHS[usize::from(input.u8()) % WIDTHS.len()];
                let value = input.u64().to_le_bytes();
                self.bus.write(BASE + offset, &value[..width]);
            }
            // A status write: the driver's next step, or any value.
            2 => {
                let value = match input.u8() % 7 {
                    0 => 0,
                    1 => status::ACKNOWLEDGE,
                    2 => status::ACKNOWLEDGE | status::DRIVER,
                    3 => status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                    4 => {
                        status::ACKNOWLEDGE
                            | status::DRIVER
                            | status::FEATURES_OK
                            | status::DRIVER_OK
                    }
                    5 => self.read32(0x70) | status::FAILED,
                    _ => input.u32(),
                };
                self.write32(0x70, value);
            }
            // Features: the driver accepts a word of them.
            3 => {
                let sel = u32::from(input.u8() % 3);
                let value = match input.u8() % 3 {
                    0 => {
                        self.write32(0x14, sel);
                        self.read32(0x10) // what the device offers
                    }
                    1 => u32::from(sel == 1), // VIRTIO_F_VERSION_1
                    _ => input.u32(),
                };
                self.write32(0x24, sel);
                self.write32(0x20, value);
            }
            // Queue setup: the selected queue's size and rings, and ready.
            4 => self.setup_queue(input),
            // A notification: through the bus (to the lock-free notifier).
            5 => {
                let queue = u32::from(input.u8() % 4);
                self.write32(QUEUE_NOTIFY, queue);
            }
            // Guest memory: descriptors, avail ring entries and indexes.
            6 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8() % 32);
                let bytes = input.bytes(len).to_vec();
                let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
            }
            // Let a running worker serve the queues, and acknowledge.
            _ => {
                let active = self.transport.lock().is_ok_and(|t| t.is_active());
                if active && self.waits < MAX_WAITS {
                    self.waits += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                let pending = self.read32(0x60);
                self.write32(0x64, pending);
            }
        }
    }

    /// Sets up queue `sel` as a driver does: its rings at one of three
    /// places in guest memory (or anywhere), a size, and ready.
    fn setup_queue(&self, input: &mut Input) {
        let sel = u32::from(input.u8() % 4);
        self.write32(0x30, sel);
        let max = self.read32(0x34);
        let size = match input.u8() % 4 {
            0 => max,
            1 => 16,
            2 => max / 2 + 1, // not a power of two
            _ => u32::from(input.u16()),
        };
        self.write32(0x38, size);
        let base = match input.u8() % 4 {
            3 => input.u64(),
            slot => u64::from(slot) * 0x4000,
        };
        let rings = [base, base.wrapping_add(0x1000), base.wrapping_add(0x2000)];
        for (reg, addr) in [0x80u64, 0x90, 0xa0].into_iter().zip(rings) {
            self.write32(reg, addr as u32);
            self.write32(reg + 4, (addr >> 32) as u32);
        }
        let ready = match input.u8() % 3 {
            0 | 1 => 1,
            _ => 0,
        };
        self.write32(0x44, ready);
    }
}
