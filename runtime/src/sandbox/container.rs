//! Containers and processes of a sandbox by name: what the containerd shim
//! drives (several containers of a pod in one VM). The CLI's single
//! container is [`CONTAINER_ID`](super::CONTAINER_ID).

use airlock_protocol::agent;

use super::{agent_err, ctx, Sandbox, SandboxError};

/// Where a container's root filesystem is, inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRootfs {
    /// A block device (`/dev/vda`) or a guest directory.
    pub source: String,
    /// `ext4`, or empty for a directory.
    pub fstype: String,
    pub read_only: bool,
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
        let json = serde_json::to_vec(spec).map_err(|e| SandboxError::Io(e.to_string()))?;
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
        self.agent
            .raw()
            .create_container(ctx(), &req)
            .await
            .map_err(agent_err("CreateContainer"))?;
        Ok(())
    }

    /// Starts container `id`'s init process.
    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let req = agent::StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent
            .raw()
            .start_container(ctx(), &req)
            .await
            .map_err(agent_err("StartContainer"))?;
        Ok(())
    }

    /// Starts `process` in container `id` as `exec_id`.
    pub async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<(), SandboxError> {
        let req = agent::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_spec: serde_json::to_vec(process)
                .map_err(|e| SandboxError::Io(e.to_string()))?,
            tty: process.terminal().unwrap_or(false),
            ..Default::default()
        };
        self.agent
            .raw()
            .exec_process(ctx(), &req)
            .await
            .map_err(agent_err("ExecProcess"))?;
        Ok(())
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
        let req = agent::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent
            .raw()
            .signal_process(ctx(), &req)
            .await
            .map_err(agent_err("SignalProcess"))?;
        Ok(())
    }

    /// Kills what is left of container `id` and releases it in the guest.
    pub async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        let req = agent::RemoveContainerRequest {
            container_id: id.into(),
            timeout_seconds: 0,
            ..Default::default()
        };
        self.agent
            .raw()
            .remove_container(ctx(), &req)
            .await
            .map_err(agent_err("RemoveContainer"))?;
        Ok(())
    }
}

impl Sandbox {
    /// Container `id`'s cgroup counters and limits.
    pub async fn container_stats(
        &self,
        id: &str,
    ) -> Result<agent::StatsContainerResponse, SandboxError> {
        let req = agent::StatsContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent
            .raw()
            .stats_container(ctx(), &req)
            .await
            .map_err(agent_err("StatsContainer"))
    }

    /// Applies new cgroup limits to container `id`.
    pub async fn update_container(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), SandboxError> {
        let req = agent::UpdateContainerRequest {
            container_id: id.into(),
            resources: serde_json::to_vec(resources)
                .map_err(|e| SandboxError::Io(e.to_string()))?,
            ..Default::default()
        };
        self.agent
            .raw()
            .update_container(ctx(), &req)
            .await
            .map_err(agent_err("UpdateContainer"))?;
        Ok(())
    }
}
