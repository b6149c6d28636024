//! The VMM's own half of the jail: before it touches any guest input, a
//! VMM started with `--jail-root` moves into a root that holds only its
//! sandbox's files and drops every privilege.
//!
//! The runtime does the other half when it starts the VMM (`airlock-runtime`
//! `jail.rs`): new pid, mount, net, ipc and uts namespaces (`clone(2)`), a
//! cgroup v2 with memory and pids limits. This half runs after `execve`,
//! so the binary and its shared libraries load from the host first; once
//! here nothing else is ever loaded. Steps, in order:
//! 1. a private mount namespace of its own (never the host's mounts);
//! 2. the root directory, bind-mounted on itself, owned by the jail user;
//! 3. each file the VMM needs bind-mounted in: kernel and initrd read-only,
//!    drives as configured, `/dev/kvm`, the console file; no `/proc`;
//! 4. `pivot_root` into it, the old root detached;
//! 5. rlimits: no core dumps (they would hold guest memory), bounded files
//!    (how many, and how large: `file_size_limit`; SIGXFSZ ignored);
//! 6. every capability dropped (bounding, ambient, effective, permitted,
//!    inheritable), the jail uid/gid (unless `/dev/kvm` cannot be opened by
//!    them: then uid 0 without any capability), `no_new_privs`.
//!
//! Written here with `nix` and `caps` rather than taken from Firecracker's
//! jailer: that is a separate binary that execs a static VMM, and Airlock's
//! VMM is dynamically linked.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chown, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use crate::config::{ConsoleOutput, VmConfig};

/// Errors entering the jail. Each names the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// the jail needs root (it mounts and changes user); airlock-runtime starts the VMM as root
    #[error(
        "the jail needs root (it mounts and changes user); airlock-runtime starts the VMM as root"
    )]
    NotRoot,
    #[error("jail: {step} {path}: {source}")]
    Step {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: the vsock socket {0} must be inside the jail root {1}")]
    VsockOutsideRoot(PathBuf, PathBuf),
    #[error(transparent)]
    Kvm(#[from] crate::vstate::vm::VmError),
    #[error("jail: cannot drop capabilities: {0}")]
    Caps(String),
}

/// The `cgroup.procs` file that the runtime handed over as descriptor
/// `fd` (`--vmm-cgroup-fd`): the VMM, once forked from its keeper, writes
/// itself into it (see [`join_cgroup`]).
pub fn cgroup_procs_from_fd(fd: i32) -> Result<std::fs::File, JailError> {
    let path = PathBuf::from(format!("fd {fd}"));
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(JailError::Step {
            step: "use the VMM's cgroup.procs",
            path,
            source: std::io::Error::from_raw_os_error(libc::EBADF),
        });
    }
    // SAFETY: the descriptor is open (checked above), was handed to this
    // process for this use only, and is owned by the returned File alone.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs`, and closes it.
pub fn join_cgroup(mut procs: std::fs::File) -> Result<(), JailError> {
    use std::io::Write;
    procs.write_all(b"0").map_err(|source| JailError::Step {
        step: "join the VMM's cgroup",
        path: PathBuf::from("cgroup.procs"),
        source,
    })
}

/// Where the VMM is jailed, and as whom (part of the launch configuration).
pub use crate::config::JailConfig;

/// What the VMM became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailed {
    pub uid: u32,
    pub gid: u32,
    /// Why it stayed uid 0 (without capabilities), if it did.
    pub kept_root: Option<String>,
    /// Each path inside the jail and the host path it is.
    pub paths: Vec<(PathBuf, PathBuf)>,
}

impl Jailed {
    /// `message` with a note naming the host path of each jail path in it,
    /// so that an error about `/vmlinux` names the file the user gave.
    pub fn explain(&self, message: &str) -> String {
        let notes: Vec<String> = self
            .paths
            .iter()
            .filter(|(inside, _)| message.contains(&*inside.to_string_lossy()))
            .map(|(inside, host)| format!("{} is {}", inside.display(), host.display()))
            .collect();
        if notes.is_empty() {
            message.to_string()
        } else {
            format!("{message} (in the VMM's jail: {})", notes.join(", "))
        }
    }
}

