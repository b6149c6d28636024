//! Guest memory: anonymous, `MAP_NORESERVE` mappings from `vm-memory`, and
//! the wipe that overwrites every page the guest touched before the mapping
//! is returned to the host.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::layout::arch_memory_regions;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit the host's address space.
    #[error("guest memory size of {0} MiB is too large for this host")]
    TooLarge(u64),
    /// mmap failed.
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("cannot set up guest memory regions: {0}")]
    Regions(String),
}

/// Alignment of guest RAM in the VMM's address space. With guest-physical
/// and host-virtual addresses congruent modulo 2 MiB, KVM can back the guest
/// with 2 MiB pages wherever the host kernel gives transparent huge pages:
/// far fewer faults while the guest first touches its memory.
const HUGE_PAGE: usize = 2 << 20;

/// One anonymous mapping that [`GuestRam`] owns.
#[derive(Debug)]
struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by `GuestRam`; the pointer is
// only used to unmap it, once, in `GuestRam::drop`.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of anonymous, `MAP_NORESERVE` memory at a 2 MiB
    /// aligned address, marked for transparent huge pages and left out of
    /// core dumps (they would copy guest memory to disk).
    fn new(len: usize) -> std::io::Result<Self> {
        let total = len
            .checked_add(HUGE_PAGE)
            .ok_or(std::io::ErrorKind::OutOfMemory)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new anonymous mapping, not MAP_FIXED: nothing existing is
        // affected; the result is checked.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let raw = raw.cast::<u8>();
        let head = (HUGE_PAGE - raw as usize % HUGE_PAGE) % HUGE_PAGE;
        // SAFETY: `head < HUGE_PAGE`, so `raw + head` and the `len` bytes after
        // it lie inside the `total`-byte mapping.
        let addr = unsafe { raw.add(head) };
        let tail = total - head - len;
        // SAFETY: unmapping the unaligned head and the tail of the mapping
        // just made, which nothing else refers to.
        unsafe {
            if head > 0 {
                libc::munmap(raw.cast(), head);
            }
            if tail > 0 {
                libc::munmap(addr.add(len).cast(), tail);
            }
        }
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_DONTDUMP] {
            // SAFETY: advice on our own mapping; failure (no THP support)
            // only loses the optimisation.
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

/// Guest RAM: the mappings and the `vm-memory` view of them.
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
}

impl GuestRam {
    /// The guest memory, as `vm-memory` sees it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Maps `mib` MiB of guest RAM, split around the MMIO gap below 4 GiB.
/// Nothing is touched: pages are only allocated when the guest uses them.
pub fn create_guest_memory(mib: u64) -> Result<GuestRam, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::TooLarge(mib))?;
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    for (guest_addr, len) in arch_memory_regions(bytes) {
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(mib))?;
        let mapping = Mapping::new(len).map_err(|source| MemoryError::Map { mib, source })?;
        let addr = mapping.addr;
        // SAFETY: `mapping` is a live anonymous mapping of exactly `len` bytes,
        // owned by the returned `GuestRam`, which outlives the region.
        let region = unsafe {
            MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(addr)
        }
        .build()
        .map_err(|e| MemoryError::Regions(e.to_string()));
        mappings.push(mapping);
        let region = GuestRegionMmap::new(region?, guest_addr)
            .ok_or_else(|| MemoryError::Regions("region wraps the address space".into()))?;
        regions.push(region);
    }
    let mut ram = GuestRam {
        mem: GuestMemoryMmap::default(),
        mappings,
    };
    // On error, dropping `ram` unmaps the mappings.
    ram.mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))?;
    Ok(ram)
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
    /// `/proc/self/pagemap`: only pages present in RAM or in swap.
    Pagemap,
    /// Every page, because pagemap could not be read. Slower, never weaker.
    Full,
}

const PAGE_SIZE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per syscall (512 KiB of entries, 1 GiB of memory).
const PAGEMAP_BATCH: usize = 1 << 16;

/// `/proc/self/pagemap`, opened before the VMM left the host's `/proc`
/// behind (see `jail`).
static PAGEMAP: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Opens `/proc/self/pagemap` now and keeps it for the wipe, for a VMM
/// that is about to lose sight of `/proc` (its jail has none). The file
/// reads this process's memory map for as long as the process lives.
pub fn keep_pagemap() -> std::io::Result<()> {
    let file = File::open("/proc/self/pagemap")?;
    let _ = PAGEMAP.set(file);
    Ok(())
}

