//! A container: its bundle, root filesystem, cgroup and processes, from
//! `CreateContainer` to `RemoveContainer`.

pub mod cgroup;
pub mod rootfs;
pub mod spec;
pub mod unpack;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::launcher::{self, LaunchError, Reply, Request};
use crate::machine::Machine;
use crate::process::exits::Exits;
use crate::process::{self, ExitInfo, Process};
use cgroup::Cgroup;
use rootfs::{Layout, RootfsError};
use spec::SpecError;

/// How long a terminal's master may take to arrive from the container.
const TTY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors managing a container or its processes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid id {0:?}: use 1-64 of [A-Za-z0-9_.-], not starting with '.'")]
    BadId(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("Cannot set up the root filesystem")]
    Rootfs(#[from] RootfsError),
    #[error("Cannot write the bundle")]
    Bundle(#[source] std::io::Error),
    #[error("Cannot set up stdio")]
    Stdio(#[source] std::io::Error),
    #[error("the container process did not send its terminal")]
    NoTty,
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("exec {0:?} already exists in this container")]
    ExecExists(String),
    #[error("the container is not running (its init process exited)")]
    NotRunning,
}

/// Checks a container or exec id: it becomes a path component.
pub fn check_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadId(id.to_string()))
    }
}

/// A created container.
pub struct Container {
    pub id: String,
    bundle: PathBuf,
    layout: Layout,
    cgroup: Cgroup,
    /// The init process (exec id "").
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    /// Creates the container: mounts its rootfs and has libcontainer set up
    /// its init process, which waits for [`Container::start`].
    /// `image` is the rootfs's source, filesystem type and mount options.
    pub async fn create(
        exits: &Arc<Exits>,
        machine: &dyn Machine,
        id: &str,
        spec_json: &[u8],
        image: (&str, &str, &[String]),
        writable: &Path,
    ) -> Result<Self, ContainerError> {
        let (source, fstype, options) = image;
        check_id(id)?;
        let spec = spec::parse(spec_json)?;
        let tty = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let bundle = machine.bundles().join(id);
        let layout = Layout::new(&bundle, writable);
        // Adapted before anything is mounted: a spec the guest cannot use
        // is refused without side effects.
        let spec = spec::adapt(spec, id, &layout.rootfs, machine.net_dir())?;
        std::fs::create_dir_all(&bundle).map_err(ContainerError::Bundle)?;
        let cgroup = Cgroup::of(id);
        let result = async {
            machine.mount_rootfs(source, fstype, options, &layout)?;
            let json = serde_json::to_vec(&spec).map_err(|e| ContainerError::Bundle(e.into()))?;
            std::fs::write(bundle.join("config.json"), json).map_err(ContainerError::Bundle)?;
            let bundle2 = bundle.clone();
            let id2 = id.to_string();
            start_process(
                exits,
                machine,
                &cgroup,
                &bundle,
                "init",
                tty,
                move |console_socket| Request::Create {
                    id: id2,
                    bundle: bundle2,
                    console_socket,
                },
            )
            .await
        }
        .await;
        match result {
            Ok(init) => Ok(Self {
                id: id.to_string(),
                bundle,
                layout,
                cgroup,
                init: Arc::new(init),
                execs: Mutex::new(HashMap::new()),
            }),
            Err(e) => {
                machine.unmount_rootfs(&layout);
                std::fs::remove_dir_all(&bundle).ok();
                Err(e)
            }
        }
    }

    /// Lets the init process run its program.
    pub async fn start(
        &self,
        exits: &Arc<Exits>,
        machine: &dyn Machine,
    ) -> Result<(), ContainerError> {
        let start = Request::Start {
            id: self.id.clone(),
        };
        machine.launch(exits, start, vec![]).await?;
        Ok(())
    }

