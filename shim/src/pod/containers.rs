//! The pod's container registry: containers created on the VM's image
//! or joining it with an archive of their rootfs, their deletion, their
//! cgroup stats and limits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use airlock_runtime::sandbox::container::GuestRootfs;
use airlock_runtime::sandbox::{ContainerStats, Sandbox, GUEST_SCRATCH_DIR};

use super::bundle::cleanup_bundle;
use super::{CreateRequest, Event, Pod, PodError};
use crate::process::{Exited, Process, Status};
use crate::stdio::Stdio;
use crate::{rootfs, spec};

/// A container: its bundle and its processes by exec id ("" for init).
pub(super) struct Container {
    pub(super) bundle: PathBuf,
    pub(super) processes: HashMap<String, Arc<Process>>,
}

impl Pod {
    /// A further container of the pod whose VM runs here: its rootfs goes
    /// into the guest as a tar archive on the scratch disk (a running VM
    /// takes no new block device), which the agent unpacks.
    pub(super) async fn join(
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
    pub(super) async fn add_container(
        &self,
        req: CreateRequest,
        oci: oci_spec::runtime::Spec,
        sandbox: &Sandbox,
        rootfs: &GuestRootfs,
    ) -> Result<u32, PodError> {
        let (guest_spec, dropped) = spec::for_guest(oci);
        if dropped.hooks {
            tracing::warn!("{}: OCI hooks are not run: they are host commands", req.id);
        }
        for m in &dropped.bind_mounts {
            tracing::warn!("{}: host bind mount at {m} left out of the microVM", req.id);
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
        if !self.teardown_if_owner(id).await {
            if let Ok(sandbox) = self.sandbox().await {
                sandbox.remove_container(id).await.ok();
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
}
