//! The containerd shim (`containerd-shim-airlock-v2`) against a real
//! containerd from Debian's package, driven with `ctr` as a user would,
//! on real KVM with the real guest kernel and agent.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use airlock_e2e::containerd::{Containerd, RUNTIME};
use airlock_e2e::guest_memory::{
    guest_memory_of, marked_pages, the_keeper, wait_ended, wait_marked, PAGE,
};
use airlock_e2e::{guest, on_real_kvm, processes_mentioning, vmm_processes};
use airlock_test_guest::marker_word;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ctr_run_exec_kill_tty_and_stdin() {
    on_real_kvm("ctr_run_exec_kill_tty_and_stdin", || {
        let c = Containerd::start(false);
        let img = c.import_test_image();

        // Output and exit codes.
        let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, img, "t1", "echo", "hi"]);
        assert_eq!(out.status.code(), Some(0), "{}", c.log());
        assert_eq!(text(&out.stdout), "hi\n");
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            img,
            "t2",
            "sh",
            "-c",
            "echo oops >&2; exit 7",
        ]);
        assert_eq!(out.status.code(), Some(7));
        assert!(
            text(&out.stderr).contains("oops"),
            "stderr is passed through"
        );
        assert!(
            !text(&out.stdout).contains("oops"),
            "stdout and stderr stay apart"
        );

        // Stdin piped in.
        let mut child = c
            .ctr_command(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                img,
                "t3",
                "sh",
                "-c",
                "tr a-z A-Z",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"piped in\n")
            .unwrap();
        let out = c.finish(child, &["run", "t3 (stdin)"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(text(&out.stdout), "PIPED IN\n");

        // A long-lived task: exec into it, then kill it.
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            img,
            "t4",
            "sleep",
            "1000",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(c.task_status("t4").as_deref(), Some("RUNNING"));
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "t4",
            "sh",
            "-c",
            "echo from-exec; exit 5",
        ]);
        assert_eq!(out.status.code(), Some(5));
        assert_eq!(text(&out.stdout), "from-exec\n");
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "t4",
            "cat",
            "/proc/1/cmdline",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            text(&out.stdout),
            "sleep\x001000\x00",
            "exec runs in the task's container"
        );
        // Stats come from the container's cgroup in the guest.
        let out = c.ctr(&["task", "metrics", "--format", "json", "t4"]);
        assert_eq!(out.status.code(), Some(0), "{}", c.log());
        let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            metrics["pids"]["current"].as_u64().unwrap_or(0) >= 1,
            "{metrics}"
        );
        assert!(
            metrics["memory"]["usage"].as_u64().unwrap_or(0) > 0,
            "{metrics}"
        );
        let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", "t4"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            c.wait_for_task("t4", Some("STOPPED"), 30).as_deref(),
            Some("STOPPED")
        );
        assert!(c.ctr(&["task", "rm", "t4"]).status.success());
        assert!(c.ctr(&["container", "rm", "t4"]).status.success());

        // A terminal: `ctr run -t` wants one of its own, so it runs under
        // script(1).
        let cmd = format!(
            "ctr --address {} --namespace {} run --rm -t --runtime {RUNTIME} {img} t5 tty",
            c.socket().display(),
            airlock_e2e::containerd::NAMESPACE
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let tty = text(&out.stdout);
        println!("tty: {tty:?}");
        assert_eq!(out.status.code(), Some(0), "{}", c.log());
        assert!(tty.contains("/dev/pts/"), "{tty:?}");

        c.assert_nothing_left();
    });
}

