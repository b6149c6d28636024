//! Boot time: VMM process start to the guest agent's `airlock-agent ready`
//! line on the serial console, for every VMM booting the same kernel and
//! initramfs with the same vCPUs and memory. Runs are interleaved across the
//! VMMs so that drift on a shared machine hits them all alike.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::stats::{summarize, Summary};

const READY: &str = "airlock-agent ready";
/// The guest arguments every VMM gets (Airlock's own base line).
const GUEST_ARGS: &str =
    "console=ttyS0 reboot=k,panic_warm panic=-1 pci=off nomodule quiet airlock.oneshot";

#[derive(clap::Args)]
pub struct BootArgs {
    /// Runs per VMM
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs per guest
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// airlock-vmm binary [default: target/release/airlock-vmm]
    #[arg(long)]
    airlock: Option<PathBuf>,
    /// Guest kernel [default: the cached default guest image]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs [default: the cached default guest image]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Write the results as JSON to this file too
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Vmm {
    Airlock,
    QemuMicrovm,
    Firecracker,
}

struct Setup {
    airlock: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    vcpus: u32,
    memory: u64,
    firecracker: Option<PathBuf>,
    scratch: PathBuf,
}

impl Setup {
    fn command(&self, vmm: Vmm, run: usize) -> anyhow::Result<Command> {
        let (kernel, initrd) = (self.kernel.display(), self.initrd.display());
        let cmd = match vmm {
            Vmm::Airlock => {
                let mut c = Command::new(&self.airlock);
                c.args([
                    "--kernel",
                    &kernel.to_string(),
                    "--initrd",
                    &initrd.to_string(),
                ])
                .args([
                    "--vcpus",
                    &self.vcpus.to_string(),
                    "--memory",
                    &self.memory.to_string(),
                ])
                .args(["--log-level", "warn"]);
                c
            }
            Vmm::QemuMicrovm => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off",
                    "-enable-kvm",
                    "-cpu",
                    "host",
                ])
                .args([
                    "-smp",
                    &self.vcpus.to_string(),
                    "-m",
                    &self.memory.to_string(),
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .args(["-serial", "stdio", "-kernel", &kernel.to_string()])
                .args(["-initrd", &initrd.to_string(), "-append", GUEST_ARGS]);
                c
            }
            Vmm::Firecracker => {
                let bin = self
                    .firecracker
                    .as_ref()
                    .context("FIRECRACKER_BIN not set")?;
                let config = self.scratch.join(format!("fc-{run}.json"));
                let json = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": self.kernel, "initrd_path": self.initrd,
                        "boot_args": GUEST_ARGS.replace("reboot=k,panic_warm panic=-1", "reboot=k panic=1"),
                    },
                    "machine-config": { "vcpu_count": self.vcpus, "mem_size_mib": self.memory },
                    "drives": [],
                });
                std::fs::write(&config, json.to_string())?;
                let mut c = Command::new(bin);
                c.args(["--no-api", "--level", "Error", "--config-file"])
                    .arg(&config);
                c
            }
        };
        Ok(cmd)
    }
}

/// Milliseconds from spawning `cmd` to the ready line, or an error with the
/// output tail.
fn time_to_ready(mut cmd: Command) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim_end() == READY {
                let _ = tx.send(start.elapsed());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(120));
    // Boot is what is measured: once the guest is ready (or never got
    // there), the VMM is stopped at once rather than left to shut down.
    let status = wait_or_kill(&mut child, Duration::ZERO);
    match ready {
        Ok(d) => Ok(d.as_secs_f64() * 1000.0),
        Err(_) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "no '{READY}' line (exit {status:?}); stderr: {}",
                err.trim()
            )
        }
    }
}

fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

#[derive(Serialize)]
struct Row {
    vmm: Vmm,
    #[serde(flatten)]
    summary: Summary,
    /// Airlock's median divided by this VMM's median.
    airlock_ratio: f64,
}

pub fn run(args: &BootArgs) -> anyhow::Result<()> {
    let guest = airlock_vmm::config::default_guest_dir();
    let setup = Setup {
        airlock: args
            .airlock
            .clone()
            .unwrap_or_else(|| "target/release/airlock-vmm".into()),
        kernel: args.kernel.clone().unwrap_or_else(|| guest.join("vmlinux")),
        initrd: args
            .initrd
            .clone()
            .unwrap_or_else(|| guest.join("initramfs.cpio")),
        vcpus: args.vcpus,
        memory: args.memory,
        firecracker: std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from),
        scratch: std::env::temp_dir(),
    };
    let mut vmms = vec![Vmm::Airlock, Vmm::QemuMicrovm];
    if setup.firecracker.is_some() {
        vmms.push(Vmm::Firecracker);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    for run in 0..args.runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let ms = time_to_ready(setup.command(*vmm, run)?)
                .with_context(|| format!("{vmm:?}, run {}", run + 1))?;
            eprintln!("boot: run {}/{} {vmm:?}: {ms:.0} ms", run + 1, args.runs);
            samples[i].push(ms);
        }
    }
    let summaries: Vec<Summary> = samples
        .iter()
        .map(|s| summarize(s).context("no samples"))
        .collect::<Result<_, _>>()?;
    let airlock = summaries[0].median_ms;
    let rows: Vec<Row> = vmms
        .iter()
        .zip(summaries)
        .map(|(vmm, summary)| Row {
            vmm: *vmm,
            airlock_ratio: airlock / summary.median_ms,
            summary,
        })
        .collect();
    print_table(args, &rows);
    let json = serde_json::json!({
        "benchmark": "boot_to_ready", "vcpus": args.vcpus, "memory_mib": args.memory, "results": rows,
    });
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn print_table(args: &BootArgs, rows: &[Row]) {
    println!(
        "Boot to `{READY}` ({} vCPU, {} MiB, {} runs each)\n",
        args.vcpus, args.memory, args.runs
    );
    println!("| VMM | median ms | min–max ms | Airlock ÷ this |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        let s = &r.summary;
        println!(
            "| {:?} | {:.0} | {:.0}–{:.0} | {:.2}× |",
            r.vmm, s.median_ms, s.min_ms, s.max_ms, r.airlock_ratio
        );
    }
    println!();
}
