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
pub mod wire;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::process::exits::{Exit, Exits};

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
    /// It failed; the message is libcontainer's error chain.
    Failed(String),
}

/// Errors running the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Cannot start the launcher process
    #[error("Cannot start the launcher process")]
    Spawn(#[source] std::io::Error),
    /// Cannot talk to the launcher
    #[error("Cannot talk to the launcher")]
    Wire(#[from] wire::WireError),
    /// the launcher ended without a reply ({0:?})
    #[error("the launcher ended without a reply ({0:?})")]
    Died(Option<Exit>),
    /// {0}
    #[error("{0}")]
    Failed(String),
}

/// Runs one operation in a new launcher process and returns its reply
/// (a [`Reply::Failed`] becomes [`LaunchError::Failed`]).
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
    let exited = exits.watch(child.id() as i32);
    drop(child);

    let reply = tokio::task::spawn_blocking(move || -> Result<Option<Reply>, wire::WireError> {
        wire::send(ours.as_raw_fd(), &req, &fds)?;
        drop(fds);
        let (reply, _) = wire::recv::<Reply>(ours.as_raw_fd(), 0)?;
        Ok(reply)
    })
    .await
    .map_err(|e| LaunchError::Failed(format!("launcher task failed: {e}")))??;
    let status = exited.await.ok();
    match reply {
        Some(Reply::Failed(msg)) => Err(LaunchError::Failed(msg)),
        Some(reply) => Ok(reply),
        None => Err(LaunchError::Died(status)),
    }
}
