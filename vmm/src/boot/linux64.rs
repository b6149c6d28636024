//! The 64-bit Linux boot protocol: the zero page (`boot_params`) with the
//! setup header, command line, initrd and E820 map. Used for a bzImage and
//! for an ELF `vmlinux` without a PVH note.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::kernel::LoadedKernel;
use super::{e820, BootError, InitrdRegion};
use crate::arch::x86_64::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::vstate::vcpu::BootEntry;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Writes the zero page and returns the 64-bit entry.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<InitrdRegion>,
    cmdline_len: usize,
) -> Result<BootEntry, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820::memory_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Write("E820 memory map"));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(|_| BootError::Write("zero page"))?;
    Ok(BootEntry::Linux64 {
        entry: kernel.entry,
        boot_params: GuestAddress(ZERO_PAGE_START),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::boot::KernelFormat;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(0x100_0200),
            end: 0x200_0000,
            setup_header: None,
        };
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            size: 4096,
        };
        let entry = write_boot_params(&mem, &kernel, Some(initrd), 42).unwrap();
        assert!(matches!(entry, BootEntry::Linux64 { .. }));
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (flag, magic, ramdisk, size) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.ramdisk_image,
            p.hdr.cmdline_size,
        );
        assert_eq!(
            (flag, magic, ramdisk, size),
            (0xaa55, KERNEL_HDR_MAGIC, 0x300_0000, 42)
        );
        assert_eq!(p.e820_entries, 3);
    }
}
