//! The runtime's half of the VMM jail: the VMM process starts in new pid,
//! mount, net, ipc and uts namespaces (`clone(2)`), inside a cgroup v2 of
//! its own with memory and pids limits. The VMM's half (root of its own,
//! capabilities, user, rlimits) is `airlock-vmm --jail-root`, see
//! `vmm/src/jail.rs`: it runs right after `execve`, before any guest input.
//!
//! `clone(2)` rather than `std::process::Command`: a new pid namespace
//! takes effect for the children of the caller, so the VMM itself can only
//! be its first process if it is cloned into it.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

use crate::config::JailSettings;

/// Errors setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the VMM jail needs root (namespaces, mounts, a cgroup): run as root, or set `[jail] enabled = false` in the runtime config (weaker isolation: seccomp only)")]
    NotRoot,
    #[error("{0} is not on a cgroup v2 filesystem: mount cgroup2 on /sys/fs/cgroup, or set `[jail] cgroup_parent`")]
    NoCgroup2(PathBuf),
    #[error("cannot reserve a uid for the VMM ({0}): {1}")]
    Uid(PathBuf, #[source] std::io::Error),
    #[error(
        "every uid of [jail] uid_base = {0}, uid_count = {1} is held by a live sandbox: \
         remove sandboxes, or widen the range"
    )]
    NoUid(u32, u32),
    #[error("cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("an argument or environment variable holds a NUL byte")]
    Nul,
    #[error("cannot start the jailed VMM: {0}")]
    Clone(std::io::Error),
    #[error("the jailed VMM failed to start ({0}): {1}")]
    Child(&'static str, std::io::Error),
}

/// What the VMM's logs in the state dir (tmpfs) may take: the console
/// (capped by the VMM) and its own log (rate-limited).
pub const LOG_ALLOWANCE_MIB: u64 = 16;

/// One VMM's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// Its root directory (the sandbox's `root/`).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    pub memory_max: u64,
    pub pids_max: u32,
}

impl JailSpec {
    /// The jail of sandbox `id`, whose root is `root`, whose guest has
    /// `memory_mib` of memory and whose scratch disk `scratch_mib`.
    ///
    /// `memory.max` counts all that the VMM is charged for: guest memory,
    /// its own overhead, the scratch disk (a tmpfs file: the pages the VMM
    /// writes are charged to it) and its logs. So a guest that fills its
    /// scratch disk meets a full disk (ENOSPC), never the OOM killer.
    pub fn new(
        settings: &JailSettings,
        id: &str,
        root: &Path,
        memory_mib: u32,
        scratch_mib: u64,
    ) -> Self {
        JailSpec {
            root: root.to_path_buf(),
            uid: settings.uid,
            gid: settings.gid,
            cgroup: cgroup_dir(settings, id),
            memory_max: (u64::from(memory_mib)
                + settings.memory_overhead_mib
                + scratch_mib
                + LOG_ALLOWANCE_MIB)
                << 20,
            pids_max: settings.pids_max,
        }
    }
}

/// The uid (and gid of the same number) of sandbox `id`'s VMM: one of
/// `[jail] uid_base .. uid_base + uid_count` that no other live sandbox
/// holds, reserved by creating `<state_root>/.uid-<uid - uid_base>` (holding the id)
/// exclusively; [`release_uid`] removes it at teardown. With `uid_count`
/// 0, the shared `uid`/`gid`.
pub fn reserve_uid(
    settings: &JailSettings,
    state_root: &Path,
    id: &str,
) -> Result<(u32, u32), JailError> {
    if settings.uid_count == 0 {
        return Ok((settings.uid, settings.gid));
    }
    match crate::procs::reserve_slot(state_root, "uid", id, settings.uid_count) {
        Ok(Some(n)) => {
            let uid = settings.uid_base + n;
            Ok((uid, uid))
        }
        Ok(None) => Err(JailError::NoUid(settings.uid_base, settings.uid_count)),
        Err((path, e)) => Err(JailError::Uid(path, e)),
    }
}