#[test]
fn runtime_config_path_and_bad_input() {
    on_real_kvm("runtime_config_path_and_bad_input", || {
        let c = Containerd::start(false);
        let img = c.import_test_image();

        // ConfigPath sizes the VM.
        let cfg = c.dir.join("airlock.toml");
        std::fs::write(&cfg, "memory_mib = 200\n").unwrap();
        let cfg = cfg.display().to_string();
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &cfg,
            img,
            "m1",
            "sh",
            "-c",
            "cat /proc/meminfo",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", c.log());
        let kib: u64 = text(&out.stdout)
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("MemTotal");
        assert!(kib < 200 * 1024 && kib > 150 * 1024, "MemTotal {kib} KiB");

        // The network: the config's [network] mode, and annotations over it.
        std::fs::write(
            &cfg,
            "[network]\nmode = \"egress\"\ndns = [\"192.0.2.53\"]\n",
        )
        .unwrap();
        for (name, annotation, nics) in [
            ("n1", None, "eth0 lo"),
            ("n2", Some("io.airlock.net=none"), "lo"),
        ] {
            let mut args = vec![
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--runtime-config-path",
                &cfg,
            ];
            if let Some(a) = annotation {
                args.extend_from_slice(&["--annotation", a]);
            }
            args.extend_from_slice(&[img, name, "sh", "-c", "echo $(ls /sys/class/net)"]);
            let out = c.ctr(&args);
            assert_eq!(out.status.code(), Some(0), "{}", c.log());
            assert_eq!(text(&out.stdout).trim(), nics, "{name}");
        }
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &cfg,
            "--annotation",
            "io.airlock.net=bogus",
            img,
            "n3",
            "true",
        ]);
        assert_ne!(out.status.code(), Some(0));
        assert!(text(&out.stderr).contains("bogus"), "{}", text(&out.stderr));

        // A malformed config: a clear error, and nothing is left.
        std::fs::write(&cfg, "memory_mib = [oops\n").unwrap();
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &cfg,
            img,
            "m2",
            "true",
        ]);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            text(&out.stderr).contains(&cfg),
            "the error names the config file"
        );

        // A command the image does not have: runc's wording, no VM left.
        let out = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            img,
            "m3",
            "no-such-command",
        ]);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            text(&out.stderr).contains("executable 'no-such-command' not found"),
            "{}",
            text(&out.stderr)
        );
        c.ctr(&["container", "rm", "m2", "m3"]);
        c.assert_nothing_left();
    });
}

#[test]
fn a_killed_vmm_and_a_containerd_restart() {
    on_real_kvm("a_killed_vmm_and_a_containerd_restart", || {
        let mut c = Containerd::start(false);
        let img = c.import_test_image();

        // containerd restarts; the task keeps running and answers.
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            img,
            "r1",
            "sleep",
            "1000",
        ]);
        assert_eq!(out.status.code(), Some(0));
        c.restart();
        assert_eq!(c.task_status("r1").as_deref(), Some("RUNNING"));
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            "r1",
            "echo",
            "still-here",
        ]);
        assert_eq!(text(&out.stdout), "still-here\n", "{}", c.log());

        assert!(c
            .ctr(&["task", "kill", "--signal", "SIGKILL", "r1"])
            .status
            .success());
        c.wait_for_task("r1", Some("STOPPED"), 30);
        assert!(c.ctr(&["task", "rm", "r1"]).status.success());
        assert!(c.ctr(&["container", "rm", "r1"]).status.success());

        // The VMM is SIGKILLed under a running task: `ctr run` gets the
        // exit with a non-zero status, and containerd deletes the task.
        let child = c
            .ctr_command(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                img,
                "r2",
                "sleep",
                "1000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.wait_for_task("r2", Some("RUNNING"), 120);
        // The VMM itself, not the keeper of its memory (which wipes it).
        let vmm = vmm_processes();
        assert_eq!(vmm.len(), 1, "{vmm:?}");
        let pid: i32 = vmm[0].split(' ').next().unwrap().parse().unwrap();
        // SAFETY: kill only reads its arguments.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let out = c.finish(child, &["run", "r2 (VMM killed)"]);
        assert!(
            !matches!(out.status.code(), Some(0) | None),
            "exit status {:?}",
            out.status
        );
        assert_eq!(c.task_status("r2"), None, "the task was deleted");
        c.assert_nothing_left();

        c.assert_nothing_left();
    });
}

