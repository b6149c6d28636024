//! Connecting to a sandbox's guest agent: Firecracker's hybrid vsock
//! handshake on the VMM's Unix socket (`CONNECT 1024\n` → `OK <port>\n`),
//! retried until the agent listens, then ttrpc and the version check.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_protocol::agent::CheckRequest;
use airlock_protocol::agent_ttrpc::AgentServiceClient;
use airlock_protocol::ttrpc;
use airlock_protocol::ttrpc::context;
use airlock_protocol::ttrpc::r#async::transport::Socket;
use airlock_protocol::ttrpc::r#async::Client;
use airlock_protocol::{check_compatible, VersionError, AGENT_VSOCK_PORT, PROTOCOL_VERSION};
use airlock_vmm_api::EventLog;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Pause between attempts once the agent should be listening.
const RETRY: Duration = Duration::from_millis(10);
/// How often the VMM's events are checked for the agent's readiness where
/// inotify is not available.
const READY_POLL: Duration = Duration::from_millis(20);
/// Attempts while the events say nothing yet are this far apart.
const FALLBACK_RETRY: Duration = Duration::from_millis(250);
/// Longest a handshake line may be.
const LINE_MAX: usize = 64;
/// Longest one handshake attempt may take: a VMM that accepted the
/// connection answers `OK` or hangs up once the guest answers or its own
/// connect timeout passes; one that says nothing at all is stuck.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the agent did not answer on vsock port {AGENT_VSOCK_PORT} within {1:?} (socket {0}): see the sandbox's console.log")]
    Timeout(PathBuf, Duration),
    #[error("the VM stopped before its agent answered: see the sandbox's vmm.log and console.log")]
    VmGone,
    #[error("the VMM answered the vsock handshake with {0:?}")]
    Handshake(String),
    /// the VMM accepted the vsock connection on {0} but answered nothing to CONNECT within {1:?}
    #[error(
        "the VMM accepted the vsock connection on {0} but answered nothing to CONNECT within {1:?}"
    )]
    HandshakeTimeout(PathBuf, Duration),
    #[error("the agent's version check failed: {0}")]
    Check(String),
    /// {0}
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// A connection to an agent that passed the version check. Clones share
/// the connection.
#[derive(Clone)]
pub struct AgentClient {
    client: AgentServiceClient,
    agent_version: String,
}

impl AgentClient {
    /// The generated ttrpc client.
    fn raw(&self) -> &AgentServiceClient {
        &self.client
    }

    /// Runs `call` on the generated ttrpc client: the crate's one way to
    /// it (the sandbox's `call` helper wraps it with error mapping).
    pub(crate) async fn call<'a, T, F, Fut>(&'a self, call: F) -> ttrpc::Result<T>
    where
        F: FnOnce(&'a AgentServiceClient) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        call(self.raw()).await
    }

    /// The agent's crate version.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }
}

/// Connects within `deadline`.
pub async fn connect(uds: &Path, deadline: Duration) -> Result<AgentClient, ConnectError> {
    connect_while(uds, deadline, || true).await
}

