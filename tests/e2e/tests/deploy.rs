//! deploy/: the Kubernetes manifests parse and carry what the cluster
//! relies on, the containerd snippets are valid, and the installer script
//! puts Airlock in place (and takes it out again) on a node root that a
//! real containerd then accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use airlock_e2e::workspace_root;
use serde_yaml::Value;

fn deploy(file: &str) -> PathBuf {
    workspace_root().join("deploy").join(file)
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*k],
    })
}

#[test]
fn runtimeclass_has_handler_overhead_and_node_selection() {
    let rc = yaml("runtimeclass.yaml");
    assert_eq!(at(&rc, &["kind"]).as_str(), Some("RuntimeClass"));
    assert_eq!(at(&rc, &["apiVersion"]).as_str(), Some("node.k8s.io/v1"));
    assert_eq!(at(&rc, &["metadata", "name"]).as_str(), Some("airlock"));
    assert_eq!(at(&rc, &["handler"]).as_str(), Some("airlock"));
    for r in ["memory", "cpu"] {
        assert!(
            at(&rc, &["overhead", "podFixed", r]).as_str().is_some(),
            "overhead.podFixed.{r}"
        );
    }
    assert_eq!(
        at(&rc, &["scheduling", "nodeSelector", "airlock.dev/runtime"]).as_str(),
        Some("ready")
    );
}

#[test]
fn installer_and_example_pod() {
    let ds = yaml("installer.yaml");
    assert_eq!(at(&ds, &["kind"]).as_str(), Some("DaemonSet"));
    let pod = at(&ds, &["spec", "template", "spec"]);
    assert_eq!(at(pod, &["hostPID"]).as_bool(), Some(true));
    let c = at(pod, &["containers", "0"]);
    assert_eq!(
        at(c, &["securityContext", "privileged"]).as_bool(),
        Some(true)
    );
    assert!(at(c, &["command", "2"])
        .as_str()
        .unwrap()
        .contains("install.sh"));
    assert_eq!(
        at(pod, &["volumes", "0", "hostPath", "path"]).as_str(),
        Some("/")
    );

    let ex = yaml("example-agent-pod.yaml");
    assert_eq!(at(&ex, &["kind"]).as_str(), Some("Pod"));
    assert_eq!(
        at(&ex, &["spec", "runtimeClassName"]).as_str(),
        Some("airlock")
    );
    assert!(
        at(&ex, &["metadata", "annotations", "io.airlock.memory-mib"])
            .as_str()
            .is_some()
    );
}

#[test]
fn containerd_snippets_name_the_runtime() {
    for (file, plugin) in [
        ("containerd-1.6-1.7.toml", "io.containerd.grpc.v1.cri"),
        ("containerd-2.x.toml", "io.containerd.cri.v1.runtime"),
    ] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let rt = &v["plugins"][plugin]["containerd"]["runtimes"]["airlock"];
        assert_eq!(
            rt["runtime_type"].as_str(),
            Some("io.containerd.airlock.v2"),
            "{file}"
        );
        assert!(rt["options"]["ConfigPath"].as_str().is_some(), "{file}");
    }
}

fn install(root: &Path, artifacts: &Path, action: &str) -> std::process::Output {
    let out = Command::new(deploy("install.sh"))
        .arg("--host-root")
        .arg(root)
        .arg("--artifacts")
        .arg(artifacts)
        .args(["--no-restart", "--no-kvm-check", action])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn install_script_configures_a_node_that_containerd_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (root, artifacts) = (dir.path().join("node"), dir.path().join("artifacts"));
    std::fs::create_dir_all(artifacts.join("guest")).unwrap();
    for f in [
        "airlock-vmm",
        "airlock-netfilter",
        "containerd-shim-airlock-v2",
        "airlock",
        "guest/vmlinux",
        "guest/initramfs.cpio",
    ] {
        std::fs::write(artifacts.join(f), f).unwrap();
    }
    let config = root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let original = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";
    std::fs::write(&config, original).unwrap();

    // Missing artifacts: a clear error, nothing touched.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = install(&root, &empty, "install");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is missing"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), original);

    // Twice: the runtime is added once.
    for _ in 0..2 {
        assert!(install(&root, &artifacts, "install").status.success());
    }
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(text.matches("runtimes.airlock]").count(), 1, "{text}");
    assert!(root.join("opt/airlock/bin/airlock-vmm").is_file());
    assert!(root.join("opt/airlock/bin/airlock-netfilter").is_file());
    assert!(root.join("opt/airlock/guest/vmlinux").is_file());
    let link = std::fs::read_link(root.join("usr/local/bin/containerd-shim-airlock-v2")).unwrap();
    assert_eq!(
        link,
        Path::new("/opt/airlock/bin/containerd-shim-airlock-v2")
    );
    let cfg = std::fs::read_to_string(root.join("opt/airlock/etc/airlock.toml")).unwrap();
    toml::from_str::<toml::Value>(&cfg).expect("the runtime config is TOML");

    // Debian's containerd reads the result and sees the handler.
    let dump = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"])
        .output()
        .expect("containerd not found: run scripts/setup");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("runtimes.airlock]"), "{dump}");
    assert!(dump.contains("io.containerd.airlock.v2"), "{dump}");
    assert!(
        dump.contains("registry.k8s.io/pause:3.9"),
        "the old config is kept"
    );

    // Uninstall restores the config and removes the files.
    assert!(install(&root, &artifacts, "uninstall").status.success());
    assert_eq!(
        std::fs::read_to_string(&config).unwrap().trim_end(),
        original.trim_end()
    );
    assert!(!root.join("opt/airlock").exists());
    assert!(!root
        .join("usr/local/bin/containerd-shim-airlock-v2")
        .exists());
}

#[test]
fn installer_image_holds_the_script_binaries_and_guest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("installer.tar");
    let built = Command::new(deploy("build-installer"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(&out)
        .status()
        .unwrap()
        .success());
    assert!(layout.join("index.json").is_file());
    // The one layer (the biggest blob) holds what install.sh copies.
    let layer = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .unwrap()
        .path();
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(&layer)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for f in [
        "opt/airlock-installer/install.sh",
        "opt/airlock-installer/airlock-vmm",
        "opt/airlock-installer/airlock-netfilter",
        "opt/airlock-installer/containerd-shim-airlock-v2",
        "opt/airlock-installer/guest/vmlinux",
        "opt/airlock-installer/guest/initramfs.cpio",
        "bin/busybox",
    ] {
        assert!(
            list.lines().any(|l| l.trim_start_matches("./") == f),
            "{f} missing:\n{list}"
        );
    }
}