    /// Starts another process in the running container.
    pub async fn exec(
        &self,
        exits: &Arc<Exits>,
        machine: &dyn Machine,
        exec_id: &str,
        process_json: &[u8],
        tty: bool,
    ) -> Result<Arc<Process>, ContainerError> {
        check_id(exec_id)?;
        if self.init.exited() {
            return Err(ContainerError::NotRunning);
        }
        let mut execs = self.execs.lock().await;
        if execs.contains_key(exec_id) {
            return Err(ContainerError::ExecExists(exec_id.into()));
        }
        let mut proc_spec = spec::parse_process(process_json)?;
        proc_spec.set_terminal(Some(tty));
        let path = self.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&proc_spec).map_err(|e| ContainerError::Bundle(e.into()))?;
        std::fs::write(&path, json).map_err(ContainerError::Bundle)?;
        let id = self.id.clone();
        let result = start_process(
            exits,
            machine,
            &self.cgroup,
            &self.bundle,
            exec_id,
            tty,
            move |console_socket| Request::Exec {
                id,
                process: path,
                console_socket,
            },
        )
        .await;
        std::fs::remove_file(self.bundle.join(format!("exec-{exec_id}.json"))).ok();
        let process = Arc::new(result?);
        execs.insert(exec_id.to_string(), process.clone());
        Ok(process)
    }

    /// The process `exec_id` ("" for init).
    pub async fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(self.init.clone());
        }
        self.execs.lock().await.get(exec_id).cloned()
    }

    /// Signals one process, or every process in the container.
    pub async fn signal(&self, exec_id: &str, signal: i32, all: bool) -> Result<(), nix::Error> {
        let sig = nix::sys::signal::Signal::try_from(signal)?;
        let pids = if all {
            self.cgroup.pids()
        } else {
            match self.process(exec_id).await {
                Some(p) if !p.exited() => vec![p.pid],
                _ => return Err(nix::Error::ESRCH),
            }
        };
        for pid in pids {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stops every process (SIGTERM, then SIGKILL after `grace`), deletes
    /// the container's cgroup and state, unmounts its root filesystem and
    /// deletes its writable layer.
    pub async fn remove(&self, exits: &Arc<Exits>, machine: &dyn Machine, grace: Duration) {
        if !self.init.exited() && !grace.is_zero() {
            self.signal("", libc::SIGTERM, true).await.ok();
            tokio::time::timeout(grace, self.init.wait()).await.ok();
        }
        if !self.init.exited() || !self.cgroup.pids().is_empty() {
            self.cgroup.kill_all().ok();
            tokio::time::timeout(Duration::from_secs(5), self.init.wait())
                .await
                .ok();
        }
        let delete = Request::Delete {
            id: self.id.clone(),
        };
        if let Err(e) = machine.launch(exits, delete, vec![]).await {
            crate::console::warn(format_args!(
                "airlock-agent: deleting container {}: {}",
                self.id,
                airlock_report::chain(&e)
            ));
        }
        machine.unmount_rootfs(&self.layout);
        std::fs::remove_dir_all(&self.bundle).ok();
    }

    /// The container's cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The pid whose root is the container's root (for the file API).
    pub fn root_pid(&self) -> Option<i32> {
        (!self.init.exited()).then_some(self.init.pid)
    }
}

/// Sets up stdio, runs the launcher request that `make` builds and watches
/// the new process's exit.
async fn start_process(
    exits: &Arc<Exits>,
    machine: &dyn Machine,
    cgroup: &Cgroup,
    bundle: &Path,
    name: &str,
    tty: bool,
    make: impl FnOnce(Option<PathBuf>) -> Request,
) -> Result<Process, ContainerError> {
    let (reply, stdio) = if tty {
        let sock = bundle.join(format!("{name}.tty.sock"));
        std::fs::remove_file(&sock).ok();
        let listener = tokio::net::UnixListener::bind(&sock).map_err(ContainerError::Stdio)?;
        let master = tokio::spawn(receive_master(listener));
        let reply = machine
            .launch(exits, make(Some(sock.clone())), vec![])
            .await;
        std::fs::remove_file(&sock).ok();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                master.abort();
                return Err(e.into());
            }
        };
        let master = tokio::time::timeout(TTY_TIMEOUT, master)
            .await
            .map_err(|_| ContainerError::NoTty)?
            .map_err(|_| ContainerError::NoTty)?
            .map_err(ContainerError::Stdio)?;
        (reply, process::tty(master).map_err(ContainerError::Stdio)?)
    } else {
        let (ours, theirs) = process::pipes().map_err(ContainerError::Stdio)?;
        let fds = vec![theirs.stdin, theirs.stdout, theirs.stderr];
        (machine.launch(exits, make(None), fds).await?, ours)
    };
    let Reply::Pid(pid) = reply else {
        return Err(LaunchError::Failed {
            message: "the launcher returned no pid".into(),
            exec: None,
        }
        .into());
    };
    let oom_before = cgroup.oom_kills();
    let exited = exits.watch(pid);
    let (tx, rx) = Process::exit_channel();
    let cgroup = cgroup.clone();
    tokio::spawn(async move {
        let exit = process::exits::exit_of(exited, pid)
            .await
            .unwrap_or_else(|| {
                // Its status went elsewhere: say it was killed rather than
                // leave every waiter hanging.
                crate::console::warn(format_args!(
                    "airlock-agent: the exit status of pid {pid} was lost; reporting SIGKILL"
                ));
                process::exits::Exit::Signal(libc::SIGKILL)
            });
        let oom_killed = exit.signal() == libc::SIGKILL && cgroup.oom_kills() > oom_before;
        tx.send(Some(ExitInfo { exit, oom_killed })).ok();
    });
    Ok(Process::new(pid, stdio, rx))
}

/// Accepts the console socket's one connection and takes the terminal
/// master that libcontainer sends over it.
async fn receive_master(listener: tokio::net::UnixListener) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let (stream, _) = listener.accept().await?;
    loop {
        stream.readable().await?;
        match stream.try_io(tokio::io::Interest::READABLE, || {
            launcher::wire::recv_raw(stream.as_raw_fd(), 1).map_err(|e| match e {
                launcher::wire::WireError::Recv(errno) => std::io::Error::from(errno),
                other => std::io::Error::other(other),
            })
        }) {
            Ok((_, mut fds)) => {
                return fds
                    .pop()
                    .ok_or_else(|| std::io::Error::other("no terminal fd in the message"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_escape_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "sandbox", "exec-1.2_3", &"x".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
    }
}
