//! Exec round trip: the time to run `true` in a running sandbox and get its
//! exit status back,
//! * through `airlock exec` (a CLI process per exec);
//! * through the agent's ttrpc `ExecProcess` + `WaitProcess`, on an open
//!   connection, with no CLI in the way;
//! * through containerd (`ctr task exec`), into an Airlock task and into a
//!   runc task: the same client path for both, runc being the peer.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use crate::containerd::{Containerd, AIRLOCK, IMAGE, RUNC};
use crate::report::{ms, ratio_to_best, Section};
use crate::stats::{summarize, Summary};

#[derive(clap::Args, Clone)]
pub struct ExecArgs {
    /// Execs per path
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
}

fn airlock() -> Command {
    Command::new("target/release/airlock")
}

fn timed(
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<()>,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        f().with_context(|| format!("{what}, exec {}", i + 1))?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!("exec: {what}: {runs} execs done");
    Ok(v)
}

fn status_ok(out: std::process::Output, what: &str) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `airlock exec` and direct ttrpc into one `airlock create`d sandbox.
fn airlock_paths(runs: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let id = status_ok(airlock().arg("create").output()?, "airlock create")?;
    let result = (|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let cli = timed(
            "airlock exec",
            || {
                status_ok(
                    airlock().args(["exec", &id, "--", "true"]).output()?,
                    "airlock exec",
                )
                .map(drop)
            },
            runs,
        )?;
        let direct = direct_ttrpc(&id, runs)?;
        Ok((cli, direct))
    })();
    let removed = airlock().args(["rm", &id]).output();
    let (cli, direct) = result?;
    status_ok(removed?, "airlock rm")?;
    Ok((cli, direct))
}

fn direct_ttrpc(id: &str, runs: usize) -> anyhow::Result<Vec<f64>> {
    use airlock_runtime::sandbox::{spec, Sandbox};
    let config = airlock_runtime::config::RuntimeConfig::load(None)?;
    let id = airlock_runtime::state::SandboxId::parse(id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sandbox = Sandbox::open(&config, &id).await?;
        let opts = spec::ProcessOptions {
            args: vec!["true".into()],
            env: vec![],
            cwd: None,
            tty: false,
        };
        let process = spec::exec_process(&sandbox.container_spec()?, &opts, &Default::default())?;
        let mut v = Vec::with_capacity(runs);
        for i in 0..runs {
            let exec_id = format!("bench-{i}");
            let t = Instant::now();
            let exit = sandbox.exec(&exec_id, &process).await?.wait().await?;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            if exit.status != 0 {
                bail!("`true` exited {} in the sandbox", exit.status);
            }
        }
        eprintln!("exec: agent ttrpc: {runs} execs done");
        Ok(v)
    })
}

/// `ctr task exec` into a task of `runtime`.
fn ctr_path(c: &Containerd, runtime: &str, runs: usize) -> anyhow::Result<Vec<f64>> {
    let id = format!("bench-exec-{}", runtime.rsplit('.').nth(1).unwrap_or("x"));
    c.ctr(&["run", "-d", "--runtime", runtime, IMAGE, &id])?;
    let mut n = 0;
    let result = timed(
        &format!("ctr task exec ({runtime})"),
        || {
            n += 1;
            let exec_id = format!("e{n}");
            c.ctr(&["task", "exec", "--exec-id", &exec_id, &id, "true"])
                .map(drop)
        },
        runs,
    );
    c.remove(&id);
    result
}

pub fn run(args: &ExecArgs) -> anyhow::Result<Section> {
    let (cli, direct) = airlock_paths(args.runs)?;
    let containerd = Containerd::start()?;
    let ctr_airlock = ctr_path(&containerd, AIRLOCK, args.runs)?;
    let ctr_runc = ctr_path(&containerd, RUNC, args.runs)?;
    drop(containerd);
    let paths: [(&str, &[f64]); 4] = [
        ("Airlock: `airlock exec` CLI", &cli),
        ("Airlock: agent ttrpc Exec+Wait", &direct),
        ("Airlock via containerd: `ctr task exec`", &ctr_airlock),
        ("runc via containerd: `ctr task exec`", &ctr_runc),
    ];
    let sums: Vec<Summary> = paths
        .iter()
        .map(|(_, s)| summarize(s).context("no samples"))
        .collect::<Result<_, _>>()?;
    let medians: Vec<f64> = sums.iter().map(|s| s.median_ms).collect();
    let mut section = Section::new(json!(null));
    section.para(&format!(
        "**Exec round trip** of `true` into a running sandbox, {} execs per \
         path (ms). The containerd rows take the same client path (`ctr` → \
         containerd → shim), runc being the peer.",
        args.runs
    ));
    let rows: Vec<Vec<String>> = paths
        .iter()
        .zip(&sums)
        .map(|((name, _), s)| {
            vec![
                name.to_string(),
                ms(s.median_ms),
                format!("{}–{}", ms(s.min_ms), ms(s.max_ms)),
                crate::report::times(ratio_to_best(s.median_ms, &medians, false)),
                crate::report::times(s.median_ms / medians[3]),
            ]
        })
        .collect();
    section.table(&["path", "median", "min–max", "÷ best", "÷ runc"], &rows);
    section.json = json!({
        "benchmark": "exec_round_trip", "runs": args.runs,
        "results": paths.iter().zip(&sums).map(|((name, _), s)| json!({
            "path": name, "summary": s, "ratio_to_best": ratio_to_best(s.median_ms, &medians, false),
        })).collect::<Vec<_>>(),
    });
    Ok(section)
}
