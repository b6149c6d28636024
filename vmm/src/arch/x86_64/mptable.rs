//! Intel MultiProcessor Specification 1.4 table, which tells the guest about
//! its CPUs, the I/O APIC and how ISA interrupts reach it.
//!
//! The floating pointer and the configuration table sit back to back at
//! [`MPTABLE_START`], in the EBDA, where guests scan for them.

use std::mem::size_of;

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use super::layout::{APIC_ADDR, EBDA_END, IOAPIC_ADDR, IRQ_MAX, MPTABLE_START};
use super::MAX_VCPUS;

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const ISA_BUS_ID: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger mode conform to the bus (ISA: active high, edge).
const INT_FLAGS_CONFORM: u16 = 0;
/// Destination local APIC id meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpFloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    length_paragraphs: u8,
    spec_rev: u8,
    checksum: u8,
    features: [u8; 5],
}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpConfigHeader {
    signature: [u8; 4],
    length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

/// Processor entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpProcessor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

/// Bus entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpBus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpIoApic {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    address: u32,
}

/// I/O or local interrupt assignment entry (same layout for both).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpInterrupt {
    entry_type: u8,
    int_type: u8,
    flags: u16,
    source_bus: u8,
    source_irq: u8,
    dest_apic: u8,
    dest_pin: u8,
}

// SAFETY: each struct is `repr(C, packed)` and made only of integers and
// integer arrays, so it has no padding and every bit pattern is valid.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above: packed, integer fields only.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above: packed, integer fields only.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above: packed, integer fields only.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above: packed, integer fields only.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above: packed, integer fields only.
unsafe impl ByteValued for MpInterrupt {}

const _: () = {
    assert!(size_of::<MpFloatingPointer>() == 16);
    assert!(size_of::<MpConfigHeader>() == 44);
    assert!(size_of::<MpProcessor>() == 20);
    assert!(size_of::<MpBus>() == 8 && size_of::<MpIoApic>() == 8);
    assert!(size_of::<MpInterrupt>() == 8);
    // Both APICs sit below 4 GiB (the local APIC is the higher one).
    assert!(IOAPIC_ADDR < APIC_ADDR && APIC_ADDR <= u32::MAX as u64);
    assert!(MPTABLE_START + 16 <= u32::MAX as u64 && IRQ_MAX <= u8::MAX as u32);
};

/// Number of I/O interrupt entries: ISA IRQ n → I/O APIC pin n, 0..=IRQ_MAX.
const IO_INTERRUPTS: usize = IRQ_MAX as usize + 1;
/// Bytes of the table that don't depend on the CPU count.
const FIXED_SIZE: usize = size_of::<MpFloatingPointer>()
    + size_of::<MpConfigHeader>()
    + size_of::<MpBus>()
    + size_of::<MpIoApic>()
    + (IO_INTERRUPTS + 2) * size_of::<MpInterrupt>();

/// Most CPUs whose MP table still ends within the EBDA.
pub const MAX_CPUS_IN_EBDA: usize =
    ((EBDA_END - MPTABLE_START) as usize - FIXED_SIZE) / size_of::<MpProcessor>();

/// Size in bytes of the whole MP table (floating pointer included) for
/// `num_cpus` CPUs.
pub const fn mptable_size(num_cpus: u8) -> usize {
    FIXED_SIZE + num_cpus as usize * size_of::<MpProcessor>()
}

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table needs at least one CPU")]
    NoCpus,
    #[error("{0} CPUs is more than the MP table supports ({MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("guest memory does not cover the MP table at {MPTABLE_START:#x}")]
    NotEnoughMemory,
    #[error("failed to write the MP table into guest memory")]
    Write(#[source] GuestMemoryError),
}