const KVM: &str = "/dev/kvm";
/// Open files allowed: devices, eventfds, a few hundred vsock connections.
const MAX_FILES: u64 = 4096;
/// RLIMIT_FSIZE's headroom above the largest file the VMM writes on purpose.
const FSIZE_HEADROOM: u64 = 64 << 20;

/// RLIMIT_FSIZE for the VMM and its keeper: a backstop against a runaway
/// log (the console file is capped by the VMM, its stderr log, opened by
/// the runtime, is not). The limit is on the offset written, not on
/// growth, so it must cover every file written on purpose: the guest memory
/// file (the keeper's wipe `pwrite`s every page of it), each writable drive
/// (writes land at their offset in the image) and the console file (its cap
/// plus the truncation line); it is the largest of those plus 64 MiB. A
/// writable drive that cannot be sized leaves the limit off: the drive's
/// own open reports the problem, and no write of it may fail.
fn file_size_limit(config: &VmConfig) -> u64 {
    let mut largest = config
        .memory_mib
        .saturating_mul(1 << 20)
        // The console's truncation line is under 100 bytes.
        .max(config.console_max_bytes.saturating_add(256));
    for drive in config.drives.iter().filter(|d| !d.read_only) {
        // A block device's size is where its end is, not its inode's.
        let size = std::fs::File::open(&drive.path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)));
        match size {
            Ok(size) => largest = largest.max(size),
            Err(_) => return libc::RLIM_INFINITY,
        }
    }
    largest.saturating_add(FSIZE_HEADROOM)
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> JailError + 'a {
    move |e| JailError::Step {
        step,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn io_step<'a>(
    step: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Step {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Enters the jail and rewrites `config`'s paths to the ones inside it.
pub fn enter(jail: &JailConfig, config: &mut VmConfig) -> Result<Jailed, JailError> {
    prepare(jail, config)?.drop_privileges()
}

/// A jail entered up to its last step: in its root, privileges not yet
/// dropped. `airlock-vmm` forks its keeper here (see `keeper.rs`), so that
/// both processes are jailed alike, and each then drops its privileges.
#[derive(Debug)]
pub struct Prepared {
    run_uid: Uid,
    run_gid: Gid,
    groups: Vec<Gid>,
    jailed: Jailed,
}

/// Steps 1 to 5 of the jail (see the module doc): the process is in its
/// root with its rlimits, still privileged.
pub fn prepare(jail: &JailConfig, config: &mut VmConfig) -> Result<Prepared, JailError> {
    if !Uid::effective().is_root() {
        return Err(JailError::NotRoot);
    }
    let root = &jail.root;
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    let vsock_inside = match &config.vsock {
        // A listener handed over is used through its descriptor, never its
        // path (but for guest connections, `<uds>_P`, which then must be
        // inside the jail too).
        Some(v) if v.listen_fd.is_some() && !v.guest_connect => None,
        Some(v) => Some(
            v.uds
                .strip_prefix(root)
                .map(|rel| Path::new("/").join(rel))
                .map_err(|_| JailError::VsockOutsideRoot(v.uds.clone(), root.clone()))?,
        ),
        None => None,
    };
    // Inside, /sys is out of sight: check the host's KVM while it is not.
    // After the checks of the configuration alone, so those report the
    // same on any host.
    crate::vstate::vm::check_kvm_host(Path::new("/"))?;
    let (run_uid, run_gid, groups, kept_root) = jail_user(uid, gid)?;

    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare the mount namespace", root))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make mounts private", Path::new("/")))?;
    std::fs::create_dir_all(root).map_err(io_step("create", root))?;
    chown(root, Some(run_uid), Some(run_gid)).map_err(step("chown", root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(io_step("chmod", root))?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step("bind the root on itself", root))?;

    let mut paths = Vec::new();
    let mut record = |host: &Path, inside: PathBuf| {
        paths.push((inside.clone(), host.to_path_buf()));
        inside
    };
    config.kernel = record(
        &config.kernel.clone(),
        bind_file(&config.kernel, root, "vmlinux", true)?,
    );
    if let Some(initrd) = config.initrd.clone() {
        config.initrd = Some(record(&initrd, bind_file(&initrd, root, "initrd", true)?));
    }
    for (i, drive) in config.drives.iter_mut().enumerate() {
        if !drive.read_only {
            chown(&drive.path, Some(run_uid), Some(run_gid))
                .map_err(step("chown the writable drive", &drive.path))?;
        }
        let inside = bind_file(&drive.path, root, &format!("drive{i}"), drive.read_only)?;
        drive.path = record(&drive.path, inside);
    }
    bind_file(Path::new(KVM), root, "dev/kvm", false)?;
    if let ConsoleOutput::File(path) = &config.console {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_step("create the console file", path))?;
        chown(path, Some(run_uid), Some(run_gid)).map_err(step("chown", path))?;
        let inside = record(path, bind_file(path, root, "console", false)?);
        config.console = ConsoleOutput::File(inside);
    }
    if let (Some(v), Some(inside)) = (config.vsock.as_mut(), vsock_inside) {
        v.uds = record(&v.uds.clone(), inside);
    }
    std::env::set_current_dir(root).map_err(io_step("chdir", root))?;
    pivot_root(".", ".").map_err(step("pivot_root into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root from", root))?;
    std::env::set_current_dir("/").map_err(io_step("chdir", Path::new("/")))?;

    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("setrlimit CORE", root))?;
    setrlimit(Resource::RLIMIT_NOFILE, MAX_FILES, MAX_FILES)
        .map_err(step("setrlimit NOFILE", root))?;
    // A write past RLIMIT_FSIZE fails with EFBIG instead of killing the
    // process with SIGXFSZ. Ignored before the keeper forks and before any
    // seccomp filter: both processes inherit it.
    // SAFETY: sets a signal's disposition to SIG_IGN; no handler runs.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        let e = std::io::Error::last_os_error();
        return Err(io_step("ignore SIGXFSZ", root)(e));
    }
    let fsize = file_size_limit(config);
    setrlimit(Resource::RLIMIT_FSIZE, fsize, fsize).map_err(step("setrlimit FSIZE", root))?;

    Ok(Prepared {
        run_uid,
        run_gid,
        groups,
        jailed: Jailed {
            uid: run_uid.as_raw(),
            gid: run_gid.as_raw(),
            kept_root,
            paths,
        },
    })
}

