//! The sandbox: this VM's state as the agent API sees it — the scratch
//! disk, the containers and their processes. The ttrpc service (`rpc/`)
//! only translates messages and forwards here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use tokio::sync::{Mutex, Notify};

use crate::container::{self, Container, ContainerError};
use crate::files::{FileError, Root};
use crate::process::exits::Exits;
use crate::process::Process;

/// Where the writable layers live (the scratch disk, or a tmpfs).
pub const SCRATCH: &str = airlock_protocol::GUEST_SCRATCH_DIR;

/// Errors from sandbox operations, sorted by the status code they map to.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// no container {0:?}
    #[error("no container {0:?}")]
    NoContainer(String),
    /// no process {1:?} in container {0:?}
    #[error("no process {1:?} in container {0:?}")]
    NoProcess(String, String),
    /// container {0:?} already exists
    #[error("container {0:?} already exists")]
    Exists(String),
    /// {0}
    #[error("{0}")]
    Invalid(String),
    /// {0}
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// {0}
    #[error(transparent)]
    File(#[from] FileError),
    /// {0}: {1}
    #[error("{0}: {1}")]
    Sys(&'static str, nix::Error),
}

/// The one sandbox of this VM.
pub struct Sandbox {
    pub exits: Arc<Exits>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    scratch_ready: Mutex<bool>,
    /// Notified when the runtime asked the VM to shut down.
    pub shutdown: Notify,
}

impl Sandbox {
    pub fn new(exits: Arc<Exits>) -> Self {
        Self {
            exits,
            containers: Mutex::new(HashMap::new()),
            scratch_ready: Mutex::new(false),
            shutdown: Notify::new(),
        }
    }

    /// Sets the hostname and clock, and mounts the scratch disk.
    pub async fn setup(
        &self,
        hostname: &str,
        epoch_seconds: i64,
        scratch_device: &str,
    ) -> Result<(), SandboxError> {
        if !hostname.is_empty() {
            nix::unistd::sethostname(hostname).map_err(|e| SandboxError::Sys("sethostname", e))?;
        }
        if epoch_seconds > 0 {
            let ts = nix::sys::time::TimeSpec::new(epoch_seconds, 0);
            nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
                .map_err(|e| SandboxError::Sys("clock_settime", e))?;
        }
        self.mount_scratch(scratch_device).await
    }

    async fn mount_scratch(&self, device: &str) -> Result<(), SandboxError> {
        let mut ready = self.scratch_ready.lock().await;
        if *ready {
            return Ok(());
        }
        std::fs::create_dir_all(SCRATCH).map_err(|e| {
            SandboxError::Sys(
                "mkdir scratch",
                nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let r = if device.is_empty() {
            mount(
                Some("tmpfs"),
                SCRATCH,
                Some("tmpfs"),
                flags,
                Some("mode=0700"),
            )
        } else {
            mount(Some(device), SCRATCH, Some("ext4"), flags, None::<&str>)
        };
        r.map_err(|e| SandboxError::Sys("mounting the scratch disk", e))?;
        *ready = true;
        Ok(())
    }

    /// Creates a container; its init process waits for `start_container`.
    pub async fn create_container(
        &self,
        id: &str,
        spec: &[u8],
        source: &str,
        fstype: &str,
        options: &[String],
    ) -> Result<(), SandboxError> {
        container::check_id(id)?;
        self.mount_scratch("").await?;
        let mut containers = self.containers.lock().await;
        if containers.contains_key(id) {
            return Err(SandboxError::Exists(id.into()));
        }
        if source.is_empty() {
            return Err(SandboxError::Invalid("rootfs.source is empty".into()));
        }
        let writable = Path::new(SCRATCH).join(id);
        // A tar archive on the scratch disk (a container joining a running
        // VM): unpacked next to the container's writable layer.
        let (source, fstype) = if fstype == "tar" {
            let archive = container::unpack::check_place(source, SCRATCH)
                .map_err(|e| SandboxError::Invalid(e.to_string()))?;
            let dest = writable.join("image");
            let d = dest.clone();
            tokio::task::spawn_blocking(move || container::unpack::unpack(&archive, &d))
                .await
                .map_err(|e| SandboxError::Invalid(format!("unpack task failed: {e}")))?
                .map_err(|e| SandboxError::Invalid(e.to_string()))?;
            (dest.to_string_lossy().into_owned(), String::new())
        } else {
            (source.to_string(), fstype.to_string())
        };
        let c =
            Container::create(&self.exits, id, spec, &source, &fstype, options, &writable).await;
        if c.is_err() {
            std::fs::remove_dir_all(&writable).ok();
        }
        let c = c?;
        containers.insert(id.to_string(), Arc::new(c));
        Ok(())
    }

    pub async fn container(&self, id: &str) -> Result<Arc<Container>, SandboxError> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NoContainer(id.into()))
    }

    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        Ok(self.container(id).await?.start(&self.exits).await?)
    }

    pub async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        let c = self
            .containers
            .lock()
            .await
            .remove(id)
            .ok_or_else(|| SandboxError::NoContainer(id.into()))?;
        c.remove(&self.exits, grace).await;
        // Its writable layer (and an unpacked image) on the scratch disk.
        std::fs::remove_dir_all(Path::new(SCRATCH).join(id)).ok();
        Ok(())
    }

    /// New cgroup limits for container `id` (OCI `LinuxResources` JSON).
    pub async fn update_container(&self, id: &str, resources: &[u8]) -> Result<(), SandboxError> {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources)
            .map_err(|e| SandboxError::Invalid(format!("malformed resources: {e}")))?;
        let c = self.container(id).await?;
        c.cgroup().update(&r).map_err(|e| {
            SandboxError::Invalid(format!("cannot apply the resources to container {id}: {e}"))
        })
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &[u8],
        tty: bool,
    ) -> Result<(), SandboxError> {
        self.container(id)
            .await?
            .exec(&self.exits, exec_id, process, tty)
            .await?;
        Ok(())
    }

    pub async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, SandboxError> {
        self.container(id)
            .await?
            .process(exec_id)
            .await
            .ok_or_else(|| SandboxError::NoProcess(id.into(), exec_id.into()))
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let signal = i32::try_from(signal)
            .map_err(|_| SandboxError::Invalid(format!("bad signal {signal}")))?;
        self.container(id)
            .await?
            .signal(exec_id, signal, all)
            .await
            .map_err(|e| SandboxError::Sys("kill", e))
    }

    /// The root that file API paths of container `id` ("" = the guest)
    /// resolve in.
    pub async fn root(&self, id: &str) -> Result<Root, SandboxError> {
        if id.is_empty() {
            return Ok(Root::open(Path::new("/"))?);
        }
        let pid = self
            .container(id)
            .await?
            .root_pid()
            .ok_or(ContainerError::NotRunning)?;
        Ok(Root::open(&PathBuf::from(format!("/proc/{pid}/root")))?)
    }

    /// Removes every container and asks init to shut the VM down.
    pub async fn destroy(&self) {
        let ids: Vec<String> = self.containers.lock().await.keys().cloned().collect();
        for id in ids {
            self.remove_container(&id, Duration::from_secs(1))
                .await
                .ok();
        }
        self.shutdown.notify_one();
    }
}
