//! Tearing a sandbox down: the VM stops and wipes its memory, the scratch
//! disk is scrubbed and deleted, the state dir removed. One way in,
//! [`Sandbox::teardown`], whose [`Teardown`] says how the guest is let go;
//! [`Sandbox::teardown_remains`] does the same for a sandbox whose agent
//! cannot be reached.

use std::time::Duration;

use airlock_protocol::agent;
use airlock_protocol::ttrpc::context;

use super::Sandbox;
use crate::config::RuntimeConfig;
use crate::state::{SandboxRecord, StateDir};
use crate::{scratch, vmm};

/// How long the agent's `DestroySandbox` may take before the VMM is
/// stopped all the same.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);

/// How [`Sandbox::teardown`] lets the guest go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// The agent's `DestroySandbox` first (best effort), then the VMM stops.
    Graceful,
    /// At once, without a clean guest shutdown (e.g. after a timeout, or
    /// with a command still running).
    Kill,
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

impl Sandbox {
    /// Stops the VM (memory wiped by the VMM), scrubs and deletes the
    /// scratch disk and removes the state dir; `how` says whether the
    /// agent is asked to shut the guest down first. Through a shared
    /// reference: the containerd shim's tasks may still hold the sandbox.
    pub async fn teardown(&self, how: Teardown) -> TeardownReport {
        if how == Teardown::Graceful {
            self.destroy_in_guest().await;
        }
        teardown_state(&self.config, &self.state, Some(&self.record)).await
    }

    /// Tears down whatever is in `state` when no [`Sandbox`] can be had
    /// (its agent is unreachable): the VMM of `record` (else of the record
    /// in `state`), if it still runs, the scratch disk and the state dir.
    pub async fn teardown_remains(
        config: &RuntimeConfig,
        state: &StateDir,
        record: Option<&SandboxRecord>,
    ) -> TeardownReport {
        teardown_state(config, state, record).await
    }

    /// The agent's `DestroySandbox`, best effort: a dead or hostile agent
    /// must not stop the teardown.
    async fn destroy_in_guest(&self) {
        let req = agent::DestroySandboxRequest {
            sandbox_id: self.id.to_string(),
            ..Default::default()
        };
        let nanos = i64::try_from(DESTROY_TIMEOUT.as_nanos()).unwrap_or(i64::MAX);
        let destroyed = tokio::time::timeout(
            DESTROY_TIMEOUT,
            self.call("DestroySandbox", |c| {
                c.destroy_sandbox(context::with_timeout(nanos), &req)
            }),
        )
        .await;
        if !matches!(destroyed, Ok(Ok(_))) {
            tracing::debug!(id = %self.id, "DestroySandbox failed; stopping the VMM with SIGTERM");
        }
    }
}

/// Tears down whatever is in `state`: the VMM of `record` (else of the
/// record in `state`), if it still runs, the scratch disk and the state
/// dir. Used for sandboxes whose agent is unreachable too.
///
/// The VMM gets [`Timeouts::stop_grace`](crate::config::Timeouts::stop_grace)
/// for its guest's memory to stop and wipe before it is killed.
pub(super) async fn teardown_state(
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
        let dir = state.path().to_path_buf();
        let stop = tokio::task::spawn_blocking(move || vmm::stop(&record, grace, &dir)).await;
        match stop {
            Ok(Ok(stop)) => {
                if let Some((wiped, guest)) = stop.wipe {
                    report.wiped_mib = Some(wiped);
                    report.guest_mib = Some(guest);
                }
            }
            Ok(Err(e)) => tracing::warn!("stopping the VMM of {}: {e}", state.id()),
            Err(e) => tracing::warn!("stopping the VMM of {}: {e}", state.id()),
        }
    }
    // After the VMM (which holds the tap): the filter, the namespace with
    // its tap, veth and rules, the host's table, the address slot.
    crate::net::teardown(&config.state_dir, state.path());
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
        if let Some((wiped, guest)) = vmm::wiped(state.path()) {
            report.wiped_mib = Some(wiped);
            report.guest_mib = Some(guest);
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
        None if pid.is_none() || !vmm::ran(state.path()) => {}
        None => tracing::warn!(id = %state.id(), "the VMM reported no memory wipe"),
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
