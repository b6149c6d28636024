//! Waiting on the agent for as long as a process runs, but never on an
//! agent that is gone. Calls such as `WaitProcess` have no deadline (a
//! process may run for days); a VMM that dies closes the vsock connection,
//! which ends them, but a guest that hangs with its VMM alive would leave
//! them waiting forever. So while such a call is pending, the agent is
//! asked `Check` every [`CHECK_EVERY`]; when one gets no answer within
//! [`SILENCE_LIMIT`], or the connection fails, the wait ends with
//! [`SandboxError::AgentLost`] naming what was waited for.

use std::future::Future;
use std::time::Duration;

use airlock_protocol::agent::CheckRequest;
use airlock_protocol::ttrpc::context;
use airlock_protocol::PROTOCOL_VERSION;

use super::SandboxError;
use crate::agent_client::AgentClient;

/// Pause between two liveness checks.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How long the agent has to answer one. Twice what short calls get: a
/// guest whose one vCPU shares a busy host, or that is reclaiming memory
/// for the OOM killer, is slow, not gone.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `call` (a pending call to the agent behind `client`) to its end,
/// or until the agent stops answering; `what` names what was waited for.
pub async fn while_agent_answers<T>(
    client: &AgentClient,
    what: &str,
    call: impl Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    while_answering(client, what, CHECK_EVERY, SILENCE_LIMIT, call).await
}

/// [`while_agent_answers`] with its timings.
async fn while_answering<T>(
    client: &AgentClient,
    what: &str,
    every: Duration,
    limit: Duration,
    call: impl Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    tokio::select! {
        // The call's own end wins over a check that fails at the same time.
        biased;
        r = call => r,
        why = lost(client, every, limit) => Err(SandboxError::AgentLost(what.to_string(), why)),
    }
}

/// Checks the agent every `every` until it fails to answer within
/// `limit`; returns why.
async fn lost(client: &AgentClient, every: Duration, limit: Duration) -> String {
    let req = CheckRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let nanos = i64::try_from(limit.as_nanos()).unwrap_or(i64::MAX);
    loop {
        tokio::time::sleep(every).await;
        // ttrpc's own timeout only starts once the request is queued: the
        // outer one bounds the queueing too.
        let checked = tokio::time::timeout(
            limit,
            client.call(|c| c.check(context::with_timeout(nanos), &req)),
        )
        .await;
        match checked {
            Ok(Ok(_)) => {}
            // The agent answered, if with an error: it is there.
            Ok(Err(airlock_protocol::ttrpc::Error::RpcStatus(_))) => {}
            Ok(Err(airlock_protocol::ttrpc::Error::Others(e))) if e.contains("timeout") => {
                return format!("the agent answered no Check within {limit:?}")
            }
            Ok(Err(e)) => return format!("the connection to the agent failed ({e})"),
            Err(_) => return format!("the agent answered no Check within {limit:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::sandbox::testing::FakeAgent;

    const EVERY: Duration = Duration::from_millis(20);
    const LIMIT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_call_runs_to_its_end_while_the_agent_answers() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeAgent::start(dir.path()).await;
        let client = fake.connect().await.unwrap();
        // Many checks pass while the call waits.
        let call = async {
            tokio::time::sleep(LIMIT * 3).await;
            Ok::<_, SandboxError>(7)
        };
        let r = while_answering(&client, "a test", EVERY, LIMIT, call).await;
        assert_eq!(r.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_silent_agent_ends_the_wait_naming_what_was_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeAgent::start(dir.path()).await;
        let client = fake.connect().await.unwrap();
        fake.go_silent();
        let started = Instant::now();
        let call = std::future::pending::<Result<(), SandboxError>>();
        let waited = while_answering(&client, "process \"x\" to exit", EVERY, LIMIT, call);
        let err = tokio::time::timeout(Duration::from_secs(10), waited)
            .await
            .expect("still waiting on a silent agent after 10 s")
            .unwrap_err();
        assert!(started.elapsed() >= LIMIT);
        assert_eq!(
            err.to_string(),
            "lost the agent while waiting for process \"x\" to exit: the agent answered no \
             Check within 300ms; see the sandbox's console.log"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeAgent::start(dir.path()).await;
        let client = fake.connect().await.unwrap();
        // The VMM's end of the vsock socket, closed as when it dies.
        fake.cut();
        let started = Instant::now();
        let call = std::future::pending::<Result<(), SandboxError>>();
        let waited = while_answering(&client, "output", EVERY, Duration::from_secs(30), call);
        let err = tokio::time::timeout(Duration::from_secs(10), waited)
            .await
            .expect("still waiting on a closed connection after 10 s")
            .unwrap_err();
        // Well before the 30 s limit: a closed connection fails at once.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            err.to_string()
                .starts_with("lost the agent while waiting for output: "),
            "{err}"
        );
    }
}
