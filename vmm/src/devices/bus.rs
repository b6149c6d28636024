//! Address-space dispatch for port I/O and MMIO exits.
//!
//! Every address and length here comes from the guest, so lookups use checked
//! arithmetic and an access must fall entirely inside one device's range.
//! Written here rather than taken from a crate because vm-device's bus pulls
//! in a different device trait than the one our devices implement; the logic
//! is a sorted range map and nothing more.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a [`Bus`]. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Handles a guest read. `data` is pre-filled with zeros.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device that is already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

/// Writes a device serves without its lock. They must not block and must
/// not need the state behind the device's mutex.
pub trait LockFreeWrite: Send + Sync {
    /// Handles a guest write at `offset` if it is one of these; returns
    /// whether it did (otherwise the device gets it under its lock).
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
    lock_free: Option<Arc<dyn LockFreeWrite>>,
}

/// A map from address ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by base address.
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        self.insert_entry(device, None, base, len)
    }

    /// Places `device` at `[base, base + len)`; writes go to `lock_free`
    /// first, and to the device (under its lock) only if it declines them.
    pub fn insert_with_lock_free_writes(
        &mut self,
        device: SharedDevice,
        lock_free: Arc<dyn LockFreeWrite>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_entry(device, Some(lock_free), base, len)
    }

    fn insert_entry(
        &mut self,
        device: SharedDevice,
        lock_free: Option<Arc<dyn LockFreeWrite>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b.saturating_add(e.len) > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(
            base,
            Entry {
                len,
                device,
                lock_free,
            },
        );
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + len)`, with the offset.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let len = u64::try_from(len).ok()?;
        let last = addr.checked_add(len.checked_sub(1)?)?;
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let dev_last = base.checked_add(entry.len - 1)?;
        (last <= dev_last).then_some((entry, offset))
    }

    /// Dispatches a read. Returns false, leaving `data` untouched, when no
    /// device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                data.fill(0);
                entry
                    .device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device claims the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                let served = entry
                    .lock_free
                    .as_ref()
                    .is_some_and(|f| f.write(offset, data));
                if !served {
                    entry
                        .device
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with the offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn bus_with_probe(base: u64, len: u64) -> (Bus, Arc<Mutex<Probe>>) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(probe.clone(), base, len).unwrap();
        (bus, probe)
    }

    #[test]
    fn dispatches_inside_range() {
        let (bus, probe) = bus_with_probe(0x3f8, 8);
        let mut b = [0xffu8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(probe.lock().unwrap().last_write, Some((7, vec![7])));
    }

    #[test]
    fn rejects_accesses_that_straddle_or_miss() {
        let (bus, probe) = bus_with_probe(0x3f8, 8);
        let mut b = [0xaau8; 4];
        // Straddles the end of the device.
        assert!(!bus.read(0x3fe, &mut b));
        assert_eq!(b, [0xaa; 4]);
        // Below, above, and zero-length accesses.
        assert!(!bus.read(0x3f7, &mut b[..1]));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x3f8, &[]));
        assert!(probe.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn garbage_addresses_and_sizes_never_panic() {
        let (bus, _probe) = bus_with_probe(u64::MAX - 7, 7);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 4096];
        for _ in 0..20_000 {
            // xorshift: deterministic garbage.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let addr = if seed & 1 == 0 {
                seed
            } else {
                u64::MAX - (seed % 16)
            };
            let len = (seed >> 40) as usize % buf.len();
            let _ = bus.read(addr, &mut buf[..len]);
            let _ = bus.write(addr, &buf[..len]);
        }
        // The very last byte of the address space is reachable, and an
        // access running past it is refused rather than wrapping.
        assert!(bus.read(u64::MAX - 1, &mut buf[..1]));
        assert!(!bus.read(u64::MAX - 1, &mut buf[..2]));
    }

    #[test]
    fn insert_rejects_overlap_and_bad_ranges() {
        let (mut bus, _) = bus_with_probe(0x60, 5);
        let other = Arc::new(Mutex::new(Probe::default()));
        assert_eq!(
            bus.insert(other.clone(), 0x64, 2),
            Err(BusError::Overlap { base: 0x64, len: 2 })
        );
        assert_eq!(
            bus.insert(other.clone(), 0x5f, 2),
            Err(BusError::Overlap { base: 0x5f, len: 2 })
        );
        assert!(bus.insert(other.clone(), 0x65, 1).is_ok());
        assert!(matches!(
            bus.insert(other.clone(), 0x1000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(other, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    /// Counts the writes at offset 4 it takes without the device's lock.
    #[derive(Default)]
    struct Doorbell(std::sync::atomic::AtomicU32);

    impl LockFreeWrite for Doorbell {
        fn write(&self, offset: u64, _data: &[u8]) -> bool {
            if offset != 4 {
                return false;
            }
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        }
    }

    #[test]
    fn lock_free_writes_do_not_wait_for_the_device_lock() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let bell = Arc::new(Doorbell::default());
        let mut bus = Bus::new();
        bus.insert_with_lock_free_writes(probe.clone(), bell.clone(), 0x1000, 8)
            .unwrap();
        // Another vCPU holds the device's lock (as a reset does).
        let held = probe.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let kicker = bus.clone();
        let t = std::thread::spawn(move || {
            tx.send(kicker.write(0x1004, &[1, 0, 0, 0])).unwrap();
        });
        // A generous bound: the write takes microseconds, but the machine
        // running the tests may be busy; a blocked write never returns.
        let served = rx.recv_timeout(std::time::Duration::from_secs(2));
        assert_eq!(served, Ok(true), "the kick waited for the device lock");
        t.join().unwrap();
        assert_eq!(bell.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(held.last_write.is_none());
        drop(held);
        // Other writes still reach the device.
        assert!(bus.write(0x1000, &[9]));
        assert_eq!(probe.lock().unwrap().last_write, Some((0, vec![9])));
    }
}
