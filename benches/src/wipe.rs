//! The wipe alone, without a guest: guest RAM mapped as `airlock-vmm` maps
//! it, touched by this process, then wiped and unmapped (Airlock) or only
//! unmapped (what the peers do). It shows how the wipe itself scales with
//! touched memory and guest size, apart from the VM around it. (In the test
//! host, the end-to-end teardown also pays the emulator for overwriting
//! pages that the guest ran code from; memory this process touched carries
//! no such cost.)

use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use airlock_vmm::vstate::memory;

use crate::report::ms;
use crate::stats::summarize;
use crate::teardown::{touched_mib, SERIES};

const PAGE: u64 = 4096;

/// Milliseconds to tear down `mem_mib` of guest RAM whose first `touch_mib`
/// were written, with the wipe (`wipe`) or unmapping only, and the MiB
/// wiped.
fn once(mem_mib: u64, touch_mib: u64, wipe: bool) -> anyhow::Result<(f64, u64)> {
    let ram = memory::create_guest_memory(mem_mib)
        .with_context(|| format!("cannot map {mem_mib} MiB"))?;
    for page in 0..(touch_mib << 20) / PAGE {
        ram.write_obj(0xa5u8, GuestAddress(page * PAGE))
            .context("cannot write guest RAM")?;
    }
    let start = Instant::now();
    let wiped = if wipe {
        (ram.wipe().wiped_pages * PAGE) >> 20
    } else {
        0
    };
    drop(ram);
    Ok((start.elapsed().as_secs_f64() * 1000.0, wiped))
}

/// One table row per (series, size) and its JSON: guest MiB, touched MiB,
/// wipe and unmap ms, unmap-only ms, MiB wiped.
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
            let (mut wiped_ms, mut unmap_ms, mut wiped_mib) = (Vec::new(), Vec::new(), 0);
            for _ in 0..runs {
                let (t, w) = once(mem, touch, true)?;
                wiped_ms.push(t);
                wiped_mib = w;
                unmap_ms.push(once(mem, touch, false)?.0);
            }
            let w = summarize(&wiped_ms).context("no samples")?;
            let u = summarize(&unmap_ms).context("no samples")?;
            eprintln!(
                "teardown: wipe alone, {mem} MiB, {touch} MiB touched: {:.0} ms (unmap only {:.0} ms)",
                w.median_ms, u.median_ms
            );
            rows.push(vec![
                mem.to_string(),
                touch.to_string(),
                ms(w.median_ms),
                ms(u.median_ms),
                wiped_mib.to_string(),
            ]);
            results.push(json!({
                "series": series, "guest_mib": mem, "touched_mib": touch,
                "wipe_and_unmap": w, "unmap_only": u, "wiped_mib": wiped_mib,
            }));
        }
    }
    Ok((rows, results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wipe_overwrites_what_was_touched_and_no_more() {
        assert_eq!(once(16, 4, true).unwrap().1, 4);
        assert_eq!(once(16, 0, true).unwrap().1, 0);
        assert_eq!(once(16, 4, false).unwrap().1, 0);
    }

    #[test]
    fn each_series_and_size_has_a_row() {
        let (rows, json) = rows(&[8, 16], 2, 1).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0][..2], ["8".to_string(), "4".to_string()]);
        assert_eq!(rows[3][4], "2");
        assert_eq!(json.len(), 4);
    }
}
