//! Guest images for tests: the default one from `guest-image/build`, and
//! initramfs images whose init is a test program from `tests/guest`.

use std::path::PathBuf;
use std::process::Command;

use airlock_vmm::config::default_guest_dir;

use crate::workspace_root;

/// The default guest kernel, built by `guest-image/build`.
pub fn kernel() -> PathBuf {
    existing(default_guest_dir().join("vmlinux"))
}

/// The default initramfs (the agent as `/init`).
pub fn initramfs() -> PathBuf {
    existing(default_guest_dir().join("initramfs.cpio"))
}

fn existing(p: PathBuf) -> PathBuf {
    assert!(
        p.exists(),
        "{} is missing: run guest-image/build",
        p.display()
    );
    p
}

/// A static test program built from `tests/guest` (tests/run builds them).
pub fn program(name: &str) -> PathBuf {
    let p = workspace_root()
        .join("target/guest/x86_64-unknown-linux-gnu/release")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: tests/run builds the static test programs",
        p.display()
    );
    p
}

/// Builds, in `dir`, an initramfs whose `/init` is the test program `name`.
pub fn initramfs_with_init(name: &str, dir: &std::path::Path) -> PathBuf {
    let out = dir.join(format!("{name}.cpio"));
    let status = Command::new(workspace_root().join("guest-image/mkinitramfs"))
        .arg("-o")
        .arg(&out)
        .arg("--init")
        .arg(program(name))
        .status()
        .expect("run guest-image/mkinitramfs");
    assert!(status.success(), "mkinitramfs failed for {name}");
    out
}
