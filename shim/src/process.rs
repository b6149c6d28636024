//! One task process as containerd sees it: a container's init (exec id
//! "") or an exec, its stdio, its state and how it exited.

use std::sync::Mutex;
use std::time::SystemTime;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::stdio::{Pumps, Stdio};

/// containerd's view of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    /// Exit code, or 128 + signal.
    pub status: u32,
    pub at: SystemTime,
}

impl Exited {
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        let d = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut t = Timestamp::new();
        t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
        t
    }
}

/// A process of a task.
pub struct Process {
    pub stdio: Stdio,
    /// An exec's OCI process (JSON from containerd); None for init.
    pub spec: Option<oci_spec::runtime::Process>,
    status: Mutex<Status>,
    exited: watch::Sender<Option<Exited>>,
    pub pumps: tokio::sync::Mutex<Option<Pumps>>,
}

impl Process {
    pub fn new(stdio: Stdio, spec: Option<oci_spec::runtime::Process>) -> Self {
        Self {
            stdio,
            spec,
            status: Mutex::new(Status::Created),
            exited: watch::channel(None).0,
            pumps: tokio::sync::Mutex::new(None),
        }
    }

    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_running(&self) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Status::Running;
    }

    /// Records the exit (the first one wins) and wakes the waiters.
    pub fn set_exited(&self, exit: Exited) -> bool {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if *status == Status::Stopped {
            return false;
        }
        *status = Status::Stopped;
        self.exited.send_replace(Some(exit));
        true
    }

    pub fn exit(&self) -> Option<Exited> {
        *self.exited.borrow()
    }

    /// Waits until the process exited.
    pub async fn wait(&self) -> Exited {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self, so this cannot happen while
                // we are borrowed; answer as if killed.
                return Exited::now(137);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_the_first_exit() {
        let p = std::sync::Arc::new(Process::new(Stdio::default(), None));
        assert_eq!(p.status(), Status::Created);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        p.set_running();
        assert_eq!(p.status(), Status::Running);
        assert!(p.set_exited(Exited::now(7)));
        assert!(!p.set_exited(Exited::now(9)), "a second exit is ignored");
        assert_eq!(waiter.await.unwrap().status, 7);
        assert_eq!(p.exit().unwrap().status, 7);
        assert_eq!(p.status(), Status::Stopped);
        // A wait after the exit returns at once.
        assert_eq!(p.wait().await.status, 7);
    }

    #[test]
    fn timestamps_carry_seconds_and_nanos() {
        let e = Exited {
            status: 0,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::new(5, 42),
        };
        let t = e.timestamp();
        assert_eq!((t.seconds, t.nanos), (5, 42));
    }
}
