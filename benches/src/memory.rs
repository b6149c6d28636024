//! VMM memory overhead: RSS and PSS of the VMM process minus the guest
//! memory it has touched, for an idle booted guest (the agent serving, a
//! vsock device attached under every VMM). Airlock's VMM is two processes,
//! the keeper of guest memory and its child, the VMM: both count.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::boot::AirlockVm;
use crate::peers::{unique_cid, Guest, Peers, Running, Scratch, Shape, Vmm, READY_LINE};
use crate::report::{ratio_to_best, times, Section};
use crate::stats::summarize;

#[derive(clap::Args, Clone)]
pub struct MemoryArgs {
    /// Runs per VMM
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Guest shape as VCPUS:MIB
    #[arg(long, value_parser = crate::boot::parse_shape, default_value = "1:128")]
    pub shape: Shape,
    /// Seconds to let the idle guest settle before measuring
    #[arg(long, default_value_t = 2)]
    pub settle_secs: u64,
}

/// A process's memory, split into guest memory and the rest (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub guest_rss_kib: u64,
    pub guest_pss_kib: u64,
}

impl Usage {
    pub fn overhead_rss_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }

    pub fn overhead_pss_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_pss_kib)
    }
}

/// Sums `/proc/PID/smaps` (of one or more processes). Guest memory is the
/// largest anonymous or memfd mapping at least `guest_mib` large: every
/// VMM here maps guest RAM one of those ways.
pub fn parse_smaps(smaps: &str, guest_mib: u64) -> anyhow::Result<Usage> {
    struct Map {
        anonymous: bool,
        size: u64,
        rss: u64,
        pss: u64,
    }
    let mut maps: Vec<Map> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // "start-end perms offset dev inode [path]"
            let path = words.nth(4);
            maps.push(Map {
                anonymous: path.is_none_or(|p| p.starts_with("/memfd:")),
                size: 0,
                rss: 0,
                pss: 0,
            });
            continue;
        }
        let Some(m) = maps.last_mut() else { continue };
        let value = || words.clone().next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Size:" => m.size = value().unwrap_or(0),
            "Rss:" => m.rss = value().unwrap_or(0),
            "Pss:" => m.pss = value().unwrap_or(0),
            _ => {}
        }
    }
    if maps.is_empty() {
        bail!("no mappings in smaps");
    }
    let guest = maps
        .iter()
        .filter(|m| m.anonymous && m.size >= guest_mib * 1024)
        .max_by_key(|m| m.size)
        .with_context(|| {
            format!("no anonymous or memfd mapping of at least {guest_mib} MiB (guest RAM)")
        })?;
    Ok(Usage {
        rss_kib: maps.iter().map(|m| m.rss).sum(),
        pss_kib: maps.iter().map(|m| m.pss).sum(),
        guest_rss_kib: guest.rss,
        guest_pss_kib: guest.pss,
    })
}

/// The usage of `pid` and its children (Airlock's keeper and VMM).
fn measure(pid: u32, shape: Shape, settle: Duration) -> anyhow::Result<Usage> {
    std::thread::sleep(settle);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut smaps = String::new();
    for p in std::iter::once(pid.to_string()).chain(children.split_whitespace().map(String::from)) {
        smaps += &std::fs::read_to_string(format!("/proc/{p}/smaps"))
            .with_context(|| format!("cannot read /proc/{p}/smaps"))?;
    }
    parse_smaps(&smaps, shape.memory_mib)
}

fn one(peers: &Peers, vmm: Vmm, guest: &Guest, args: &MemoryArgs) -> anyhow::Result<Usage> {
    let scratch = Scratch::new("memory")?;
    let settle = Duration::from_secs(args.settle_secs);
    if vmm == Vmm::Airlock {
        let vm = AirlockVm::start(peers, guest, args.shape)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        vm.connect(&rt)?;
        return measure(vm.pid, args.shape, settle);
    }
    let cmd = peers.peer_command(
        vmm,
        guest,
        args.shape,
        "",
        Some(unique_cid()),
        scratch.path(),
    )?;
    let mut running = Running::spawn(cmd)?;
    let usage = running
        .wait_for_line(READY_LINE, Duration::from_secs(120))
        .and_then(|_| measure(running.pid(), args.shape, settle));
    running.kill();
    usage
}

