//! Turning SIGTERM, SIGINT and SIGHUP into a clean stop: the handler only
//! records the signal and writes to an eventfd (both async-signal-safe); the
//! event loop does the rest, so the guest memory is still wiped.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;

static SIGNAL_EVENT: OnceLock<EventFd> = OnceLock::new();
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    if let Some(evt) = SIGNAL_EVENT.get() {
        // SAFETY: write(2) on an eventfd with an 8-byte buffer that lives on
        // this stack frame; write is async-signal-safe.
        unsafe { libc::write(evt.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
    }
}

/// Installs the handlers (once per process) and returns the eventfd that
/// becomes readable when one of the signals arrives.
pub fn termination_event() -> std::io::Result<&'static EventFd> {
    if let Some(evt) = SIGNAL_EVENT.get() {
        return Ok(evt);
    }
    let new_evt = EventFd::new(EFD_NONBLOCK)?;
    let evt = SIGNAL_EVENT.get_or_init(|| new_evt);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        register_signal_handler(sig, on_signal).map_err(std::io::Error::from)?;
    }
    Ok(evt)
}

/// The last termination signal received, if any.
pub fn received_signal() -> Option<i32> {
    match LAST_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}