/// The value that makes `bytes` sum to zero (mod 256).
fn checksum<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u8 {
    0u8.wrapping_sub(bytes.into_iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Pads or truncates `text` to an `N`-byte, space-filled identifier.
fn id<const N: usize>(text: &[u8]) -> [u8; N] {
    let mut out = [b' '; N];
    for (dst, src) in out.iter_mut().zip(text) {
        *dst = *src;
    }
    out
}

fn push<T: ByteValued>(buf: &mut Vec<u8>, value: T) {
    buf.extend_from_slice(value.as_slice());
}

/// The configuration table's entries (after its header), and their count.
fn entries(num_cpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = num_cpus + 1;
    let mut buf = Vec::with_capacity(mptable_size(num_cpus));
    for apic_id in 0..num_cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BSP } else { 0 };
        push(
            &mut buf,
            MpProcessor {
                entry_type: ENTRY_PROCESSOR,
                apic_id,
                apic_version: APIC_VERSION,
                flags,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                reserved: [0; 2],
            },
        );
    }
    push(
        &mut buf,
        MpBus {
            entry_type: ENTRY_BUS,
            bus_id: ISA_BUS_ID,
            bus_type: *b"ISA   ",
        },
    );
    push(
        &mut buf,
        MpIoApic {
            entry_type: ENTRY_IOAPIC,
            apic_id: ioapic_id,
            apic_version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            address: IOAPIC_ADDR as u32,
        },
    );
    for irq in 0..=IRQ_MAX as u8 {
        push(
            &mut buf,
            MpInterrupt {
                entry_type: ENTRY_IO_INTERRUPT,
                int_type: INT_VECTORED,
                flags: INT_FLAGS_CONFORM,
                source_bus: ISA_BUS_ID,
                source_irq: irq,
                dest_apic: ioapic_id,
                dest_pin: irq,
            },
        );
    }
    for (int_type, dest_apic, dest_pin) in [(INT_EXTINT, 0, 0), (INT_NMI, ALL_LOCAL_APICS, 1)] {
        push(
            &mut buf,
            MpInterrupt {
                entry_type: ENTRY_LOCAL_INTERRUPT,
                int_type,
                flags: INT_FLAGS_CONFORM,
                source_bus: ISA_BUS_ID,
                source_irq: 0,
                dest_apic,
                dest_pin,
            },
        );
    }
    // Bounded by MAX_VCPUS, so it always fits.
    let count = u16::from(num_cpus) + 2 + IO_INTERRUPTS as u16 + 2;
    (buf, count)
}

/// Builds the MP table bytes for `num_cpus` CPUs (APIC ids 0..num_cpus, the
/// I/O APIC gets id `num_cpus + 1`), to be placed at [`MPTABLE_START`].
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let (body, entry_count) = entries(num_cpus);
    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        // At most a few KiB (bounded by MAX_VCPUS).
        length: (size_of::<MpConfigHeader>() + body.len()) as u16,
        spec_rev: MP_SPEC_REV,
        oem_id: id(b"AIRLOCK"),
        product_id: id(b"MICROVM"),
        entry_count,
        lapic_addr: APIC_ADDR as u32,
        ..Default::default()
    };
    header.checksum = checksum(header.as_slice().iter().chain(&body));

    let mut pointer = MpFloatingPointer {
        signature: *b"_MP_",
        config_table: (MPTABLE_START + size_of::<MpFloatingPointer>() as u64) as u32,
        length_paragraphs: 1,
        spec_rev: MP_SPEC_REV,
        ..Default::default()
    };
    pointer.checksum = checksum(pointer.as_slice());

    let mut table = Vec::with_capacity(mptable_size(num_cpus));
    push(&mut table, pointer);
    push(&mut table, header);
    table.extend_from_slice(&body);
    Ok(table)
}

