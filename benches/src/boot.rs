//! Cold boot to ready, every VMM on the same kernel and initramfs:
//! * Airlock: `airlock-vmm` started exactly as the runtime starts it, until
//!   the guest agent answers the runtime's `Check` call over vsock;
//! * Firecracker and QEMU `microvm`: until the guest's `/init` (the same
//!   agent binary) prints its boot marker on the serial console, which it
//!   does first thing.
//!
//! Runs are interleaved across the VMMs so that drift on a shared machine
//! hits them all alike.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_vmm_api::{Event, EventLog};
use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::peers::{Guest, Peers, Running, Scratch, Shape, Vmm, BOOT_MARKER_ARG, BOOT_MARKER_LINE};
use crate::report::{ms, ratio_to_best, times, Section};
use crate::stats::{summarize, Summary};

const DEADLINE: Duration = Duration::from_secs(120);

#[derive(clap::Args, Clone)]
pub struct BootArgs {
    /// Runs per VMM and shape
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Guest shapes as VCPUS:MIB (repeatable)
    #[arg(long = "shape", value_parser = parse_shape, default_values = ["1:128", "2:512"])]
    pub shapes: Vec<Shape>,
}

pub fn parse_shape(s: &str) -> Result<Shape, String> {
    let (v, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected VCPUS:MIB, e.g. 1:128"))?;
    let vcpus = v.parse().map_err(|e| format!("{s:?}: vCPUs: {e}"))?;
    let memory_mib = m.parse().map_err(|e| format!("{s:?}: MiB: {e}"))?;
    Ok(Shape { vcpus, memory_mib })
}

/// Where Airlock's boot went, from its boot-timer device (ms since the VMM
/// process started).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Phases {
    pub kernel_entry_ms: f64,
    pub init_ms: f64,
    pub agent_ready_ms: f64,
}

impl Phases {
    /// From the VMM's events.
    pub fn from_events(events: &[Event]) -> Self {
        let mut p = Phases {
            kernel_entry_ms: f64::NAN,
            init_ms: f64::NAN,
            agent_ready_ms: f64::NAN,
        };
        for e in events {
            match *e {
                Event::KernelEntered { ms } => p.kernel_entry_ms = ms,
                Event::InitStarted { ms } => p.init_ms = ms,
                Event::AgentReady { ms } => p.agent_ready_ms = ms,
                _ => {}
            }
        }
        p
    }
}

/// An `airlock-vmm` started the way the runtime starts a sandbox's
/// (`VmmProcess::spawn`, then `connect_when_ready`), with no drives.
pub struct AirlockVm {
    pub pid: u32,
    pub started: Instant,
    pub spec: airlock_runtime::vmm::VmmSpec,
    _dir: Scratch,
}

impl AirlockVm {
    pub fn start(peers: &Peers, guest: &Guest, shape: Shape) -> anyhow::Result<Self> {
        let dir = Scratch::new("airlock")?;
        let spec = airlock_spec(guest, shape, dir.path());
        let started = Instant::now();
        let vmm = airlock_runtime::vmm::VmmProcess::spawn(&peers.airlock_vmm, &spec)?;
        Ok(AirlockVm {
            pid: vmm.pid(),
            started,
            spec,
            _dir: dir,
        })
    }

    /// Waits for the agent to answer `Check`; returns when it did.
    pub fn connect(&self, rt: &tokio::runtime::Runtime) -> anyhow::Result<Instant> {
        let pid = self.pid;
        let alive = move || std::path::Path::new(&format!("/proc/{pid}")).exists();
        let uds = self.spec.vm.vsock.as_ref().map(|v| v.uds.clone());
        rt.block_on(airlock_runtime::agent_client::connect_when_ready(
            &uds.context("no vsock")?,
            &airlock_runtime::vmm::events_path(&self.spec.dir),
            DEADLINE,
            alive,
        ))
        .with_context(|| format!("Airlock's agent never answered; VMM log:\n{}", self.log()))?;
        Ok(Instant::now())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(airlock_runtime::vmm::log_path(&self.spec.dir)).unwrap_or_default()
    }

