//! The VMM jail on real KVM: a sandbox's VMM runs in namespaces of its
//! own, pivot_rooted into a root holding only its sandbox's files, with no
//! capabilities, `no_new_privs`, a seccomp filter, an unprivileged user
//! (the test host gives /dev/kvm a kvm group, as udev does), rlimits and a
//! cgroup with memory and pids limits; `airlock rm` removes the cgroup.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use airlock_e2e::{airlock_binary, assert_one_line_error, on_real_kvm};

fn airlock(args: &[&str]) -> Output {
    let out = Command::new(airlock_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run airlock");
    airlock_e2e::show(&format!("airlock {}", args.join(" ")), &out);
    out
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_sandbox_vmm_runs_jailed() {
    on_real_kvm("a_sandbox_vmm_runs_jailed", || {
        let out = airlock(&["create"]);
        assert_eq!(out.status.code(), Some(0));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = airlock(&["ls", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let me = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id.as_str())
            .expect("the sandbox is listed")
            .clone();
        // The process the runtime knows is the keeper of guest memory; the
        // VMM is its only child. Both are jailed alike.
        let keeper = me["vmm_pid"].as_u64().unwrap();
        let children =
            std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
        let vmm: u64 = children.trim().parse().expect("the keeper has one child");
        // Each in its own leaf of the sandbox's cgroup: the keeper never
        // shares the VMM's memory limit.
        for (pid, leaf) in [(keeper, "keeper"), (vmm, "vmm")] {
            assert_jailed(&id, pid, leaf);
        }
        assert!(
            airlock_e2e::proc_status(vmm, "Threads")
                .parse::<u32>()
                .unwrap()
                > 2
        );
        assert_eq!(airlock_e2e::proc_status(keeper, "Threads"), "1");

        let cg = Path::new("/sys/fs/cgroup/airlock").join(&id);
        let memory_max: u64 = std::fs::read_to_string(cg.join("vmm/memory.max"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            memory_max,
            (256 + 64 + 1024 + 16) << 20,
            "guest memory + overhead + scratch disk + logs"
        );
        assert_eq!(
            std::fs::read_to_string(cg.join("pids.max")).unwrap().trim(),
            "64"
        );
        // The OOM killer may take the VMM, never the memory's keeper.
        let oom = |pid: u64| std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        assert_eq!(oom(keeper).trim(), "-1000");
        assert_eq!(oom(vmm).trim(), "0");

        // The vsock socket is not in the jail root (which the jail user
        // owns) but in the state dir, root's alone: the VMM got the
        // listening descriptor.
        let state = Path::new("/run/airlock").join(&id);
        let meta = std::fs::metadata(state.join("vsock.sock")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
        let dir = std::fs::metadata(&state).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&dir), 0);
        assert_eq!(std::os::unix::fs::MetadataExt::mode(&dir) & 0o077, 0);

        // Keeper and VMM share their sandbox's uid; another sandbox has
        // its own.
        assert_eq!(
            airlock_e2e::proc_status(keeper, "Uid"),
            airlock_e2e::proc_status(vmm, "Uid")
        );
        let out = airlock(&["create"]);
        assert_eq!(out.status.code(), Some(0));
        let other = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = airlock(&["ls", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let other_keeper = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == other.as_str())
            .expect("the other sandbox is listed")["vmm_pid"]
            .as_u64()
            .unwrap();
        assert_ne!(
            airlock_e2e::proc_status(keeper, "Uid"),
            airlock_e2e::proc_status(other_keeper, "Uid"),
            "two sandboxes share a uid"
        );
        assert_eq!(airlock(&["rm", &other]).status.code(), Some(0));

        let out = airlock(&["exec", &id, "--", "echo", "from the jailed VM"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from the jailed VM\n");
        let out = airlock(&["rm", &id]);
        assert_eq!(out.status.code(), Some(0));
        assert!(!cg.exists(), "the cgroup {} is left", cg.display());
    });
}

/// Process `pid` of sandbox `id` runs without capabilities, with
/// `no_new_privs`, a seccomp filter, the jail user, only the sandbox's
/// files as its root, namespaces of its own, the `leaf` of the sandbox's
/// cgroup and no core dumps.
fn assert_jailed(id: &str, pid: u64, leaf: &str) {
    println!("checking pid {pid}");
    assert_eq!(airlock_e2e::proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(airlock_e2e::proc_status(pid, "CapPrm"), "0000000000000000");
    assert_eq!(airlock_e2e::proc_status(pid, "CapBnd"), "0000000000000000");
    assert_eq!(airlock_e2e::proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(airlock_e2e::proc_status(pid, "Seccomp"), "2");
    let kvm_group = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("kvm:"));
    if kvm_group {
        // A uid of the sandbox's own from the default range (and the gid
        // of the same number), since /dev/kvm is root:kvm 0660.
        let uid = airlock_e2e::proc_status(pid, "Uid");
        let ids: Vec<u32> = uid.split('\t').map(|u| u.parse().unwrap()).collect();
        assert!(ids.iter().all(|u| *u == ids[0]), "{uid}");
        assert!((524_288..524_288 + 65_536).contains(&ids[0]), "{uid}");
        assert!(airlock_e2e::proc_status(pid, "Gid").starts_with(&format!("{}\t", ids[0])));
    }

    let root = Path::new("/proc").join(pid.to_string()).join("root");
    let expected: BTreeSet<String> = ["console", "dev", "drive0", "drive1", "initrd", "vmlinux"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names(&root), expected, "the jail root holds only these");
    assert_eq!(
        names(&root.join("dev")),
        BTreeSet::from(["kvm".to_string()])
    );

    let pid_s = pid.to_string();
    for kind in ["pid", "mnt", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pid_s, kind),
            ns("self", kind),
            "{kind} namespace shared"
        );
    }

    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(cgroup.trim(), format!("0::/airlock/{id}/{leaf}"));

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
}

#[test]
fn a_jailed_vmm_that_fails_setup_reports_why_and_leaves_nothing() {
    on_real_kvm(
        "a_jailed_vmm_that_fails_setup_reports_why_and_leaves_nothing",
        || {
            let work = tempfile::tempdir().unwrap();
            let not_a_kernel = work.path().join("vmlinux");
            std::fs::write(&not_a_kernel, b"this is not a kernel").unwrap();
            let config = work.path().join("config.toml");
            std::fs::write(
                &config,
                format!("kernel = \"{}\"\n", not_a_kernel.display()),
            )
            .unwrap();
            let out = airlock(&["--config", config.to_str().unwrap(), "run", "--", "true"]);
            // The VMM's own reason, with the user's path for the jail's.
            assert_one_line_error(
                &out,
                125,
                &format!("/vmlinux is {}", not_a_kernel.display()),
            );
            assert!(String::from_utf8_lossy(&out.stderr).contains("not a bootable x86_64 kernel"));
            airlock_e2e::assert_no_sandbox_left();
        },
    );
}
