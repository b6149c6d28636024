//! Seccomp filters, one per kind of VMM thread, built with `seccompiler`.
//!
//! Each thread installs its own filter once its setup is done and before it
//! handles anything the guest controls:
//! * the **main** thread after the VM is built (event loop, stop, wipe);
//! * each **vCPU** thread before its first `KVM_RUN`;
//! * each **device** worker thread before it takes its first job (see
//!   `devices::virtio::worker`: the threads are started at build time so
//!   that they do not inherit the vCPU filter of the thread that activates
//!   their device; filters stack, and the strictest answer wins).
//!
//! A syscall outside a thread's list kills the whole VMM with `SIGSYS`;
//! the runtime reports that as the VMM's death and tears the sandbox down.
//!
//! Filters are installed only in a process that asked for them with
//! [`enable`]: `airlock-vmm` always does (no flag turns them off); a test
//! that embeds the VMM library in its own process does not, since a filter
//! would outlive the VM on the test harness's threads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the {0:?} thread's seccomp filter: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    #[error("Cannot install the {0:?} thread's seccomp filter: {1}")]
    Install(ThreadKind, seccompiler::Error),
}

/// The kinds of VMM threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: waits for the VM's end or a signal, stops the
    /// vCPUs and workers, wipes and unmaps guest memory.
    Main,
    /// Runs `KVM_RUN` and dispatches exits to the emulated devices
    /// (serial, i8042, boot timer, virtio-mmio registers, device
    /// activation and reset).
    Vcpu,
    /// A virtio device's worker: queues, disk image, tap, Unix sockets.
    Device,
    /// The keeper process (see `keeper.rs`); its filter is
    /// [`keeper_filter`], not [`filter`].
    Keeper,
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Asks for filters on every VMM thread of this process from now on.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

static DEVICE_CONNECT: AtomicBool = AtomicBool::new(false);

/// Lets device threads open connections (`socket(AF_UNIX)` and `connect`):
/// only for a vsock device whose guest may connect to host ports. Call
/// before any thread installs its filter.
pub fn allow_device_connect(allowed: bool) {
    DEVICE_CONNECT.store(allowed, Ordering::SeqCst);
}

/// Whether this process installs filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs the filter of `kind` on the calling thread, if this process
/// asked for filters.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let program = filter(kind)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind, e))
}

// ioctl request numbers (linux/kvm.h, asm-generic/ioctls.h).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const FIONBIO: u64 = 0x5421;
/// linux/if_tun.h: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The compiled filter of `kind`: its syscalls are allowed, anything else
/// kills the process.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    filter_with(kind, DEVICE_CONNECT.load(Ordering::SeqCst))
}

