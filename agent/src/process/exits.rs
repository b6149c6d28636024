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

    fn record(&self, pid: i32, exit: Exit) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
