//! `airlock-agent`: PID 1 inside every Airlock microVM.
//!
//! For now it is a correct init: it mounts the base filesystems, reports to
//! the VMM's boot-timer device, reaps orphans and shuts the guest down on
//! request. Later it serves ttrpc on vsock port 1024.

mod boot_timer;
mod cmdline;
mod init;
mod sysinfo;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Refuse before touching anything: as root on a host, this program would
    // otherwise mount over /dev and /tmp, SIGTERM every process and reboot.
    if std::process::id() != 1 {
        init::console::warn(format_args!(
            "airlock-agent: not running as PID 1 (this is the guest's /init); refusing to start"
        ));
        return ExitCode::from(2);
    }
    boot_timer::signal(boot_timer::Event::InitEntered);

    let err = match init::run() {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Exiting makes the kernel panic ("Attempted to kill init"), which the VMM
    // reports as a failed boot. Try hard to make the reason visible first.
    init::console::ensure_stdio().ok();
    init::console::warn(format_args!(
        "airlock-agent: fatal: {}",
        init::error_chain(&err)
    ));
    ExitCode::FAILURE
}
