//! Lifecycle throughput: sandboxes created, run with `true` and destroyed
//! (memory wiped, scratch scrubbed) per second, 1 and N at a time:
//! * `airlock run -- true`;
//! * `ctr run --rm` with the Airlock shim;
//! * `ctr run --rm` with runc, the peer.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use crate::containerd::{Containerd, AIRLOCK, IMAGE, RUNC};
use crate::report::{ratio_to_best, times, Section};
use crate::stats::summarize;

#[derive(clap::Args, Clone)]
pub struct LifecycleArgs {
    /// Sandboxes per measurement
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Concurrency levels (repeatable)
    #[arg(long = "parallel", default_values_t = [1, 4])]
    pub parallel: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    AirlockCli,
    AirlockShim,
    Runc,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::AirlockCli => "Airlock: `airlock run -- true`",
            Path::AirlockShim => "Airlock via containerd: `ctr run --rm`",
            Path::Runc => "runc via containerd: `ctr run --rm`",
        }
    }
}

fn job(path: Path, c: &Containerd, n: usize) -> anyhow::Result<()> {
    let out = match path {
        Path::AirlockCli => Command::new("target/release/airlock")
            .args(["run", "--", "true"])
            .output()?,
        Path::AirlockShim | Path::Runc => {
            let rt = if path == Path::Runc { RUNC } else { AIRLOCK };
            let id = format!("bench-life-{n}");
            c.command(&["run", "--rm", "--runtime", rt, IMAGE, &id, "true"])
                .output()?
        }
    };
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            path.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sandboxes per second and the median time of one, `jobs` jobs on
/// `parallel` workers.
fn measure(path: Path, c: &Containerd, jobs: usize, parallel: usize) -> anyhow::Result<(f64, f64)> {
    let next = AtomicUsize::new(0);
    let times = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return;
                }
                let t = Instant::now();
                match job(path, c, n) {
                    Ok(()) => times
                        .lock()
                        .map(|mut v| v.push(t.elapsed().as_secs_f64() * 1000.0))
                        .unwrap_or(()),
                    Err(e) => errors.lock().map(|mut v| v.push(e)).unwrap_or(()),
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    if let Some(e) = errors.into_inner().ok().and_then(|mut v| v.pop()) {
        return Err(e);
    }
    let times = times.into_inner().unwrap_or_default();
    let median = summarize(&times).context("no jobs ran")?.median_ms;
    Ok((jobs as f64 / wall, median))
}

pub fn run(args: &LifecycleArgs) -> anyhow::Result<Section> {
    let containerd = Containerd::start()?;
    let paths = [Path::AirlockCli, Path::AirlockShim, Path::Runc];
    let mut section = Section::new(json!(null));
    section.para(&format!(
        "**Lifecycle throughput**: sandboxes created, run with `true` and \
         destroyed per second ({} per measurement; Airlock's teardown \
         includes the memory wipe and the scratch scrub).",
        args.jobs
    ));
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for &p in &args.parallel {
        let mut rates = Vec::new();
        let mut lat = Vec::new();
        for path in paths {
            let (rate, median) = measure(path, &containerd, args.jobs, p)
                .with_context(|| format!("{}, {p} at a time", path.name()))?;
            eprintln!("lifecycle: {}, {p} at a time: {rate:.2}/s", path.name());
            rates.push(rate);
            lat.push(median);
        }
        for (i, path) in paths.iter().enumerate() {
            let r = ratio_to_best(rates[i], &rates, true);
            rows.push(vec![
                path.name().to_string(),
                p.to_string(),
                format!("{:.2}", rates[i]),
                format!("{:.0}", lat[i]),
                times(r),
            ]);
            json_rows.push(json!({
                "path": path.name(), "parallel": p, "per_second": rates[i],
                "median_ms_each": lat[i], "ratio_to_best": r,
            }));
        }
    }
    section.table(
        &[
            "path",
            "at a time",
            "per second",
            "median ms each",
            "÷ best",
        ],
        &rows,
    );
    section.json =
        json!({ "benchmark": "lifecycle_throughput", "jobs": args.jobs, "results": json_rows });
    Ok(section)
}
