//! The shim process's lifecycle (containerd's runtime v2 protocol):
//! `start` picks or spawns the shim daemon for the container's pod,
//! `delete` cleans up after a shim that died, and the daemon serves the
//! task service until Shutdown.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_runtime::config::{ConfigError, RuntimeConfig};
use airlock_runtime::sandbox::Sandbox;
use airlock_runtime::state::{SandboxId, StateDir, StateError};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Error, Flags, StartOpts};

use crate::logging;
use crate::pod::{self, remove_socket, Pod};
use crate::process::Exited;
use crate::spec;
use crate::task::{self, TaskService};

/// Set to a sandbox id, this binary tears that sandbox down and exits.
pub const CLEANUP_ENV: &str = "AIRLOCK_SHIM_CLEANUP";
/// With [`CLEANUP_ENV`]: the runtime config the sandbox was created with
/// (its Create's `ConfigPath`); unset, `$AIRLOCK_CONFIG` or the defaults,
/// as for Create.
pub const CLEANUP_CONFIG_ENV: &str = "AIRLOCK_SHIM_CLEANUP_CONFIG";
/// The log of cleanups after dead shims, in the runtime config's
/// `state_dir` (`/run/airlock/shim-cleanup.log` by default).
pub const CLEANUP_LOG: &str = "shim-cleanup.log";

/// Why a cleanup after a dead shim could not be done.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
}

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
        match pod::SandboxFile::read(&bundle) {
            Ok(Some(sandbox)) => {
                // containerd gives `delete` a few seconds; stopping a VM
                // (its memory wipe) and scrubbing its scratch disk may take
                // longer, so a detached copy of this binary does it (see
                // main.rs). Both log to the cleanup log, and `delete` its
                // warnings and errors to its stderr too, which containerd
                // logs.
                let path = cleanup_log_path(sandbox.config_path.as_deref());
                let log = open_cleanup_log(&path);
                logging::for_delete(log.as_ref().ok().and_then(|f| f.try_clone().ok()));
                if let Err(e) = &log {
                    tracing::error!(
                        "{}: cannot open the cleanup log {}: {e}: the cleanup of microVM {} logs nowhere",
                        self.id,
                        path.display(),
                        sandbox.id
                    );
                }
                match spawn_cleanup(&sandbox, log.ok()) {
                    Ok(()) => tracing::info!(
                        "{}: cleaning up microVM {} after a dead shim (bundle {})",
                        self.id,
                        sandbox.id,
                        bundle.display()
                    ),
                    Err(e) => tracing::error!(
                        "{}: cannot clean up microVM {} after a dead shim: {e}: its VMM may still run",
                        self.id,
                        sandbox.id
                    ),
                }
            }
            Ok(None) => {}
            Err(e) => {
                logging::for_delete(open_cleanup_log(&cleanup_log_path(None)).ok());
                tracing::error!(
                    "{}: cannot read {}: {e}: the microVM of a dead shim cannot be found to clean it up",
                    self.id,
                    bundle.join(pod::SANDBOX_FILE).display()
                );
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

/// Starts `containerd-shim-airlock-v2` detached (own session, no stdin or
/// stdout, stderr to `log`) with [`CLEANUP_ENV`] and [`CLEANUP_CONFIG_ENV`]
/// set, to tear down `sandbox`.
fn spawn_cleanup(sandbox: &pod::SandboxFile, log: Option<std::fs::File>) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    SandboxId::parse(&sandbox.id).map_err(std::io::Error::other)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(CLEANUP_ENV, &sandbox.id);
    match &sandbox.config_path {
        Some(p) => cmd.env(CLEANUP_CONFIG_ENV, p),
        None => cmd.env_remove(CLEANUP_CONFIG_ENV),
    };
    // Never the stdio `delete` got from containerd: containerd would wait
    // for the detached process to close it.
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.map_or_else(std::process::Stdio::null, std::process::Stdio::from))
        .process_group(0);
    cmd.spawn().map(drop)
}

/// [`CLEANUP_LOG`] in the `state_dir` of the config at `config_path`, or
/// of the default config when that one cannot be loaded (the cleanup then
/// logs why, there).
fn cleanup_log_path(config_path: Option<&Path>) -> PathBuf {
    RuntimeConfig::load(config_path)
        .map_or_else(|_| RuntimeConfig::default().state_dir, |c| c.state_dir)
        .join(CLEANUP_LOG)
}

/// Opens the cleanup log at `path` to append to (created 0600, its
/// directory 0711 as `StateDir::create` makes the state dir).
fn open_cleanup_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .ok();
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The detached cleanup after a dead shim: stops the VM (the VMM wipes
/// guest memory), scrubs and deletes the scratch disk, removes the state
/// dir, with the config at `config_path` (as Create had it: its
/// `state_dir` is where the sandbox is).
///
/// It logs to its stderr, which [`spawn_cleanup`] points at
/// `<state_dir>/shim-cleanup.log` ([`CLEANUP_LOG`]): what was wiped and
/// scrubbed, and any error, with the sandbox id, for an operator to find
/// after containerd has removed the bundle.
pub async fn cleanup(id: &str, config_path: Option<&Path>) -> Result<(), CleanupError> {
    let config = RuntimeConfig::load(config_path)?;
    let id = SandboxId::parse(id)?;
    let state = StateDir::open(&config.state_dir, &id)?;
    let record = state
        .read_record()
        .inspect_err(|e| {
            tracing::warn!("{id}: {e}: its VMM, if one runs, cannot be found to stop it")
        })
        .ok();
    let report = Sandbox::teardown_remains(&config, &state, record.as_ref()).await;
    tracing::info!(
        "{id}: cleaned up after a dead shim: {} MiB of guest memory wiped, {} scratch bytes scrubbed, state {}",
        report.wiped_mib.map_or("no".into(), |m| m.to_string()),
        report.scratch_scrubbed_bytes,
        if report.state_removed { "removed" } else { "NOT removed" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A config whose state_dir (and cgroup parent) is under `dir`.
    fn config_in(dir: &Path) -> PathBuf {
        let path = dir.join("airlock.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{0}/state\"\n[jail]\nenabled = false\ncgroup_parent = \"{0}/cg\"\n",
                dir.display()
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn the_cleanup_log_is_in_the_configs_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let path = cleanup_log_path(Some(&config));
        assert_eq!(path, dir.path().join("state").join(CLEANUP_LOG));
        let mut log = open_cleanup_log(&path).unwrap();
        std::io::Write::write_all(&mut log, b"line\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Appended to, not truncated.
        open_cleanup_log(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "line\n");
        // A config that cannot be loaded: the default state dir's log.
        assert_eq!(
            cleanup_log_path(Some(&dir.path().join("missing.toml"))),
            RuntimeConfig::default().state_dir.join(CLEANUP_LOG)
        );
    }

    #[tokio::test]
    async fn cleanup_finds_the_sandbox_in_the_configs_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let id = SandboxId::generate();
        let state = StateDir::create(&dir.path().join("state"), &id).unwrap();
        // Not in the default state dir.
        let err = cleanup(id.as_str(), Some(&dir.path().join("missing.toml")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
        assert!(state.path().exists());
        cleanup(id.as_str(), Some(&config)).await.unwrap();
        assert!(!state.path().exists());
        let err = cleanup(id.as_str(), Some(&config)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no sandbox {id}: `airlock ls` lists them")
        );
    }
}
