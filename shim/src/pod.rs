//! The logic behind the task service: one microVM per shim, holding the
//! containers containerd creates through it. Everything here can be
//! driven without a ttrpc transport; `task/` only translates messages.
//!
//! A `ctr run` container gets a VM of its own. A CRI pod's sandbox
//! container boots the VM; the pod's further containers join it (the shim
//! is shared by pod, see `shim.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::image::ImageRef;
use airlock_runtime::sandbox::container::GuestRootfs;
use airlock_runtime::sandbox::{
    ContainerStats, Process as AgentProcess, Sandbox, SandboxOptions, Teardown, GUEST_SCRATCH_DIR,
    IMAGE_DEVICE,
};
use containerd_shim::protos::api::Mount;
use tokio::sync::Mutex;

use crate::process::{Exited, Process, Status};
use crate::stdio::{self, Stdio};
use crate::{options, rootfs, spec};

/// The image built from a container's rootfs, in its bundle.
pub const IMAGE_FILE: &str = "airlock-rootfs.ext4";
/// What `delete` needs after a dead shim to tear down the VM that a
/// bundle's container booted ([`SandboxFile`]).
pub const SANDBOX_FILE: &str = "airlock-sandbox";

/// The content of [`SANDBOX_FILE`]: JSON `{"id": ..., "config_path": ...}`
/// (older shims wrote the bare id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxFile {
    /// The sandbox id of the VM.
    pub id: String,
    /// The runtime config Create used (its `ConfigPath`): where the VM's
    /// state is (`state_dir`) and how long its stop may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
}

impl SandboxFile {
    /// Writes it into `bundle`, whole or not at all (temp file, rename).
    pub fn write(&self, bundle: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self)?;
        let tmp = bundle.join(format!(".{SANDBOX_FILE}.tmp"));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, bundle.join(SANDBOX_FILE)).inspect_err(|_| {
            std::fs::remove_file(&tmp).ok();
        })
    }

    /// Reads `bundle`'s; `None` if it has none (no VM was booted for it).
    pub fn read(bundle: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read_to_string(bundle.join(SANDBOX_FILE)) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn parse(text: &str) -> std::io::Result<Self> {
        let text = text.trim();
        if text.starts_with('{') {
            return serde_json::from_str(text).map_err(std::io::Error::from);
        }
        Ok(Self {
            id: text.to_string(),
            config_path: None,
        })
    }
}

/// What a task call can fail with; `task/` maps each to a ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// container {0} not found
    #[error("container {0} not found")]
    NoContainer(String),
    /// process {1} of container {0} not found
    #[error("process {1} of container {0} not found")]
    NoProcess(String, String),
    /// {0} already exists
    #[error("{0} already exists")]
    Exists(String),
    /// {0}
    #[error("{0}")]
    Precondition(String),
    /// {0}
    #[error("{0}")]
    Unsupported(String),
    /// {0}
    #[error("{0}")]
    Failed(String),
}

impl From<airlock_runtime::sandbox::SandboxError> for PodError {
    fn from(e: airlock_runtime::sandbox::SandboxError) -> Self {
        PodError::Failed(e.to_string())
    }
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

/// A task event for containerd.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create {
        id: String,
        pid: u32,
    },
    Start {
        id: String,
        pid: u32,
    },
    Exit {
        id: String,
        exec_id: String,
        pid: u32,
        exit: Exited,
    },
    Delete {
        id: String,
        pid: u32,
        exit: Exited,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
}

/// Where events go (the publisher to containerd, or a test's channel).
pub type Events = tokio::sync::mpsc::UnboundedSender<Event>;

struct Container {
    bundle: PathBuf,
    processes: HashMap<String, Arc<Process>>,
}

struct Vm {
    sandbox: Arc<Sandbox>,
    /// The container whose Create booted it; its Delete tears it down.
    owner: String,
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

