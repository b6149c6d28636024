//! `airlock-agent`: PID 1 inside every Airlock microVM.
//!
//! The one binary plays three parts, chosen by its first argument:
//! * no argument: PID 1 — mounts, reaping, the ttrpc server on vsock port
//!   1024 (`init/`, `rpc/`, `sandbox.rs`, `container/`, `process/`,
//!   `files.rs`);
//! * `launch`: the single-threaded launcher that PID 1 starts for each OCI
//!   operation, because youki's libcontainer must not run in a process with
//!   other threads (`launcher/`);
//! * `pause`: the placeholder init process of a long-lived sandbox's
//!   container, which sleeps until it is killed (`pause.rs`).
//!
//! The modules are the library's (`lib.rs`); this is only the entry point.

use airlock_agent::{init, launcher, pause};
use std::process::ExitCode;

fn main() -> ExitCode {
    // As PID 1, the arguments are whatever the kernel did not understand on
    // its command line: only the modes' own words select a mode.
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some(launcher::ARG) => return launcher::main(),
        Some(pause::ARG) => return pause::main(),
        _ => {}
    }
    // Refuse before touching anything: as root on a host, this program would
    // otherwise mount over /dev and /tmp, SIGTERM every process and reboot.
    if std::process::id() != 1 {
        airlock_agent::console::warn(format_args!(
            "airlock-agent: not running as PID 1 (this is the guest's /init; \
             other modes: `{} ...`, `{}`); refusing to start",
            launcher::ARG,
            pause::ARG
        ));
        return ExitCode::from(2);
    }

    let err = match init::run() {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Exiting makes the kernel panic ("Attempted to kill init"), which the VMM
    // reports as a failed boot. Try hard to make the reason visible first.
    airlock_agent::console::ensure_stdio().ok();
    airlock_agent::console::warn(format_args!(
        "airlock-agent: fatal: {}",
        airlock_report::chain(&err)
    ));
    ExitCode::FAILURE
}
