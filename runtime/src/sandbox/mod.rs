//! A sandbox's lifecycle: create (state dir → image → scratch disk → VMM
//! → agent) → containers and processes → teardown (the VM stops and wipes
//! its memory, the scratch disk is scrubbed and deleted, the state dir
//! removed).

pub mod container;
pub mod files;
pub mod io;
pub mod liveness;
pub mod spec;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_protocol::agent;
use airlock_protocol::ttrpc::context::{self, Context};

use crate::agent_client::{self, AgentClient};
use crate::config::RuntimeConfig;
use crate::image::{self, ImageRef};
use crate::state::{SandboxId, SandboxRecord, StateDir};
use crate::{scratch, vmm};

/// The container of a sandbox (one per sandbox).
pub const CONTAINER_ID: &str = "main";
/// Guest device of the workload image (first drive).
pub const IMAGE_DEVICE: &str = "/dev/vda";
/// Guest device of the scratch disk (second drive).
pub const SCRATCH_DEVICE: &str = "/dev/vdb";
/// Deadline of short agent calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the sandbox lifecycle; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot size the microVM: {0}")]
    Size(#[source] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Scratch(#[from] scratch::ScratchError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Connect(#[from] agent_client::ConnectError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("the agent refused {0}: {1}")]
    Agent(&'static str, String),
    /// The agent could not start the program; `failure` says why.
    #[error("the agent refused {call}: {message}")]
    CannotRun {
        call: &'static str,
        failure: agent::ExecFailure,
        message: String,
    },
    /// lost the agent while waiting for {0}: {1}; see the sandbox's console.log
    #[error("lost the agent while waiting for {0}: {1}; see the sandbox's console.log")]
    AgentLost(String, String),
    #[error("{0}")]
    Io(String),
}

impl SandboxError {
    /// The agent's own message, when the agent refused a call.
    pub fn agent_message(&self) -> Option<&str> {
        match self {
            SandboxError::Agent(_, msg) | SandboxError::CannotRun { message: msg, .. } => Some(msg),
            _ => None,
        }
    }

    /// Why the agent could not start the program, when that is the error.
    pub fn exec_failure(&self) -> Option<&agent::ExecFailure> {
        match self {
            SandboxError::CannotRun { failure, .. } => Some(failure),
            _ => None,
        }
    }
}

/// Turns a ttrpc error into [`SandboxError::Agent`] with the status
/// message alone (not ttrpc's debug dump).
pub(crate) fn agent_err(
    call: &'static str,
) -> impl FnOnce(airlock_protocol::ttrpc::Error) -> SandboxError {
    move |e| match e {
        airlock_protocol::ttrpc::Error::RpcStatus(s) => match airlock_protocol::exec_failure(&s) {
            Some(failure) => SandboxError::CannotRun {
                call,
                failure,
                message: s.message().to_string(),
            },
            None => SandboxError::Agent(call, s.message().to_string()),
        },
        other => SandboxError::Agent(call, other.to_string()),
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub image: ImageRef,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The VM stops if this process dies (`airlock run`), rather than
    /// living on for later commands (`airlock create`).
    pub ephemeral: bool,
}

impl SandboxOptions {
    /// The config's defaults and its default image.
    pub fn from_config(config: &RuntimeConfig) -> Self {
        Self {
            image: ImageRef::Named(config.default_image.clone()),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            ephemeral: false,
        }
    }
}

/// What teardown did, for the user and the logs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TeardownReport {
    pub id: String,
    /// Guest memory the VMM overwrote before unmapping it (MiB), from its log.
    pub wiped_mib: Option<u64>,
    pub guest_mib: Option<u64>,
    /// Scratch-disk bytes overwritten before the file was deleted.
    pub scratch_scrubbed_bytes: u64,
    /// The state dir is gone.
    pub state_removed: bool,
}

/// A running sandbox and a connection to its agent.
pub struct Sandbox {
    pub id: SandboxId,
    pub state: StateDir,
    pub record: SandboxRecord,
    pub agent: AgentClient,
    /// The image's process defaults (only known to the creator).
    pub image_config: Option<image::ImageConfig>,
    config: RuntimeConfig,
}

impl Sandbox {
    /// Boots a new sandbox. On failure everything it made is torn down.
    pub async fn create(
        config: &RuntimeConfig,
        opts: &SandboxOptions,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Self, SandboxError> {
        // Whoever asked for the size (pod annotations, the pod's limits,
        // --cpus/--memory), it stays within the config's [limits].
        config
            .check_vm_size(u64::from(opts.vcpus), u64::from(opts.memory_mib))
            .map_err(SandboxError::Size)?;
        // SAFETY: geteuid has no preconditions.
        if config.jail.enabled && unsafe { libc::geteuid() } != 0 {
            return Err(vmm::VmmError::from(crate::jail::JailError::NotRoot).into());
        }
        config.check_artifacts()?;
        let vmm_binary = config.vmm_binary_path()?;
        let resolved = image::resolve(&opts.image, config, progress)?;
        let id = SandboxId::generate();
        let state = StateDir::create(&config.state_dir, &id)?;
        // The started VMM, for the teardown after a failure (its record may
        // not have been written).
        let mut started: Option<SandboxRecord> = None;
        let result = async {
            scratch::check_memory_backed(state.path())?;
            scratch::create(&state.scratch_path(), config.scratch_mib)?;
            let guest_cid = random_cid();
            let jail = match config.jail.enabled {
                true => {
                    let mut jail = crate::jail::JailSpec::new(
                        &config.jail,
                        id.as_str(),
                        &state.jail_root(),
                        opts.memory_mib,
                        config.scratch_mib,
                    );
                    (jail.uid, jail.gid) =
                        crate::jail::reserve_uid(&config.jail, &config.state_dir, id.as_str())
                            .map_err(vmm::VmmError::from)?;
                    Some(jail)
                }
                false => None,
            };
            let spec = vmm::VmmSpec {
                kernel: config.kernel.clone(),
                initrd: config.initrd.clone(),
                vcpus: opts.vcpus,
                memory_mib: opts.memory_mib,
                vsock_uds: state.vsock_uds(),
                guest_cid,
                drives: vec![
                    vmm::Drive {
                        path: resolved.path.clone(),
                        read_only: true,
                        id: "image".into(),
                    },
                    vmm::Drive {
                        path: state.scratch_path(),
                        read_only: false,
                        id: "scratch".into(),
                    },
                ],
                log_path: state.log_path(),
                console_path: Some(state.console_path()),
                extra_args: vec![],
                die_with_parent: opts.ephemeral,
                jail,
                stop_grace_secs: config.timeouts.teardown_secs,
            };
            if !config.jail.enabled {
                tracing::warn!(id = %id, "[jail] enabled = false: the VMM runs unjailed, with its seccomp filters only");
            }
            progress("booting the microVM");
            let process = vmm::VmmProcess::spawn(&vmm_binary, &spec)?;
            let record = SandboxRecord {
                id: id.to_string(),
                vmm_pid: process.pid(),
                vmm_start_time: Some(process.start_time()),
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                image: resolved.name.clone(),
                vcpus: opts.vcpus,
                memory_mib: opts.memory_mib,
                guest_cid,
            };
            started = Some(record.clone());
            state.write_record(&record)?;
            let deadline = Duration::from_secs(config.timeouts.agent_connect_secs);
            let pid = record.vmm_pid;
            let alive = move || !vmm::exited(pid);
            let agent = agent_client::connect_when_ready(
                &state.vsock_uds(),
                &state.log_path(),
                deadline,
                alive,
            )
            .await?;
            let sandbox = Sandbox {
                id: id.clone(),
                state: state.clone(),
                record,
                agent,
                image_config: resolved.config.clone(),
                config: config.clone(),
            };
            sandbox.setup().await?;
            Ok::<_, SandboxError>((sandbox, resolved))
        }
        .await;
        match result {
            Ok((sandbox, _)) => Ok(sandbox),
            Err(e) => {
                tracing::debug!(id = %id, "sandbox creation failed; tearing down: {e}");
                // A VMM that died on its own said why in its log, which the
                // teardown deletes: that line is the error to report.
                let e = match (&e, vmm::error_line(&state.log_path())) {
                    (SandboxError::Connect(agent_client::ConnectError::VmGone), Some(line)) => {
                        vmm::VmmError::Failed(line).into()
                    }
                    _ => e,
                };
                teardown_state(config, &state, started.as_ref()).await;
                Err(e)
            }
        }
    }

    /// Connects to an existing sandbox.
    pub async fn open(config: &RuntimeConfig, id: &SandboxId) -> Result<Self, SandboxError> {
        let state = StateDir::open(&config.state_dir, id)?;
        let record = state.read_record()?;
        let agent = agent_client::connect(&state.vsock_uds(), Duration::from_secs(5)).await?;
        Ok(Self {
            id: id.clone(),
            state,
            record,
            agent,
            image_config: None,
            config: config.clone(),
        })
    }

    async fn setup(&self) -> Result<(), SandboxError> {
        let req = agent::CreateSandboxRequest {
            sandbox_id: self.id.to_string(),
            hostname: self.id.to_string(),
            epoch_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            scratch_device: SCRATCH_DEVICE.into(),
            ..Default::default()
        };
        self.agent
            .raw()
            .create_sandbox(ctx(), &req)
            .await
            .map_err(agent_err("CreateSandbox"))?;
        Ok(())
    }

    /// Creates the sandbox's container from `spec` on the workload image.
    pub async fn create_container(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), SandboxError> {
        let json = serde_json::to_vec(spec).map_err(|e| SandboxError::Io(e.to_string()))?;
        std::fs::write(self.state.path().join("config.json"), &json)
            .map_err(|e| SandboxError::Io(format!("cannot save the container spec: {e}")))?;
        let rootfs = container::GuestRootfs {
            source: IMAGE_DEVICE.into(),
            fstype: "ext4".into(),
            read_only: true,
        };
        self.create_container_on(CONTAINER_ID, spec, &rootfs)
            .await?;
        self.start_container(CONTAINER_ID).await
    }

    /// The container's spec, as saved by [`Sandbox::create_container`].
    pub fn container_spec(&self) -> Result<oci_spec::runtime::Spec, SandboxError> {
        let bytes = std::fs::read(self.state.path().join("config.json"))
            .map_err(|e| SandboxError::Io(format!("cannot read the container spec: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SandboxError::Io(format!("corrupt container spec: {e}")))
    }

    /// Starts `process` in the container as `exec_id`.
    pub async fn exec(
        &self,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<(), SandboxError> {
        self.exec_in(CONTAINER_ID, exec_id, process).await
    }

    /// Stops the VM (memory wiped by the VMM), scrubs and deletes the
    /// scratch disk and removes the state dir.
    pub async fn teardown(self) -> TeardownReport {
        self.shutdown().await
    }

    /// [`Sandbox::teardown`] through a shared reference (the containerd
    /// shim's tasks may still hold the sandbox).
    pub async fn shutdown(&self) -> TeardownReport {
        let req = agent::DestroySandboxRequest {
            sandbox_id: self.id.to_string(),
            ..Default::default()
        };
        // Best effort: a dead or hostile agent must not stop the teardown.
        let destroyed = tokio::time::timeout(
            Duration::from_secs(5),
            self.agent
                .raw()
                .destroy_sandbox(context::with_timeout(5_000_000_000), &req),
        )
        .await;
        if !matches!(destroyed, Ok(Ok(_))) {
            tracing::debug!(id = %self.id, "DestroySandbox failed; stopping the VMM with SIGTERM");
        }
        teardown_state(&self.config, &self.state, Some(&self.record)).await
    }
}

impl Sandbox {
    /// Tears down at once, without a clean guest shutdown (e.g. after a
    /// timeout): the VMM is stopped (and wipes), the rest as in teardown.
    pub async fn kill(self) -> TeardownReport {
        drop(self.agent);
        teardown_state(&self.config, &self.state, Some(&self.record)).await
    }
}

/// Tears down whatever is in `state`: the VMM of `record` (else of the
/// record in `state`), if it still runs, the scratch disk and the state
/// dir. Used for sandboxes whose agent is unreachable too.
///
/// The VMM gets [`Timeouts::stop_grace`](crate::config::Timeouts::stop_grace)
/// for its guest's memory to stop and wipe before it is killed.
pub async fn teardown_state(
    config: &RuntimeConfig,
    state: &StateDir,
    record: Option<&SandboxRecord>,
) -> TeardownReport {
    let mut report = TeardownReport {
        id: state.id().to_string(),
        ..Default::default()
    };
    let record = record.cloned().or_else(|| state.read_record().ok());
    let pid = record.as_ref().map(|r| r.vmm_pid);
    if let Some(record) = record {
        let grace = config.timeouts.stop_grace(record.memory_mib);
        let log = state.log_path();
        let stop = tokio::task::spawn_blocking(move || vmm::stop(&record, grace, &log)).await;
        match stop {
            Ok(Ok(stop)) => {
                if let Some(w) = stop.wipe {
                    report.wiped_mib = Some(w.wiped_mib);
                    report.guest_mib = Some(w.guest_mib);
                }
            }
            Ok(Err(e)) => tracing::warn!("stopping the VMM of {}: {e}", state.id()),
            Err(e) => tracing::warn!("stopping the VMM of {}: {e}", state.id()),
        }
    }
    crate::jail::release_uid(&config.state_dir, state.id().as_str());
    let cgroup = crate::jail::cgroup_dir(&config.jail, state.id().as_str());
    if let Err(e) = crate::jail::remove_cgroup(&cgroup) {
        tracing::warn!(
            "removing the cgroup {} of {}: {e}",
            cgroup.display(),
            state.id()
        );
    }
    if report.wiped_mib.is_none() {
        if let Some(w) = vmm::wipe_from_log(&state.log_path()) {
            report.wiped_mib = Some(w.wiped_mib);
            report.guest_mib = Some(w.guest_mib);
        }
    }
    match report.wiped_mib {
        Some(mib) => tracing::info!(
            id = %state.id(),
            wiped_mib = mib,
            guest_mib = report.guest_mib.unwrap_or(0),
            "guest memory wiped"
        ),
        // No VMM ever ran a guest (its setup failed): there was no guest
        // memory to wipe.
        None if pid.is_none() || !vmm::logged_running(&state.log_path()) => {}
        None => tracing::warn!(id = %state.id(), "the VMM logged no memory wipe"),
    }
    let scratch = state.scratch_path();
    if scratch.exists() {
        match scratch::scrub_and_delete(&scratch) {
            Ok(r) => {
                report.scratch_scrubbed_bytes = r.bytes_scrubbed;
                tracing::info!(id = %state.id(), bytes = r.bytes_scrubbed, "scratch disk scrubbed and deleted");
            }
            // Another teardown of the same sandbox (`airlock rm` while its
            // `airlock run` tears down too) scrubbed and deleted it first:
            // only a teardown deletes it, and only after the scrub.
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!("scrubbing the scratch disk of {}: {e}", state.id()),
        }
    }
    match state.remove() {
        Ok(()) => report.state_removed = true,
        Err(e) => tracing::warn!("removing the state dir of {}: {e}", state.id()),
    }
    report
}

/// A fresh guest CID for every sandbox, so that no guest can guess
/// another's: 3 and up are guest CIDs; hybrid vsock keeps each one
/// private to its VM anyway.
fn random_cid() -> u32 {
    let r = u32::from_str_radix(&crate::state::random_hex(4), 16).unwrap_or(0);
    3 + r % (u32::MAX - 16)
}

/// A context for short calls.
pub(crate) fn ctx() -> Context {
    context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// A context for calls that block as long as the process runs.
pub(crate) fn no_timeout() -> Context {
    context::with_timeout(0)
}
