//! `airlock doctor`: can this host run sandboxes, and if not, why not.

use std::path::Path;
use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;

use crate::common;

/// Check this host: KVM (and whether it can boot unmodified guests), the
/// VMM binary, the guest kernel and initramfs, the images, the state dir
/// (writable, in memory), the VMM jail (root, cgroup v2) or a warning that
/// it is off. Exits 1 when a check fails (a warning does not fail).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON (an array of checks)
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Passes, but weakens isolation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    warning: bool,
    detail: String,
}

fn check(name: &'static str, result: Result<String, String>) -> Check {
    match result {
        Ok(detail) => Check {
            name,
            ok: true,
            warning: false,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            warning: false,
            detail,
        },
    }
}

pub fn main(config_path: Option<&Path>, args: &Args) -> ExitCode {
    let mut checks = Vec::new();
    let config = common::load_config(config_path);
    checks.push(check(
        "config",
        config
            .as_ref()
            .map(|_| "loaded (defaults where unset)".to_string())
            .map_err(Clone::clone),
    ));
    checks.push(check("kvm", kvm()));
    if let Ok(config) = &config {
        checks.push(check(
            "vmm",
            config
                .vmm_binary_path()
                .map(|p| p.display().to_string())
                .map_err(|e| common::error_line(&e)),
        ));
        checks.push(check(
            "guest",
            config
                .check_artifacts()
                .map(|()| {
                    format!(
                        "kernel {}, initramfs {}",
                        config.kernel.display(),
                        config.initrd.display()
                    )
                })
                .map_err(|e| common::error_line(&e)),
        ));
        checks.push(check("images", images(config)));
        checks.push(check("state dir", state_dir(config)));
        checks.push(jail(config));
    }
    checks.push(check(
        "mkfs.ext4",
        which("mkfs.ext4").ok_or_else(|| "not found: apt-get install e2fsprogs".to_string()),
    ));
    let ok = checks.iter().all(|c| c.ok);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).unwrap_or_default()
        );
    } else {
        for c in &checks {
            println!(
                "{:<4} {:<10} {}",
                match (c.ok, c.warning) {
                    (true, false) => "ok",
                    (true, true) => "WARN",
                    (false, _) => "FAIL",
                },
                c.name,
                c.detail
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn kvm() -> Result<String, String> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Err("no /dev/kvm: enable VT-x/AMD-V in the firmware (or nested virtualisation on a cloud VM) and load kvm_intel or kvm_amd".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Err(format!(
            "cannot open /dev/kvm read-write ({e}): run as root or join the kvm group"
        ));
    }
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if module("kvm_pvm") {
        return Err("/dev/kvm is kvm_pvm, a paravirtual KVM: it cannot boot unmodified Linux guests; use a host with VT-x/AMD-V (on this machine, run airlock inside tests/testhost/run)".into());
    }
    match (module("kvm_intel"), module("kvm_amd")) {
        (true, _) => Ok("/dev/kvm (kvm_intel)".into()),
        (_, true) => Ok("/dev/kvm (kvm_amd)".into()),
        _ => Ok("/dev/kvm (module unknown; assuming hardware KVM)".into()),
    }
}

fn images(config: &RuntimeConfig) -> Result<String, String> {
    let names = airlock_runtime::image::known_names(&config.image_dir);
    if !names.contains(&config.default_image) {
        return Err(format!(
            "default image \"{}\" not found in {}: build it with scripts/setup",
            config.default_image,
            config.image_dir.display()
        ));
    }
    Ok(names.join(", "))
}

fn state_dir(config: &RuntimeConfig) -> Result<String, String> {
    let dir = &config.state_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    std::fs::remove_dir(&probe).ok();
    airlock_runtime::scratch::check_memory_backed(dir).map_err(|e| e.to_string())?;
    Ok(format!("{} (in memory)", dir.display()))
}

/// The VMM jail: on, and able to run (root, cgroup v2), or off, which is
/// reported as a warning at every start and here.
fn jail(config: &RuntimeConfig) -> Check {
    if !config.jail.enabled {
        return Check {
            name: "jail",
            ok: true,
            warning: true,
            detail: "disabled ([jail] enabled = false): each VMM runs unjailed, with its seccomp \
                     filters only between a guest that escapes KVM and this host"
                .into(),
        };
    }
    check("jail", jail_ready(config))
}

fn jail_ready(config: &RuntimeConfig) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the VMM jail needs root: run airlock as root, or set [jail] enabled = false \
             (weaker isolation)"
                .into(),
        );
    }
    let parent = &config.jail.cgroup_parent;
    let mount = parent
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let fs = nix::sys::statfs::statfs(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "{} is not on a cgroup v2 filesystem (a cgroup v1 host?): boot with \
             systemd.unified_cgroup_hierarchy=1, or set [jail] cgroup_parent to a cgroup v2 directory",
            mount.display()
        ));
    }
    Ok(format!(
        "uid {}, cgroups under {}",
        config.jail.uid,
        parent.display()
    ))
}

fn which(cmd: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}
