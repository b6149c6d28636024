//! The shim process's lifecycle (containerd's runtime v2 protocol):
//! `start` picks or spawns the shim daemon for the container's pod,
//! `delete` cleans up after a shim that died, and the daemon serves the
//! task service until Shutdown.

use std::path::Path;
use std::sync::Arc;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::teardown_state;
use airlock_runtime::state::{SandboxId, StateDir};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Error, Flags, StartOpts};

use crate::pod::{self, Pod};
use crate::process::Exited;
use crate::spec;
use crate::task::{self, TaskService};

/// Set to a sandbox id, this binary tears that sandbox down and exits.
pub const CLEANUP_ENV: &str = "AIRLOCK_SHIM_CLEANUP";

pub struct AirlockShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: String,
}

#[async_trait]
impl Shim for AirlockShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        AirlockShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
        }
    }

    /// One shim per pod: a CRI container joins the shim of its pod's
    /// sandbox (the socket address is derived from the pod id), anything
    /// else gets its own.
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle.
        let grouping = spec::load(Path::new("."))
            .ok()
            .and_then(|s| spec::pod_of(&s))
            .map_or_else(|| opts.id.clone(), |(pod, _)| pod);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// containerd's cleanup after a shim that is gone: stop the VM it left
    /// (the VMM wipes guest memory on SIGTERM), scrub its scratch disk,
    /// remove its state and what the shim put in the bundle.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?
        } else {
            self.bundle.clone().into()
        };
        if let Ok(id) = std::fs::read_to_string(bundle.join(pod::SANDBOX_FILE)) {
            // containerd gives `delete` a few seconds; stopping a VM (its
            // memory wipe) and scrubbing its scratch disk may take longer,
            // so a detached copy of this binary does it (see main.rs).
            match spawn_cleanup(id.trim()) {
                Ok(()) => log::info!(
                    "{}: cleaning up microVM {} after a dead shim",
                    self.id,
                    id.trim()
                ),
                Err(e) => log::error!("{}: cannot clean up microVM {}: {e}", self.id, id.trim()),
            }
        }
        // The dead shim's socket (runc's shim removes it here too); only
        // when no shim serves it any more (it may be the pod's, still
        // serving other containers).
        remove_socket(&bundle, true);
        pod::cleanup_bundle(&bundle);
        let exit = Exited::now(128 + libc::SIGKILL as u32);
        Ok(DeleteResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(task::forward_events(publisher, self.namespace.clone(), rx));
        TaskService::new(Arc::new(Pod::new(tx)), self.exit.clone())
    }
}

/// Starts `containerd-shim-airlock-v2` detached (own session, no stdio)
/// with [`CLEANUP_ENV`] set, to tear down sandbox `id`.
fn spawn_cleanup(id: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    SandboxId::parse(id).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(CLEANUP_ENV, id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    cmd.spawn().map(drop)
}

/// The detached cleanup: stops the VM (the VMM wipes guest memory), scrubs
/// and deletes the scratch disk, removes the state dir.
pub async fn cleanup(id: &str) -> Result<(), String> {
    let config = RuntimeConfig::load(None).map_err(|e| e.to_string())?;
    let id = SandboxId::parse(id).map_err(|e| e.to_string())?;
    let state = StateDir::open(&config.state_dir, &id).map_err(|e| e.to_string())?;
    let record = state.read_record().ok();
    teardown_state(&config, &state, record.as_ref()).await;
    Ok(())
}

/// Removes the shim socket named in `bundle`'s `address` file (written by
/// `start`; containerd's `unix:///run/containerd/s/<hash>`), if it is a
/// socket. With `if_unserved`, only when no shim answers on it.
pub fn remove_socket(bundle: &Path, if_unserved: bool) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let path = address.trim().trim_start_matches("unix://");
    if if_unserved && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            std::fs::remove_file(path).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn socket_removal_follows_the_address_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let address = |p: &Path| {
            std::fs::write(
                dir.path().join("address"),
                format!("unix://{}\n", p.display()),
            )
            .unwrap()
        };
        address(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        // Served: kept when asked to spare a live shim's socket.
        remove_socket(dir.path(), true);
        assert!(sock.exists());
        // The serving shim removes its own.
        remove_socket(dir.path(), false);
        assert!(!sock.exists());
        drop(listener);
        // Never a file that is not a socket.
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        address(&file);
        remove_socket(dir.path(), false);
        assert!(file.exists());
        // No address file: nothing to do.
        remove_socket(&dir.path().join("missing"), false);
    }
}