impl Prepared {
    /// Step 6: drops every capability, changes to the jail user, sets
    /// `no_new_privs`.
    pub fn drop_privileges(self) -> Result<Jailed, JailError> {
        // A user or group change clears the parent-death signal that the
        // runtime asked for (`airlock run`: the VM must not outlive it).
        let mut pdeathsig: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int, which lives across the call.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut pdeathsig as *mut libc::c_int) };
        drop_privileges(self.run_uid, self.run_gid, &self.groups)?;
        if pdeathsig != 0 {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, pdeathsig as libc::c_ulong) };
        }
        Ok(self.jailed)
    }
}

/// The user to run as: the jail's, with `/dev/kvm`'s group when that is
/// how it may be opened; uid 0 (still without capabilities) when the jail
/// user cannot open `/dev/kvm` at all.
fn jail_user(uid: Uid, gid: Gid) -> Result<(Uid, Gid, Vec<Gid>, Option<String>), JailError> {
    if uid.is_root() {
        return Ok((uid, gid, Vec::new(), None));
    }
    let kvm = std::fs::metadata(KVM).map_err(io_step("stat", Path::new(KVM)))?;
    let mode = kvm.mode();
    if kvm.uid() == uid.as_raw() && mode & 0o600 == 0o600 || mode & 0o006 == 0o006 {
        Ok((uid, gid, vec![gid], None))
    } else if mode & 0o060 == 0o060 {
        Ok((uid, gid, vec![gid, Gid::from_raw(kvm.gid())], None))
    } else {
        Ok((
            Uid::from_raw(0),
            Gid::from_raw(0),
            Vec::new(),
            Some(format!(
                "/dev/kvm is mode {:o} owner {}:{}: uid {} cannot open it, so the VMM runs as uid 0 \
                 without capabilities; give /dev/kvm a group with rw (udev: GROUP=\"kvm\", MODE=\"0660\")",
                mode & 0o7777,
                kvm.uid(),
                kvm.gid(),
                uid
            )),
        ))
    }
}

