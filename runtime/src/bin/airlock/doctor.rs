//! `airlock doctor`: can this host run sandboxes, and if not, why not.

use std::path::Path;
use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::preflight::{self, Host};

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
    if let Ok(config) = &config {
        for o in preflight::checks(config, &preflight::RealHost) {
            let mut c = check(o.name, o.result.map_err(|e| common::error_line(&e)));
            c.warning = o.warning;
            checks.push(c);
        }
        checks.push(check("images", images(config)));
    } else {
        // Without a config only KVM can be checked.
        checks.push(check(
            "kvm",
            preflight::RealHost
                .kvm()
                .map_err(|e| common::error_line(&e)),
        ));
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

fn which(cmd: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}
