//! The keeper: the process that holds guest memory and wipes it once the
//! VMM is gone, however the VMM ended.
//!
//! `airlock-vmm` creates the guest memory file (a sealed memfd, see
//! `vstate/memory.rs`) and then forks. The parent becomes the keeper, the
//! child goes on to be the VMM. The keeper:
//! * forwards SIGTERM, SIGINT and SIGHUP to the VMM and, if the VMM has not
//!   ended `grace` later, SIGKILLs it;
//! * reaps the VMM, whatever ended it: its own exit, a guest reset, SIGKILL,
//!   the OOM killer, a seccomp kill, an abort;
//! * overwrites every page of the memfd that holds data, logs the wipe, and
//!   exits with the VMM's status (128 + N for a VMM killed by signal N).
//!
//! It is what the runtime knows as the VMM's process (named
//! `airlock-keeper` in `/proc/PID/comm`; pid 1 of the jail's
//! pid namespace), jailed like the VMM (same root and user, no
//! capabilities), exempt from the OOM killer (`oom_score_adj` -1000, set
//! while it may), and under a seccomp filter of its own that allows no
//! `open`, no socket and `kill` of the VMM only (`seccomp::keeper_filter`).
//! The VMM gets SIGTERM if the keeper dies first, and then wipes guest
//! memory itself.
//!
//! Written by hand: the loop is a `ppoll` on a pidfd and a signalfd; no
//! crate of the field supervises a child this narrowly.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use airlock_vmm_api::Event;

use crate::vstate::memory;