/// Bind-mounts `src` at `root/name` (a new empty file); returns the path
/// inside the jail.
fn bind_file(src: &Path, root: &Path, name: &str, read_only: bool) -> Result<PathBuf, JailError> {
    let target = root.join(name);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(io_step("create", dir))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&target)
        .map_err(io_step("create the mount point", &target))?;
    mount(
        Some(src),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step("bind-mount", src))?;
    if read_only {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(step("make read-only", src))?;
    }
    Ok(Path::new("/").join(name))
}

fn drop_privileges(uid: Uid, gid: Gid, groups: &[Gid]) -> Result<(), JailError> {
    use caps::CapSet;
    let caps_err = |e: caps::errors::CapsError| JailError::Caps(e.to_string());
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // user change below takes away.
    caps::clear(None, CapSet::Bounding).map_err(caps_err)?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err)?;
    setgroups(groups).map_err(step("setgroups", Path::new("/")))?;
    setresgid(gid, gid, gid).map_err(step("setresgid", Path::new("/")))?;
    setresuid(uid, uid, uid).map_err(step("setresuid", Path::new("/")))?;
    // A non-root user lost them with the uid change; uid 0 keeps them
    // until cleared here.
    caps::clear(None, CapSet::Effective).map_err(caps_err)?;
    caps::clear(None, CapSet::Permitted).map_err(caps_err)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::Caps(format!(
            "no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_size_limit_covers_memory_writable_drives_and_the_console() {
        let dir = std::env::temp_dir().join(format!("airlock-fsize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sparse = |name: &str, bytes: u64| {
            let p = dir.join(name);
            std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
            p
        };
        let drive = |path, read_only| crate::config::DriveConfig {
            path,
            read_only,
            id: String::new(),
        };
        let mut config = crate::config::with_defaults();
        config.memory_mib = 128;
        assert_eq!(file_size_limit(&config), (128 << 20) + FSIZE_HEADROOM);
        // A read-only drive is never written: it does not count.
        config.drives = vec![
            drive(sparse("ro", 8 << 30), true),
            drive(sparse("rw", 300 << 20), false),
        ];
        assert_eq!(file_size_limit(&config), (300 << 20) + FSIZE_HEADROOM);
        config.memory_mib = 1024;
        assert_eq!(file_size_limit(&config), (1024 << 20) + FSIZE_HEADROOM);
        config.console_max_bytes = 2 << 30;
        assert_eq!(file_size_limit(&config), (2 << 30) + 256 + FSIZE_HEADROOM);
        // A writable drive that cannot be sized: no limit.
        config.drives.push(drive(dir.join("missing"), false));
        assert_eq!(file_size_limit(&config), libc::RLIM_INFINITY);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_keeps_root_without_a_kvm_check() {
        let (u, g, groups, kept) = jail_user(Uid::from_raw(0), Gid::from_raw(0)).unwrap();
        assert_eq!((u.as_raw(), g.as_raw()), (0, 0));
        assert!(groups.is_empty() && kept.is_none());
    }

    #[test]
    fn a_vsock_socket_outside_the_root_is_refused_before_anything_changes() {
        if !Uid::effective().is_root() {
            let mut config = crate::config::with_defaults();
            let jail = JailConfig {
                root: "/tmp/r".into(),
                uid: 1,
                gid: 1,
                vmm_cgroup_fd: None,
            };
            assert!(matches!(enter(&jail, &mut config), Err(JailError::NotRoot)));
            return;
        }
        let mut config = crate::config::with_defaults();
        config.vsock = Some(crate::config::VsockConfig {
            guest_cid: 3,
            uds: "/elsewhere/v.sock".into(),
            guest_connect: false,
            listen_fd: None,
        });
        let jail = JailConfig {
            root: "/tmp/airlock-jail-test-root".into(),
            uid: 65534,
            gid: 65534,
            vmm_cgroup_fd: None,
        };
        let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let err = enter(&jail, &mut config).unwrap_err();
        assert!(matches!(err, JailError::VsockOutsideRoot(..)), "{err}");
        assert_eq!(
            std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
            before
        );
        assert!(!jail.root.exists());
    }
}
