//! Stopping a sandbox's VMM: SIGTERM through a pidfd, the grace, then
//! SIGKILL; and the `/proc` facts that prove a pid is still the VMM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::VmmError;
use crate::state::SandboxRecord;

/// How a stop went.
#[derive(Debug, Clone)]
pub struct StopReport {
    /// The wipe the VMM reported: (touched MiB, guest MiB).
    pub wipe: Option<(u64, u64)>,
    /// It had to be SIGKILLed (no wipe then).
    pub killed: bool,
}

/// Stops the VMM of `record`: SIGTERM, up to `grace` to exit, then
/// SIGKILL. Both go through a pidfd, and only if the process still is the
/// sandbox's VMM ([`SandboxRecord::is_own_vmm`]); a pid that now names
/// another process is left alone, with a warning. The VMM's events in
/// `dir` give the wipe.
pub fn stop(record: &SandboxRecord, grace: Duration, dir: &Path) -> Result<StopReport, VmmError> {
    let pid = record.vmm_pid;
    let mut killed = false;
    // Opened before the identity check: whatever the check proves then
    // holds for the process the pidfd names, even if it exits and its pid
    // is reused afterwards.
    if let Some(vmm) = PidFd::open(pid)? {
        if !record.is_own_vmm() {
            tracing::warn!(
                "pid {pid} is no longer sandbox {}'s VMM; not signalling it",
                record.id
            );
        } else {
            vmm.signal(libc::SIGTERM)?;
            if !vmm.wait_exit(grace)? {
                tracing::warn!(
                    id = %record.id,
                    "the VMM (pid {pid}) did not exit within {} s of SIGTERM; killing it: guest memory is not wiped",
                    grace.as_secs()
                );
                vmm.signal(libc::SIGKILL)?;
                killed = true;
                vmm.wait_exit(Duration::from_secs(5))?;
            }
            vmm.reap();
        }
    }
    Ok(StopReport {
        wipe: super::wiped(dir),
        killed,
    })
}

/// A pidfd: a handle on one process that a reused pid cannot redirect.
struct PidFd {
    pid: u32,
    fd: OwnedFd,
}

impl PidFd {
    /// A pidfd for `pid`; `None` if no such process exists.
    fn open(pid: u32) -> Result<Option<Self>, VmmError> {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return Ok(None);
        };
        if p <= 0 {
            return Ok(None);
        }
        // SAFETY: pidfd_open takes a pid and flags and passes no memory.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(VmmError::PidFd(pid, e)),
            };
        }
        let fd = i32::try_from(fd)
            .map_err(|_| VmmError::PidFd(pid, std::io::Error::from_raw_os_error(libc::EBADF)))?;
        // SAFETY: the kernel just returned this new descriptor, which
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Some(Self { pid, fd }))
    }

    /// Sends `sig`; a process that already exited is no error.
    fn signal(&self, sig: i32) -> Result<(), VmmError> {
        // SAFETY: pidfd_send_signal reads the descriptor and the signal; a
        // null siginfo is allowed (the kernel fills in a kill()'s).
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(VmmError::Signal(self.pid, e));
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit (a zombie has); the
    /// pidfd turns readable then.
    fn wait_exit(&self, timeout: Duration) -> Result<bool, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll writes `revents` of the one pollfd it is given,
            // which lives across the call.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                n if n > 0 => return Ok(true),
                0 => return Ok(false),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(VmmError::Wait(self.pid, e));
                    }
                }
            }
        }
    }

    /// Reaps the process if it is our child and has exited (`airlock run`,
    /// the shim); waitid on the pidfd can reap no other process.
    fn reap(&self) {
        // SAFETY: siginfo_t is plain data, for which zeroes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t, which lives across the call;
        // not our child, it fails with ECHILD and changes nothing.
        unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// A record of `child` as a sandbox's VMM.
    fn record_of(child: &std::process::Child) -> SandboxRecord {
        SandboxRecord {
            id: "abc".into(),
            vmm_pid: child.id(),
            vmm_start_time: crate::procs::start_time(child.id()),
            created_unix: 1,
            image: "default".into(),
            vcpus: 1,
            memory_mib: 128,
            guest_cid: 3,
        }
    }

    #[test]
    fn stop_terms_and_reaps_a_vmm_that_honours_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let record = record_of(&child);
        assert!(record.vmm_start_time.is_some());
        let started = Instant::now();
        let report = stop(&record, Duration::from_secs(20), dir.path()).unwrap();
        assert!(!report.killed);
        assert!(report.wipe.is_none());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited out the grace"
        );
        // stop() reaped it: nothing is left for us to wait for.
        assert!(child.try_wait().is_err());
    }

    #[test]
    fn stop_terms_then_kills_and_reads_the_wipe() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            super::super::events_path(dir.path()),
            "{\"fields\":{\"message\":\"booting\"}}\n\
             {\"event\":\"wiped\",\"touched_mib\":12,\"total_mib\":256,\"ms\":3.5}\n",
        )
        .unwrap();
        // A process that ignores SIGTERM needs the SIGKILL (an ignored
        // signal stays ignored across exec).
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        // Let sh set the trap before the SIGTERM comes.
        std::thread::sleep(Duration::from_millis(100));
        let record = record_of(&child);
        let started = Instant::now();
        let report = stop(&record, Duration::from_millis(300), dir.path()).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(report.killed);
        assert!(child.try_wait().is_err(), "reaped");
        assert_eq!(report.wipe, Some((12, 256)));
    }

    #[test]
    fn a_process_that_is_not_the_recorded_vmm_is_not_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut record = record_of(&child);
        // The pid was reused: the process there started at another time.
        record.vmm_start_time = record.vmm_start_time.map(|t| t + 1);
        let report = stop(&record, Duration::from_millis(100), log).unwrap();
        assert!(!report.killed);
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        // A record from before start times were kept: only an airlock-vmm
        // naming the sandbox is its VMM.
        record.vmm_start_time = None;
        stop(&record, Duration::from_millis(100), log).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_gone_vmm_needs_no_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let record = record_of(&child);
        child.wait().unwrap();
        let report = stop(&record, Duration::from_secs(5), dir.path()).unwrap();
        assert!(!report.killed);
    }
}