    /// What the VMM reported so far.
    pub fn events(&self) -> Vec<Event> {
        EventLog::read(&airlock_runtime::vmm::events_path(&self.spec.dir))
    }
}

impl Drop for AirlockVm {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid only read their arguments; the VMM is
        // our child (VmmProcess::spawn forgets its handle, not the process).
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
        }
        if let Some(jail) = &self.spec.jail {
            let _ = airlock_runtime::jail::remove_cgroup(&jail.cgroup);
        }
    }
}

/// One Airlock boot: milliseconds to `Check`, and its phases.
pub fn airlock_boot(
    peers: &Peers,
    guest: &Guest,
    shape: Shape,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(f64, Phases)> {
    let vm = AirlockVm::start(peers, guest, shape)?;
    let answered = vm.connect(rt)?;
    let ms = answered.duration_since(vm.started).as_secs_f64() * 1000.0;
    Ok((ms, Phases::from_events(&vm.events())))
}

/// The VMM as the runtime starts it for a sandbox (`airlock-runtime`'s
/// `VmmSpec`, jail included), without the workload drives.
pub fn airlock_spec(guest: &Guest, shape: Shape, dir: &Path) -> airlock_runtime::vmm::VmmSpec {
    let root = dir.join("root");
    let name = dir
        .file_name()
        .map_or_else(|| "bench".into(), |n| n.to_string_lossy().into_owned());
    let settings = airlock_runtime::config::JailSettings {
        cgroup_parent: "/sys/fs/cgroup/airlock-bench".into(),
        ..Default::default()
    };
    let mut vm = airlock_vmm_api::VmConfig::new(guest.kernel.clone());
    vm.initrd = Some(guest.initrd.clone());
    vm.vcpus = shape.vcpus;
    vm.memory_mib = shape.memory_mib;
    // Beside the jail root, as the runtime keeps it: bound by the runtime.
    vm.vsock = Some(airlock_vmm_api::VsockConfig {
        guest_cid: 3,
        uds: dir.join("vsock.sock"),
        guest_connect: false,
        listen_fd: None,
    });
    vm.console = airlock_vmm_api::ConsoleOutput::File(dir.join("console.log"));
    airlock_runtime::vmm::VmmSpec {
        vm,
        dir: dir.to_path_buf(),
        die_with_parent: true,
        jail: Some(airlock_runtime::jail::JailSpec::new(
            &settings,
            &name,
            &root,
            shape.memory_mib as u32,
            0,
        )),
    }
}

/// Writes to as much fresh host memory as the next guest gets, plus its
/// VMM's share, and frees it, outside the timing.
///
/// Measured in the test host: a VM booted right after another VM was
/// killed took about 1 s longer (Airlock and QEMU alike) than one booted
/// after a VM whose memory was zeroed before it exited, or after this
/// step. The emulator pays to reuse the pages the killed guest ran code
/// from, and whichever VMM boots next would otherwise pay for its
/// predecessor. On hardware this step costs a few milliseconds and
/// changes nothing.
fn settle_host_memory(guest_mib: u64) {
    let len = usize::try_from(guest_mib.saturating_add(128) << 20).unwrap_or(usize::MAX);
    let mut scratch = vec![1u8; len];
    for byte in scratch.iter_mut().step_by(4096) {
        *byte = 2;
    }
    std::hint::black_box(&scratch);
}

/// One boot timed like a peer's: milliseconds from the spawn of `cmd` to
/// the boot marker on its console.
fn marker_boot(cmd: std::process::Command) -> anyhow::Result<f64> {
    let mut running = Running::spawn(cmd)?;
    let at = running.wait_for_line(BOOT_MARKER_LINE, DEADLINE);
    let started = running.started;
    running.kill();
    Ok(at?.duration_since(started).as_secs_f64() * 1000.0)
}

/// One line of a boot table: what was started, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Series {
    /// Airlock as a sandbox starts: jailed, until the agent answers `Check`.
    Airlock,
    /// `airlock-vmm` started on its own (no jail, no vsock) until the
    /// `/init` marker: the peers' measure, for a like-for-like VMM
    /// comparison.
    AirlockToInit,
    /// A peer VMM until the `/init` marker.
    Peer(Vmm),
}

