//! Ending the guest.
//!
//! An x86 microVM without ACPI has no power-off: the guest's only way out is
//! a reset. So a clean shutdown ends in `reboot(RB_AUTOBOOT)`; with
//! `reboot=k` the kernel pulses the reset line through the i8042 keyboard
//! controller, and the VMM treats that as a clean exit (as Firecracker
//! does). A kernel panic instead resets with `reboot=panic_warm`, which
//! leaves 0x1234 at guest physical 0x472 for the VMM to tell the two apart.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::reaper::{self, Children, ReaperError, Signals};

/// How long other processes get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);

/// Errors shutting down.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("Cannot signal the other processes")]
    Kill(#[source] Errno),
    #[error("Waiting for the other processes failed")]
    Wait(#[source] ReaperError),
    #[error("reboot(RB_AUTOBOOT) failed")]
    Reboot(#[source] Errno),
}

/// Stops every other process (SIGTERM, up to [`GRACE`] to exit while being
/// reaped, then SIGKILL), then syncs and resets the guest.
pub fn stop_all_and_reboot(
    signals: &mut Signals,
) -> Result<std::convert::Infallible, ShutdownError> {
    signal_all(Signal::SIGTERM)?;
    let deadline = Instant::now() + GRACE;
    loop {
        if reaper::reap().map_err(ShutdownError::Wait)? == Children::None {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            signal_all(Signal::SIGKILL)?;
            // Best effort: the kernel reaps nothing for us, but reboot does
            // not care about zombies.
            reaper::reap().ok();
            break;
        }
        // Whatever woke us (SIGCHLD, the deadline, a repeated shutdown
        // request), the next round reaps and checks the clock again.
        signals.next(Some(left)).map_err(ShutdownError::Wait)?;
    }
    reboot_now()
}

/// Syncs filesystems and resets the guest; returns only on failure.
pub fn reboot_now() -> Result<std::convert::Infallible, ShutdownError> {
    crate::console::flush();
    nix::unistd::sync();
    reboot(RebootMode::RB_AUTOBOOT).map_err(ShutdownError::Reboot)
}

/// Sends `signal` to every process but init; none left is fine.
fn signal_all(signal: Signal) -> Result<(), ShutdownError> {
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(ShutdownError::Kill(e)),
    }
}
