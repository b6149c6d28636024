//! Teardown with wipe: the time from a guest's reset (its memory still
//! full of what it wrote) to the VMM process being gone, against guest
//! memory size, for a guest that touched half its memory and for one that
//! touched a fixed small amount. Airlock zeroes every touched page before
//! unmapping; the peers only unmap. The guest is `tests/guest`'s
//! `fill-memory` under every VMM.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use airlock_vmm_api::EventLog;

pub use crate::series::TeardownArgs;
use crate::series::{growth, touched_mib, SERIES};

use crate::peers::{airlock_events, Guest, Peers, Running, Scratch, Shape, Vmm};
use crate::report::{ms, times, Section};
use crate::stats::summarize;

const WROTE: &str = "fill-memory: wrote";

struct Point {
    teardown_ms: f64,
    wiped_mib: Option<u64>,
}

fn one(peers: &Peers, vmm: Vmm, guest: &Guest, mem: u64, touch: u64) -> anyhow::Result<Point> {
    let scratch = Scratch::new("teardown")?;
    let shape = Shape {
        vcpus: 1,
        memory_mib: mem,
    };
    let args = format!("airlock.test.fill_mib={touch}");
    let cmd = if vmm == Vmm::Airlock {
        peers.airlock_command(guest, shape, &args, None, scratch.path())?
    } else {
        peers.peer_command(vmm, guest, shape, &args, None, scratch.path())?
    };
    let mut running = Running::spawn(cmd)?;
    let wrote = running.wait_for_line(WROTE, Duration::from_secs(300))?;
    let (gone, _status) = running.wait_exit(Duration::from_secs(120))?;
    let stderr = running.collect_stderr();
    let wiped_mib = if vmm == Vmm::Airlock {
        let mut events = EventLog::new(&airlock_events(scratch.path()));
        events.refresh();
        Some(
            events
                .wiped()
                .with_context(|| format!("airlock-vmm reported no wipe; its log:\n{stderr}"))?
                .0,
        )
    } else {
        None
    };
    Ok(Point {
        teardown_ms: gone.duration_since(wrote).as_secs_f64() * 1000.0,
        wiped_mib,
    })
}

pub fn run(args: &TeardownArgs, peers: &Peers) -> anyhow::Result<Section> {
    let scratch = Scratch::new("teardown-guest")?;
    let guest = peers.guest.with_program("fill-memory", scratch.path())?;
    let vmms = peers.vmms();
    let mut section = Section::new(json!(null));
    section.para(&format!(
        "**Teardown with wipe**: from the guest's reset, its touched memory \
         still full, to the VMM process gone (ms, median of {} runs; 1 vCPU). \
         Airlock zeroes every page the guest touched before unmapping; the \
         peers only unmap. {}.",
        args.runs,
        peers.note()
    ));
    let mut headers = vec!["guest MiB".to_string(), "touched MiB".to_string()];
    headers.extend(vmms.iter().map(|v| format!("{} ms", v.name())));
    headers.push("Airlock wiped MiB".into());
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for series in SERIES {
        for &mem in &args.memory {
            let touch = touched_mib(series, mem, args.fixed_mib);
            let mut row = vec![mem.to_string(), touch.to_string()];
            let mut wiped = f64::NAN;
            for &vmm in &vmms {
                let mut samples = Vec::new();
                for run in 0..args.runs {
                    let p = one(peers, vmm, &guest, mem, touch).with_context(|| {
                        format!("{}, {mem} MiB, {touch} MiB touched", vmm.name())
                    })?;
                    eprintln!(
                        "teardown: {mem} MiB, {touch} MiB touched, run {}/{}: {}: {:.0} ms",
                        run + 1,
                        args.runs,
                        vmm.name(),
                        p.teardown_ms
                    );
                    samples.push(p.teardown_ms);
                    if let Some(w) = p.wiped_mib {
                        wiped = w as f64;
                    }
                }
                let s = summarize(&samples).context("no samples")?;
                row.push(ms(s.median_ms));
                json_rows.push(json!({
                    "vmm": vmm, "series": series, "guest_mib": mem, "touched_mib": touch,
                    "summary": s,
                }));
            }
            row.push(format!("{wiped:.0}"));
            rows.push(row);
        }
    }
    let heads: Vec<&str> = headers.iter().map(String::as_str).collect();
    section.table(&heads, &rows);
    let airlock_ms = |r: &Value| {
        (r["vmm"] == json!(Vmm::Airlock))
            .then(|| r["summary"]["median_ms"].as_f64())
            .flatten()
    };
    let half = growth(&json_rows, "half", &args.memory, airlock_ms);
    let fixed = growth(&json_rows, "fixed", &args.memory, airlock_ms);
    section.para(&format!(
        "Airlock's teardown from the smallest to the largest guest: {} with \
         half of memory touched, {} with a fixed {} MiB touched.",
        times(half),
        times(fixed),
        args.fixed_mib
    ));
    let (wipe_json, wipe_growth) = crate::wipe::append(&mut section, args)?;
    section.json = json!({
        "benchmark": "teardown_with_wipe", "runs": args.runs, "results": json_rows,
        "airlock_growth_smallest_to_largest": { "half_touched": half, "fixed_touched": fixed },
        "wipe_alone": wipe_json,
        "wipe_alone_growth_smallest_to_largest": wipe_growth,
    });
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_touches_its_share() {
        assert_eq!(touched_mib("half", 512, 32), 256);
        assert_eq!(touched_mib("fixed", 512, 32), 32);
        assert_eq!(touched_mib("fixed", 32, 32), 16);
    }

    #[test]
    fn growth_is_largest_over_smallest_among_the_results_that_count() {
        let results = vec![
            json!({"vmm": "qemu", "series": "half", "guest_mib": 2048, "ms": 1.0}),
            json!({"vmm": "airlock", "series": "half", "guest_mib": 2048, "ms": 30.0}),
            json!({"vmm": "airlock", "series": "half", "guest_mib": 128, "ms": 10.0}),
            json!({"vmm": "airlock", "series": "fixed", "guest_mib": 128, "ms": 5.0}),
        ];
        let airlock = |r: &Value| (r["vmm"] == "airlock").then(|| r["ms"].as_f64()).flatten();
        assert_eq!(growth(&results, "half", &[128, 512, 2048], airlock), 3.0);
        assert!(growth(&results, "fixed", &[128, 2048], airlock).is_nan());
        assert!(growth(&results, "half", &[], airlock).is_nan());
    }
}
