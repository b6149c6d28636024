//! Segment descriptors for the boot GDT, and their KVM register form.
//!
//! `flags` packs the descriptor's access byte (bits 0-7: type, S, DPL, P) and
//! its flag nibble (bits 12-15: AVL, L, D/B, G), as in the usual notation
//! where `0xa09b` is a 64-bit code segment.

use kvm_bindings::kvm_segment;

/// Flat 64-bit code segment: present, ring 0, execute/read, accessed, L, G.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flat 32-bit code segment: present, ring 0, execute/read, accessed, D, G.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flat data segment: present, ring 0, read/write, accessed, B, G.
pub const DATA_FLAGS: u16 = 0xc093;
/// Busy 32-bit TSS with byte granularity.
pub const TSS_FLAGS: u16 = 0x008b;
/// Busy 32-bit TSS with page granularity.
pub const TSS_PAGE_FLAGS: u16 = 0x808b;

/// Builds a segment descriptor from its flags, 32-bit base and 20-bit limit
/// (in bytes, or in 4 KiB pages when G is set; higher bits are ignored).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

fn entry_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

/// The segment limit in bytes, scaled to 4 KiB granularity when G is set, as
/// KVM expects it.
fn entry_limit(entry: u64) -> u32 {
    // Masked to 20 bits, so the cast is lossless.
    let raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    if bit(entry, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// Decodes a descriptor into the segment register KVM loads for it;
/// `table_index` is the descriptor's slot in the GDT (selector = index × 8,
/// RPL 0). A non-present descriptor gives an unusable segment.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(TSS_PAGE_FLAGS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, 0x67), 0x0000_8b00_0000_0067);
        assert_eq!(gdt_entry(0, 0, 0), 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = gdt_entry(TSS_FLAGS, 0x1234_5678, 0xa_bcde);
        let seg = kvm_segment_from_gdt(entry, 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xa_bcde);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn decodes_64bit_code() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 2);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.type_, seg.present, seg.dpl, seg.s), (0xb, 1, 0, 1));
        assert_eq!(
            (seg.l, seg.db, seg.g, seg.avl, seg.unusable),
            (1, 0, 1, 0, 0)
        );
    }

    #[test]
    fn decodes_32bit_code_and_data() {
        let code = kvm_segment_from_gdt(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 1);
        assert_eq!((code.type_, code.l, code.db, code.g), (0xb, 0, 1, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = kvm_segment_from_gdt(gdt_entry(DATA_FLAGS, 0, 0xfffff), 2);
        assert_eq!(
            (data.type_, data.s, data.db, data.g, data.present),
            (0x3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn decodes_tss() {
        let tss = kvm_segment_from_gdt(gdt_entry(TSS_FLAGS, 0, 0x67), 1);
        assert_eq!((tss.type_, tss.s, tss.present, tss.g), (0xb, 0, 1, 0));
        assert_eq!(tss.limit, 0x67);
        let tss = kvm_segment_from_gdt(gdt_entry(TSS_PAGE_FLAGS, 0, 0xfffff), 1);
        assert_eq!(tss.limit, 0xffff_ffff);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!((seg.present, seg.unusable, seg.selector), (0, 1, 0));
    }
}