    /// Create: the container's rootfs becomes an ext4 image, a VM boots on
    /// it, and the container is created in the guest (not started).
    pub async fn create(&self, req: CreateRequest) -> Result<u32, PodError> {
        let _one_at_a_time = self.creating.lock().await;
        if self.containers.lock().await.contains_key(&req.id) {
            return Err(PodError::Exists(format!("container {}", req.id)));
        }
        let oci = spec::load(&req.bundle).map_err(|e| PodError::Failed(e.to_string()))?;
        let running = self.vm.lock().await.as_ref().map(|vm| vm.sandbox.clone());
        if let Some(sandbox) = running {
            return self.join(req, oci, sandbox).await;
        }
        let config = RuntimeConfig::load(req.options.config_path.as_deref())
            .map_err(|e| PodError::Failed(e.to_string()))?;
        let image = rootfs::build_image(&req.bundle, &req.rootfs).await?;
        let (vcpus, memory_mib) = match spec::vm_size(&oci, &config) {
            Ok(size) => size,
            Err(e) => {
                cleanup_bundle(&req.bundle);
                return Err(PodError::Failed(format!("container {}: {e}", req.id)));
            }
        };
        let opts = SandboxOptions {
            image: ImageRef::Ext4(image.clone()),
            vcpus,
            memory_mib,
            ..SandboxOptions::from_config(&config)
        };
        let mut progress = |m: &str| log::info!("{}: {m}", req.id);
        let sandbox = match Sandbox::create(&config, &opts, &mut progress).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                std::fs::remove_file(&image).ok();
                return Err(e.into());
            }
        };
        // A dead shim's VM is found through this file only: without it, it
        // would run on, its memory never wiped.
        let record = SandboxFile {
            id: sandbox.id.to_string(),
            config_path: req
                .options
                .config_path
                .as_deref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        };
        if let Err(e) = record.write(&req.bundle) {
            sandbox.teardown(Teardown::Graceful).await;
            cleanup_bundle(&req.bundle);
            return Err(PodError::Failed(format!(
                "cannot record sandbox {} in the bundle (needed to clean up after a dead shim): {}: {e}",
                sandbox.id,
                req.bundle.join(SANDBOX_FILE).display()
            )));
        }
        let rootfs = GuestRootfs {
            source: IMAGE_DEVICE.into(),
            fstype: "ext4".into(),
            read_only: true,
        };
        let (id, bundle) = (req.id.clone(), req.bundle.clone());
        *self.vm.lock().await = Some(Vm {
            sandbox: sandbox.clone(),
            owner: id.clone(),
        });
        match self.add_container(req, oci, &sandbox, &rootfs).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                *self.vm.lock().await = None;
                sandbox.teardown(Teardown::Graceful).await;
                cleanup_bundle(&bundle);
                Err(e)
            }
        }
    }

    /// A further container of the pod whose VM runs here: its rootfs goes
    /// into the guest as a tar archive on the scratch disk (a running VM
    /// takes no new block device), which the agent unpacks.
    async fn join(
        &self,
        req: CreateRequest,
        oci: oci_spec::runtime::Spec,
        sandbox: Arc<Sandbox>,
    ) -> Result<u32, PodError> {
        if !matches!(spec::pod_of(&oci), Some((_, false))) {
            return Err(PodError::Unsupported(format!(
                "container {}: this shim's microVM belongs to another container; only \
                 containers of the same Kubernetes pod share one",
                req.id
            )));
        }
        let archive = rootfs::build_archive(&req.bundle, &req.rootfs).await?;
        let guest_archive = format!("{}/{}.tar", GUEST_SCRATCH_DIR, req.id);
        let sent = sandbox.write_file_from("", &archive, &guest_archive).await;
        std::fs::remove_file(&archive).ok();
        sent?;
        let rootfs = GuestRootfs {
            source: guest_archive,
            fstype: "tar".into(),
            read_only: true,
        };
        self.add_container(req, oci, &sandbox, &rootfs).await
    }

    /// Creates the container in the guest and tracks it.
    async fn add_container(
        &self,
        req: CreateRequest,
        oci: oci_spec::runtime::Spec,
        sandbox: &Sandbox,
        rootfs: &GuestRootfs,
    ) -> Result<u32, PodError> {
        let (guest_spec, dropped) = spec::for_guest(oci);
        if dropped.hooks {
            log::warn!("{}: OCI hooks are not run: they are host commands", req.id);
        }
        for m in &dropped.bind_mounts {
            log::warn!("{}: host bind mount at {m} left out of the microVM", req.id);
        }
        let terminal = guest_spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        sandbox
            .create_container_on(&req.id, &guest_spec, rootfs)
            .await?;
        let pid = sandbox.record.vmm_pid;
        let stdio = Stdio {
            terminal: terminal || req.stdio.terminal,
            ..req.stdio
        };
        let init = Arc::new(Process::new(stdio, None));
        self.containers.lock().await.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle,
                processes: HashMap::from([(String::new(), init)]),
            },
        );
        self.emit(Event::Create { id: req.id, pid });
        Ok(pid)
    }

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
        guest: AgentProcess,
        id: String,
        exec_id: String,
        p: Arc<Process>,
        pid: u32,
    ) {
        let status = match guest.wait().await {
            Ok(e) => {
                if e.oom_killed {
                    log::warn!("{id}: process {exec_id:?} was killed by the OOM killer");
                }
                u32::try_from(e.status).unwrap_or(255)
            }
            Err(e) => {
                // The agent or the VM is gone: containerd must still see
                // an exit, with a status that says it did not end well.
                log::error!("{id}: lost process {exec_id:?}: {e}");
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
                Ok(Ok(Err(e))) => log::warn!("{id}: stdin of {exec_id:?}: {e}"),
                Ok(Err(e)) => log::warn!("{id}: stdin task of {exec_id:?}: {e}"),
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

    /// Delete: an exited exec, or a container (whose VM goes with it when
    /// it booted it: memory wiped, scratch disk scrubbed).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exited), PodError> {
        let p = self.process(id, exec_id).await?;
        if p.status() == Status::Running {
            return Err(PodError::Precondition(format!(
                "process {exec_id:?} of {id} is still running"
            )));
        }
        let exit = p.exit().unwrap_or_else(|| Exited::now(0));
        let pid = self.pid().await;
        if !exec_id.is_empty() {
            if let Some(c) = self.containers.lock().await.get_mut(id) {
                c.processes.remove(exec_id);
            }
            return Ok((pid, exit));
        }
        let Some(container) = self.containers.lock().await.remove(id) else {
            return Err(PodError::NoContainer(id.into()));
        };
        let owner = {
            let vm = self.vm.lock().await;
            vm.as_ref()
                .filter(|vm| vm.owner == id)
                .map(|vm| vm.sandbox.clone())
        };
        match owner {
            Some(sandbox) => {
                let report = sandbox.teardown(Teardown::Graceful).await;
                log::info!(
                    "{id}: microVM {} torn down: {} MiB of guest memory wiped, {} scratch bytes scrubbed",
                    report.id,
                    report.wiped_mib.unwrap_or(0),
                    report.scratch_scrubbed_bytes
                );
                *self.vm.lock().await = None;
            }
            None => {
                if let Ok(sandbox) = self.sandbox().await {
                    sandbox.remove_container(id).await.ok();
                }
            }
        }
        cleanup_bundle(&container.bundle);
        self.emit(Event::Delete {
            id: id.into(),
            pid,
            exit,
        });
        Ok((pid, exit))
    }

    /// Stats: the container's cgroup in the guest.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, PodError> {
        self.process(id, "").await?;
        Ok(self.sandbox().await?.container_stats(id).await?)
    }

    /// Update: new cgroup limits for the container in the guest (the VM's
    /// own size stays).
    pub async fn update(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), PodError> {
        self.process(id, "").await?;
        Ok(self
            .sandbox()
            .await?
            .update_container(id, resources)
            .await?)
    }

    /// Whether no container is left (Shutdown may end the shim).
    pub async fn is_empty(&self) -> bool {
        self.containers.lock().await.is_empty()
    }

    /// Tears the VM down whatever state the containers are in (the shim
    /// is going away).
    pub async fn destroy(&self) {
        if let Some(vm) = self.vm.lock().await.take() {
            vm.sandbox.teardown(Teardown::Graceful).await;
        }
    }
}

