//! The wipe alone, without a guest: guest RAM mapped as `airlock-vmm` maps
//! it (a sealed memfd, mapped shared), touched by this process, then wiped
//! and unmapped (Airlock) or only unmapped (what the peers do). It shows how
//! the wipe itself scales with touched memory and guest size, apart from the
//! VM around it. (In the test host, the end-to-end teardown also pays the
//! emulator for overwriting pages that the guest ran code from; memory this
//! process touched carries no such cost.)
//!
//! Each row also measures, in the same run, the design the memfd replaced
//! (see [`AnonRam`]): what the memfd costs to first touch and to wipe, as a
//! ratio to the anonymous mapping.
//!
//! Touching writes one byte per 4 KiB page: the page faults, which are what
//! the two designs do differently. A guest that fills its pages adds the
//! same memory bandwidth to both.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

use airlock_vmm::vstate::memory;

use crate::report::{ms, times, Section};
use crate::series::{growth, touched_mib, TeardownArgs, SERIES};
use crate::stats::{summarize, Summary};

const PAGE: usize = 4096;

/// The table's columns. Unprefixed: Airlock's memfd; "anon": the anonymous
/// mapping it replaced.
pub const HEADERS: [&str; 10] = [
    "guest MiB",
    "touched MiB",
    "wipe + unmap ms",
    "unmap only ms",
    "wiped MiB",
    "touch ms",
    "anon touch ms",
    "touch ÷ anon",
    "anon wipe + unmap ms",
    "wipe + unmap ÷ anon",
];

