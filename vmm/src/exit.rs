//! Why a VM stopped, and the one-shot channel that vCPUs and devices use to
//! ask the VMM to stop it.

use std::fmt;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself cleanly (a normal `reboot`, which is how the
    /// guest powers off: an x86 microVM without ACPI has no power-off).
    Reboot,
    /// The guest asked KVM for a system shutdown, or halted for good.
    Poweroff,
    /// The guest kernel panicked (detected through its warm-reboot flag).
    GuestPanic,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { vcpu: u8 },
    /// KVM or the VMM failed while running the guest.
    Error(String),
    /// The VMM received a termination signal.
    Signal(i32),
    /// A `stop` command came on the control socket.
    Stopped,
}

impl VmExit {
    /// The process exit code for this reason: 0 for a clean stop, the shell
    /// convention 128+N for a signal, 1 for any failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reboot | VmExit::Poweroff | VmExit::Stopped => 0,
            VmExit::Signal(libc::SIGTERM) | VmExit::Signal(libc::SIGINT) => 0,
            VmExit::Signal(n) => 128 + n,
            VmExit::GuestPanic | VmExit::TripleFault { .. } | VmExit::Error(_) => 1,
        }
    }

    /// Whether this is a clean, expected stop.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reboot => write!(f, "guest rebooted (clean shutdown)"),
            VmExit::Poweroff => write!(f, "guest powered off"),
            VmExit::GuestPanic => write!(f, "guest kernel panic (see the console output above)"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExit::Error(msg) => write!(f, "{msg}"),
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::Stopped => write!(f, "stopped by a command"),
        }
    }
}

/// A clonable handle that records the first exit reason and wakes the VMM's
/// event loop through an eventfd.
#[derive(Clone, Debug)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<VmExit>>>,
    evt: Arc<EventFd>,
}

impl ExitSignal {
    /// Creates a new, unsignalled handle.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Arc::new(Mutex::new(None)),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Records `exit` unless a reason is already recorded, and wakes the VMM.
    pub fn signal(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        drop(reason);
        // A full counter (impossible with one writer per reason) is the only
        // failure, and the reason is recorded already.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.signal(VmExit::GuestPanic);
        s.clone().signal(VmExit::Reboot);
        assert_eq!(s.reason(), Some(VmExit::GuestPanic));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExit::Reboot.exit_code(), 0);
        assert_eq!(VmExit::Poweroff.exit_code(), 0);
        assert_eq!(VmExit::Stopped.exit_code(), 0);
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 0);
        assert_eq!(VmExit::Signal(libc::SIGHUP).exit_code(), 129);
        assert_eq!(VmExit::GuestPanic.exit_code(), 1);
        assert_eq!(VmExit::TripleFault { vcpu: 1 }.exit_code(), 1);
        assert_eq!(VmExit::Error("x".into()).exit_code(), 1);
        assert!(!VmExit::GuestPanic.is_clean());
    }
}
