//! The pod's microVM: booted by the first container's Create on an ext4
//! image of its rootfs, recorded in its bundle for a dead shim's
//! cleanup, torn down with that container (or when the shim goes).

use std::sync::Arc;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::image::ImageRef;
use airlock_runtime::sandbox::container::GuestRootfs;
use airlock_runtime::sandbox::{Sandbox, SandboxOptions, Teardown};

use super::bundle::{cleanup_bundle, SandboxFile, SANDBOX_FILE};
use super::{CreateRequest, Pod, PodError};
use crate::{rootfs, spec};

/// The running VM.
pub(super) struct Vm {
    pub(super) sandbox: Arc<Sandbox>,
    /// The container whose Create booted it; its Delete tears it down.
    pub(super) owner: String,
}

impl Pod {
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
        let net = match crate::net::options(&oci, &config) {
            Ok(net) => net,
            Err(e) => {
                cleanup_bundle(&req.bundle);
                std::fs::remove_file(&image).ok();
                return Err(PodError::Failed(format!("container {}: {e}", req.id)));
            }
        };
        let opts = SandboxOptions {
            image: ImageRef::Ext4(image.clone()),
            vcpus,
            memory_mib,
            net,
            ..SandboxOptions::from_config(&config)
        };
        let mut progress = |m: &str| tracing::info!("{}: {m}", req.id);
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
        let rootfs = GuestRootfs::image();
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

    /// Tears down the VM if container `id` booted it; whether it did.
    pub(super) async fn teardown_if_owner(&self, id: &str) -> bool {
        let owner = {
            let vm = self.vm.lock().await;
            vm.as_ref()
                .filter(|vm| vm.owner == id)
                .map(|vm| vm.sandbox.clone())
        };
        let Some(sandbox) = owner else {
            return false;
        };
        let report = sandbox.teardown(Teardown::Graceful).await;
        tracing::info!(
            "{id}: microVM {} torn down: {} MiB of guest memory wiped, {} scratch bytes scrubbed",
            report.id,
            report.wiped_mib.unwrap_or(0),
            report.scratch_scrubbed_bytes
        );
        *self.vm.lock().await = None;
        true
    }

    /// Tears the VM down whatever state the containers are in (the shim
    /// is going away).
    pub async fn destroy(&self) {
        if let Some(vm) = self.vm.lock().await.take() {
            vm.sandbox.teardown(Teardown::Graceful).await;
        }
    }
}