impl Series {
    fn all(peers: &Peers) -> Vec<Series> {
        let mut v = vec![Series::Airlock, Series::AirlockToInit];
        v.extend(
            peers
                .vmms()
                .into_iter()
                .filter(|&m| m != Vmm::Airlock)
                .map(Series::Peer),
        );
        v
    }

    fn name(self) -> &'static str {
        match self {
            Series::Airlock => "Airlock",
            Series::AirlockToInit => "Airlock VMM alone",
            Series::Peer(vmm) => vmm.name(),
        }
    }

    fn measured_to(self) -> &'static str {
        match self {
            Series::Airlock => "agent answers Check",
            Series::AirlockToInit | Series::Peer(_) => "/init marker",
        }
    }
}

#[derive(Serialize)]
struct Row {
    series: Series,
    measured_to: &'static str,
    #[serde(flatten)]
    summary: Summary,
    ratio_to_best: f64,
    airlock_ratio: f64,
}

pub fn run(args: &BootArgs, peers: &Peers) -> anyhow::Result<Section> {
    let guest = peers.guest.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let series = Series::all(peers);
    let mut section = Section::new(json!([]));
    section.para(&format!(
        "Boot to ready, same kernel and initramfs for every VMM, {} runs each, \
         interleaved. Airlock: VMM start until the agent answers `Check` over \
         vsock. Peers: VMM start until `/init` prints its marker. \
         \"Airlock VMM alone\": `airlock-vmm` started directly (no jail, no \
         vsock), timed like the peers. {}.",
        args.runs,
        peers.note()
    ));
    let mut results = Vec::new();
    for &shape in &args.shapes {
        let mut samples = vec![Vec::new(); series.len()];
        let mut phases = Vec::new();
        for run in 0..args.runs {
            for (i, &s) in series.iter().enumerate() {
                settle_host_memory(shape.memory_mib);
                let ms = match s {
                    Series::Airlock => {
                        let (ms, p) = airlock_boot(peers, &guest, shape, &rt)?;
                        phases.push(p);
                        ms
                    }
                    Series::AirlockToInit => {
                        let scratch = Scratch::new("boot")?;
                        marker_boot(peers.airlock_command(
                            &guest,
                            shape,
                            BOOT_MARKER_ARG,
                            None,
                            scratch.path(),
                        )?)?
                    }
                    Series::Peer(vmm) => {
                        let scratch = Scratch::new("boot")?;
                        marker_boot(peers.peer_command(
                            vmm,
                            &guest,
                            shape,
                            BOOT_MARKER_ARG,
                            None,
                            scratch.path(),
                        )?)?
                    }
                };
                eprintln!(
                    "boot: {shape}, run {}/{}: {}: {ms:.0} ms",
                    run + 1,
                    args.runs,
                    s.name()
                );
                samples[i].push(ms);
            }
        }
        let summaries: Vec<Summary> = samples
            .iter()
            .map(|s| summarize(s).context("no samples"))
            .collect::<Result<_, _>>()?;
        let medians: Vec<f64> = summaries.iter().map(|s| s.median_ms).collect();
        let airlock = medians[0];
        let rows: Vec<Row> = series
            .iter()
            .zip(summaries)
            .map(|(&series, summary)| Row {
                series,
                measured_to: series.measured_to(),
                ratio_to_best: ratio_to_best(summary.median_ms, &medians, false),
                airlock_ratio: airlock / summary.median_ms,
                summary,
            })
            .collect();
        let phase = |f: fn(&Phases) -> f64| {
            let v: Vec<f64> = phases.iter().map(f).collect();
            summarize(&v).map_or(f64::NAN, |s| s.median_ms)
        };
        let median_phases = Phases {
            kernel_entry_ms: phase(|p| p.kernel_entry_ms),
            init_ms: phase(|p| p.init_ms),
            agent_ready_ms: phase(|p| p.agent_ready_ms),
        };
        section.para(&format!("**Boot to ready, {shape}** (ms)"));
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.series.name().into(),
                    r.measured_to.into(),
                    ms(r.summary.median_ms),
                    format!("{}–{}", ms(r.summary.min_ms), ms(r.summary.max_ms)),
                    times(r.ratio_to_best),
                    times(r.airlock_ratio),
                ]
            })
            .collect();
        section.table(
            &[
                "VMM",
                "until",
                "median",
                "min–max",
                "÷ best",
                "Airlock ÷ this",
            ],
            &table,
        );
        section.para(&format!(
            "Airlock's phases (medians, ms from VMM start, its boot-timer \
             device): guest kernel entry {}, `/init` {}, agent ready {}, \
             `Check` answered {}.",
            ms(median_phases.kernel_entry_ms),
            ms(median_phases.init_ms),
            ms(median_phases.agent_ready_ms),
            ms(airlock)
        ));
        section.para(&vmm_alone_note(&rows));
        results.push(json!({
            "vcpus": shape.vcpus, "memory_mib": shape.memory_mib,
            "results": rows, "airlock_phases_median": median_phases,
        }));
    }
    section.json = json!({ "benchmark": "boot_to_ready", "runs": args.runs, "shapes": results });
    Ok(section)
}

