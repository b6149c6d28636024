//! The exec, OOM and teardown paths of the `airlock` CLI under CPU
//! contention: busy loops beside the sandboxes, one per CPU of the machine
//! (the test host), for several rounds. An exec whose process the OOM
//! killer takes must end with 137 every time, and nothing may wait for an
//! event that never comes: every step has a deadline, and a step that
//! misses it fails the test naming the round and the step (and showing
//! the sandbox's VMM log and console) instead of stalling the suite.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_e2e::{airlock_binary, assert_no_sandbox_left, on_real_kvm};

/// Rounds of create → OOM exec → exec → rm, then run with an OOM.
/// About 70 s a round in the test host (one vCPU) with the hog running.
const ROUNDS: usize = 4;
/// Deadlines of the steps: far more than a step takes on a busy test host,
/// far less than the test host's own limit, so a hang is named here.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const EXEC_DEADLINE: Duration = Duration::from_secs(120);
const RM_DEADLINE: Duration = Duration::from_secs(120);

/// Busy loops, one per CPU, at the default nice value; they stop when the
/// guard drops (also when the test panics).
struct Hogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Hogs {
    fn start() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut spins = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        spins = std::hint::black_box(spins.wrapping_add(1));
                    }
                    spins
                })
            })
            .collect();
        println!("{cpus} CPU hog(s) started");
        Hogs { stop, threads }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `airlock ARGS` within `deadline`; a miss kills it and fails the test,
/// naming `round` and `step`.
fn airlock(round: usize, step: &str, args: &[&str], deadline: Duration) -> Output {
    let started = Instant::now();
    let mut child = Command::new(airlock_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run airlock");
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            pipe.read_to_end(&mut b).ok();
            b
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "round {round}, step {step:?}: `airlock {}` did not finish within {} s\n{}",
                args.join(" "),
                deadline.as_secs(),
                sandbox_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    println!(
        "round {round}, {step}: status {:?} in {:.1} s; stderr: {}",
        output.status.code(),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

/// The tails of every sandbox's VMM log and console.
fn sandbox_logs() -> String {
    let mut logs = String::new();
    for e in std::fs::read_dir("/run/airlock")
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in ["vmm.log", "console.log"] {
            let body = std::fs::read(e.path().join(f)).unwrap_or_default();
            let tail = text(&body[body.len().saturating_sub(4000)..]);
            logs.push_str(&format!("==> {}/{f}\n{tail}\n", e.path().display()));
        }
    }
    logs
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// runc's default spec with a memory limit.
fn limited_spec(limit: u64) -> String {
    format!(
        r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}},
            "env":["PATH=/usr/bin:/bin"]}},
          "root":{{"path":"rootfs","readonly":false}},
          "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                    {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}},
                    {{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["nosuid","nodev"]}}],
          "linux":{{"resources":{{"memory":{{"limit":{limit},"swap":{limit}}}}},
                   "namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}}}}"#
    )
}

/// busybox dd allocates its block: 96 MiB against the spec's 32 MiB limit.
const OOM_DD: [&str; 5] = ["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"];

#[test]
fn oom_kills_execs_and_teardowns_finish_under_cpu_contention() {
    on_real_kvm(
        "oom_kills_execs_and_teardowns_finish_under_cpu_contention",
        || {
            let work = tempfile::tempdir().unwrap();
            let spec = work.path().join("config.json");
            std::fs::write(&spec, limited_spec(32 << 20)).unwrap();
            let spec = spec.to_str().unwrap();
            let _hogs = Hogs::start();
            let started = Instant::now();
            for round in 1..=ROUNDS {
                let out = airlock(round, "create", &["create", "--spec", spec], BOOT_DEADLINE);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "round {round}: create: {}",
                    text(&out.stderr)
                );
                let id = text(&out.stdout).trim().to_string();

                let mut args = vec!["exec", id.as_str(), "--"];
                args.extend(OOM_DD);
                let out = airlock(round, "OOM exec", &args, EXEC_DEADLINE);
                assert_eq!(
                    out.status.code(),
                    Some(137),
                    "round {round}: the OOM-killed exec: {}",
                    text(&out.stderr)
                );
                assert!(
                    text(&out.stderr).contains("out of memory"),
                    "round {round}: {}",
                    text(&out.stderr)
                );

                let out = airlock(
                    round,
                    "exec after the OOM",
                    &["exec", &id, "--", "echo", "still up"],
                    EXEC_DEADLINE,
                );
                assert_eq!(out.status.code(), Some(0), "round {round}: exec");
                assert_eq!(text(&out.stdout), "still up\n", "round {round}: exec");

                let out = airlock(round, "rm", &["rm", &id], RM_DEADLINE);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "round {round}: rm: {}",
                    text(&out.stderr)
                );
                assert_no_sandbox_left();

                // The same through `airlock run`: the container's first
                // process is OOM-killed, then the sandbox is torn down.
                let mut args = vec!["run", "--spec", spec, "--"];
                args.extend(OOM_DD);
                let out = airlock(round, "OOM run", &args, BOOT_DEADLINE + EXEC_DEADLINE);
                assert_eq!(
                    out.status.code(),
                    Some(137),
                    "round {round}: the OOM-killed run: {}",
                    text(&out.stderr)
                );
                assert_no_sandbox_left();
                println!(
                    "round {round} done after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
            assert_no_sandbox_left();
        },
    );
}