pub fn run(args: &MemoryArgs, peers: &Peers) -> anyhow::Result<Section> {
    let guest = peers.guest.clone();
    let vmms = peers.vmms();
    let mut samples: Vec<Vec<Usage>> = vec![Vec::new(); vmms.len()];
    for run in 0..args.runs {
        for (i, &vmm) in vmms.iter().enumerate() {
            let u = one(peers, vmm, &guest, args).with_context(|| vmm.name())?;
            eprintln!(
                "memory: run {}/{}: {}: overhead RSS {} KiB, PSS {} KiB (guest touched {} KiB)",
                run + 1,
                args.runs,
                vmm.name(),
                u.overhead_rss_kib(),
                u.overhead_pss_kib(),
                u.guest_rss_kib
            );
            samples[i].push(u);
        }
    }
    let median = |v: &[Usage], f: fn(&Usage) -> u64| {
        let xs: Vec<f64> = v.iter().map(|u| f(u) as f64).collect();
        summarize(&xs).map_or(f64::NAN, |s| s.median_ms)
    };
    let rss: Vec<f64> = samples
        .iter()
        .map(|s| median(s, Usage::overhead_rss_kib))
        .collect();
    let mut section = Section::new(json!(null));
    section.para(&format!(
        "**VMM memory overhead**, idle guest ({}, agent serving, vsock attached), \
         median of {} runs: the VMM process's RSS and PSS minus the guest \
         memory it has touched. {}.",
        args.shape,
        args.runs,
        peers.note()
    ));
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for (i, &vmm) in vmms.iter().enumerate() {
        let pss = median(&samples[i], Usage::overhead_pss_kib);
        let touched = median(&samples[i], |u| u.guest_rss_kib);
        let r = ratio_to_best(rss[i], &rss, false);
        rows.push(vec![
            vmm.name().into(),
            format!("{:.1}", rss[i] / 1024.0),
            format!("{:.1}", pss / 1024.0),
            format!("{:.1}", touched / 1024.0),
            times(r),
            times(rss[0] / rss[i]),
        ]);
        json_rows.push(json!({
            "vmm": vmm, "overhead_rss_kib": rss[i], "overhead_pss_kib": pss,
            "guest_touched_kib": touched, "ratio_to_best": r, "airlock_ratio": rss[0] / rss[i],
            "samples": samples[i],
        }));
    }
    section.table(
        &[
            "VMM",
            "overhead RSS MiB",
            "overhead PSS MiB",
            "guest touched MiB",
            "RSS ÷ best",
            "Airlock ÷ this",
        ],
        &rows,
    );
    section.json = json!({
        "benchmark": "vmm_memory_overhead", "vcpus": args.shape.vcpus,
        "memory_mib": args.shape.memory_mib, "runs": args.runs, "results": json_rows,
    });
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_the_largest_big_anonymous_mapping() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0008200000 rw-p 00000000 00:00 0
Size:             133120 kB
Rss:               20480 kB
Pss:               20480 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 300 kB
Pss:                 300 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
Pss:                  16 kB
";
        let u = parse_smaps(smaps, 128).unwrap();
        assert_eq!((u.rss_kib, u.pss_kib), (21596, 21196));
        assert_eq!((u.guest_rss_kib, u.guest_pss_kib), (20480, 20480));
        assert_eq!((u.overhead_rss_kib(), u.overhead_pss_kib()), (1116, 716));
        assert!(parse_smaps(smaps, 256).is_err());
        assert!(parse_smaps("", 1).is_err());
    }

    #[test]
    fn guest_ram_may_be_a_memfd_over_two_processes() {
        // Airlock: the keeper (small) and the VMM, whose guest RAM is the
        // keeper's memfd mapped shared.
        let smaps = "55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42 /usr/bin/airlock-vmm
Size:               1024 kB
Rss:                 500 kB
Pss:                 250 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 7 /memfd:airlock-guest-ram (deleted)
Size:             131072 kB
Rss:               20480 kB
Pss:               20480 kB
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42 /usr/bin/airlock-vmm
Size:               1024 kB
Rss:                 500 kB
Pss:                 250 kB
";
        let u = parse_smaps(smaps, 128).unwrap();
        assert_eq!(u.guest_rss_kib, 20480);
        assert_eq!(u.overhead_rss_kib(), 1000);
    }
}
