//! The Airlock agent API: protobuf messages and async ttrpc client/server
//! generated from `protos/agent.proto`.
//!
//! This crate is the only thing shared between the guest agent
//! (`airlock-agent`) and the host runtime. The agent serves
//! [`agent_ttrpc::AgentService`] on vsock port [`AGENT_VSOCK_PORT`]; the
//! runtime talks to it with [`agent_ttrpc::AgentServiceClient`].
//!
//! The first call on every connection is `Check`, which exchanges
//! [`PROTOCOL_VERSION`]s; both sides use [`check_compatible`] on the
//! other's version and stop with its error on a mismatch.
//!
//! ```
//! use airlock_protocol::{agent, check_compatible, PROTOCOL_VERSION};
//!
//! // Runtime side: build the request.
//! let req = agent::CheckRequest {
//!     protocol_version: PROTOCOL_VERSION,
//!     ..Default::default()
//! };
//! # let resp = agent::CheckResponse {
//! #     protocol_version: req.protocol_version,
//! #     agent_version: "0.1.0".into(),
//! #     ..Default::default()
//! # };
//! // ... `client.check(ctx, &req).await?` returns `resp` ...
//! check_compatible(resp.protocol_version).expect("same protocol version");
//!
//! let err = check_compatible(PROTOCOL_VERSION + 1).unwrap_err();
//! assert!(err.to_string().contains("upgrade the guest image or the runtime"));
//! ```

include!(concat!(env!("OUT_DIR"), "/generated_mods.rs"));

mod exec_failure;

pub use exec_failure::{exec_failure, exec_failure_status, EXEC_FAILURE_TYPE_URL};
pub use protobuf;
pub use ttrpc;

/// Version of the agent API spoken by this build. Bump it on any change to
/// `agent.proto` that is not wire compatible, or that changes what a call
/// means. (Version 1 gained the [`exec_failure`] details without a bump:
/// an old peer ignores them; a new runtime facing an old agent reports such
/// a failure as a plain one.) Version 2: `ConfigureNetwork`, and containers
/// share the VM's network namespace and get its `resolv.conf` and `hosts`
/// (a version-1 agent gave a container that asked for a network namespace
/// an empty one).
pub const PROTOCOL_VERSION: u32 = 2;

/// Version of `ConfigureNetworkRequest`'s contents; the agent refuses a
/// request with any other. Bump it when the meaning of its fields changes.
pub const NETWORK_CONFIG_VERSION: u32 = 1;

/// Guest vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Where the agent mounts the scratch disk in the guest. A container that
/// joins a running VM sends its rootfs as a tar archive there (file API),
/// named in `Rootfs { fstype: "tar" }`.
pub const GUEST_SCRATCH_DIR: &str = "/run/airlock-agent/scratch";

/// The peer speaks a different protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent speaks protocol version {theirs}, this runtime speaks {ours}: \
     upgrade the guest image or the runtime"
)]
pub struct VersionError {
    /// The peer's protocol version.
    pub theirs: u32,
    /// This build's protocol version ([`PROTOCOL_VERSION`]).
    pub ours: u32,
}

/// Checks the peer's protocol version (from `Check`) against
/// [`PROTOCOL_VERSION`].
///
/// # Errors
/// [`VersionError`] when they differ.
pub fn check_compatible(theirs: u32) -> Result<(), VersionError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(VersionError {
            theirs,
            ours: PROTOCOL_VERSION,
        })
    }
}

#[cfg(test)]
mod tests;