/// The like-for-like sentence: Airlock's VMM alone against each peer, all
/// timed to the same `/init` marker.
fn vmm_alone_note(rows: &[Row]) -> String {
    let alone = rows.iter().find(|r| r.series == Series::AirlockToInit);
    let peers: Vec<String> = rows
        .iter()
        .filter_map(|r| match (r.series, alone) {
            (Series::Peer(vmm), Some(a)) => Some(format!(
                "{} {}",
                times(a.summary.median_ms / r.summary.median_ms),
                vmm.name()
            )),
            _ => None,
        })
        .collect();
    format!(
        "Like for like, to the same `/init` marker, Airlock's VMM alone takes {}.",
        if peers.is_empty() {
            "no peer's time (no peer ran)".to_string()
        } else {
            peers.join(" and ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(series: Series, median_ms: f64) -> Row {
        Row {
            series,
            measured_to: series.measured_to(),
            summary: summarize(&[median_ms]).unwrap(),
            ratio_to_best: f64::NAN,
            airlock_ratio: f64::NAN,
        }
    }

    #[test]
    fn vmm_alone_is_compared_with_each_peer() {
        let rows = [
            row(Series::Airlock, 1500.0),
            row(Series::AirlockToInit, 900.0),
            row(Series::Peer(Vmm::Firecracker), 1000.0),
            row(Series::Peer(Vmm::QemuMicrovm), 1800.0),
        ];
        let note = vmm_alone_note(&rows);
        assert!(
            note.contains("0.90× Firecracker and 0.50× QEMU microvm"),
            "{note}"
        );
        assert!(vmm_alone_note(&rows[..2]).contains("no peer ran"));
    }

    #[test]
    fn series_name_their_rows_and_endpoints() {
        let names: Vec<&str> = [
            Series::Airlock,
            Series::AirlockToInit,
            Series::Peer(Vmm::Firecracker),
        ]
        .iter()
        .map(|s| s.name())
        .collect();
        assert_eq!(names, ["Airlock", "Airlock VMM alone", "Firecracker"]);
        assert_eq!(Series::AirlockToInit.measured_to(), "/init marker");
    }

    #[test]
    fn shapes_parse() {
        let s = parse_shape("2:512").unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2, 512));
        assert!(parse_shape("2").is_err());
        assert!(parse_shape("x:1").is_err());
    }

    #[test]
    fn phases_come_from_the_boot_timer_events() {
        let events = [
            Event::Running { ms: 3.0 },
            Event::KernelEntered { ms: 12.5 },
            Event::InitStarted { ms: 80.0 },
            Event::AgentReady { ms: 95.25 },
        ];
        let p = Phases::from_events(&events);
        assert_eq!(
            (p.kernel_entry_ms, p.init_ms, p.agent_ready_ms),
            (12.5, 80.0, 95.25)
        );
        assert!(Phases::from_events(&[]).init_ms.is_nan());
    }
}
