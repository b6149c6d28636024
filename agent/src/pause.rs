//! `airlock-agent pause`: the init process of a long-lived sandbox's
//! container (`airlock create`), like Kubernetes' pause container.
//!
//! It is PID 1 of the container's PID namespace, so it also reaps the
//! orphans of processes started there with `exec`. It sleeps in
//! `sigwait` (no polling) and exits on SIGTERM, SIGINT or SIGHUP.

use std::process::ExitCode;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The first argument that selects this mode.
pub const ARG: &str = "pause";

pub fn main() -> ExitCode {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(sig);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("airlock-agent pause: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("airlock-agent pause: sigwait failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

fn reap() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}
