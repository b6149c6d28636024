//! Boot-time vCPU registers for the PVH and 64-bit Linux boot protocols.
//!
//! The pure parts (register values, the GDT/IDT and page tables written into
//! guest memory) are separate from the ioctls that load them.
//!
//! Both protocols share one GDT layout: null, TSS (0x08), code (0x10), data
//! (0x18). Code and data sit where the Linux boot protocol wants `__BOOT_CS`
//! and `__BOOT_DS`; PVH leaves the selectors unspecified.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{self, gdt_entry, kvm_segment_from_gdt};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS with only the always-one bit 1 set: interrupts off.
const RFLAGS_RESERVED: u64 = 0x2;

/// Page-table entry bits: present, writable, and (in a PDE) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

const GDT_TSS: u8 = 1;
const GDT_CODE: u8 = 2;
const GDT_DATA: u8 = 3;

/// PVH starts in 32-bit protected mode: entry and start info must be below 4 GiB.
const PVH_REACH: u64 = 1 << 32;
/// The 64-bit boot page tables identity-map the first 1 GiB.
pub const IDENTITY_MAPPED: u64 = 1 << 30;

/// Errors setting up a vCPU's boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// `KVM_GET_SREGS` failed.
    #[error("failed to read the special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("failed to set the special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("failed to set the general-purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("failed to set the FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("failed to write the boot GDT and IDT into guest memory")]
    WriteDescriptorTables(#[source] GuestMemoryError),
    #[error("failed to write the boot page tables into guest memory")]
    WritePageTables(#[source] GuestMemoryError),
    #[error("{what} at {addr:#x} is not below {limit:#x}, out of reach at boot")]
    Unreachable {
        /// What the address is for.
        what: &'static str,
        /// The address.
        addr: u64,
        /// The first address out of reach.
        limit: u64,
    },
}

fn reachable(what: &'static str, addr: GuestAddress, limit: u64) -> Result<u64, RegsError> {
    if addr.0 < limit {
        Ok(addr.0)
    } else {
        Err(RegsError::Unreachable {
            what,
            addr: addr.0,
            limit,
        })
    }
}

/// Writes `gdt` at [`BOOT_GDT_START`] and an empty IDT at [`BOOT_IDT_START`],
/// and points the vCPU's segment and descriptor-table registers at them.
fn load_descriptor_tables(
    mem: &GuestMemoryMmap,
    gdt: &[u64; 4],
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .and_then(|()| mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)))
        .map_err(RegsError::WriteDescriptorTables)?;

    let code = kvm_segment_from_gdt(gdt[usize::from(GDT_CODE)], GDT_CODE);
    let data = kvm_segment_from_gdt(gdt[usize::from(GDT_DATA)], GDT_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt[usize::from(GDT_TSS)], GDT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    Ok(())
}

/// Writes the PVH GDT/IDT and sets `sregs` for 32-bit protected mode with
/// flat segments and paging off, as the PVH ABI requires.
pub fn configure_pvh_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let gdt = [
        0,
        gdt_entry(gdt::TSS_FLAGS, 0, 0x67),
        gdt_entry(gdt::CODE32_FLAGS, 0, 0xfffff),
        gdt_entry(gdt::DATA_FLAGS, 0, 0xfffff),
    ];
    load_descriptor_tables(mem, &gdt, sregs)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// Writes page tables identity-mapping the first 1 GiB with 2 MiB pages at
/// [`PML4_START`], [`PDPTE_START`] and [`PDE_START`].
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let mut pde = [0u8; 4096];
    for (i, slot) in (0u64..).zip(pde.chunks_exact_mut(8)) {
        slot.copy_from_slice(&((i << 21) | PDE_HUGE | PTE_PRESENT_RW).to_le_bytes());
    }
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .and_then(|()| mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START)))
        .and_then(|()| mem.write_slice(&pde, GuestAddress(PDE_START)))
        .map_err(RegsError::WritePageTables)
}

