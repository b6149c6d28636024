//! The logic behind the task service: one microVM per shim, holding the
//! containers containerd creates through it. Everything here can be
//! driven without a ttrpc transport; `task/` only translates messages.
//!
//! A `ctr run` container gets a VM of its own. A CRI pod's sandbox
//! container boots the VM; the pod's further containers join it (the shim
//! is shared by pod, see `shim.rs`).
//!
//! * `vm.rs`: the VM, booted by the first container and torn down with it;
//! * `containers.rs`: the container registry (create, join, delete, stats);
//! * `processes.rs`: the processes of the containers and their states;
//! * `events.rs`: what is reported to containerd;
//! * `bundle.rs`: what the shim keeps in a bundle, and its removal.

mod bundle;
mod containers;
mod events;
mod processes;
mod vm;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use airlock_runtime::sandbox::{Sandbox, SandboxError};
use containerd_shim::protos::api::Mount;
use tokio::sync::Mutex;

pub use self::bundle::{cleanup_bundle, remove_socket, SandboxFile, SANDBOX_FILE};
use self::containers::Container;
pub use self::events::{Event, Events};
use self::vm::Vm;
use crate::options;
use crate::process::Process;
use crate::rootfs::RootfsError;
use crate::stdio::{Stdio, StdioError};

/// What a task call can fail with; `task/` maps each to a ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("container {0} not found")]
    NoContainer(String),
    #[error("process {1} of container {0} not found")]
    NoProcess(String, String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
}

/// What containerd asked Create for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: Stdio,
    pub options: options::RuntimeOptions,
}

/// The shim's VM and containers.
pub struct Pod {
    events: Events,
    vm: Mutex<Option<Vm>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Creates one at a time: two first containers must not both boot a VM.
    creating: Mutex<()>,
}

impl Pod {
    pub fn new(events: Events) -> Self {
        Self {
            events,
            vm: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        }
    }

    fn emit(&self, e: Event) {
        // The receiver lives as long as the shim.
        self.events.send(e).ok();
    }

    /// The VMM's pid: the host process that stands for every task process.
    pub async fn pid(&self) -> u32 {
        self.vm
            .lock()
            .await
            .as_ref()
            .map_or(0, |vm| vm.sandbox.record.vmm_pid)
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, PodError> {
        self.vm
            .lock()
            .await
            .as_ref()
            .map(|vm| vm.sandbox.clone())
            .ok_or_else(|| PodError::Precondition("the microVM is not running".into()))
    }

    async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, PodError> {
        let containers = self.containers.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| PodError::NoContainer(id.into()))?;
        c.processes
            .get(exec_id)
            .cloned()
            .ok_or_else(|| PodError::NoProcess(id.into(), exec_id.into()))
    }

    /// Whether no container is left (Shutdown may end the shim).
    pub async fn is_empty(&self) -> bool {
        self.containers.lock().await.is_empty()
    }
}