/// The CRI annotations that put a container into a pod.
fn in_pod(pod: &str, sandbox: bool) -> [String; 4] {
    let kind = if sandbox { "sandbox" } else { "container" };
    [
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

#[test]
fn containers_of_one_pod_share_one_vm() {
    on_real_kvm("containers_of_one_pod_share_one_vm", || {
        let c = Containerd::start(false);
        let img = c.import_test_image();
        let run = |id: &str, sandbox: bool, detach: bool, cmd: &[&str]| {
            let mut args: Vec<String> = vec!["run".into()];
            args.push(if detach { "-d" } else { "--rm" }.into());
            args.extend(["--runtime".into(), RUNTIME.into()]);
            args.extend(in_pod("pod1", sandbox));
            args.extend([img.to_string(), id.to_string()]);
            args.extend(cmd.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            c.ctr(&args)
        };
        assert!(run("pod1", true, true, &["sleep", "1000"]).status.success());
        assert!(run("c1", false, true, &["sleep", "1000"]).status.success());
        assert_eq!(c.task_status("pod1").as_deref(), Some("RUNNING"));
        assert_eq!(c.task_status("c1").as_deref(), Some("RUNNING"));
        let vmms = vmm_processes();
        assert_eq!(vmms.len(), 1, "one VM for the pod: {vmms:?}");

        // c1 is a container of its own in that VM: its own pid namespace
        // and root, from its own image copy.
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "x",
            "c1",
            "cat",
            "/proc/1/cmdline",
        ]);
        assert_eq!(text(&out.stdout), "sleep\x001000\x00");
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "y",
            "c1",
            "sh",
            "-c",
            "echo mine > /work/f",
        ]);
        assert!(out.status.success());
        let out = c.ctr(&["task", "exec", "--exec-id", "z", "pod1", "cat", "/work/f"]);
        assert_ne!(
            out.status.code(),
            Some(0),
            "the pod's containers have separate roots"
        );

        // One more, run to completion, with its exit code.
        let out = run("c2", false, false, &["sh", "-c", "echo c2 here; exit 4"]);
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(text(&out.stdout), "c2 here\n");
        assert_eq!(vmm_processes().len(), 1);

        for id in ["c1", "pod1"] {
            assert!(c
                .ctr(&["task", "kill", "--signal", "SIGKILL", id])
                .status
                .success());
            c.wait_for_task(id, Some("STOPPED"), 30);
            assert!(c.ctr(&["task", "rm", id]).status.success());
            assert!(c.ctr(&["container", "rm", id]).status.success());
        }
        c.assert_nothing_left();
    });
}

#[test]
fn wipe_when_the_shim_dies() {
    on_real_kvm("wipe_when_the_shim_dies", || {
        let c = Containerd::start(false);
        // An image with only /hold-marker, which fills 64 MiB of guest
        // memory with a marker computed at run time from its seed.
        let root = tempfile::tempdir().unwrap();
        let holder = root.path().join("hold-marker");
        std::fs::copy(guest::program("hold-marker"), &holder).unwrap();
        std::fs::set_permissions(&holder, std::fs::Permissions::from_mode(0o755)).unwrap();
        c.import_dir_image(root.path(), "airlock-marker:1");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let seed = seed.to_string();
        let args = [
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "airlock-marker:1",
            "w1",
            "/hold-marker",
            &seed,
            "64",
        ];
        assert_eq!(c.ctr(&args).status.code(), Some(0), "{}", c.log());
        let keeper = the_keeper(Duration::from_secs(120));
        let memory = guest_memory_of(keeper);
        let marker = marker_word(seed.parse().unwrap());
        let want = (64 << 20) / PAGE * 9 / 10;
        let before = wait_marked(&memory, marker, want, Duration::from_secs(180));
        println!("{before} pages hold the marker before the shim dies");
        assert!(before >= want, "no marker in guest memory: {before} pages");

        // The shim is SIGKILLed: containerd runs `shim delete`, which
        // stops the VM it left; the keeper wipes its memory.
        let shims: Vec<_> = processes_mentioning("containerd-shim-airlock-v2")
            .into_iter()
            .filter(|p| p.contains("-socket"))
            .collect();
        assert_eq!(shims.len(), 1, "{shims:?}");
        let pid: i32 = shims[0].split(' ').next().unwrap().parse().unwrap();
        // SAFETY: kill only reads its arguments.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_ended(keeper, "the keeper", Duration::from_secs(180));
        let after = marked_pages(&memory, marker);
        assert_eq!(after, 0, "{after} pages still hold the marker");
        // containerd deletes the task of a dead shim (or shows it stopped).
        let status = c.wait_for_task("w1", None, 60);
        assert!(
            matches!(status.as_deref(), Some("STOPPED") | None),
            "{status:?}"
        );
        c.ctr(&["task", "rm", "w1"]);
        assert!(c.ctr(&["container", "rm", "w1"]).status.success());
        c.assert_nothing_left();
    });
}