/// Errors splitting into keeper and VMM.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot block the termination signals for the keeper")]
    Mask(#[source] nix::Error),
    #[error("cannot fork the keeper")]
    Fork(#[source] nix::Error),
    #[error("the keeper cannot watch the VMM (pidfd_open)")]
    Pidfd(#[source] std::io::Error),
    #[error("the keeper cannot receive signals (signalfd)")]
    Signalfd(#[source] nix::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// The signals a keeper forwards to its VMM.
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

fn forwarded() -> SigSet {
    FORWARDED.iter().copied().collect()
}

/// Which process this is after [`split`].
pub enum Role {
    /// The VMM; `keeper` is its parent's pid; `memfd` is guest memory.
    Vmm { keeper: u32, memfd: File },
    /// The keeper, to [`Keeper::run`] once jailed.
    Keeper(Keeper),
}

/// The keeper's half: what it holds and whom it watches.
pub struct Keeper {
    vmm: Pid,
    memfd: File,
    bytes: u64,
    grace: Duration,
}

/// This process's `oom_score_adj`, opened while `/proc` is in sight (before
/// the jail): after [`split`], the keeper (the parent, which `self` names
/// now) writes it.
pub fn oom_score_file() -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/oom_score_adj")
}

/// Forks the keeper of `memfd` (`bytes` long). Must be called while the
/// process has one thread. The VMM's half returns with the signal mask it
/// had; the keeper's with the forwarded signals blocked (they reach it
/// through a signalfd). `oom` is [`oom_score_file`]'s result.
pub fn split(
    memfd: File,
    bytes: u64,
    grace: Duration,
    oom: std::io::Result<File>,
) -> Result<Role, KeeperError> {
    let mut old = SigSet::empty();
    // Blocked before the fork, so that a SIGTERM in between is not lost.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded()), Some(&mut old))
        .map_err(KeeperError::Mask)?;
    let keeper = std::process::id();
    // SAFETY: the process has one thread (the caller's contract), so the
    // child may run any code; both halves go on as ordinary programs.
    match unsafe { fork() }.map_err(KeeperError::Fork)? {
        ForkResult::Child => {
            drop(oom);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)
                .map_err(KeeperError::Mask)?;
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
            if std::os::unix::process::parent_id() != keeper {
                tracing::warn!("the keeper died at once; the VMM will wipe guest memory itself");
            }
            Ok(Role::Vmm { keeper, memfd })
        }
        ForkResult::Parent { child } => {
            // `ps` and /proc/PID/comm tell keeper and VMM apart.
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most
            // 16 bytes; the literal is 15 with its NUL.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"airlock-keeper".as_ptr()) };
            // The OOM killer must choose the VMM, never the memory's keeper.
            if let Err(e) = oom.and_then(|mut f| f.write_all(b"-1000")) {
                tracing::warn!("keeper: cannot set its oom_score_adj to -1000: {e}");
            }
            Ok(Role::Keeper(Keeper {
                vmm: child,
                memfd,
                bytes,
                grace,
            }))
        }
    }
}

impl Keeper {
    /// The VMM's pid.
    pub fn vmm(&self) -> u32 {
        self.vmm.as_raw() as u32
    }

    /// Filters itself, waits for the VMM to end (forwarding termination
    /// signals, killing it after the grace), wipes guest memory and exits
    /// with the VMM's status.
    pub fn run(self) -> ! {
        let status = match self.watchers() {
            Ok(watch) => watch_vmm(self.vmm, &watch, self.grace),
            Err(e) => {
                // Without its watchers the keeper cannot forward a stop:
                // stop the VMM now, and still wipe.
                eprintln!("airlock-vmm: error: {e}");
                let _ = nix::sys::signal::kill(self.vmm, Signal::SIGKILL);
                waitpid(self.vmm, None).ok()
            }
        };
        self.wipe();
        let code = exit_code(status);
        if let Some(WaitStatus::Signaled(_, sig, _)) = status {
            // The VMM could not say how it ended: its keeper does.
            let reason = format!("the VMM process was killed by {sig}; guest memory was wiped");
            eprintln!("airlock-vmm: error: {reason}");
            crate::events::emit(Event::Exited {
                reason,
                status: i32::from(code),
            });
        }
        // Straight out: no exit handlers or destructors, whose system calls
        // the keeper's filter does not allow (they killed it with SIGSYS
        // after the wipe). Its output is unbuffered and written already.
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(i32::from(code)) }
    }

    fn watchers(&self) -> Result<Watchers, KeeperError> {
        let signals = nix::sys::signalfd::SignalFd::with_flags(
            &forwarded(),
            nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
        )
        .map_err(KeeperError::Signalfd)?;
        let pidfd = pidfd_open(self.vmm).map_err(KeeperError::Pidfd)?;
        crate::seccomp::apply_keeper(self.vmm())?;
        Ok(Watchers {
            pidfd,
            signals: signals.as_raw_fd(),
            _signalfd: Some(signals),
        })
    }

    fn wipe(&self) {
        let report = memory::wipe_file(&self.memfd, self.bytes);
        crate::vmm::log_wipe(&report);
    }
}

/// What the keeper polls: the VMM's pidfd and a signalfd (or, in tests,
/// any fd that delivers `signalfd_siginfo` records).
struct Watchers {
    pidfd: OwnedFd,
    signals: RawFd,
    _signalfd: Option<nix::sys::signalfd::SignalFd>,
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits until `vmm` has ended and reaps it. A termination signal read
/// from `signals` is forwarded to it; `grace` after the first one, it is
/// killed. Returns how it ended (`None` if it could not be reaped).
fn watch_vmm(vmm: Pid, watch: &Watchers, grace: Duration) -> Option<WaitStatus> {
    let mut deadline: Option<Instant> = None;
    loop {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut fds = [
            libc::pollfd {
                fd: watch.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: watch.signals,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: `fds` is a live array of two pollfds and `ts_ptr` is null or
        // points to a timespec that lives across the call.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, std::ptr::null()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Polling is broken: wait for the VMM without watching signals.
            return waitpid(vmm, None).ok();
        }
        if fds[0].revents != 0 {
            return waitpid(vmm, None).ok();
        }
        if fds[1].revents != 0 {
            if let Some(sig) = read_signal(watch.signals) {
                tracing::info!(signal = sig, "keeper: forwarding the signal to the VMM");
                // SAFETY: kill with integer arguments; `vmm` is our unreaped
                // child, so its pid cannot have been reused.
                unsafe { libc::kill(vmm.as_raw(), sig) };
                deadline.get_or_insert_with(|| Instant::now() + grace);
            }
            continue;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "keeper: the VMM did not stop within its grace period; killing it"
            );
            // SAFETY: as above.
            unsafe { libc::kill(vmm.as_raw(), libc::SIGKILL) };
            deadline = None;
        }
    }
}

/// Reads one `signalfd_siginfo` record; its signal number.
fn read_signal(fd: RawFd) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reads at most `info.len()` bytes into the live buffer.
    let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) };
    if n != info.len() as isize {
        return None;
    }
    // `ssi_signo` is the record's first field, a u32.
    Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32)
}

