//! The `airlock` CLI end to end: real microVMs on real KVM, the real guest
//! kernel and agent, the workload images built by scripts/setup.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use airlock_e2e::{
    airlock_binary, assert_one_line_error, on_real_kvm, processes_mentioning, real_kvm,
};

fn airlock(args: &[&str]) -> Command {
    let mut cmd = Command::new(airlock_binary());
    cmd.args(args).stdin(Stdio::null());
    cmd
}

fn show(out: &Output) {
    println!("--- status {:?}", out.status.code());
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.len() < 4096 {
        println!("--- stdout\n{stdout}");
    }
    println!("--- stderr\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs airlock with a deadline: a hang becomes a failure that shows what
/// every sandbox's VMM and guest console said, instead of a stuck suite.
fn run(args: &[&str]) -> Output {
    let child = airlock(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run airlock");
    let out = wait_with_deadline(child, args);
    show(&out);
    out
}

fn wait_with_deadline(mut child: std::process::Child, args: &[&str]) -> Output {
    use std::io::Read;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        stdout.read_to_end(&mut b).ok();
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        stderr.read_to_end(&mut b).ok();
        b
    });
    let until = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let logs = sandbox_logs();
            child.kill().ok();
            panic!("airlock {args:?} hung for 240 s; sandbox logs:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// The tails of every sandbox's VMM log and console.
fn sandbox_logs() -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(state_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in ["vmm.log", "console.log"] {
            let body = std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let tail: String = body
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            text.push_str(&format!("==> {}/{f}\n{tail}\n", e.path().display()));
        }
    }
    text
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with one `airlock: ...` line on stderr.
#[test]
fn run_output_exit_codes_and_stdin() {
    on_real_kvm("run_output_exit_codes_and_stdin", || {
        let out = run(&["run", "--", "echo", "hello"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), "hello\n");
        assert_eq!(stderr(&out), "", "stderr stays the command's own");

        let out = run(&["run", "--", "sh", "-c", "exit 7"]);
        assert_eq!(out.status.code(), Some(7));

        let out = run(&[
            "run",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; echo more-out",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), "to-out\nmore-out\n");
        assert_eq!(stderr(&out), "to-err\n");

        let mut child = airlock(&["run", "-i", "--", "sh", "-c", "cat; echo done"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"piped line 1\npiped line 2\n")
            .unwrap();
        let out = wait_with_deadline(child, &["run", "-i"]);
        show(&out);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), "piped line 1\npiped line 2\ndone\n");
    });
}

#[test]
fn a_100_mib_stdout_stream_arrives_intact() {
    on_real_kvm("a_100_mib_stdout_stream_arrives_intact", || {
        const LEN: usize = 100 << 20;
        let line = "airlock-0123456789-abcdefghijklmnopqrstuvwxyz\n";
        let script = format!("yes {} | head -c {LEN}", line.trim_end());
        let child = airlock(&["run", "--memory", "256", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_deadline(child, &["run", "100 MiB"]);
        println!("--- stderr\n{}", stderr(&out));
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(out.stdout.len(), LEN);
        let expected: Vec<u8> = line.bytes().cycle().take(LEN).collect();
        assert_eq!(fnv(&out.stdout), fnv(&expected), "checksum of the stream");
    });
}

/// FNV-1a, enough to compare two streams.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn timeout_tty_and_the_python_image() {
    on_real_kvm("timeout_tty_and_the_python_image", || {
        // The same sandbox without the timeout, to subtract boot and
        // teardown, which are slow in the emulated test host.
        let t = Instant::now();
        let out = run(&["run", "--", "true"]);
        assert_eq!(out.status.code(), Some(0));
        let baseline = t.elapsed();

        let t = Instant::now();
        let out = run(&["run", "--timeout", "2", "--", "sleep", "100"]);
        let took = t.elapsed();
        assert_eq!(out.status.code(), Some(124));
        assert!(
            stderr(&out).contains("timed out after 2 s"),
            "{}",
            stderr(&out)
        );
        println!("baseline {baseline:?}, with --timeout 2: {took:?}");
        assert!(took >= Duration::from_secs(2));
        // Ended within 5 s of the timeout, beyond what a normal run costs.
        assert!(
            took < baseline + Duration::from_secs(2 + 5),
            "timeout took {took:?} (a run of `true` took {baseline:?})"
        );

        let out = run(&["run", "-t", "--", "tty"]);
        assert_eq!(out.status.code(), Some(0));
        let tty = stdout(&out);
        let tty = tty.trim();
        assert!(
            tty.starts_with("/dev/pts/") && tty["/dev/pts/".len()..].parse::<u32>().is_ok(),
            "{tty:?}"
        );

        let out = run(&[
            "run",
            "--image",
            "python",
            "--",
            "python3",
            "-c",
            "print(1+1)",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), "2\n");
    });
}

/// `airlock ls --json`'s entry for sandbox `id`.
fn listed(id: &str) -> serde_json::Value {
    let out = run(&["ls", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

/// Every process whose command line mentions `needle`.
fn state_dir() -> PathBuf {
    PathBuf::from("/run/airlock")
}

#[test]
fn create_exec_cp_rm_leaves_nothing_behind() {
    on_real_kvm("create_exec_cp_rm_leaves_nothing_behind", || {
        let out = run(&["create"]);
        assert_eq!(out.status.code(), Some(0));
        let id = stdout(&out).trim().to_string();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "{id:?}"
        );
        let dir = state_dir().join(&id);
        assert!(dir.is_dir());
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&dir).unwrap().permissions()
            ) & 0o777,
            0o700
        );

        let out = run(&["exec", &id, "--", "sh", "-c", "echo one > /tmp/shared"]);
        assert_eq!(out.status.code(), Some(0));
        let out = run(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "cat /tmp/shared; echo two >> /tmp/shared",
        ]);
        assert_eq!(stdout(&out), "one\n");
        let out = run(&["exec", &id, "--", "cat", "/tmp/shared"]);
        assert_eq!(stdout(&out), "one\ntwo\n");
        // A process killed by a signal: 128 + its number, as shells say.
        let out = run(&["exec", &id, "--", "sh", "-c", "kill -9 $$"]);
        assert_eq!(out.status.code(), Some(137));

        let work = tempfile::tempdir().unwrap();
        let local_in = work.path().join("in.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        std::fs::write(&local_in, &data).unwrap();
        let out = run(&[
            "cp",
            local_in.to_str().unwrap(),
            &format!("{id}:/tmp/in.bin"),
        ]);
        assert_eq!(out.status.code(), Some(0));
        let out = run(&["exec", &id, "--", "sh", "-c", "wc -c < /tmp/in.bin"]);
        assert_eq!(stdout(&out).trim(), "3000000");
        let local_out = work.path().join("out.bin");
        let out = run(&[
            "cp",
            &format!("{id}:/tmp/in.bin"),
            local_out.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(std::fs::read(&local_out).unwrap(), data, "round trip");
        let out = run(&[
            "cp",
            &format!("{id}:/tmp/shared"),
            work.path().to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            std::fs::read_to_string(work.path().join("shared")).unwrap(),
            "one\ntwo\n"
        );

        let me = listed(&id);
        assert_eq!(me["running"], true);
        let vmm_pid = me["vmm_pid"].as_u64().unwrap();

        let out = run(&["rm", &id]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out).trim(), id);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{id}: guest memory wiped (")),
            "{err}"
        );
        assert!(!err.contains("wiped (? MiB"), "the wipe was logged: {err}");

        assert!(!dir.exists(), "state dir {} is left", dir.display());
        assert!(
            !Path::new(&format!("/proc/{vmm_pid}")).exists(),
            "the VMM is still running"
        );
        assert_eq!(processes_mentioning(&id), Vec::<String>::new());
        let sockets = std::fs::read_to_string("/proc/net/unix").unwrap();
        assert!(!sockets.contains(&id), "a socket of {id} is left");
        let out = run(&["ls", "--json"]);
        assert!(!stdout(&out).contains(&id));
        // Removing it again is an error that names it.
        let out = run(&["rm", &id]);
        assert_one_line_error(&out, 125, &id);
    });
}

#[test]
fn four_sandboxes_at_once() {
    on_real_kvm("four_sandboxes_at_once", || {
        let children: Vec<_> = (0..4)
            .map(|i| {
                let script = format!(
                    "echo {i} > /tmp/mine; hostname > /tmp/host; sleep 2; cat /tmp/mine /tmp/host"
                );
                airlock(&["run", "--memory", "192", "--", "sh", "-c", &script])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut hosts = Vec::new();
        for (i, child) in children.into_iter().enumerate() {
            let out = wait_with_deadline(child, &["run", "four at once"]);
            show(&out);
            assert_eq!(out.status.code(), Some(0));
            let text = stdout(&out);
            let mut lines = text.lines();
            assert_eq!(
                lines.next(),
                Some(i.to_string().as_str()),
                "sandbox {i} saw another's file"
            );
            hosts.push(lines.next().unwrap().to_string());
        }
        hosts.sort();
        hosts.dedup();
        assert_eq!(
            hosts.len(),
            4,
            "every sandbox has its own hostname: {hosts:?}"
        );
    });
}

#[test]
fn a_memory_limit_from_the_spec_oom_kills_only_the_process() {
    on_real_kvm(
        "a_memory_limit_from_the_spec_oom_kills_only_the_process",
        || {
            let work = tempfile::tempdir().unwrap();
            let spec = work.path().join("config.json");
            std::fs::write(&spec, limited_spec(32 << 20)).unwrap();
            let out = run(&["create", "--spec", spec.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(0));
            let id = stdout(&out).trim().to_string();

            // busybox dd allocates its block: 96 MiB against a 32 MiB limit.
            let out = run(&[
                "exec",
                &id,
                "--",
                "dd",
                "if=/dev/zero",
                "of=/dev/null",
                "bs=96M",
                "count=1",
            ]);
            assert_eq!(out.status.code(), Some(137));
            assert!(stderr(&out).contains("out of memory"), "{}", stderr(&out));

            let out = run(&["exec", &id, "--", "echo", "still up"]);
            assert_eq!(out.status.code(), Some(0));
            assert_eq!(stdout(&out), "still up\n");
            let out = run(&["rm", &id]);
            assert_eq!(out.status.code(), Some(0));
        },
    );
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

#[test]
fn bad_input_gets_one_clear_line() {
    // These fail before any VM boots: they run on any machine.
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config.toml");

    std::fs::write(&config, "kernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "run", "--", "true"]);
    assert_one_line_error(&out, 125, "kernel not found at /nonexistent/vmlinux");

    std::fs::write(&config, "vcpus = \"many\"\n[timeouts\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "run", "--", "true"]);
    assert_one_line_error(&out, 125, "malformed config file");

    let spec = work.path().join("bad.json");
    std::fs::write(&spec, "{\"ociVersion\": \"1.0.2\", \"process\": ").unwrap();
    let out = run(&["run", "--spec", spec.to_str().unwrap(), "--", "true"]);
    assert_one_line_error(&out, 125, "invalid OCI spec");

    let out = run(&["run", "--image", "no-such-image", "--", "true"]);
    assert_one_line_error(&out, 125, "unknown image \"no-such-image\"");

    let out = run(&["exec", "../etc", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let out = run(&["run", "-e", "NOEQUALS", "--", "true"]);
    assert_one_line_error(&out, 125, "-e NOEQUALS");

    for (args, needle) in [
        (
            &["run", "--cpus", "0", "--", "true"][..],
            "--cpus 0: 0 vCPUs: a microVM needs at least 1",
        ),
        (
            &["run", "--cpus", "1000", "--", "true"],
            "--cpus 1000: 1000 vCPUs is more than the 32 a microVM can have",
        ),
        (
            &["run", "--memory", "0", "--", "true"],
            "--memory 0: 0 MiB of memory is less than the 64 MiB a guest needs",
        ),
        (
            &["run", "--memory", "4000000000", "--", "true"],
            "--memory 4000000000: 4000000000 MiB of memory is more than this host's",
        ),
    ] {
        let out = run(args);
        assert_one_line_error(&out, 125, needle);
    }

    // The vsock socket path would not fit a Unix socket address.
    let long = format!("/tmp/{}", "d".repeat(100));
    std::fs::write(&config, format!("state_dir = \"{long}\"\n")).unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "run", "--", "true"]);
    assert_one_line_error(&out, 125, "Unix socket paths hold at most 107");
    assert!(
        !Path::new(&long).exists(),
        "nothing is made for a bad config"
    );
}

#[test]
fn a_missing_command_is_reported_like_runc() {
    on_real_kvm("a_missing_command_is_reported_like_runc", || {
        let out = run(&["run", "--", "nonexistent-command", "arg"]);
        assert_one_line_error(
            &out,
            127,
            "exec: \"nonexistent-command\": executable file not found in $PATH",
        );
        assert_eq!(stdout(&out), "");
        assert!(
            !state_dir().exists() || std::fs::read_dir(state_dir()).unwrap().next().is_none(),
            "teardown after a failed start"
        );
    });
}

#[test]
fn doctor_tells_whether_this_kvm_can_boot_guests() {
    let out = run(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kvm = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kvm")
        .unwrap();
    assert_eq!(kvm["ok"], real_kvm(), "{kvm}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(kvm["detail"]
            .as_str()
            .unwrap()
            .contains("cannot boot unmodified Linux guests"));
        assert_eq!(out.status.code(), Some(1));
    }
    let guest = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "guest")
        .unwrap();
    assert_eq!(guest["ok"], true, "{guest}");
    let find = |checks: &serde_json::Value, name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {checks}"))
            .clone()
    };
    // Both name what a sandbox needs of them (this machine, the
    // developers', may lack either).
    for (name, needle) in [("state dir", "in memory"), ("jail", "cgroup")] {
        let c = find(&checks, name);
        let detail = c["detail"].as_str().unwrap();
        assert!(c["ok"] == true || detail.contains(needle), "{c}");
    }
    // A disabled jail passes, with a warning that says what is lost.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[jail]\nenabled = false\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jail = find(&checks, "jail");
    assert_eq!(
        (&jail["ok"], &jail["warning"]),
        (&true.into(), &true.into()),
        "{jail}"
    );
    assert!(
        jail["detail"].as_str().unwrap().contains("unjailed"),
        "{jail}"
    );
    let out = run(&["--config", config.to_str().unwrap(), "doctor"]);
    assert!(stdout(&out).contains("WARN jail"), "{}", stdout(&out));
}

/// The one sandbox dir under /run/airlock, once its record is written.
fn wait_for_sandbox(timeout: Duration) -> Option<PathBuf> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(entries) = std::fs::read_dir(state_dir()) {
            for e in entries.flatten() {
                if e.path().join("sandbox.json").exists() && e.path().join("config.json").exists() {
                    return Some(e.path());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_killed_airlock_run_leaves_no_vm_running() {
    on_real_kvm("a_killed_airlock_run_leaves_no_vm_running", || {
        // SIGTERM: the sandbox is destroyed, the status is 128 + 15.
        let child = airlock(&["run", "--", "sleep", "100"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let dir = wait_for_sandbox(Duration::from_secs(60)).expect("the sandbox started");
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        // SAFETY: kill only reads its arguments.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = wait_with_deadline(child, &["run", "SIGTERM"]);
        show(&out);
        assert_eq!(out.status.code(), Some(143));
        assert!(stderr(&out).contains("interrupted by signal 15"));
        assert!(!dir.exists(), "state dir left after SIGTERM");
        assert_eq!(processes_mentioning(&id), Vec::<String>::new());

        // SIGKILL: nothing can clean up in airlock, but its VMM stops with
        // it (and wipes); `airlock rm` removes what is left on disk.
        let mut child = airlock(&["run", "--", "sleep", "100"]).spawn().unwrap();
        let dir = wait_for_sandbox(Duration::from_secs(60)).expect("the sandbox started");
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        child.kill().unwrap();
        child.wait().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while !processes_mentioning(&id).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            processes_mentioning(&id),
            Vec::<String>::new(),
            "the VMM outlived airlock"
        );
        let me = listed(&id);
        assert_eq!(me["running"], false);
        let out = run(&["rm", &id]);
        assert_eq!(out.status.code(), Some(0));
        assert!(!dir.exists());
    });
}

#[test]
fn oci_image_tarball_runs() {
    on_real_kvm("oci_image_tarball_runs", || {
        // An OCI image made here from the default image's busybox, with an
        // image config whose Env and WorkingDir the process gets.
        let work = tempfile::tempdir().unwrap();
        let tarball = work.path().join("image.tar");
        let status = Command::new("sh")
            .arg(airlock_e2e::workspace_root().join("tests/e2e/make-oci-image"))
            .arg(&tarball)
            .status()
            .unwrap();
        assert!(status.success());
        let out = run(&[
            "run",
            "--image",
            tarball.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo $GREETING from $(pwd)",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), "hello from /work\n");
    });
}

#[test]
fn doctor_checks_what_networks_need() {
    // The test host loads tun, veth, nf_tables and the tc modules: both
    // network lines pass there and say what they found.
    on_real_kvm("doctor_checks_what_networks_need", || {
        let out = run(&["doctor", "--json"]);
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (name, needles) in [
            ("net egress", &["tun", "nf_tables", "nft"][..]),
            ("net pods", &["sch_ingress", "act_mirred"][..]),
        ] {
            let c = checks
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no {name} check in {checks}"));
            assert_eq!((&c["ok"], c.get("warning")), (&true.into(), None), "{c}");
            let detail = c["detail"].as_str().unwrap();
            assert!(needles.iter().all(|n| detail.contains(n)), "{c}");
        }
    });
}
