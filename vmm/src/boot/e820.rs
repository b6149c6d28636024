//! The guest's physical memory map, as both boot protocols describe it.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{EBDA_START, HIGH_RAM_START};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map: low RAM up to the EBDA (which holds the MP table), the
/// EBDA-to-1MiB hole as reserved, then the rest of each RAM region.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_RAM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIGH_RAM_START);
        let end = region.start_addr().0.saturating_add(region.len());
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn map_covers_ram_and_skips_the_legacy_hole() {
        let mem = create_guest_memory(256).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIGH_RAM_START,
                size: (256 << 20) - HIGH_RAM_START,
                kind: E820_RAM
            }
        );
        let big = create_guest_memory(4096).unwrap();
        let map = memory_map(&big);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3].addr, 1 << 32);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4096 << 20) - (HIGH_RAM_START - EBDA_START));
    }
}
