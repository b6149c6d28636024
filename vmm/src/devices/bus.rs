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

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A map from address ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by base address; the value holds the length and the device.
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b.saturating_add(*l) > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + len)`, with the offset.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let len = u64::try_from(len).ok()?;
        let last = addr.checked_add(len.checked_sub(1)?)?;
        let (base, (dev_len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let dev_last = base.checked_add(dev_len - 1)?;
        (last <= dev_last).then_some((dev, offset))
    }

    /// Dispatches a read. Returns false, leaving `data` untouched, when no
    /// device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                data.fill(0);
                dev.lock()
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
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
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
}
