//! A sandbox's lifecycle: create (state dir → image → scratch disk → VMM
//! → agent) → containers and processes → teardown (the VM stops and wipes
//! its memory, the scratch disk is scrubbed and deleted, the state dir
//! removed).

pub mod container;
mod create;
pub mod files;
pub mod io;
pub mod liveness;
mod network;
mod process;
pub mod spec;
mod teardown;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::time::Duration;

use airlock_protocol::agent;
use airlock_protocol::agent_ttrpc::AgentServiceClient;
use airlock_protocol::ttrpc;
use airlock_protocol::ttrpc::context::{self, Context};

pub use self::container::ContainerStats;
pub use self::network::*;
pub use self::process::Process;
pub use self::teardown::{Teardown, TeardownReport};
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
/// Where the guest mounts the scratch disk: files sent into the guest
/// itself (container id "") go below it.
pub const GUEST_SCRATCH_DIR: &str = airlock_protocol::GUEST_SCRATCH_DIR;
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
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("lost the agent while waiting for {0}: {1}; see the sandbox's console.log")]
    AgentLost(String, String),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot {0} the container spec: {1}")]
    SpecFile(&'static str, #[source] std::io::Error),
    #[error("corrupt container spec: {0}")]
    CorruptSpec(#[source] serde_json::Error),
    #[error("{}: {source}", .path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a regular file (directories are not supported)", .0.display())]
    NotAFile(std::path::PathBuf),
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
    #[error("reading stdin: {0}")]
    Input(#[source] std::io::Error),
    #[error("output task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
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
    /// The network (`--net`) and its egress policy.
    pub net: crate::net::NetOptions,
}

impl SandboxOptions {
    /// The config's defaults and its default image.
    pub fn from_config(config: &RuntimeConfig) -> Self {
        Self {
            image: ImageRef::Named(config.default_image.clone()),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            ephemeral: false,
            // A config whose [network] policy fails to parse does not
            // load (RuntimeConfig::validate).
            net: crate::net::NetOptions::from_settings(&config.network).unwrap_or_default(),
        }
    }
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

    /// Creates the sandbox's container from `spec` on the workload image.
    pub async fn create_container(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), SandboxError> {
        let json = serde_json::to_vec(spec)?;
        std::fs::write(self.state.path().join("config.json"), &json)
            .map_err(|e| SandboxError::SpecFile("save", e))?;
        let rootfs = container::GuestRootfs::image();
        self.create_container_on(CONTAINER_ID, spec, &rootfs)
            .await?;
        self.start_container(CONTAINER_ID).await
    }

    /// The container's spec, as saved by [`Sandbox::create_container`].
    pub fn container_spec(&self) -> Result<oci_spec::runtime::Spec, SandboxError> {
        let bytes = std::fs::read(self.state.path().join("config.json"))
            .map_err(|e| SandboxError::SpecFile("read", e))?;
        serde_json::from_slice(&bytes).map_err(SandboxError::CorruptSpec)
    }

    /// Starts `process` in the container as `exec_id`.
    pub async fn exec(
        &self,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<Process, SandboxError> {
        self.exec_in(CONTAINER_ID, exec_id, process).await
    }

    /// The handle of process `exec_id` ("" for its init) of container
    /// `container`, whether or not it runs (its calls say so).
    pub fn process(&self, container: &str, exec_id: &str) -> Process {
        Process::new(self.agent.clone(), container, exec_id)
    }

    /// Calls the agent: `request` runs on the generated client, a failure
    /// becomes [`SandboxError::Agent`] naming `name`.
    pub(crate) async fn call<'a, T, F, Fut>(
        &'a self,
        name: &'static str,
        request: F,
    ) -> Result<T, SandboxError>
    where
        F: FnOnce(&'a AgentServiceClient) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        call(&self.agent, name, request).await
    }
}

/// Calls the agent behind `agent`: `request` runs on the generated client,
/// a failure becomes [`SandboxError::Agent`] naming `name`. The one place
/// where the crate's agent calls meet ttrpc's errors.
pub(crate) async fn call<'a, T, F, Fut>(
    agent: &'a AgentClient,
    name: &'static str,
    request: F,
) -> Result<T, SandboxError>
where
    F: FnOnce(&'a AgentServiceClient) -> Fut,
    Fut: std::future::Future<Output = ttrpc::Result<T>>,
{
    agent.call(request).await.map_err(agent_err(name))
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

#[cfg(test)]
mod tests;