/// Removes what the shim put in a bundle (containerd removes the rest).
pub fn cleanup_bundle(bundle: &Path) {
    rootfs::unmount(&bundle.join("rootfs"));
    std::fs::remove_file(bundle.join(IMAGE_FILE)).ok();
    std::fs::remove_file(bundle.join(rootfs::ARCHIVE_FILE)).ok();
    std::fs::remove_file(bundle.join(SANDBOX_FILE)).ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_file_keeps_the_id_and_the_config_path() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), None);
        let f = SandboxFile {
            id: "0123456789ab".into(),
            config_path: Some("/etc/airlock/pods.toml".into()),
        };
        f.write(dir.path()).unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), Some(f));
        let text = std::fs::read_to_string(dir.path().join(SANDBOX_FILE)).unwrap();
        assert_eq!(
            text,
            r#"{"id":"0123456789ab","config_path":"/etc/airlock/pods.toml"}"#
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let defaults = SandboxFile {
            id: "0123456789ab".into(),
            config_path: None,
        };
        defaults.write(dir.path()).unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), Some(defaults));
    }

    #[test]
    fn an_older_shims_bare_id_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SANDBOX_FILE), "0123456789ab").unwrap();
        assert_eq!(
            SandboxFile::read(dir.path()).unwrap(),
            Some(SandboxFile {
                id: "0123456789ab".into(),
                config_path: None
            })
        );
    }

    #[test]
    fn a_sandbox_file_that_cannot_be_written_or_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = SandboxFile {
            id: "0123456789ab".into(),
            config_path: None,
        };
        assert!(f.write(&dir.path().join("no-such-bundle")).is_err());
        std::fs::write(dir.path().join(SANDBOX_FILE), "{\"id\": ").unwrap();
        assert!(SandboxFile::read(dir.path()).is_err());
    }
}