/// [`filter`], with device threads allowed to connect or not.
fn filter_with(kind: ThreadKind, device_connect: bool) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind, e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in COMMON {
        rules.insert(*nr, Vec::new());
    }
    rules.insert(
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NAME as u64).map_err(build)?],
    );
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(nr, vec![no_exec().map_err(build)?]);
    }
    rules.insert(
        libc::SYS_fcntl,
        vec![
            arg_eq(1, libc::F_DUPFD_CLOEXEC as u64).map_err(build)?,
            arg_eq(1, libc::F_GETFL as u64).map_err(build)?,
            arg_eq(1, libc::F_SETFL as u64).map_err(build)?,
            arg_eq(1, libc::F_GETFD as u64).map_err(build)?,
        ],
    );
    match kind {
        ThreadKind::Main => {
            for nr in MAIN.iter().chain(DEVICE_CONTROL) {
                rules.insert(*nr, Vec::new());
            }
            // The control socket's connections (`control.rs`), made
            // non-blocking as they are accepted.
            rules.insert(libc::SYS_ioctl, vec![arg_eq(1, FIONBIO).map_err(build)?]);
        }
        ThreadKind::Vcpu => {
            for nr in DEVICE_CONTROL {
                rules.insert(*nr, Vec::new());
            }
            rules.insert(
                libc::SYS_ioctl,
                [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]
                    .iter()
                    .map(|req| arg_eq(1, *req))
                    .collect::<Result<_, _>>()
                    .map_err(build)?,
            );
        }
        ThreadKind::Keeper => return keeper_filter(0),
        ThreadKind::Device => {
            for nr in DEVICE {
                rules.insert(*nr, Vec::new());
            }
            // FIONBIO for the vsock connections; TUNSETOFFLOAD for the
            // net worker, which sets the tap's offloads to what the driver
            // negotiated when the device starts.
            rules.insert(
                libc::SYS_ioctl,
                [FIONBIO, TUNSETOFFLOAD]
                    .iter()
                    .map(|req| arg_eq(1, *req))
                    .collect::<Result<_, _>>()
                    .map_err(build)?,
            );
            if device_connect {
                // Guest connections to the host reach Unix sockets only.
                rules.insert(
                    libc::SYS_socket,
                    vec![arg_eq(0, libc::AF_UNIX as u64).map_err(build)?],
                );
                rules.insert(libc::SYS_connect, Vec::new());
            }
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// A rule for `mmap` and `mprotect`: the protection (argument 2) has no
/// `PROT_EXEC`. Code is mapped by the dynamic loader before any filter is
/// installed; nothing maps code after that.
fn no_exec() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
}

/// A rule: the low 32 bits of argument `index` equal `value`. Every
/// argument checked here is an `int` or an ioctl number below 2^32, and the
/// kernel does not promise what the upper half of an `int` register holds.
fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// What every thread needs: I/O on its eventfds and the log, memory for
/// the allocator and thread stacks, waiting, signals (the vCPU kick, the
/// stop signals, abort on a panic) and its own end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The main thread's extra syscalls: the wipe of guest memory when no
/// keeper is left to do it (`getppid` tells; `lseek`, `pwrite64` and
/// `fallocate` on the memfd) and the removal of the vsock socket.
const MAIN: &[i64] = &[
    libc::SYS_getppid,
    libc::SYS_lseek,
    libc::SYS_pwrite64,
    libc::SYS_fallocate,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_accept4,
];

/// The keeper's whole list (see `keeper.rs`): it waits for the VMM or a
/// termination signal (`ppoll` on a pidfd and a signalfd), signals the VMM,
/// reaps it, wipes the memfd, logs, and exits. No file is opened, no
/// socket, no process made.
const KEEPER: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_ppoll,
    libc::SYS_poll,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_lseek,
    libc::SYS_pwrite64,
    libc::SYS_fallocate,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The keeper's filter: [`KEEPER`], and `kill` of its VMM (`child`) only.
pub fn keeper_filter(child: u32) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(ThreadKind::Keeper, e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        KEEPER.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_kill,
        vec![arg_eq(0, u64::from(child)).map_err(build)?],
    );
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(nr, vec![no_exec().map_err(build)?]);
    }
    // Debug builds of std check that a descriptor is open (F_GETFD)
    // before they use it (seen killing the keeper of a debug build).
    rules.insert(
        libc::SYS_fcntl,
        vec![arg_eq(1, libc::F_GETFD as u64).map_err(build)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs the keeper's filter on the calling (only) thread, if this
/// process asked for filters.
pub fn apply_keeper(child: u32) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let program = keeper_filter(child)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(ThreadKind::Keeper, e))
}

/// Stopping a device (a guest driver's reset, on a vCPU thread; the
/// teardown, on the main thread) returns its backend to the caller, which
/// disarms the vsock handshake timer.
const DEVICE_CONTROL: &[i64] = &[libc::SYS_timerfd_settime];

