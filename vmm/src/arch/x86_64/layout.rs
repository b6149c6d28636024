//! Where things live in guest physical memory.
//!
//! Low memory (below 1 MiB) holds the boot structures; the kernel goes at
//! [`HIGH_RAM_START`]. RAM is split around the MMIO gap below 4 GiB.

use vm_memory::GuestAddress;

/// The boot GDT (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (one empty entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const MODLIST_START: u64 = 0x6040;
/// PVH e820 memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// bzImage `boot_params` (the zero page). PVH and bzImage boots are exclusive,
/// so this may share its address with [`MEMMAP_START`].
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity mapping (512 × 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line, including its NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area.
pub const EBDA_START: u64 = 0x9fc00;
/// End (exclusive) of the Extended BIOS Data Area, where the legacy VGA hole begins.
pub const EBDA_END: u64 = 0xa0000;
/// The MP table lives at the start of the EBDA, where guests look for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// First byte of RAM above the legacy hole: where the kernel is loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB (no RAM here).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO gap; RAM resumes here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The I/O APIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS region (three pages, `KVM_SET_TSS_ADDR`).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// First virtio-mmio device window; each device gets 4 KiB from here.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// First GSI handed to devices (the legacy ones sit below).
pub const IRQ_BASE: u32 = 5;
/// Last GSI the I/O APIC serves.
pub const IRQ_MAX: u32 = 23;

// The boot structures must not overlap: the GDT has four entries and the IDT
// one, the stack grows down below the PML4, and the MP table ends in the EBDA.
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_INFO_START < MODLIST_START && MODLIST_START < MEMMAP_START);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START + 0x1000 <= PDPTE_START && PDPTE_START + 0x1000 <= PDE_START);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(EBDA_END <= HIGH_RAM_START);
    assert!(MMIO_GAP_START <= MMIO_DEVICES_START && IOAPIC_ADDR < MMIO_GAP_END);
    assert!(KVM_IDENTITY_MAP_ADDRESS + 0x1000 == KVM_TSS_ADDRESS);
};

/// Splits `size` bytes of guest RAM into `(start, length)` regions that avoid
/// the MMIO gap: `[0, size)` if it fits below [`MMIO_GAP_START`], otherwise
/// the low part up to the gap and the rest from [`MMIO_GAP_END`]. The high
/// region is clamped so it never wraps the 64-bit address space.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        return vec![(GuestAddress(0), size)];
    }
    let high = (size - MMIO_GAP_START).min(u64::MAX - MMIO_GAP_END);
    vec![
        (GuestAddress(0), MMIO_GAP_START),
        (GuestAddress(MMIO_GAP_END), high),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            arch_memory_regions(128 << 20),
            vec![(GuestAddress(0), 128 << 20)]
        );
        assert_eq!(
            arch_memory_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let regions = arch_memory_regions(4 << 30);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START),
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn huge_memory_does_not_wrap() {
        let regions = arch_memory_regions(u64::MAX);
        let (start, len) = regions[1];
        assert!(start.0.checked_add(len).is_some());
    }
}
