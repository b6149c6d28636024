//! Guest memory: one sealed `memfd` mapped shared into the VMM, and the
//! wipe that overwrites every page of it the guest touched.
//!
//! Guest RAM lives in a memfd rather than an anonymous mapping so that it
//! can outlive the VMM that maps it: `airlock-vmm` forks a keeper (see
//! `keeper.rs`) that holds the same memfd and wipes it once the VMM is gone,
//! however it went (clean exit, SIGKILL, the OOM killer, a seccomp kill, an
//! abort). An anonymous mapping dies with its process, unwiped.
//!
//! The memfd is sealed against shrinking and growing, so that a VMM taken
//! over by its guest cannot truncate it (which frees pages without
//! overwriting them) before the keeper wipes it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::arch_memory_regions;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size of {0} MiB is too large for this host")]
    TooLarge(u64),
    #[error("cannot create the guest memory file ({mib} MiB)")]
    Memfd {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest memory file is {got} bytes, not the {want} bytes of {mib} MiB")]
    WrongSize { got: u64, want: u64, mib: u64 },
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up a guest memory region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("a guest memory region wraps the address space")]
    Wraps,
    #[error("cannot set up guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Alignment of guest RAM in the VMM's address space. With guest-physical
/// and host-virtual addresses congruent modulo 2 MiB, KVM can back the guest
/// with 2 MiB pages wherever the host gives huge pages to shared memory
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
const HUGE_PAGE: usize = 2 << 20;

/// Creates the memfd that holds `mib` MiB of guest RAM: sized, sealed
/// against shrinking and growing, nothing allocated yet.
pub fn guest_memfd(mib: u64) -> Result<File, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::TooLarge(mib))?;
    let len = i64::try_from(bytes).map_err(|_| MemoryError::TooLarge(mib))?;
    let err = |source| MemoryError::Memfd { mib, source };
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"airlock-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd with a checked, non-negative length.
    if unsafe { libc::ftruncate(file.as_raw_fd(), len) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl with integer arguments on our own fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// One shared mapping of part of the memfd that [`GuestRam`] owns.
#[derive(Debug)]
struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by `GuestRam`; the pointer is
// only used to unmap it, once, in `Mapping::drop`.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset`, shared, at a 2 MiB aligned
    /// address, marked for huge pages and left out of core dumps (they
    /// would copy guest memory to disk).
    fn new(file: &File, offset: u64, len: usize) -> std::io::Result<Self> {
        let total = len
            .checked_add(HUGE_PAGE)
            .ok_or(std::io::ErrorKind::OutOfMemory)?;
        let offset = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // Reserve an address range with room to align, then map the file
        // over the aligned part of it.
        let none = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a new inaccessible anonymous mapping, not MAP_FIXED:
        // nothing existing is affected; the result is checked.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, none, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let raw = raw.cast::<u8>();
        let head = (HUGE_PAGE - raw as usize % HUGE_PAGE) % HUGE_PAGE;
        // SAFETY: `head < HUGE_PAGE`, so `raw + head` and the `len` bytes after
        // it lie inside the `total`-byte reservation.
        let addr = unsafe { raw.add(head) };
        let (prot, fd) = (libc::PROT_READ | libc::PROT_WRITE, file.as_raw_fd());
        let shared = libc::MAP_SHARED | libc::MAP_FIXED;
        // The file is sized by `guest_memfd` and checked by `GuestRam::new`.
        // SAFETY: MAP_FIXED over the reservation just made, which nothing
        // else refers to; the file holds at least `offset + len` bytes.
        let mapped = unsafe { libc::mmap(addr.cast(), len, prot, shared, fd, offset) };
        let tail = total - head - len;
        // SAFETY: unmapping the unaligned head and the tail of the
        // reservation, which nothing refers to.
        unsafe {
            if head > 0 {
                libc::munmap(raw.cast(), head);
            }
            if tail > 0 {
                libc::munmap(addr.add(len).cast(), tail);
            }
        }
        if mapped == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: the aligned part of our own reservation.
            unsafe { libc::munmap(addr.cast(), len) };
            return Err(e);
        }
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_DONTDUMP] {
            // SAFETY: advice on our own mapping; failure (no huge pages for
            // shared memory) only loses the optimisation.
            unsafe { libc::madvise(addr.cast(), len, advice) };
        }
        Ok(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // `GuestRam` drops its memory view before its mappings, and by its
        // contract no clone of the view is used after that.
        // SAFETY: made by `Mapping::new`, unmapped once, here, when unused.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Guest RAM: the memfd, its mappings and the `vm-memory` view of them.
///
/// Clones of the memory view must not outlive the `GuestRam`, which unmaps
/// the memory when dropped: the VMM stops its vCPUs and devices (the
/// only holders of clones) before it drops guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    // Dropped in this order: the view, then the mappings it points into.
    mem: GuestMemoryMmap,
    #[allow(dead_code)] // Held only to unmap on drop.
    mappings: Vec<Mapping>,
    file: File,
    bytes: u64,
}