/// Writes the 64-bit GDT/IDT and identity page tables and sets `sregs` for
/// long mode with paging on, as the 64-bit Linux boot protocol requires.
pub fn configure_linux64_sregs(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = [
        0,
        gdt_entry(gdt::TSS_PAGE_FLAGS, 0, 0xfffff),
        gdt_entry(gdt::CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(gdt::DATA_FLAGS, 0, 0xfffff),
    ];
    load_descriptor_tables(mem, &gdt, sregs)?;
    write_identity_page_tables(mem)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(())
}

/// General-purpose registers for a PVH entry: `rip` = entry, `rbx` = address
/// of `hvm_start_info`; both must be below 4 GiB.
pub fn pvh_regs(entry: GuestAddress, start_info: GuestAddress) -> Result<kvm_regs, RegsError> {
    Ok(kvm_regs {
        rip: reachable("PVH entry point", entry, PVH_REACH)?,
        rbx: reachable("PVH start info", start_info, PVH_REACH)?,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
}

/// General-purpose registers for a 64-bit Linux entry: `rip` = entry, `rsi`
/// = `boot_params`, stack at [`BOOT_STACK_POINTER`]; entry and
/// `boot_params` must be identity-mapped (below [`IDENTITY_MAPPED`]).
pub fn linux64_regs(entry: GuestAddress, boot_params: GuestAddress) -> Result<kvm_regs, RegsError> {
    Ok(kvm_regs {
        rip: reachable("kernel entry point", entry, IDENTITY_MAPPED)?,
        rsi: reachable("boot_params", boot_params, IDENTITY_MAPPED)?,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    })
}

/// FPU state at boot: x87 control word 0x37f, MXCSR 0x1f80 (all exceptions
/// masked), the values after `FNINIT`/reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Puts the boot vCPU at a PVH `entry` with `start_info` in `rbx`.
pub fn setup_pvh_regs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), RegsError> {
    let regs = pvh_regs(entry, start_info)?;
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_pvh_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Puts the boot vCPU at a 64-bit Linux `entry` with `boot_params` in `rsi`.
pub fn setup_linux64_regs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    boot_params: GuestAddress,
) -> Result<(), RegsError> {
    let regs = linux64_regs(entry, boot_params)?;
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_linux64_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Loads [`boot_fpu`] into the vCPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode() {
        let mem = memory(0x10_0000);
        let mut sregs = kvm_sregs::default();
        configure_pvh_sregs(&mem, &mut sregs).unwrap();
        assert_eq!(
            (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer),
            (0x11, 0, 0, 0)
        );
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (0x10, 1, 0));
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xffff_ffff));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(
                (seg.selector, seg.type_, seg.limit),
                (0x18, 0x3, 0xffff_ffff)
            );
        }
        assert_eq!(
            (sregs.tr.selector, sregs.tr.type_, sregs.tr.s),
            (0x08, 0xb, 0)
        );
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!(read_u64(&mem, BOOT_GDT_START), 0);
        assert_eq!(read_u64(&mem, BOOT_GDT_START + 16), 0x00cf_9b00_0000_ffff);
        assert_eq!(read_u64(&mem, BOOT_GDT_START + 24), 0x00cf_9300_0000_ffff);
        assert_eq!(read_u64(&mem, BOOT_IDT_START), 0);
    }

    #[test]
    fn linux64_starts_in_long_mode() {
        let mem = memory(0x10_0000);
        let mut sregs = kvm_sregs::default();
        configure_linux64_sregs(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(
            (sregs.cr3, sregs.cr4, sregs.efer),
            (PML4_START, 0x20, 0x500)
        );
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x10, 1, 0));
        assert_eq!((sregs.ss.selector, sregs.ds.selector), (0x18, 0x18));
        assert_eq!(read_u64(&mem, BOOT_GDT_START + 16), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_one_gib() {
        let mem = memory(0x10_0000);
        write_identity_page_tables(&mem).unwrap();
        assert_eq!(read_u64(&mem, PML4_START), PDPTE_START | 3);
        assert_eq!(read_u64(&mem, PDPTE_START), PDE_START | 3);
        assert_eq!(read_u64(&mem, PDPTE_START + 8), 0);
        assert_eq!(read_u64(&mem, PDE_START), 0x83);
        assert_eq!(read_u64(&mem, PDE_START + 8), 0x20_0083);
        assert_eq!(read_u64(&mem, PDE_START + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn tables_need_guest_memory() {
        let mem = memory(0x1000);
        let mut sregs = kvm_sregs::default();
        let err = configure_linux64_sregs(&mem, &mut sregs).unwrap_err();
        assert!(matches!(err, RegsError::WritePageTables(_)));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
        let err = configure_pvh_sregs(&mem, &mut sregs).unwrap_err();
        assert!(matches!(err, RegsError::WriteDescriptorTables(_)));
    }

    #[test]
    fn general_registers() {
        let regs = pvh_regs(GuestAddress(0x100_0000), GuestAddress(0x6000)).unwrap();
        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags, regs.rsp),
            (0x100_0000, 0x6000, 2, 0)
        );
        let regs = linux64_regs(GuestAddress(0x10_0200), GuestAddress(0x7000)).unwrap();
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x10_0200, 0x7000, 2));
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn unreachable_entries_are_rejected() {
        let high = GuestAddress(1 << 32);
        assert!(matches!(
            pvh_regs(high, GuestAddress(0)),
            Err(RegsError::Unreachable { .. })
        ));
        assert!(pvh_regs(GuestAddress(0), high).is_err());
        assert!(linux64_regs(GuestAddress(IDENTITY_MAPPED), GuestAddress(0)).is_err());
        assert!(linux64_regs(GuestAddress(0), GuestAddress(u64::MAX)).is_err());
    }

    #[test]
    fn fpu_defaults() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr, fpu.fsw), (0x37f, 0x1f80, 0));
    }
}