/// One teardown: ms to first-write the touched memory, ms to wipe (or
/// not) and unmap it, and MiB wiped.
struct Sample {
    touch_ms: f64,
    teardown_ms: f64,
    wiped_mib: u64,
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Writes one byte to each page of `slice`.
fn touch<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> anyhow::Result<()> {
    for at in (0..slice.len()).step_by(PAGE) {
        slice
            .write_obj(0xa5u8, at)
            .context("cannot write guest RAM")?;
    }
    Ok(())
}

/// Tears down `mem_mib` of guest RAM in a memfd, as `airlock-vmm` has it,
/// whose first `touch_mib` were written, with the wipe (`wipe`) or
/// unmapping only.
fn memfd_once(mem_mib: u64, touch_mib: u64, wipe: bool) -> anyhow::Result<Sample> {
    let ram = memory::create_guest_memory(mem_mib)
        .with_context(|| format!("cannot map {mem_mib} MiB"))?;
    let start = Instant::now();
    let mut left = touch_mib << 20;
    for region in ram.iter() {
        let n = left.min(region.len());
        let slice = region
            .get_slice(MemoryRegionAddress(0), usize::try_from(n)?)
            .context("cannot reach guest RAM")?;
        touch(&slice)?;
        left -= n;
    }
    let touch_ms = ms_since(start);
    let start = Instant::now();
    let wiped_pages = if wipe { ram.wipe().wiped_pages } else { 0 };
    drop(ram);
    Ok(Sample {
        touch_ms,
        teardown_ms: ms_since(start),
        wiped_mib: (wiped_pages * PAGE as u64) >> 20,
    })
}

/// The baseline: guest RAM as `airlock-vmm` had it before commit 13446e2
/// replaced it with the memfd. An anonymous private mapping, `MAP_NORESERVE`,
/// 2 MiB aligned and marked for transparent huge pages, wiped by reading
/// `/proc/self/pagemap` (kept open, as the jailed VMM kept it) and
/// `memset`-ing to zero each run of pages present in RAM or in swap. One
/// mapping, where the old code split it around the MMIO gap below 4 GiB:
/// the sizes benchmarked stay below the gap.
struct AnonRam {
    addr: *mut u8,
    len: usize,
    pagemap: File,
}

const HUGE_PAGE: usize = 2 << 20;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per syscall, as the old code read them.
const PAGEMAP_BATCH: usize = 1 << 16;

impl AnonRam {
    fn new(mib: u64) -> anyhow::Result<Self> {
        let len = usize::try_from(mib << 20)?;
        let pagemap = File::open("/proc/self/pagemap").context("cannot open pagemap")?;
        let total = len + HUGE_PAGE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new anonymous mapping, not MAP_FIXED: nothing existing
        // is affected; the result is checked.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("cannot map anonymous RAM");
        }
        let raw = raw.cast::<u8>();
        let head = (HUGE_PAGE - raw as usize % HUGE_PAGE) % HUGE_PAGE;
        // The head and tail unmapped below are parts of it nothing refers to.
        // SAFETY: `head < HUGE_PAGE`: `raw + head` and `len` bytes after it
        // lie inside the `total`-byte mapping just made.
        let addr = unsafe {
            let addr = raw.add(head);
            if head > 0 {
                libc::munmap(raw.cast(), head);
            }
            libc::munmap(addr.add(len).cast(), HUGE_PAGE - head);
            addr
        };
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_DONTDUMP] {
            // SAFETY: advice on our own mapping; failure (no THP) only
            // loses the optimisation, as it did in the old code.
            unsafe { libc::madvise(addr.cast(), len, advice) };
        }
        Ok(AnonRam { addr, len, pagemap })
    }

    /// The whole mapping, for volatile access.
    fn slice(&self) -> VolatileSlice<'_> {
        // Only this process accesses them.
        // SAFETY: `len` bytes at `addr` stay mapped while `self` lives, and
        // the returned slice's lifetime is tied to `self`.
        unsafe { VolatileSlice::new(self.addr, self.len) }
    }

    /// Zeroes each run of present or swapped pages; returns the pages zeroed.
    fn wipe(&self) -> anyhow::Result<u64> {
        let pages = self.len / PAGE;
        let first = (self.addr as usize / PAGE) as u64 * 8;
        let mut buf = vec![0u8; PAGEMAP_BATCH.min(pages) * 8];
        let (mut wiped, mut run, mut page) = (0, None, 0);
        while page < pages {
            let n = (buf.len() / 8).min(pages - page);
            self.pagemap
                .read_exact_at(&mut buf[..n * 8], first + page as u64 * 8)
                .context("cannot read pagemap")?;
            for (i, entry) in buf[..n * 8].chunks_exact(8).enumerate() {
                let entry = u64::from_ne_bytes(entry.try_into()?);
                match (entry & (PM_PRESENT | PM_SWAPPED) != 0, run) {
                    (true, None) => run = Some(page + i),
                    (false, Some(s)) => {
                        wiped += self.zero(s, page + i);
                        run = None;
                    }
                    _ => {}
                }
            }
            page += n;
        }
        if let Some(s) = run {
            wiped += self.zero(s, pages);
        }
        Ok(wiped)
    }

    /// Zeroes pages `[from, to)`; returns how many.
    fn zero(&self, from: usize, to: usize) -> u64 {
        // Callers walk the mapping's pages, which only this process touches.
        // SAFETY: `from <= to <= len / PAGE`, so the range lies inside the
        // live mapping.
        unsafe { std::ptr::write_bytes(self.addr.add(from * PAGE), 0, (to - from) * PAGE) };
        // The writes must happen although nothing reads them before unmap.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        (to - from) as u64
    }
}

