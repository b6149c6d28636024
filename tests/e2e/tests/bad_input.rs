//! Bad input that only shows on a host with KVM: each case gets one clear
//! line naming the problem, and leaves nothing behind (no state dir, no
//! cgroup, no VMM). The cases that fail before any VM is started are in
//! `cli.rs` (`bad_input_gets_one_clear_line`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use airlock_e2e::{airlock_binary, assert_one_line_error, guest, on_real_kvm, vmm_binary};

fn sh(script: &str) -> Output {
    let out = Command::new("sh")
        .args(["-c", script])
        .env("AIRLOCK", airlock_binary())
        .env("VMM", vmm_binary())
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    airlock_e2e::show(script, &out);
    out
}

#[test]
fn no_dev_kvm_is_named_with_the_fix() {
    on_real_kvm("no_dev_kvm_is_named_with_the_fix", || {
        // A mount namespace whose /dev has no kvm.
        let out = sh(
            "unshare -m sh -c 'mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 \
                      && exec \"$AIRLOCK\" run -- true'",
        );
        assert_one_line_error(&out, 125, "no /dev/kvm: this host has no KVM");
        airlock_e2e::assert_no_sandbox_left();
    });
}

#[test]
fn a_dev_kvm_the_user_cannot_open_is_named_with_the_fix() {
    on_real_kvm(
        "a_dev_kvm_the_user_cannot_open_is_named_with_the_fix",
        || {
            // /dev/kvm is root:kvm 0660 in the test host; this user is in no
            // group. The kernel goes where that user can read it (the VMM
            // checks its files before it opens /dev/kvm).
            let work = tempfile::tempdir().unwrap();
            std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let kernel = work.path().join("vmlinux");
            std::fs::copy(guest::kernel(), &kernel).unwrap();
            let out = sh(&format!(
                "setpriv --reuid 65534 --regid 65534 --clear-groups \"$VMM\" --console off \
             --no-initrd --kernel {}",
                kernel.display()
            ));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(
                err.contains("cannot open /dev/kvm (add this user to the 'kvm' group"),
                "{err}"
            );
            // The runtime as that user: the jail needs root, and says so.
            let out = sh(
                "setpriv --reuid 65534 --regid 65534 --clear-groups \"$AIRLOCK\" \
                      --config /dev/null run -- true",
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(125), "{err}");
            assert!(err.contains("the VMM jail needs root"), "{err}");
        },
    );
}

#[test]
fn an_initrd_too_big_for_guest_memory_is_named() {
    on_real_kvm("an_initrd_too_big_for_guest_memory_is_named", || {
        let work = tempfile::tempdir().unwrap();
        let big = work.path().join("big.cpio");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        let config = work.path().join("config.toml");
        std::fs::write(
            &config,
            format!("initrd = \"{}\"\nmemory_mib = 128\n", big.display()),
        )
        .unwrap();
        let out = Command::new(airlock_binary())
            .args(["--config", config.to_str().unwrap(), "run", "--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        airlock_e2e::show("airlock run (big initrd)", &out);
        assert_one_line_error(
            &out,
            125,
            "the initrd (200 MiB) does not fit in guest memory above the kernel; give the guest more memory",
        );
        assert!(Path::new(&big).exists(), "the user's file is untouched");
        airlock_e2e::assert_no_sandbox_left();
    });
}