impl GuestRam {
    /// Maps `mib` MiB of guest RAM from `file` (made by [`guest_memfd`]),
    /// split around the MMIO gap below 4 GiB. Nothing is touched: pages are
    /// only allocated when the guest uses them.
    pub fn new(file: File, mib: u64) -> Result<Self, MemoryError> {
        let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::TooLarge(mib))?;
        let got = file
            .metadata()
            .map_err(|source| MemoryError::Map { mib, source })?
            .len();
        if got != bytes {
            return Err(MemoryError::WrongSize {
                got,
                want: bytes,
                mib,
            });
        }
        let mut mappings = Vec::new();
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (guest_addr, len) in arch_memory_regions(bytes) {
            let size = usize::try_from(len).map_err(|_| MemoryError::TooLarge(mib))?;
            let mapping = Mapping::new(&file, offset, size)
                .map_err(|source| MemoryError::Map { mib, source })?;
            offset += len; // The regions add up to `bytes`.
            let addr = mapping.addr;
            mappings.push(mapping);
            // SAFETY: `addr` is a live shared mapping of exactly `size` bytes,
            // owned by the returned `GuestRam`, which outlives the region.
            let region = unsafe {
                MmapRegionBuilder::new(size)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_SHARED)
                    .with_raw_mmap_pointer(addr)
            }
            .build()
            .map_err(MemoryError::Region)?;
            let region = GuestRegionMmap::new(region, guest_addr).ok_or(MemoryError::Wraps)?;
            regions.push(region);
        }
        let mut ram = GuestRam {
            mem: GuestMemoryMmap::default(),
            mappings,
            file,
            bytes,
        };
        // On error, dropping `ram` unmaps the mappings.
        ram.mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
        Ok(ram)
    }

    /// The guest memory, as `vm-memory` sees it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Overwrites every page the guest touched (see [`wipe_file`]).
    pub fn wipe(&self) -> WipeReport {
        wipe_file(&self.file, self.bytes)
    }
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Maps `mib` MiB of guest RAM in a memfd of its own.
pub fn create_guest_memory(mib: u64) -> Result<GuestRam, MemoryError> {
    GuestRam::new(guest_memfd(mib)?, mib)
}

/// What a wipe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WipeReport {
    /// Pages overwritten (the ones the guest touched).
    pub wiped_pages: u64,
    /// All pages of guest memory.
    pub total_pages: u64,
    /// How the touched pages were found.
    pub method: WipeMethod,
    /// How long the wipe took.
    pub duration: Duration,
}

/// How a wipe found the pages to overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipeMethod {
    /// `lseek(SEEK_DATA)`: only pages the memfd holds, in RAM or in swap.
    SeekData,
    /// Every page, because the memfd could not be searched. Slower, never
    /// weaker.
    Full,
}

const PAGE_SIZE: u64 = 4096;
/// Zeroes written per `pwrite`: a `.bss` array, so it costs no file size
/// and reads as the shared zero page.
const CHUNK: usize = 1 << 20;
static ZEROES: [u8; CHUNK] = [0; CHUNK];

/// Overwrites with zeros every page of the guest memory file that holds
/// data (the pages the guest touched), then frees them (punches them out of
/// the file). `bytes` is the file's size. Nothing may map the file for
/// writing while it runs: the VM's vCPUs and devices are stopped, or its
/// VMM is gone.
///
/// Written here rather than taken from a crate: no rust-vmm crate wipes a
/// memory file; the work is `lseek` + `pwrite` + `fallocate`.
pub fn wipe_file(file: &File, bytes: u64) -> WipeReport {
    let start = Instant::now();
    let (wiped, method) = match wipe_data(file, bytes) {
        Ok(pages) => (pages, WipeMethod::SeekData),
        Err(e) => {
            tracing::warn!("cannot search the guest memory file ({e}); overwriting all of it");
            let pages = match zero_range(file, 0, bytes) {
                Ok(()) => bytes / PAGE_SIZE,
                Err(e) => {
                    tracing::error!("cannot overwrite guest memory: {e}");
                    0
                }
            };
            (pages, WipeMethod::Full)
        }
    };
    WipeReport {
        wiped_pages: wiped,
        total_pages: bytes / PAGE_SIZE,
        method,
        duration: start.elapsed(),
    }
}