/// Connects within `deadline`, giving up early once `alive` says the VM
/// is gone.
pub async fn connect_while(
    uds: &Path,
    deadline: Duration,
    alive: impl Fn() -> bool,
) -> Result<AgentClient, ConnectError> {
    let until = Instant::now() + deadline;
    let stream = loop {
        match attempt(uds, HANDSHAKE_TIMEOUT).await {
            Ok(Some(stream)) => break stream,
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        if !alive() {
            return Err(ConnectError::VmGone);
        }
        if Instant::now() >= until {
            return Err(ConnectError::Timeout(uds.to_path_buf(), deadline));
        }
        tokio::time::sleep(RETRY).await;
    };
    check(stream).await
}

/// Connects within `deadline` once the VMM's event file at `events` says
/// the agent listens (`AgentReady`, from its boot timer), giving up early
/// once `alive` says the VM is gone. Until then the guest is left alone: an attempt before the agent
/// listens costs the booting guest a vsock round trip (request, reset) on
/// its one vCPU. An attempt every 250 ms covers an agent that never writes
/// to the boot timer.
pub async fn connect_when_ready(
    uds: &Path,
    events: &Path,
    deadline: Duration,
    alive: impl Fn() -> bool,
) -> Result<AgentClient, ConnectError> {
    let until = Instant::now() + deadline;
    let mut watch = EventLog::new(events);
    let waker = FileWaker::new(events);
    let mut last_try = Instant::now();
    let mut first = true;
    let stream = loop {
        watch.refresh();
        let ready = watch.agent_ready();
        if ready || first || last_try.elapsed() >= FALLBACK_RETRY {
            first = false;
            last_try = Instant::now();
            if ready {
                tracing::debug!("agent ready (VMM event): connecting");
            }
            if let Some(stream) = attempt(uds, HANDSHAKE_TIMEOUT).await? {
                tracing::debug!("vsock handshake done: checking the agent's version");
                break stream;
            }
        }
        if !alive() {
            return Err(ConnectError::VmGone);
        }
        if Instant::now() >= until {
            return Err(ConnectError::Timeout(uds.to_path_buf(), deadline));
        }
        if ready {
            tokio::time::sleep(RETRY).await;
        } else {
            waker
                .wait(FALLBACK_RETRY.saturating_sub(last_try.elapsed()))
                .await;
        }
    };
    check(stream).await
}

/// Wakes when the VMM writes to its event file: inotify, so that waiting
/// for the agent costs the host nothing while the guest boots. (Polling
/// every few milliseconds took CPU time from the vCPU thread on a one-CPU
/// host.) Without inotify it sleeps in short steps instead.
struct FileWaker {
    fd: Option<AsyncFd<InotifyFd>>,
}

/// An inotify instance as tokio's `AsyncFd` wants it (`AsRawFd`).
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FileWaker {
    fn new(file: &Path) -> Self {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .ok()
            .and_then(|i| {
                i.add_watch(file, AddWatchFlags::IN_MODIFY).ok()?;
                // SAFETY: the inotify fd stays open until the AsyncFd drops
                // `InotifyFd`, and `as_raw_fd` always returns that same fd.
                unsafe {
                    AsyncFd::register_with_interest(InotifyFd(i), tokio::io::Interest::READABLE)
                }
                .ok()
            });
        FileWaker { fd }
    }

    /// Returns after a write to the file, or after `limit`.
    async fn wait(&self, limit: Duration) {
        let Some(fd) = &self.fd else {
            return tokio::time::sleep(limit.min(READY_POLL)).await;
        };
        if let Ok(Ok(mut guard)) = tokio::time::timeout(limit, fd.readable()).await {
            // Drain the events (EAGAIN once empty) before waiting again.
            let _ = guard.get_inner().0.read_events();
            guard.clear_ready();
        }
    }
}

/// ttrpc over `stream` and the version check.
pub(crate) async fn check(stream: UnixStream) -> Result<AgentClient, ConnectError> {
    let client = AgentServiceClient::new(Client::new(Socket::new(stream)));
    let req = CheckRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let resp = client
        .check(
            context::with_timeout(Duration::from_secs(10).as_nanos() as i64),
            &req,
        )
        .await
        .map_err(|e| ConnectError::Check(e.to_string()))?;
    check_compatible(resp.protocol_version)?;
    tracing::debug!(agent = %resp.agent_version, "the agent answered Check");
    Ok(AgentClient {
        client,
        agent_version: resp.agent_version,
    })
}

/// One handshake within `limit`: `None` when the agent is not there yet.
async fn attempt(uds: &Path, limit: Duration) -> Result<Option<UnixStream>, ConnectError> {
    tokio::time::timeout(limit, handshake(uds))
        .await
        .map_err(|_| ConnectError::HandshakeTimeout(uds.to_path_buf(), limit))?
}

/// One attempt: `None` when the agent is not there yet.
async fn handshake(uds: &Path) -> Result<Option<UnixStream>, ConnectError> {
    let Ok(mut stream) = UnixStream::connect(uds).await else {
        return Ok(None);
    };
    if stream
        .write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
        .await
        .is_err()
    {
        return Ok(None);
    }
    // Byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if line.len() < LINE_MAX => line.push(byte[0]),
            Ok(1) => {
                return Err(ConnectError::Handshake(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
            // The guest refused (nobody listening yet): the VMM hung up.
            _ => return Ok(None),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if line.starts_with("OK ") {
        Ok(Some(stream))
    } else {
        Err(ConnectError::Handshake(line))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::UnixListener;

    use super::*;
    use crate::sandbox::testing::FakeAgent;

    /// A stand-in for the VMM's hybrid vsock: the first `refuse`
    /// connections are hung up on (no listener in the guest yet), later
    /// ones get `OK` and are spliced to a real ttrpc server.
    async fn fake_vmm(dir: &Path, refuse: usize, version: u32) -> PathBuf {
        fake_vmm_counting(dir, refuse, version).await.0
    }

    /// [`fake_vmm`], with the number of `CONNECT`s it got.
    async fn fake_vmm_counting(
        dir: &Path,
        refuse: usize,
        version: u32,
    ) -> (PathBuf, Arc<std::sync::atomic::AtomicUsize>) {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = count.clone();
        let agent = FakeAgent::start_with_version(dir, version).await;
        let agent_sock = agent.socket().to_path_buf();
        std::mem::forget(agent);
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut host, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 13];
                host.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"CONNECT 1024\n");
                n += 1;
                counter.store(n, std::sync::atomic::Ordering::SeqCst);
                if n <= refuse {
                    continue; // dropped: hung up
                }
                host.write_all(b"OK 1073741824\n").await.unwrap();
                let mut guest = UnixStream::connect(&agent_sock).await.unwrap();
                tokio::spawn(
                    async move { tokio::io::copy_bidirectional(&mut host, &mut guest).await },
                );
            }
        });
        (uds, count)
    }

    #[tokio::test]
    async fn retries_until_the_agent_listens() {
        let dir = tempfile::tempdir().unwrap();
        // Not even the socket exists yet.
        let err = connect(&dir.path().join("vsock.sock"), Duration::from_millis(100))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ConnectError::Timeout(..)), "{err}");
        let uds = fake_vmm(dir.path(), 3, PROTOCOL_VERSION).await;
        let client = connect(&uds, Duration::from_secs(10)).await.unwrap();
        assert_eq!(client.agent_version(), "9.9.9");
    }

    #[tokio::test]
    async fn a_different_protocol_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_vmm(dir.path(), 0, PROTOCOL_VERSION + 1).await;
        let err = connect(&uds, Duration::from_secs(10))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("upgrade the guest image or the runtime"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn waits_for_the_ready_event_before_trying_again() {
        use airlock_vmm_api::Event;
        let dir = tempfile::tempdir().unwrap();
        let (uds, count) = fake_vmm_counting(dir.path(), 1, PROTOCOL_VERSION).await;
        let log = dir.path().join("events");
        std::fs::write(&log, Event::Running { ms: 1.0 }.to_line()).unwrap();
        let (u, l) = (uds.clone(), log.clone());
        let task = tokio::spawn(async move {
            connect_when_ready(&u, &l, Duration::from_secs(30), || true).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // One attempt at once (refused); polling every 10 ms would have
        // made ten by now.
        let before = count.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=2).contains(&before), "{before} attempts before ready");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let ready = Event::AgentReady { ms: 2.0 }.to_line();
        // Written in two parts: half a line is no event yet.
        let (a, b) = ready.split_at(9);
        std::io::Write::write_all(&mut f, a.as_bytes()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::io::Write::write_all(&mut f, b.as_bytes()).unwrap();
        let client = task.await.unwrap().unwrap();
        assert_eq!(client.agent_version(), "9.9.9");
    }

    #[tokio::test]
    async fn a_vmm_that_accepts_and_never_answers_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        // Accepts, reads the CONNECT line and keeps the connection open
        // without a word.
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                held.push(s);
            }
        });
        let started = Instant::now();
        let err = attempt(&uds, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ConnectError::HandshakeTimeout(..)), "{err}");
        assert!(err
            .to_string()
            .contains("answered nothing to CONNECT within 200ms"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_dead_vm_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_while(&dir.path().join("none"), Duration::from_secs(30), || false)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ConnectError::VmGone));
    }
}
