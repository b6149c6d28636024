//! The PVH boot protocol: `hvm_start_info`, its memory map and module list
//! (the initrd), written with `linux-loader`'s PVH configurator.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{e820, BootError, InitrdRegion};
use crate::arch::x86_64::layout::{CMDLINE_START, MEMMAP_START, MODLIST_START, PVH_INFO_START};
use crate::vstate::vcpu::BootEntry;

/// `hvm_start_info.magic`: "xEn3" with the top bit set.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the start info and returns the PVH entry.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    initrd: Option<InitrdRegion>,
) -> Result<BootEntry, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820::memory_map(mem)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.0,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: MODLIST_START,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| BootError::Write("PVH start info"))?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: GuestAddress(PVH_INFO_START),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn start_info_points_at_map_modules_and_cmdline() {
        let mem = create_guest_memory(64).unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            size: 12345,
        };
        let entry = write_start_info(&mem, GuestAddress(0x100_0000), Some(initrd)).unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: GuestAddress(0x100_0000),
                start_info: GuestAddress(PVH_INFO_START)
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 12345));
        let last: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
    }
}