/// Zeroes and frees each run of data in the file; returns the pages.
fn wipe_data(file: &File, bytes: u64) -> std::io::Result<u64> {
    let mut wiped = 0u64;
    let mut offset = 0u64;
    while offset < bytes {
        let Some(data) = seek(file, offset, libc::SEEK_DATA)? else {
            break; // No data past `offset`.
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?
            .unwrap_or(bytes)
            .min(bytes);
        if hole <= data {
            break;
        }
        zero_range(file, data, hole)?;
        wiped += (hole - data).div_ceil(PAGE_SIZE);
        offset = hole;
    }
    Ok(wiped)
}

/// `lseek(fd, offset, whence)`; `None` where there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek takes integers only.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Overwrites `[from, to)` with zeros, then punches it out of the file.
fn zero_range(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).unwrap_or(CHUNK).min(CHUNK);
        file.write_all_at(&ZEROES[..n], at)?;
        at += n as u64;
    }
    let (off, len) = (
        libc::off_t::try_from(from).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        libc::off_t::try_from(to - from).map_err(|_| std::io::ErrorKind::InvalidInput)?,
    );
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes integers only.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } != 0 {
        // The pages are zeroed already; they are only not freed early.
        tracing::debug!("punching guest memory: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    fn data_pages(ram: &GuestRam) -> u64 {
        let (mut pages, mut off) = (0, 0);
        while let Some(d) = seek(&ram.file, off, libc::SEEK_DATA).unwrap() {
            let h = seek(&ram.file, d, libc::SEEK_HOLE).unwrap().unwrap();
            pages += (h - d) / PAGE_SIZE;
            off = h;
        }
        pages
    }

    #[test]
    fn regions_are_huge_page_aligned() {
        let mem = create_guest_memory(4096).unwrap();
        for r in mem.iter() {
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0);
        }
    }

    #[test]
    fn memory_is_split_around_the_mmio_gap() {
        let mem = create_guest_memory(4096).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 4096 << 20);
        assert!(matches!(
            create_guest_memory(u64::MAX),
            Err(MemoryError::TooLarge(_))
        ));
    }

    #[test]
    fn both_regions_are_the_one_file() {
        // The high region starts at file offset 3 GiB (the gap's start).
        let ram = create_guest_memory(4096).unwrap();
        let high = GuestAddress(0x1_0000_0000);
        ram.write_obj(0x5au8, high).unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&ram.file, &mut b, 3 << 30).unwrap();
        assert_eq!(b[0], 0x5a);
    }

    #[test]
    fn the_file_cannot_shrink_or_be_the_wrong_size() {
        let file = guest_memfd(16).unwrap();
        // SAFETY: ftruncate on our own fd.
        assert_ne!(unsafe { libc::ftruncate(file.as_raw_fd(), 0) }, 0);
        assert!(matches!(
            GuestRam::new(file, 32),
            Err(MemoryError::WrongSize { .. })
        ));
    }

    #[test]
    fn wipe_zeroes_touched_pages_and_touches_nothing_else() {
        let ram = create_guest_memory(64).unwrap();
        let marker = [0xa5u8; 64];
        let touched = [0u64, 1, 2, 100, 4000, 16383];
        for p in touched {
            ram.write_slice(&marker, GuestAddress(p * PAGE_SIZE + 100))
                .unwrap();
        }
        // With huge pages a touch allocates a whole 2 MiB, so count what
        // the file holds rather than what was written.
        let held = data_pages(&ram);
        assert!(held >= touched.len() as u64 && held < 16384 / 2, "{held}");
        let report = ram.wipe();
        assert_eq!(report.method, WipeMethod::SeekData);
        assert_eq!(report.total_pages, 16384);
        assert_eq!(report.wiped_pages, held);
        // The wiped pages were freed, and nothing else was allocated.
        assert_eq!(data_pages(&ram), 0);
        for p in touched {
            // Read through the mapping (a read fault allocates a page of
            // shared memory: the file then holds zeros again).
            let mut buf = [0xffu8; PAGE_SIZE as usize];
            ram.read_slice(&mut buf, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            assert!(buf.iter().all(|b| *b == 0), "page {p} not wiped");
        }
    }

    #[test]
    fn a_file_held_elsewhere_is_wiped_after_the_mapping_is_gone() {
        // What the keeper does: the VMM's mapping is gone, the file stays.
        let file = guest_memfd(8).unwrap();
        let copy = file.try_clone().unwrap();
        let ram = GuestRam::new(file, 8).unwrap();
        ram.write_slice(&[0x77u8; 4096], GuestAddress(4 << 20))
            .unwrap();
        drop(ram);
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&copy, &mut b, 4 << 20).unwrap();
        assert_eq!(b[0], 0x77, "the data outlives the mapping");
        let report = wipe_file(&copy, 8 << 20);
        assert!(report.wiped_pages >= 1);
        std::os::unix::fs::FileExt::read_at(&copy, &mut b, 4 << 20).unwrap();
        assert_eq!(b[0], 0);
    }
}