/// Writes the MP table for `num_cpus` CPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build_mptable(num_cpus)?;
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, table.len()) {
        return Err(MptableError::NotEnoughMemory);
    }
    mem.write_slice(&table, start).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Reads the table back from guest memory: floating pointer, header and
    /// the raw entries.
    fn read_table(mem: &GuestMemoryMmap) -> (MpFloatingPointer, MpConfigHeader, Vec<u8>) {
        let pointer: MpFloatingPointer = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let header_addr = GuestAddress(u64::from(pointer.config_table));
        let header: MpConfigHeader = mem.read_obj(header_addr).unwrap();
        let mut table = vec![0u8; usize::from(header.length)];
        mem.read_slice(&mut table, header_addr).unwrap();
        (pointer, header, table)
    }

    #[test]
    fn checksums_and_signatures() {
        let mem = memory(0x10_0000);
        setup_mptable(&mem, 2).unwrap();
        let (pointer, header, table) = read_table(&mem);
        assert_eq!(sum(pointer.as_slice()), 0);
        assert_eq!(sum(&table), 0);
        assert_eq!(&pointer.signature, b"_MP_");
        assert_eq!(&header.signature, b"PCMP");
        assert_eq!(
            (pointer.length_paragraphs, pointer.spec_rev, header.spec_rev),
            (1, 4, 4)
        );
        assert_eq!({ pointer.config_table }, MPTABLE_START as u32 + 16);
        assert_eq!({ header.lapic_addr }, APIC_ADDR as u32);
        assert_eq!(&header.oem_id, b"AIRLOCK ");
    }

    #[test]
    fn entries_describe_cpus_and_interrupts() {
        let mem = memory(0x10_0000);
        setup_mptable(&mem, 3).unwrap();
        let (_, header, table) = read_table(&mem);
        assert_eq!({ header.entry_count }, 3 + 1 + 1 + 24 + 2);
        let mut rest = &table[size_of::<MpConfigHeader>()..];
        let mut counts = [0usize; 5];
        let mut cpus = Vec::new();
        while let Some(&kind) = rest.first() {
            let len = if kind == ENTRY_PROCESSOR { 20 } else { 8 };
            if kind == ENTRY_PROCESSOR {
                let cpu = MpProcessor::from_slice(&rest[..len]).unwrap();
                cpus.push((cpu.apic_id, cpu.flags, cpu.apic_version));
            }
            if kind == ENTRY_IOAPIC {
                let ioapic = MpIoApic::from_slice(&rest[..len]).unwrap();
                assert_eq!(
                    (ioapic.apic_id, ioapic.apic_version, ioapic.flags),
                    (4, 0x11, 1)
                );
                assert_eq!({ ioapic.address }, IOAPIC_ADDR as u32);
            }
            if kind == ENTRY_IO_INTERRUPT {
                let int = MpInterrupt::from_slice(&rest[..len]).unwrap();
                assert_eq!((int.source_irq, int.dest_apic), (int.dest_pin, 4));
            }
            counts[usize::from(kind)] += 1;
            rest = &rest[len..];
        }
        assert_eq!(counts, [3, 1, 1, 24, 2]);
        assert_eq!(cpus, vec![(0, 3, 0x14), (1, 1, 0x14), (2, 1, 0x14)]);
    }

    #[test]
    fn table_fits_in_the_ebda() {
        for cpus in [1, MAX_VCPUS] {
            let table = build_mptable(cpus).unwrap();
            assert_eq!(table.len(), mptable_size(cpus));
            assert!(
                MPTABLE_START + table.len() as u64 <= EBDA_END,
                "{cpus} CPUs"
            );
        }
        assert!(
            MPTABLE_START as usize + mptable_size(MAX_CPUS_IN_EBDA as u8 + 1) > EBDA_END as usize
        );
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(build_mptable(0), Err(MptableError::NoCpus)));
        let too_many = MAX_VCPUS + 1;
        assert!(
            matches!(build_mptable(too_many), Err(MptableError::TooManyCpus(n)) if n == too_many)
        );
        assert!(build_mptable(u8::MAX).is_err());
    }

    #[test]
    fn rejects_small_memory() {
        let mem = memory(MPTABLE_START as usize + 64);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotEnoughMemory)
        ));
        let mem = memory(0x1000);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotEnoughMemory)
        ));
    }
}
