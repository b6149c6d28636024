//! A process in a sandbox's container, by name: what can be done to it
//! once it was started (its stdio in `io.rs`). A handle owns a clone of
//! the agent connection, so tasks may hold it as long as they like.

use airlock_protocol::agent;

use super::io::ProcessExit;
use super::{call, ctx, no_timeout, SandboxError};
use crate::agent_client::AgentClient;

/// Process `exec_id` ("" for the init process) of container `container`.
#[derive(Clone)]
pub struct Process {
    pub(super) agent: AgentClient,
    container: String,
    exec_id: String,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("container", &self.container)
            .field("exec_id", &self.exec_id)
            .finish_non_exhaustive()
    }
}

impl Process {
    pub(super) fn new(agent: AgentClient, container: &str, exec_id: &str) -> Self {
        Self {
            agent,
            container: container.into(),
            exec_id: exec_id.into(),
        }
    }

    /// Its container.
    pub fn container(&self) -> &str {
        &self.container
    }

    /// Its exec id ("" for the container's init process).
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Waits until it exits; ends early with [`SandboxError::AgentLost`]
    /// once the agent stops answering.
    pub async fn wait(&self) -> Result<ProcessExit, SandboxError> {
        let req = agent::WaitProcessRequest {
            container_id: self.container.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        // No deadline (the process may run for days), but not past the agent.
        let what = format!(
            "process {:?} of container {} to exit",
            self.exec_id, self.container
        );
        let waited = call(&self.agent, "WaitProcess", |c| {
            c.wait_process(no_timeout(), &req)
        });
        let resp = super::liveness::while_agent_answers(&self.agent, &what, waited).await?;
        Ok(ProcessExit {
            status: resp.exit_status,
            signal: resp.signal,
            oom_killed: resp.oom_killed,
        })
    }

    /// Sends it `signal`, or with `all` to every process of its container.
    pub async fn signal(&self, signal: u32, all: bool) -> Result<(), SandboxError> {
        let req = agent::SignalProcessRequest {
            container_id: self.container.clone(),
            exec_id: self.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        call(&self.agent, "SignalProcess", |c| {
            c.signal_process(ctx(), &req)
        })
        .await?;
        Ok(())
    }

    /// Sets its terminal's size.
    pub async fn resize(&self, rows: u32, columns: u32) -> Result<(), SandboxError> {
        let req = agent::TtyWinResizeRequest {
            container_id: self.container.clone(),
            exec_id: self.exec_id.clone(),
            rows,
            columns,
            ..Default::default()
        };
        call(&self.agent, "TtyWinResize", |c| {
            c.tty_win_resize(ctx(), &req)
        })
        .await?;
        Ok(())
    }

    /// Closes its stdin.
    pub async fn close_stdin(&self) -> Result<(), SandboxError> {
        let req = agent::CloseStdinRequest {
            container_id: self.container.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        call(&self.agent, "CloseStdin", |c| c.close_stdin(ctx(), &req)).await?;
        Ok(())
    }
}
