//! Kernel image loading through `linux-loader`: an ELF `vmlinux` (entered
//! through PVH when it has the note), or a bzImage.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{BzImage, Error as LoaderError, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::arch::x86_64::layout::HIGH_RAM_START;

/// The kernel's format, which decides its entry protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF `vmlinux` with a PVH entry note (preferred: no decompression).
    ElfPvh,
    /// ELF `vmlinux` without PVH, entered in 64-bit mode at `e_entry`.
    ElfLinux64,
    /// A compressed bzImage, entered through its 64-bit entry point.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug)]
pub struct LoadedKernel {
    /// The entry protocol.
    pub format: KernelFormat,
    /// The entry point.
    pub entry: GuestAddress,
    /// The first byte after the kernel.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BootError::KernelMissing(path.to_path_buf()),
        _ => BootError::Read {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let not_a_kernel = |reason: String| BootError::NotAKernel {
        path: path.to_path_buf(),
        reason,
    };
    let highmem = Some(GuestAddress(HIGH_RAM_START));
    match Elf::load(mem, None, &mut file, highmem) {
        Ok(r) => {
            let (format, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (KernelFormat::ElfPvh, addr),
                _ => (KernelFormat::ElfLinux64, r.kernel_load),
            };
            Ok(LoadedKernel {
                format,
                entry,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut file, highmem)
                .map_err(|e| not_a_kernel(format!("neither an ELF vmlinux nor a bzImage ({e})")))?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
            let entry = r
                .kernel_load
                .0
                .checked_add(0x200)
                .map(GuestAddress)
                .ok_or_else(|| not_a_kernel("entry point overflows".into()))?;
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                entry,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Err(e) => Err(not_a_kernel(format!(
            "bad ELF image ({e}); is guest memory large enough?"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn missing_and_bogus_kernels_are_named() {
        let mem = create_guest_memory(16).unwrap();
        let missing = Path::new("/nonexistent/vmlinux");
        let err = load_kernel(&mem, missing).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel not found at /nonexistent/vmlinux (build the guest image with \
             guest-image/build, or pass --kernel)"
        );
        let bogus =
            std::env::temp_dir().join(format!("airlock-bogus-kernel-{}", std::process::id()));
        std::fs::write(&bogus, vec![0x5au8; 8192]).unwrap();
        let err = load_kernel(&mem, &bogus).unwrap_err();
        assert!(
            err.to_string().contains("is not a bootable x86_64 kernel"),
            "{err}"
        );
        std::fs::remove_file(bogus).unwrap();
    }
}
