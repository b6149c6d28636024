//! The launcher: a short-lived, single-threaded process that performs one
//! OCI operation with youki's libcontainer on PID 1's behalf.
//!
//! libcontainer forks with a raw `clone3` and runs Rust code in the child;
//! in a process with other threads (PID 1 runs tokio) that deadlocks on
//! locks held by threads that do not exist in the child (a malloc or
//! stdio lock held by another thread at the fork stays locked forever). It
//! also changes its caller (`dumpable`, `oom_score_adj`). So PID 1 runs it
//! in a fresh process: `/proc/self/exe launch`, one operation each.
//!
//! PID 1 and the launcher talk over a `SOCK_SEQPACKET` pair on the
//! launcher's stdin: one [`Request`] (JSON, with the process's stdio fds
//! attached as `SCM_RIGHTS`) and one [`Reply`]. A container process the
//! launcher starts is reparented to PID 1 when the launcher exits, so its
//! exit status reaches [`crate::process::exits::Exits`].

mod child;
pub mod exec_check;
pub mod wire;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use serde::{Deserialize, Serialize};

use crate::process::exits::{exit_of, Exit, Exits};

pub use exec_check::{ExecFailure, ExecKind};

pub use child::main;

/// The first argument that selects the launcher.
pub const ARG: &str = "launch";

/// Where libcontainer keeps its per-container state (its notify sockets).
pub const YOUKI_ROOT: &str = "/run/airlock-agent/youki";

/// One operation.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Create a container from `bundle/config.json`; its init process waits
    /// for `Start`. Without a console socket, three fds come along: the
    /// process's stdin, stdout and stderr.
    Create {
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Let a created container's init process run its program.
    Start { id: String },
    /// Start another process in a running container from a `process.json`
    /// (the OCI process object). Stdio as for `Create`.
    Exec {
        id: String,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Delete a container whose processes are gone: its cgroup and state.
    Delete { id: String },
}

/// The outcome.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The process started; its pid in PID 1's namespace.
    Pid(i32),
    /// Done.
    Done,
    /// It failed; the message is libcontainer's error chain, and `exec`
    /// says why the program could not be run when that was the cause.
    Failed {
        message: String,
        exec: Option<ExecFailure>,
    },
}

/// Errors running the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Cannot start the launcher process")]
    Spawn(#[source] std::io::Error),
    #[error("Cannot talk to the launcher")]
    Wire(#[from] wire::WireError),
    #[error("the launcher ended without a reply ({0:?})")]
    Died(Option<Exit>),
    #[error("the launcher did not reply within {0:?}; it was killed")]
    Timeout(Duration),
    #[error("the launcher's task failed")]
    Task(#[source] tokio::task::JoinError),
    /// What the launcher replied (libcontainer's error chain, from the
    /// launcher process: no source to keep), with the exec failure if any.
    #[error("{message}")]
    Failed {
        message: String,
        exec: Option<ExecFailure>,
    },
}

/// How long one launcher operation may take. libcontainer's create,
/// start, exec or delete of a container whose image is already mounted
/// takes well under a second even on an emulated CPU; a launcher that
/// has not answered by then is stuck (a fork that deadlocked, a hook
/// that never returns), and waiting for it would hang the request, and
/// `CreateContainer`'s hold on the sandbox's container table, forever.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a launcher that closed its socket without a reply may take to
/// have its exit status reaped, for the error message.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Runs one operation in a new launcher process and returns its reply
/// (a [`Reply::Failed`] becomes [`LaunchError::Failed`]). A launcher that
/// has not replied within [`LAUNCH_TIMEOUT`] is killed.
pub async fn call(exits: &Exits, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, LaunchError> {
    let (ours, theirs) = wire::pair()?;
    let child = Command::new("/proc/self/exe")
        .arg(ARG)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(LaunchError::Spawn)?;
    // PID 1's reaper collects it; never `wait` on the Child.
    let pid = child.id() as i32;
    let mut exited = exits.watch(pid);
    drop(child);

    let kill = || {
        // Its status has not been handed out, so it has not been reaped
        // (the watch above claims it) and the pid is still the launcher's.
        if exited.try_recv().is_err() {
            nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).ok();
        }
    };
    let reply = exchange(ours, req, fds, LAUNCH_TIMEOUT, kill).await?;
    match reply {
        Some(Reply::Failed { message, exec }) => Err(LaunchError::Failed { message, exec }),
        Some(reply) => Ok(reply),
        None => {
            let status = tokio::time::timeout(EXIT_WAIT, exit_of(exited, pid))
                .await
                .ok()
                .flatten();
            Err(LaunchError::Died(status))
        }
    }
}

/// Sends `req` on `sock` and waits for the reply, at most `deadline`;
/// past it, `on_timeout` runs (it must make the peer go away, which ends
/// the blocked receive) and the result is [`LaunchError::Timeout`].
async fn exchange(
    sock: OwnedFd,
    req: Request,
    fds: Vec<OwnedFd>,
    deadline: Duration,
    on_timeout: impl FnOnce(),
) -> Result<Option<Reply>, LaunchError> {
    let task = tokio::task::spawn_blocking(move || -> Result<Option<Reply>, wire::WireError> {
        wire::send(sock.as_raw_fd(), &req, &fds)?;
        drop(fds);
        let (reply, _) = wire::recv::<Reply>(sock.as_raw_fd(), 0)?;
        Ok(reply)
    });
    match tokio::time::timeout(deadline, task).await {
        Ok(joined) => Ok(joined.map_err(LaunchError::Task)??),
        Err(_) => {
            on_timeout();
            Err(LaunchError::Timeout(deadline))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_launcher_that_never_replies_times_out_and_is_stopped() {
        let (ours, theirs) = wire::pair().unwrap();
        let mut peer = Some(theirs);
        let started = std::time::Instant::now();
        let res = exchange(
            ours,
            Request::Delete { id: "c".into() },
            vec![],
            Duration::from_millis(200),
            // Standing for the kill: the peer's end closes.
            || drop(peer.take()),
        )
        .await;
        assert!(matches!(res, Err(LaunchError::Timeout(_))), "{res:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(peer.is_none(), "on_timeout did not run");
    }

    #[tokio::test]
    async fn a_reply_within_the_deadline_is_returned() {
        let (ours, theirs) = wire::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let (req, _) = wire::recv::<Request>(theirs.as_raw_fd(), 3).unwrap();
            assert!(matches!(req, Some(Request::Start { .. })));
            wire::send(theirs.as_raw_fd(), &Reply::Pid(7), &[]).unwrap();
        });
        let res = exchange(
            ours,
            Request::Start { id: "c".into() },
            vec![],
            Duration::from_secs(10),
            || panic!("timed out"),
        )
        .await;
        peer.join().unwrap();
        assert!(matches!(res, Ok(Some(Reply::Pid(7)))), "{res:?}");
    }
}