/// The keeper's exit status for how the VMM ended: its own status, or
/// 128 + N when signal N killed it; 1 when it could not be reaped.
fn exit_code(status: Option<WaitStatus>) -> u8 {
    match status {
        Some(WaitStatus::Exited(_, code)) => code.clamp(0, 255) as u8,
        Some(WaitStatus::Signaled(_, sig, _)) => 128u8.saturating_add(sig as i32 as u8),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// A guest memory file with a marker at 1 MiB, no longer mapped.
    fn marked_memory() -> File {
        let file = memory::guest_memfd(4).unwrap();
        let copy = file.try_clone().unwrap();
        let ram = memory::GuestRam::new(file, 4).unwrap();
        ram.write_slice(&[0xa5u8; 64], GuestAddress(1 << 20))
            .unwrap();
        copy
    }

    fn byte_at_1mib(file: &File) -> u8 {
        let mut b = [0u8; 1];
        file.read_at(&mut b, 1 << 20).unwrap();
        b[0]
    }

    /// Watchers on `child` with a pipe standing in for the signalfd.
    fn watchers(child: u32) -> (Watchers, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let watch = Watchers {
            pidfd: pidfd_open(Pid::from_raw(child as i32)).unwrap(),
            signals: r.as_raw_fd(),
            _signalfd: None,
        };
        std::mem::forget(r); // Lives as long as the test process.
        (watch, File::from(w))
    }

    fn send(pipe: &mut File, sig: i32) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        info[..4].copy_from_slice(&(sig as u32).to_ne_bytes());
        pipe.write_all(&info).unwrap();
    }

    fn keeper_of(child: u32, memfd: File) -> Keeper {
        Keeper {
            vmm: Pid::from_raw(child as i32),
            memfd,
            bytes: 4 << 20,
            grace: Duration::from_millis(300),
        }
    }

    #[test]
    fn a_vmm_that_exits_leaves_its_status_and_wiped_memory() {
        let copy = marked_memory();
        assert_eq!(byte_at_1mib(&copy), 0xa5);
        #[allow(clippy::zombie_processes, reason = "watch_vmm reaps it")]
        let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let (watch, _pipe) = watchers(child.id());
        let status = watch_vmm(
            Pid::from_raw(child.id() as i32),
            &watch,
            Duration::from_secs(5),
        );
        assert_eq!(exit_code(status), 3);
        keeper_of(child.id(), copy.try_clone().unwrap()).wipe();
        assert_eq!(byte_at_1mib(&copy), 0);
    }

    #[test]
    fn a_stop_is_forwarded_and_a_vmm_that_ignores_it_is_killed() {
        #[allow(clippy::zombie_processes, reason = "watch_vmm reaps it")]
        let child = Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (watch, mut pipe) = watchers(child.id());
        send(&mut pipe, libc::SIGTERM);
        let start = Instant::now();
        let status = watch_vmm(
            Pid::from_raw(child.id() as i32),
            &watch,
            Duration::from_millis(300),
        );
        assert_eq!(exit_code(status), 128 + 9, "{status:?}");
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_forwarded_stop_ends_a_vmm_that_honours_it() {
        #[allow(clippy::zombie_processes, reason = "watch_vmm reaps it")]
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let (watch, mut pipe) = watchers(child.id());
        send(&mut pipe, libc::SIGTERM);
        let status = watch_vmm(
            Pid::from_raw(child.id() as i32),
            &watch,
            Duration::from_secs(20),
        );
        assert_eq!(exit_code(status), 128 + 15, "{status:?}");
    }

    #[test]
    fn a_vmm_killed_from_outside_is_reaped() {
        #[allow(clippy::zombie_processes, reason = "watch_vmm reaps it")]
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let (watch, _pipe) = watchers(child.id());
        // SAFETY: kill with integer arguments, on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = watch_vmm(
            Pid::from_raw(child.id() as i32),
            &watch,
            Duration::from_secs(5),
        );
        assert!(
            matches!(status, Some(WaitStatus::Signaled(_, Signal::SIGKILL, _))),
            "{status:?}"
        );
    }
}