/// Overwrites with zeros every page of `mem` that the guest touched.
///
/// All vCPUs must be stopped. The mapping stays valid; dropping `mem`
/// afterwards unmaps it.
pub fn wipe(mem: &GuestMemoryMmap) -> WipeReport {
    let start = Instant::now();
    let opened;
    let pagemap = match PAGEMAP.get() {
        Some(kept) => Some(kept),
        None => {
            opened = File::open("/proc/self/pagemap").ok();
            opened.as_ref()
        }
    };
    let mut method = if pagemap.is_some() {
        WipeMethod::Pagemap
    } else {
        WipeMethod::Full
    };
    let (mut wiped, mut total) = (0u64, 0u64);
    for region in mem.iter() {
        let base = region.as_ptr();
        let pages = region.len() as usize / PAGE_SIZE;
        total += pages as u64;
        let result = match pagemap {
            Some(pm) => wipe_touched(pm, base, pages),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        wiped += match result {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("pagemap unreadable ({e}); overwriting all guest memory");
                method = WipeMethod::Full;
                zero_pages(base, 0, pages);
                pages as u64
            }
        };
    }
    WipeReport {
        wiped_pages: wiped,
        total_pages: total,
        method,
        duration: start.elapsed(),
    }
}

/// Zeroes the runs of present or swapped pages of one region, found through
/// pagemap. Returns the number of pages zeroed.
fn wipe_touched(pagemap: &File, base: *mut u8, pages: usize) -> std::io::Result<u64> {
    let first_entry = (base as usize / PAGE_SIZE) as u64 * 8;
    let mut entries = vec![0u64; PAGEMAP_BATCH.min(pages)];
    let mut wiped = 0u64;
    let mut run_start: Option<usize> = None;
    let mut page = 0usize;
    while page < pages {
        let n = entries.len().min(pages - page);
        let ptr = entries.as_mut_ptr().cast::<u8>();
        // SAFETY: the u64 slice viewed as its own n * 8 bytes; any byte
        // pattern is a valid u64.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, n * 8) };
        pagemap.read_exact_at(bytes, first_entry + page as u64 * 8)?;
        for (i, entry) in entries[..n].iter().enumerate() {
            let touched = entry & (PM_PRESENT | PM_SWAPPED) != 0;
            match (touched, run_start) {
                (true, None) => run_start = Some(page + i),
                (false, Some(s)) => {
                    zero_pages(base, s, page + i);
                    wiped += (page + i - s) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        page += n;
    }
    if let Some(s) = run_start {
        zero_pages(base, s, pages);
        wiped += (pages - s) as u64;
    }
    Ok(wiped)
}

/// Zeroes pages `[from, to)` of the mapping at `base`.
fn zero_pages(base: *mut u8, from: usize, to: usize) {
    // Callers pass page indexes within one region that `base` maps and that
    // stays mapped; the vCPUs are stopped, so nothing else touches it.
    // SAFETY: the range is inside a live mapping that only we access now.
    unsafe { std::ptr::write_bytes(base.add(from * PAGE_SIZE), 0, (to - from) * PAGE_SIZE) };
    // The writes must happen even though nothing reads the memory before it
    // is unmapped.
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn resident_pages(mem: &GuestMemoryMmap) -> usize {
        let region = mem.iter().next().unwrap();
        let pages = region.len() as usize / PAGE_SIZE;
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is one live mapping of `pages` pages, and `vec`
        // has one byte per page as mincore requires.
        let rc = unsafe {
            libc::mincore(
                region.as_ptr().cast(),
                region.len() as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| *b & 1 == 1).count()
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
    fn wipe_zeroes_touched_pages_and_touches_nothing_else() {
        let mem = create_guest_memory(64).unwrap();
        let marker = [0xa5u8; 64];
        let touched = [0u64, 1, 2, 100, 4000, 16383];
        for p in touched {
            mem.write_slice(&marker, GuestAddress(p * PAGE_SIZE as u64 + 100))
                .unwrap();
        }
        // With transparent huge pages a touch makes a whole 2 MiB resident,
        // so count what is resident rather than what was written.
        let resident = resident_pages(&mem);
        assert!(
            resident >= touched.len() && resident < 16384 / 2,
            "{resident}"
        );
        let report = wipe(&mem);
        assert_eq!(report.method, WipeMethod::Pagemap);
        assert_eq!(report.total_pages, 16384);
        assert_eq!(report.wiped_pages, resident as u64);
        for p in touched {
            let mut buf = [0xffu8; PAGE_SIZE];
            mem.read_slice(&mut buf, GuestAddress(p * PAGE_SIZE as u64))
                .unwrap();
            assert!(buf.iter().all(|b| *b == 0), "page {p} not wiped");
        }
        // The wipe did not fault in the untouched pages.
        assert_eq!(resident_pages(&mem), resident);
    }
}
