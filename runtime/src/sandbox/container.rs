//! Containers and processes of a sandbox by name: what the containerd shim
//! drives (several containers of a pod in one VM). The CLI's single
//! container is [`CONTAINER_ID`](super::CONTAINER_ID).

use airlock_protocol::agent;

use super::{ctx, Process, Sandbox, SandboxError};

/// Where a container's root filesystem is, inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRootfs {
    /// A block device (`/dev/vda`) or a guest directory.
    pub source: String,
    /// `ext4`, or empty for a directory.
    pub fstype: String,
    pub read_only: bool,
}

impl GuestRootfs {
    /// The workload image, the VM's first drive, read-only.
    pub fn image() -> Self {
        Self {
            source: super::IMAGE_DEVICE.into(),
            fstype: "ext4".into(),
            read_only: true,
        }
    }
}

/// A container's cgroup counters and limits, as the guest's cgroup v2
/// files have them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
}

impl Sandbox {
    /// Creates container `id` from `spec` on `rootfs`; its init process
    /// waits for [`Sandbox::start_container`].
    pub async fn create_container_on(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        rootfs: &GuestRootfs,
    ) -> Result<(), SandboxError> {
        let json = serde_json::to_vec(spec)?;
        let req = agent::CreateContainerRequest {
            container_id: id.into(),
            oci_spec: json,
            rootfs: Some(agent::Rootfs {
                source: rootfs.source.clone(),
                fstype: rootfs.fstype.clone(),
                options: if rootfs.read_only {
                    vec!["ro".into()]
                } else {
                    vec![]
                },
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.call("CreateContainer", |c| c.create_container(ctx(), &req))
            .await?;
        Ok(())
    }

    /// Starts container `id`'s init process.
    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let req = agent::StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.call("StartContainer", |c| c.start_container(ctx(), &req))
            .await?;
        Ok(())
    }

    /// Starts `process` in container `id` as `exec_id`.
    pub async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<Process, SandboxError> {
        let req = agent::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_spec: serde_json::to_vec(process)?,
            tty: process.terminal().unwrap_or(false),
            ..Default::default()
        };
        self.call("ExecProcess", |c| c.exec_process(ctx(), &req))
            .await?;
        Ok(self.process(id, exec_id))
    }

    /// Sends `signal` to process `exec_id` ("" for init) of container
    /// `id`, or with `all` to every process in it.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        self.process(id, exec_id).signal(signal, all).await
    }

    /// Kills what is left of container `id` and releases it in the guest.
    pub async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        let req = agent::RemoveContainerRequest {
            container_id: id.into(),
            timeout_seconds: 0,
            ..Default::default()
        };
        self.call("RemoveContainer", |c| c.remove_container(ctx(), &req))
            .await?;
        Ok(())
    }
}

impl Sandbox {
    /// Container `id`'s cgroup counters and limits.
    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, SandboxError> {
        let req = agent::StatsContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let s = self
            .call("StatsContainer", |c| c.stats_container(ctx(), &req))
            .await?;
        Ok(ContainerStats {
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            oom_kills: s.oom_kills,
        })
    }

    /// Applies new cgroup limits to container `id`.
    pub async fn update_container(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), SandboxError> {
        let req = agent::UpdateContainerRequest {
            container_id: id.into(),
            resources: serde_json::to_vec(resources)?,
            ..Default::default()
        };
        self.call("UpdateContainer", |c| c.update_container(ctx(), &req))
            .await?;
        Ok(())
    }
}
