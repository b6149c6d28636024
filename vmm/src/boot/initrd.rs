//! Placing the initrd: page-aligned, as high in low memory as it fits, and
//! never over the kernel.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{BootError, InitrdRegion};
use crate::arch::x86_64::layout::MMIO_GAP_START;

const PAGE_MASK: u64 = !0xfff;

/// Loads the initrd at `path` into `mem`, above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRegion, BootError> {
    let mut file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BootError::InitrdMissing(path.to_path_buf()),
        _ => BootError::Read {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let read_err = |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let too_big = BootError::InitrdTooBig {
        initrd_mib: size.div_ceil(1 << 20),
    };
    // The kernel reads the initrd through its low-memory identity map, so it
    // goes in the region below the MMIO gap.
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().0.saturating_add(r.len()))
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .ok_or(BootError::Write("initrd"))?;
    let addr = low_end.checked_sub(size).ok_or(too_big)? & PAGE_MASK;
    if addr < kernel_end {
        return Err(BootError::InitrdTooBig {
            initrd_mib: size.div_ceil(1 << 20),
        });
    }
    let len = usize::try_from(size).map_err(|_| BootError::Write("initrd"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::Write("initrd"))?;
    Ok(InitrdRegion {
        addr: GuestAddress(addr),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn temp_file(name: &str, len: usize) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("airlock-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; len]).unwrap();
        p
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = create_guest_memory(16).unwrap();
        let p = temp_file("initrd-ok", 10_000);
        let r = load_initrd(&mem, &p, 0x20_0000).unwrap();
        assert_eq!(r.addr.0 & 0xfff, 0);
        assert!(r.addr.0 + r.size <= 16 << 20);
        assert_eq!(mem.read_obj::<u8>(r.addr).unwrap(), 7);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn too_big_initrd_is_refused_with_its_size() {
        let mem = create_guest_memory(4).unwrap();
        let p = temp_file("initrd-big", 3 << 20);
        let err = load_initrd(&mem, &p, 0x20_0000).unwrap_err();
        assert!(err.to_string().contains("(3 MiB) does not fit"), "{err}");
        let huge = temp_file("initrd-huge", 5 << 20);
        assert!(matches!(
            load_initrd(&mem, &huge, 0),
            Err(BootError::InitrdTooBig { .. })
        ));
        let missing = load_initrd(&mem, Path::new("/nonexistent/initrd"), 0).unwrap_err();
        assert!(missing
            .to_string()
            .starts_with("initrd not found at /nonexistent/initrd"));
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(huge).unwrap();
    }
}
