//! Who gets a child's exit status.
//!
//! PID 1 reaps every process in the guest with `waitpid(-1)`: its own
//! launchers, the container processes (reparented to it when their launcher
//! exits) and any orphan. A process's status therefore arrives here, never
//! at a `Child::wait`. Whoever cares about a pid asks [`Exits::watch`]; a
//! status that arrives before anyone asked is kept (a process can exit
//! before its launcher has even told us its pid).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How many unclaimed statuses to keep (orphans nobody asks about).
const UNCLAIMED_MAX: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit(code)`.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal number.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }

    /// The killing signal, 0 for a normal exit.
    pub fn signal(self) -> i32 {
        match self {
            Exit::Code(_) => 0,
            Exit::Signal(s) => s,
        }
    }
}

/// Whether any children are left after [`Exits::reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Children {
    /// Some children are still running.
    Running,
    /// No children at all.
    None,
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

/// The exit statuses of PID 1's children.
#[derive(Default)]
pub struct Exits {
    inner: Mutex<Inner>,
}

impl Exits {
    /// A receiver that gets `pid`'s exit, also if it already happened.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if let Some(exit) = inner.unclaimed.remove(&pid) {
            inner.order.retain(|&p| p != pid);
            tx.send(exit).ok();
        } else {
            inner.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    /// Reaps every exited child without blocking and hands the statuses
    /// out. Call on each SIGCHLD.
    pub fn reap(&self) -> Result<Children, Errno> {
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return Ok(Children::Running),
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return Ok(Children::None),
                Err(e) => return Err(e),
            };
            self.record(pid.as_raw(), exit);
        }
    }

    pub(crate) fn record(&self, pid: i32, exit: Exit) {
        let mut inner = self.lock();
        match inner.waiters.remove(&pid) {
            Some(waiters) => waiters.into_iter().for_each(|tx| {
                tx.send(exit).ok();
            }),
            None => {
                if inner.order.len() >= UNCLAIMED_MAX {
                    if let Some(old) = inner.order.pop_front() {
                        inner.unclaimed.remove(&old);
                    }
                }
                inner.unclaimed.insert(pid, exit);
                inner.order.push_back(pid);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a process that has ended may take to reach [`Exits::reap`].
const REAP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// `pid`'s exit from `exited` (an [`Exits::watch`] receiver), with a
/// liveness check so that the wait cannot hang: the process is also
/// watched through a pidfd, and if it has ended but its status has not
/// come within [`REAP_GRACE`] (something other than PID 1 reaped it, e.g.
/// a launcher it was still the child of), `None`. A status that came
/// before is always returned.
pub async fn exit_of(mut exited: oneshot::Receiver<Exit>, pid: i32) -> Option<Exit> {
    if let Ok(Some(fd)) = pidfd_open(pid) {
        let interest = tokio::io::Interest::READABLE;
        // SAFETY: `fd` is an open pidfd that the AsyncFd owns, unchanged,
        // for its whole life.
        let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) };
        if let Ok(fd) = registered {
            // Readable once the process has ended (zombie or reaped).
            tokio::select! {
                r = &mut exited => return r.ok(),
                _ = fd.readable() => {}
            }
        }
    }
    // Ended (or gone before we looked): the reaper has the status at once,
    // unless it never will.
    tokio::time::timeout(REAP_GRACE, exited).await.ok()?.ok()
}

/// A pidfd for `pid`; `None` if it no longer exists.
fn pidfd_open(pid: i32) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(Some(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fd as i32)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_status_that_arrives_is_returned() {
        let exits = Exits::default();
        let child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let rx = exits.watch(pid);
        let waiter = tokio::spawn(exit_of(rx, pid));
        // As PID 1's reaper would, once the process has ended.
        let status = tokio::task::spawn_blocking(move || {
            let mut child = child;
            child.wait().unwrap()
        })
        .await
        .unwrap();
        exits.record(pid, Exit::Code(status.code().unwrap()));
        assert_eq!(waiter.await.unwrap(), Some(Exit::Code(0)));
    }

    #[tokio::test]
    async fn a_status_reaped_elsewhere_does_not_hang_the_wait() {
        let exits = Exits::default();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let rx = exits.watch(pid);
        // Someone else reaps it: its status never reaches `exits`.
        child.wait().unwrap();
        let start = std::time::Instant::now();
        assert_eq!(exit_of(rx, pid).await, None);
        assert!(start.elapsed() < REAP_GRACE * 3);
    }

    #[test]
    fn exit_conventions() {
        assert_eq!(Exit::Code(7).status(), 7);
        assert_eq!(Exit::Signal(9).status(), 137);
        assert_eq!(Exit::Signal(9).signal(), 9);
        assert_eq!(Exit::Code(0).signal(), 0);
    }

    #[test]
    fn status_before_and_after_watch() {
        let exits = Exits::default();
        // Before: kept until someone asks.
        exits.record(10, Exit::Code(3));
        let mut rx = exits.watch(10);
        assert_eq!(rx.try_recv().unwrap(), Exit::Code(3));
        // After: delivered to every watcher.
        let mut a = exits.watch(11);
        let mut b = exits.watch(11);
        exits.record(11, Exit::Signal(15));
        assert_eq!(a.try_recv().unwrap(), Exit::Signal(15));
        assert_eq!(b.try_recv().unwrap(), Exit::Signal(15));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let exits = Exits::default();
        for pid in 0..(UNCLAIMED_MAX as i32 + 10) {
            exits.record(pid, Exit::Code(0));
        }
        let inner = exits.lock();
        assert_eq!(inner.unclaimed.len(), UNCLAIMED_MAX);
        assert!(!inner.unclaimed.contains_key(&0), "the oldest went first");
    }
}
