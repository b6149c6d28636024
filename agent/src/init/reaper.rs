//! PID 1's signal handling and orphan reaping.
//!
//! The signals init cares about are blocked and read from a signalfd, so
//! init sleeps in the kernel until one arrives: no handlers, no polling.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Signals that ask init to shut the guest down, as busybox init reads them:
/// SIGTERM and SIGUSR2 (poweroff), SIGINT (Ctrl-Alt-Del), SIGUSR1 (halt),
/// SIGPWR (power failure).
pub const SHUTDOWN_SIGNALS: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGPWR,
];

/// Errors waiting for signals or children.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("Cannot block signals")]
    Block(#[source] Errno),
    #[error("Cannot create a signalfd")]
    SignalFd(#[source] Errno),
    #[error("Cannot wait for a signal")]
    Wait(#[source] Errno),
    #[error("waitpid failed")]
    WaitPid(#[source] Errno),
}

/// What a [`Signals::next`] call saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// One of [`SHUTDOWN_SIGNALS`].
    Shutdown(Signal),
    /// SIGCHLD: some children may have exited.
    Child,
    /// The timeout passed first.
    Timeout,
}

/// The blocked signals, readable one by one.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks SIGCHLD and [`SHUTDOWN_SIGNALS`] in this (single) thread and
    /// opens a signalfd for them. Call before starting any child or thread:
    /// children inherit the mask, and std's `Command` resets it.
    pub fn block() -> Result<Self, ReaperError> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        SHUTDOWN_SIGNALS.iter().for_each(|&s| set.add(s));
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
            .map_err(ReaperError::Block)?;
        // Non-blocking: the async server reads it when epoll says so.
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(ReaperError::SignalFd)?;
        Ok(Self { fd })
    }

    /// Sleeps until a signal arrives or `timeout` (if any) passes.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Event, ReaperError> {
        loop {
            if !self.readable_within(timeout)? {
                return Ok(Event::Timeout);
            }
            if let Some(event) = self.try_next()? {
                return Ok(event);
            }
        }
    }

    /// The next pending signal of interest, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Event>, ReaperError> {
        loop {
            let info = match self.fd.read_signal() {
                Ok(Some(info)) => info,
                Ok(None) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ReaperError::Wait(e)),
            };
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => return Ok(Some(Event::Child)),
                Ok(sig) if SHUTDOWN_SIGNALS.contains(&sig) => {
                    return Ok(Some(Event::Shutdown(sig)))
                }
                _ => continue,
            }
        }
    }

    fn readable_within(&self, timeout: Option<Duration>) -> Result<bool, ReaperError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd, which lives across the call; the fd is
        // owned by self.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            -1 if Errno::last() == Errno::EINTR => Ok(false),
            -1 => Err(ReaperError::Wait(Errno::last())),
            0 => Ok(false),
            _ => Ok(true),
        }
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether any children are left after [`reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Children {
    /// Some children are still running.
    Running,
    /// No children at all: in the guest that means no processes but init.
    None,
}

/// Reaps every exited child without blocking.
pub fn reap() -> Result<Children, ReaperError> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(Children::Running),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return Ok(Children::None),
            Err(e) => return Err(ReaperError::WaitPid(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_signals_are_distinct_from_sigchld() {
        assert!(!SHUTDOWN_SIGNALS.contains(&Signal::SIGCHLD));
        assert_eq!(SHUTDOWN_SIGNALS.len(), 5);
    }

    #[test]
    fn signals_and_reaping() {
        // Blocks only in this test's thread; raise() targets this thread.
        let mut signals = Signals::block().unwrap();
        let short = Some(Duration::from_millis(10));
        assert_eq!(signals.next(short).unwrap(), Event::Timeout);
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        let long = Some(Duration::from_secs(10));
        assert_eq!(
            signals.next(long).unwrap(),
            Event::Shutdown(Signal::SIGUSR2)
        );

        // No other test starts children, so waitpid(-1) sees only this one.
        #[allow(clippy::zombie_processes, reason = "reap() waits for it")]
        std::process::Command::new("true").spawn().unwrap();
        let mut children = Children::Running;
        for _ in 0..1000 {
            children = reap().unwrap();
            if children == Children::None {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(children, Children::None);
    }
}
