//! The processes of the pod's containers: started, signalled, waited
//! for, their stdio and terminal; the states containerd sees.

use std::path::PathBuf;
use std::sync::Arc;

use airlock_runtime::sandbox::Process as GuestProcess;

use super::{Event, Pod, PodError};
use crate::process::{Exited, Process, Status};
use crate::stdio::{self, Stdio};

impl Pod {
    /// Start: the init process (exec id "") or an exec added before.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, PodError> {
        let p = self.process(id, exec_id).await?;
        if p.status() != Status::Created {
            return Err(PodError::Precondition(format!(
                "process {exec_id:?} of {id} was already started"
            )));
        }
        let sandbox = self.sandbox().await?;
        let guest = sandbox.process(id, exec_id);
        if exec_id.is_empty() {
            let pumps = stdio::connect(&guest, &p.stdio).await?;
            *p.pumps.lock().await = Some(pumps);
            sandbox.start_container(id).await?;
        } else {
            let spec = p
                .spec
                .clone()
                .ok_or_else(|| PodError::Failed("exec without a process spec".into()))?;
            sandbox.exec_in(id, exec_id, &spec).await?;
            let pumps = stdio::connect(&guest, &p.stdio).await?;
            *p.pumps.lock().await = Some(pumps);
        }
        p.set_running();
        let pid = sandbox.record.vmm_pid;
        self.emit(if exec_id.is_empty() {
            Event::Start { id: id.into(), pid }
        } else {
            Event::ExecStarted {
                id: id.into(),
                exec_id: exec_id.into(),
                pid,
            }
        });
        let pod = self.clone();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move { pod.watch_exit(guest, id, exec_id, p, pid).await });
        Ok(pid)
    }

    /// Waits for a started process to end, lets its output drain, and
    /// reports the exit.
    async fn watch_exit(
        &self,
        guest: GuestProcess,
        id: String,
        exec_id: String,
        p: Arc<Process>,
        pid: u32,
    ) {
        let status = match guest.wait().await {
            Ok(e) => {
                if e.oom_killed {
                    tracing::warn!("{id}: process {exec_id:?} was killed by the OOM killer");
                }
                u32::try_from(e.status).unwrap_or(255)
            }
            Err(e) => {
                // The agent or the VM is gone: containerd must still see
                // an exit, with a status that says it did not end well.
                tracing::error!("{id}: lost process {exec_id:?}: {e}");
                255
            }
        };
        if let Some(pumps) = p.pumps.lock().await.take() {
            pumps.drain().await;
        }
        let exit = Exited::now(status);
        if p.set_exited(exit) {
            self.emit(Event::Exit {
                id: id.clone(),
                exec_id: if exec_id.is_empty() { id } else { exec_id },
                pid,
                exit,
            });
        }
    }

    /// Exec: registers a process to start later with Start.
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: Stdio,
        process: oci_spec::runtime::Process,
    ) -> Result<(), PodError> {
        {
            let mut containers = self.containers.lock().await;
            let c = containers
                .get_mut(id)
                .ok_or_else(|| PodError::NoContainer(id.into()))?;
            if exec_id.is_empty() || c.processes.contains_key(exec_id) {
                return Err(PodError::Exists(format!("exec {exec_id:?} in {id}")));
            }
            let stdio = Stdio {
                terminal: stdio.terminal || process.terminal().unwrap_or(false),
                ..stdio
            };
            c.processes
                .insert(exec_id.into(), Arc::new(Process::new(stdio, Some(process))));
        }
        self.emit(Event::ExecAdded {
            id: id.into(),
            exec_id: exec_id.into(),
        });
        Ok(())
    }

    /// Kill: a signal to one process, or with `all` to the container.
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        let p = self.process(id, exec_id).await?;
        match p.status() {
            Status::Stopped => Err(PodError::NoProcess(id.into(), exec_id.into())),
            Status::Created => {
                // Never started: nothing runs in the guest to signal.
                if p.set_exited(Exited::now(128 + signal)) {
                    let pid = self.pid().await;
                    self.emit(Event::Exit {
                        id: id.into(),
                        exec_id: if exec_id.is_empty() {
                            id.into()
                        } else {
                            exec_id.into()
                        },
                        pid,
                        exit: Exited::now(128 + signal),
                    });
                }
                Ok(())
            }
            Status::Running => {
                let sandbox = self.sandbox().await?;
                sandbox.signal(id, exec_id, signal, all).await?;
                Ok(())
            }
        }
    }

    /// Wait: until the process exited.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exited, PodError> {
        let p = self.process(id, exec_id).await?;
        Ok(p.wait().await)
    }

    /// State of one process.
    pub async fn state(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Process>, PathBuf, u32), PodError> {
        let p = self.process(id, exec_id).await?;
        let bundle = self
            .containers
            .lock()
            .await
            .get(id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default();
        Ok((p, bundle, self.pid().await))
    }

    /// CloseIO: the process's stdin ends.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), PodError> {
        let p = self.process(id, exec_id).await?;
        let copy = p.pumps.lock().await.as_mut().and_then(|p| p.take_stdin());
        // containerd closes its end of the FIFO before CloseIO: let the
        // copy take in what is still in the FIFO (it then closes the
        // guest's stdin itself), rather than dropping it.
        if let Some(mut copy) = copy {
            match tokio::time::timeout(stdio::STDIN_DRAIN_TIMEOUT, &mut copy).await {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(e))) => tracing::warn!("{id}: stdin of {exec_id:?}: {e}"),
                Ok(Err(e)) => tracing::warn!("{id}: stdin task of {exec_id:?}: {e}"),
                Err(_) => copy.abort(),
            }
        }
        let sandbox = self.sandbox().await?;
        sandbox.process(id, exec_id).close_stdin().await?;
        Ok(())
    }

    /// ResizePty.
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), PodError> {
        self.process(id, exec_id).await?;
        let sandbox = self.sandbox().await?;
        sandbox.process(id, exec_id).resize(height, width).await?;
        Ok(())
    }
}