/// Frees the uid that sandbox `id` reserved, if any.
pub fn release_uid(state_root: &Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(state_root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with(".uid-")
            && std::fs::read(e.path()).is_ok_and(|held| held == id.as_bytes())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Sandbox `id`'s cgroup directory.
pub fn cgroup_dir(settings: &JailSettings, id: &str) -> PathBuf {
    settings.cgroup_parent.join(id)
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The `cgroup.procs` files of a sandbox's two cgroups, open for writing:
/// the keeper of guest memory is started in `keeper`, and the VMM moves
/// itself into `vmm` once forked (`airlock-vmm --vmm-cgroup-fd`).
#[derive(Debug)]
pub struct CgroupProcs {
    pub keeper: File,
    pub vmm: File,
}

/// The keeper's own `memory.max`: it holds guest memory (charged to the
/// VMM, which touched it) and needs a few MiB of its own.
const KEEPER_MEMORY_MAX: u64 = 64 << 20;

/// Creates the sandbox's cgroup `<parent>/<id>` (`pids.max` for both
/// processes) with two leaves: `vmm` (`memory.max` and `memory.swap.max`
/// 0: guest memory, scratch disk and logs) and `keeper`. The keeper must
/// never share the VMM's memory limit: once the OOM killer has taken the
/// VMM, guest memory stays charged until the keeper has wiped it, and a
/// keeper charged to that full cgroup would wait forever for memory to
/// wipe it with.
pub fn create_cgroup(spec: &JailSpec) -> Result<CgroupProcs, JailError> {
    let dir = &spec.cgroup;
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| JailError::Cgroup(p, e)
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(err(parent))?;
    let fs =
        nix::sys::statfs::statfs(parent).map_err(|e| JailError::Cgroup(parent.into(), e.into()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(JailError::NoCgroup2(parent.into()));
    }
    // Controllers must be enabled in every ancestor's subtree_control, from
    // the cgroup2 mount's root down to the sandbox's own cgroup.
    let enable = |control: &Path| -> Result<(), JailError> {
        let enabled = std::fs::read_to_string(control).map_err(err(control))?;
        if !(enabled.contains("memory") && enabled.contains("pids")) {
            std::fs::write(control, "+memory +pids").map_err(err(control))?;
        }
        Ok(())
    };
    let mut chain: Vec<&Path> = parent.ancestors().collect();
    chain.reverse();
    for ancestor in chain {
        let control = ancestor.join("cgroup.subtree_control");
        if control.exists() {
            enable(&control)?;
        }
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(err(dir)(e)),
        _ => {}
    }
    let limit = |dir: &Path, file: &str, value: String| {
        let path = dir.join(file);
        std::fs::write(&path, value).map_err(err(&path))
    };
    limit(dir, "pids.max", spec.pids_max.to_string())?;
    enable(&dir.join("cgroup.subtree_control"))?;
    let mut procs = Vec::new();
    for (leaf, memory_max) in [("keeper", KEEPER_MEMORY_MAX), ("vmm", spec.memory_max)] {
        let leaf = dir.join(leaf);
        match std::fs::create_dir(&leaf) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(err(&leaf)(e)),
            _ => {}
        }
        limit(&leaf, "memory.max", memory_max.to_string())?;
        // Guest memory must never reach a swap device, where a wipe cannot
        // follow it.
        if leaf.join("memory.swap.max").exists() {
            limit(&leaf, "memory.swap.max", "0".into())?;
        }
        let path = leaf.join("cgroup.procs");
        procs.push(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(err(&path))?,
        );
    }
    let vmm = procs
        .pop()
        .ok_or_else(|| err(dir)(std::io::ErrorKind::NotFound.into()))?;
    let keeper = procs
        .pop()
        .ok_or_else(|| err(dir)(std::io::ErrorKind::NotFound.into()))?;
    Ok(CgroupProcs { keeper, vmm })
}

/// Removes a sandbox's cgroup (its leaves first) once its processes are
/// gone; a missing one is fine.
pub fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for leaf in ["keeper", "vmm"] {
        remove_dir_when_empty(&dir.join(leaf))?;
    }
    remove_dir_when_empty(dir)
}

fn remove_dir_when_empty(dir: &Path) -> std::io::Result<()> {
    // The kernel may take a moment to see the cgroup empty after the exit.
    let mut last = Ok(());
    for _ in 0..50 {
        last = match std::fs::remove_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            r => r,
        };
        if last.is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    last
}

/// What the child reports through the error pipe when a step fails.
const STEPS: [&str; 5] = [
    "setpgid",
    "PR_SET_PDEATHSIG",
    "join the cgroup",
    "redirect stdio",
    "execve",
];

/// Clones the VMM into new pid, mount, net, ipc and uts namespaces and
/// execs `argv` there, with stdout/stderr on `stdout`/`stderr`, inside the
/// cgroup whose `cgroup.procs` is open. Returns its pid (as the host sees
/// it) once `execve` has succeeded.
pub fn spawn(
    argv: &[OsString],
    stdout: File,
    stderr: File,
    cgroup_procs: &CgroupProcs,
    listen_fd: Option<i32>,
    tap_fd: Option<i32>,
    die_with_parent: bool,
) -> Result<u32, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    // Everything the child needs is made here: between clone and execve it
    // may only make async-signal-safe calls (the runtime is multi-threaded).
    let cstr = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|_| JailError::Nul);
    // The VMM moves itself into its own cgroup through this descriptor,
    // which the child keeps open across execve (its VM config names it).
    let vmm_cgroup = cgroup_procs.vmm.as_raw_fd();
    // The vsock listener, bound by us where the jailed VMM cannot reach
    // the path: it gets the descriptor, kept open across execve too.
    let listener = listen_fd.unwrap_or(-1);
    // The guest NIC's tap (`--net egress`), opened by us in the sandbox's
    // network namespace: kept open across execve too.
    let tap = tap_fd.unwrap_or(-1);
    let args = argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstr(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let devnull = File::open("/dev/null").map_err(JailError::Clone)?;
    let (err_read, err_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| JailError::Clone(e.into()))?;
    let fds = ChildFds {
        stdin: devnull.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        cgroup: cgroup_procs.keeper.as_raw_fd(),
        vmm_cgroup,
        listener,
        tap,
        report: err_write.as_raw_fd(),
    };
    let (argv_p, envp_p) = (arg_ptrs.as_ptr(), env_ptrs.as_ptr());
    let mut stack = vec![0u8; 64 << 10];
    let flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    // The child has its own copy of the address space (no CLONE_VM) and
    // runs on `stack`; the data above outlives the call in the parent.
    // SAFETY: `child_main` makes only async-signal-safe system calls on
    // that prepared data, unchanged in the child's copy.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(move || child_main(&fds, argv_p, envp_p, die_with_parent)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| JailError::Clone(e.into()))?;
    drop(err_write);
    // execve closes the write end (O_CLOEXEC): EOF means it succeeded;
    // otherwise the child wrote [step, errno] before exiting.
    let mut report = Vec::new();
    let mut reader = File::from(err_read);
    let _ = reader.read_to_end(&mut report);
    if report.len() >= 8 {
        let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        let mut status = 0;
        // SAFETY: waitpid writes one int, which lives across the call.
        unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
        return Err(JailError::Child(
            STEPS.get(step).copied().unwrap_or("setup"),
            std::io::Error::from_raw_os_error(errno),
        ));
    }
    drop((stdout, stderr, devnull));
    Ok(pid.as_raw() as u32)
}

/// The raw descriptors the child uses.
#[derive(Clone, Copy)]
struct ChildFds {
    stdin: i32,
    stdout: i32,
    stderr: i32,
    cgroup: i32,
    vmm_cgroup: i32,
    /// -1: none.
    listener: i32,
    /// -1: none.
    tap: i32,
    report: i32,
}

/// The child between clone and execve: pid 1 of its new pid namespace.
/// Only async-signal-safe calls; nothing allocates.
fn child_main(
    fds: &ChildFds,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    die_with_parent: bool,
) -> isize {
    let fail = |step: u32| -> isize {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&step.to_ne_bytes());
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writes 8 bytes from a stack buffer to the report pipe,
        // then ends the child without running any destructor.
        unsafe {
            libc::write(fds.report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on integers and on a zeroed sigset_t.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Its own process group: a terminal's ^C for `airlock` does not
        // reach it; `airlock create` returns while it runs on.
        if libc::setpgid(0, 0) != 0 {
            return fail(0);
        }
        if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
            return fail(1);
        }
        // "0" moves the writer itself.
        if libc::write(fds.cgroup, b"0".as_ptr().cast(), 1) != 1
            || libc::fcntl(fds.vmm_cgroup, libc::F_SETFD, 0) != 0
            || (fds.listener >= 0 && libc::fcntl(fds.listener, libc::F_SETFD, 0) != 0)
            || (fds.tap >= 0 && libc::fcntl(fds.tap, libc::F_SETFD, 0) != 0)
        {
            return fail(2);
        }
        if libc::dup2(fds.stdin, 0) < 0
            || libc::dup2(fds.stdout, 1) < 0
            || libc::dup2(fds.stderr, 2) < 0
        {
            return fail(3);
        }
        libc::execve(*argv, argv, envp);
    }
    fail(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_gets_a_uid_of_its_own_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let settings = JailSettings {
            uid_base: 1000,
            uid_count: 3,
            ..Default::default()
        };
        let mut held = Vec::new();
        for id in ["a", "b", "c"] {
            let (uid, gid) = reserve_uid(&settings, dir.path(), id).unwrap();
            assert_eq!(uid, gid);
            assert!((1000..1003).contains(&uid));
            assert!(!held.contains(&uid), "{uid} given twice");
            held.push(uid);
        }
        let err = reserve_uid(&settings, dir.path(), "d").unwrap_err();
        assert!(err.to_string().contains("widen the range"), "{err}");
        release_uid(dir.path(), "b");
        let (uid, _) = reserve_uid(&settings, dir.path(), "d").unwrap();
        assert_eq!(uid, held[1], "b's uid is free again");
        // Shared, when asked for.
        let shared = JailSettings {
            uid_count: 0,
            ..Default::default()
        };
        assert_eq!(
            reserve_uid(&shared, dir.path(), "e").unwrap(),
            (65534, 65534)
        );
    }
}