impl Drop for AnonRam {
    fn drop(&mut self) {
        // SAFETY: made by `AnonRam::new`, unmapped once, here; slices of it
        // borrow `self` and are gone.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Tears down `mem_mib` of anonymous guest RAM whose first `touch_mib` were
/// written: the old wipe, then unmap.
fn anon_once(mem_mib: u64, touch_mib: u64) -> anyhow::Result<Sample> {
    let ram = AnonRam::new(mem_mib)?;
    let start = Instant::now();
    let slice = ram.slice();
    touch(&slice.subslice(0, usize::try_from(touch_mib << 20)?)?)?;
    let touch_ms = ms_since(start);
    let start = Instant::now();
    let wiped_pages = ram.wipe()?;
    drop(ram);
    Ok(Sample {
        touch_ms,
        teardown_ms: ms_since(start),
        wiped_mib: (wiped_pages * PAGE as u64) >> 20,
    })
}

fn median(s: &Summary) -> f64 {
    s.median_ms
}

/// One table row per (series, size) in [`HEADERS`]' order, and its JSON.
pub fn rows(
    memory: &[u64],
    fixed_mib: u64,
    runs: usize,
) -> anyhow::Result<(Vec<Vec<String>>, Vec<Value>)> {
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for series in SERIES {
        for &mem in memory {
            let touch = touched_mib(series, mem, fixed_mib);
            let mut t: [Vec<f64>; 5] = Default::default();
            let (mut wiped_mib, mut anon_wiped_mib) = (0, 0);
            // Interleaved, so that both designs see the same machine.
            for _ in 0..runs {
                let m = memfd_once(mem, touch, true)?;
                let a = anon_once(mem, touch)?;
                let u = memfd_once(mem, touch, false)?;
                (wiped_mib, anon_wiped_mib) = (m.wiped_mib, a.wiped_mib);
                for (v, x) in t.iter_mut().zip([
                    m.teardown_ms,
                    u.teardown_ms,
                    m.touch_ms,
                    a.touch_ms,
                    a.teardown_ms,
                ]) {
                    v.push(x);
                }
            }
            let [Some(w), Some(u), Some(mt), Some(at), Some(aw)] = t.map(|v| summarize(&v)) else {
                anyhow::bail!("no samples");
            };
            let touch_ratio = median(&mt) / median(&at);
            let wipe_ratio = median(&w) / median(&aw);
            eprintln!(
                "teardown: wipe alone, {mem} MiB, {touch} MiB touched: {:.0} ms (unmap only \
                 {:.0} ms, anonymous {:.0} ms); touch {:.0} ms (anonymous {:.0} ms)",
                w.median_ms, u.median_ms, aw.median_ms, mt.median_ms, at.median_ms
            );
            rows.push(vec![
                mem.to_string(),
                touch.to_string(),
                ms(w.median_ms),
                ms(u.median_ms),
                wiped_mib.to_string(),
                ms(mt.median_ms),
                ms(at.median_ms),
                times(touch_ratio),
                ms(aw.median_ms),
                times(wipe_ratio),
            ]);
            results.push(json!({
                "series": series, "guest_mib": mem, "touched_mib": touch,
                "wipe_and_unmap": w, "unmap_only": u, "wiped_mib": wiped_mib,
                "touch": mt,
                "anon_touch": at, "anon_wipe_and_unmap": aw, "anon_wiped_mib": anon_wiped_mib,
                "touch_memfd_over_anon": touch_ratio,
                "wipe_and_unmap_memfd_over_anon": wipe_ratio,
            }));
        }
    }
    Ok((rows, results))
}

/// Appends the wipe-alone paragraphs and table to `section`; returns the
/// results and their growth from the smallest to the largest guest.
pub fn append(section: &mut Section, args: &TeardownArgs) -> anyhow::Result<(Vec<Value>, Value)> {
    let (wipe_rows, wipe_json) = rows(&args.memory, args.fixed_mib, args.runs)?;
    section.para(&format!(
        "**The wipe alone**, without a VM: guest RAM mapped as `airlock-vmm` \
         maps it (a sealed memfd, mapped shared), touched by the benchmark \
         process (one byte per 4 KiB page), then wiped and unmapped (Airlock) \
         or only unmapped (the peers); ms, median of {} runs. \"anon\": the \
         design the memfd replaced, in the same run: an anonymous private \
         mapping with `MADV_HUGEPAGE`, wiped by a `memset` of the pages \
         `/proc/self/pagemap` shows touched.",
        args.runs
    ));
    section.table(&HEADERS, &wipe_rows);
    let wipe_ms = |r: &Value| r["wipe_and_unmap"]["median_ms"].as_f64();
    let half = growth(&wipe_json, "half", &args.memory, wipe_ms);
    let fixed = growth(&wipe_json, "fixed", &args.memory, wipe_ms);
    section.para(&format!(
        "The wipe alone from the smallest to the largest guest: {} with half of \
         memory touched, {} with a fixed {} MiB touched.",
        times(half),
        times(fixed),
        args.fixed_mib
    ));
    Ok((
        wipe_json,
        json!({ "half_touched": half, "fixed_touched": fixed }),
    ))
}

/// The wipe alone as a benchmark of its own: no VM, so no KVM needed.
pub fn run(args: &TeardownArgs) -> anyhow::Result<Section> {
    let mut section = Section::new(json!(null));
    let (results, growth) = append(&mut section, args)?;
    section.json = json!({
        "benchmark": "wipe_alone", "runs": args.runs, "results": results,
        "growth_smallest_to_largest": growth,
    });
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `ram` resident in RAM.
    fn resident_pages(ram: &AnonRam) -> usize {
        let mut vec = vec![0u8; ram.len / PAGE];
        // SAFETY: one live mapping of `len` bytes, and one byte of `vec` per
        // page, as mincore requires.
        let rc = unsafe { libc::mincore(ram.addr.cast(), ram.len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn the_wipe_overwrites_what_was_touched_and_no_more() {
        assert_eq!(memfd_once(16, 4, true).unwrap().wiped_mib, 4);
        assert_eq!(memfd_once(16, 0, true).unwrap().wiped_mib, 0);
        assert_eq!(memfd_once(16, 4, false).unwrap().wiped_mib, 0);
    }

    #[test]
    fn the_anonymous_baseline_wipes_exactly_the_touched_pages() {
        assert_eq!(anon_once(16, 4).unwrap().wiped_mib, 4);
        assert_eq!(anon_once(16, 0).unwrap().wiped_mib, 0);
        let ram = AnonRam::new(16).unwrap();
        assert_eq!(ram.addr as usize % HUGE_PAGE, 0);
        let slice = ram.slice();
        // Two runs of 2 MiB (a huge page each, where THP is on), apart.
        for at in [0, 8 << 20] {
            touch(&slice.subslice(at, 2 << 20).unwrap()).unwrap();
        }
        assert_eq!(resident_pages(&ram), 1024);
        assert_eq!(ram.wipe().unwrap(), 1024);
        // The wipe faulted nothing in.
        assert_eq!(resident_pages(&ram), 1024);
        for at in (0..2 << 20).chain(8 << 20..10 << 20).step_by(PAGE) {
            assert_eq!(slice.read_obj::<u8>(at).unwrap(), 0, "byte {at}");
        }
    }

    #[test]
    fn each_series_and_size_has_a_row_of_every_column() {
        let (rows, json) = rows(&[8, 16], 2, 1).unwrap();
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.len() == HEADERS.len()));
        assert_eq!(rows[0][..2], ["8".to_string(), "4".to_string()]);
        assert_eq!(rows[3][4], "2");
        assert!(rows[3][7].ends_with('×') && rows[3][9].ends_with('×'));
        assert_eq!(json.len(), 4);
        assert_eq!(json[3]["anon_wiped_mib"], 2);
        let ratio = json[0]["wipe_and_unmap_memfd_over_anon"].as_f64().unwrap();
        let (w, a) = (
            json[0]["wipe_and_unmap"]["median_ms"].as_f64().unwrap(),
            json[0]["anon_wipe_and_unmap"]["median_ms"]
                .as_f64()
                .unwrap(),
        );
        assert_eq!(ratio, w / a);
    }
}