/// A device worker's extra syscalls: the disk image, the tap (`read` and
/// `write`, common to all; its offloads through `ioctl`), the vsock Unix
/// sockets (the listener and its connections; `socket` and `connect` only
/// with [`allow_device_connect`]) and the vsock handshake timer.
const DEVICE: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child that first installs the filter of
    /// `kind`; returns the child's wait status.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> i32 {
        in_child_under(filter(kind).unwrap(), body)
    }

    fn in_child_under(program: BpfProgram, body: fn()) -> i32 {
        // The child allocates nothing, so the test process's other threads
        // do not matter.
        // SAFETY: the child only installs the prepared filter, makes raw
        // syscalls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the child without running any destructor.
                unsafe { libc::_exit(3) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes one int, which lives across the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_ok(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    #[test]
    fn every_filter_builds() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Keeper,
        ] {
            assert!(!filter(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn allowed_syscalls_pass() {
        fn eventfd_roundtrip() {
            // SAFETY: raw syscalls on a fresh eventfd that this code owns.
            unsafe {
                let fd = libc::eventfd(0, 0);
                let one = 1u64;
                libc::write(fd, (&one as *const u64).cast(), 8);
                libc::close(fd);
            }
        }
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device] {
            let status = in_filtered_child(kind, eventfd_roundtrip);
            assert!(exited_ok(status), "{kind:?}: status {status:#x}");
        }
    }

    #[test]
    fn a_syscall_outside_the_filter_kills_with_sigsys() {
        fn getuid() {
            // SAFETY: getuid has no arguments and no effect.
            unsafe { libc::syscall(libc::SYS_getuid) };
        }
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Keeper,
        ] {
            let status = in_filtered_child(kind, getuid);
            assert!(killed_by_sigsys(status), "{kind:?}: status {status:#x}");
        }
    }

    #[test]
    fn arguments_are_checked() {
        fn inet_socket() {
            // SAFETY: socket only reads its arguments.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        fn unix_socket() {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        }
        fn open_for_writing() {
            // SAFETY: the path is a NUL-terminated literal.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        }
        fn kvm_create_vm() {
            // SAFETY: an ioctl on fd -1 fails; the filter sees it first.
            unsafe { libc::ioctl(-1, 0xae01) };
        }
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Device,
            inet_socket
        )));
        // Device threads open sockets only for a guest that may connect.
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Device,
            unix_socket
        )));
        let connecting = filter_with(ThreadKind::Device, true).unwrap();
        assert!(exited_ok(in_child_under(connecting.clone(), unix_socket)));
        assert!(killed_by_sigsys(in_child_under(connecting, inet_socket)));
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Vcpu,
            unix_socket
        )));
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Main,
            open_for_writing
        )));
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Vcpu,
            kvm_create_vm
        )));
    }

    #[test]
    fn device_threads_may_set_tap_offloads_and_no_other_tap_ioctl() {
        fn set_offload() {
            // SAFETY: an ioctl on fd -1 fails with EBADF once let through.
            unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0) };
        }
        fn set_iff() {
            // SAFETY: as above; TUNSETIFF would attach a new interface.
            unsafe { libc::ioctl(-1, libc::TUNSETIFF, 0) };
        }
        fn set_vnet_hdr_size() {
            // SAFETY: as above.
            unsafe { libc::ioctl(-1, libc::TUNSETVNETHDRSZ, 0) };
        }
        assert_eq!(TUNSETOFFLOAD, libc::TUNSETOFFLOAD);
        assert!(exited_ok(in_filtered_child(
            ThreadKind::Device,
            set_offload
        )));
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Device,
            set_iff
        )));
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Device,
            set_vnet_hdr_size
        )));
        for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
            assert!(
                killed_by_sigsys(in_filtered_child(kind, set_offload)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn no_thread_maps_code() {
        fn map(prot: i32) {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            // SAFETY: a new anonymous mapping, never used; the filter sees it.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0) };
            if p != libc::MAP_FAILED {
                // SAFETY: the page just mapped, made executable or not.
                unsafe { libc::mprotect(p, 4096, prot) };
            }
        }
        fn map_data() {
            map(libc::PROT_READ | libc::PROT_WRITE);
        }
        fn map_code() {
            map(libc::PROT_READ | libc::PROT_EXEC);
        }
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Keeper,
        ] {
            assert!(exited_ok(in_filtered_child(kind, map_data)), "{kind:?}");
            assert!(
                killed_by_sigsys(in_filtered_child(kind, map_code)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_keeper_may_signal_its_vmm_only() {
        // A child under the keeper filter built for its parent's pid
        // signals (with 0: a mere check) its parent, or pid 1.
        let run = |other: bool| {
            // SAFETY: the child only installs a filter prepared before it
            // is applied, makes raw syscalls and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: getppid has no arguments and no effect.
                let vmm = unsafe { libc::getppid() };
                let program = keeper_filter(vmm as u32).unwrap();
                if seccompiler::apply_filter(&program).is_err() {
                    // SAFETY: ends the child without destructors.
                    unsafe { libc::_exit(3) };
                }
                let target = if other { 1 } else { vmm };
                // SAFETY: signal 0 only checks that the target exists.
                unsafe { libc::kill(target, 0) };
                // SAFETY: as above.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waitpid writes one int, which lives across the call.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            status
        };
        assert!(exited_ok(run(false)));
        assert!(killed_by_sigsys(run(true)));
    }

    #[test]
    fn nothing_is_installed_unless_enabled() {
        // Tests never call enable(): the VMM library in a test process
        // leaves its threads unfiltered.
        assert!(!enabled());
        apply(ThreadKind::Vcpu).unwrap();
    }
}
