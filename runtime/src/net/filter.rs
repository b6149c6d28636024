//! The sandbox's filter: an `airlock-netfilter` process in the host's
//! namespace whose sockets live in the sandbox's (the guest's DNS server
//! and, with domain rules, the proxy that lets TCP through by name). It
//! outlives `airlock create`; the teardown stops it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::NetError;

/// How long the filter may take to bind its sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The filter's configuration (`airlock-netfilter --config FILE`).
pub use airlock_net::filter::config::FilterConfig;

/// `configured`, else `airlock-netfilter` beside this executable, else on
/// $PATH.
pub fn binary(configured: Option<&Path>) -> Result<PathBuf, NetError> {
    if let Some(path) = configured {
        return match path.is_file() {
            true => Ok(path.to_path_buf()),
            false => Err(NetError::NoFilter(path.to_path_buf())),
        };
    }
    crate::procs::find_binary("airlock-netfilter").map_err(NetError::NoFilter)
}

/// Starts the filter with `config` written to `dir/netfilter.json` and its
/// log in `dir/netfilter.log`; returns its pid once it is ready.
pub fn start(
    binary: &Path,
    dir: &Path,
    config: &FilterConfig,
    die_with_parent: bool,
) -> Result<u32, NetError> {
    let path = dir.join("netfilter.json");
    let json = serde_json::to_vec_pretty(config)
        .map_err(|e| NetError::io("write", path.clone(), e.into()))?;
    std::fs::write(&path, json).map_err(|e| NetError::io("write", path.clone(), e))?;
    let log_path = dir.join("netfilter.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| NetError::io("create", log_path.clone(), e))?;
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    if die_with_parent {
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| NetError::Spawn(binary.display().to_string(), e))?;
    let pid = child.id();
    let stdout = child.stdout.take();
    // The ready line, read on a thread so that a filter that hangs
    // before it cannot hang us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
    if ready.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(NetError::FilterFailed {
            reason: last.trim().to_string(),
            log: log_path,
        });
    }
    // It runs on without us (own process group); the teardown stops it.
    std::mem::forget(child);
    Ok(pid)
}

/// Stops the filter `pid` if it is still the one that started at
/// `start_time`: SIGTERM, then SIGKILL after a grace.
pub fn stop(pid: u32, start_time: Option<u64>) {
    let current = crate::procs::start_time(pid);
    if current.is_none() || (start_time.is_some() && current != start_time) {
        return; // gone, or the pid is someone else's now
    }
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
            // Reaped, or not our child (another command started it): then
            // its pid's start time tells whether it is gone.
            Ok(_) => return,
            Err(_) if crate::procs::exited(pid.as_raw() as u32) => return,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// Tells the filter to re-read its policy file.
pub fn reload(pid: u32) -> Result<(), NetError> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| {
        NetError::io(
            "signal the filter",
            PathBuf::from(format!("pid {pid}")),
            e.into(),
        )
    })
}
