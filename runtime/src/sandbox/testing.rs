//! An in-process fake of the guest agent for tests without a VM: a ttrpc
//! `AgentService` on a Unix socket, with containers and processes kept in
//! memory, and a [`Sandbox`] around a connection to it. The link between
//! a client and the fake can be cut, as when a VMM dies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use airlock_protocol::agent::*;
use airlock_protocol::agent_ttrpc::{create_agent_service, AgentService};
use airlock_protocol::ttrpc::r#async::{Server, TtrpcContext};
use airlock_protocol::ttrpc::{self, Code};
use airlock_protocol::PROTOCOL_VERSION;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Sandbox;
use crate::agent_client::{self, AgentClient, ConnectError};
use crate::config::RuntimeConfig;
use crate::state::{SandboxId, SandboxRecord, StateDir};

/// A served fake agent.
pub struct FakeAgent {
    _server: Server,
    socket: PathBuf,
    guest: Arc<Guest>,
    links: Mutex<Vec<JoinHandle<()>>>,
}

impl FakeAgent {
    /// Serves a fake agent at `dir/agent.sock`; its `Check` answers with
    /// `protocol_version`.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with_version(dir, PROTOCOL_VERSION).await
    }

    /// [`FakeAgent::start`] with another protocol version.
    pub async fn start_with_version(dir: &Path, protocol_version: u32) -> Self {
        let socket = dir.join("agent.sock");
        let guest = Arc::new(Guest::default());
        guest.version.store(protocol_version, Ordering::SeqCst);
        let mut server = Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .expect("binding the fake agent's socket")
            .register_service(create_agent_service(Arc::new(Service(guest.clone()))));
        server.start().await.expect("starting the fake agent");
        Self {
            _server: server,
            socket,
            guest,
            links: Mutex::new(Vec::new()),
        }
    }

    /// Where it listens.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client that passed the version check, linked to the fake through
    /// a splice that [`FakeAgent::cut`] ends.
    pub async fn connect(&self) -> Result<AgentClient, ConnectError> {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        let mut agent = UnixStream::connect(&self.socket)
            .await
            .expect("connecting to the fake agent");
        let link = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut theirs, &mut agent).await;
        });
        lock(&self.links).push(link);
        agent_client::check(ours).await
    }

    /// Cuts every client's link, as a VMM that dies closes the vsock.
    pub fn cut(&self) {
        for link in lock(&self.links).drain(..) {
            link.abort();
        }
    }

    /// `Check` hangs from now on (a guest that hangs with its VMM alive).
    pub fn go_silent(&self) {
        self.guest.silent.store(true, Ordering::SeqCst);
    }

    /// What the processes named `exec_id` write to stdout before they
    /// exit ("" for containers' init processes).
    pub fn set_output(&self, exec_id: &str, data: &[u8]) {
        lock(&self.guest.outputs).insert(exec_id.into(), data.to_vec());
    }

    /// Ends process `exec_id` of `container` with `status`.
    pub fn exit(&self, container: &str, exec_id: &str, status: i32) {
        if let Some(p) = lock(&self.guest.containers)
            .get_mut(container)
            .and_then(|c| c.processes.get_mut(exec_id))
        {
            p.exit = Some((status, 0));
        }
        self.guest.changed.notify_waiters();
    }

    /// Whether container `id` exists in the fake guest.
    pub fn has_container(&self, id: &str) -> bool {
        lock(&self.guest.containers).contains_key(id)
    }

    /// What was written to `path` with `WriteFile`.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        lock(&self.guest.files).get(path).cloned()
    }

    /// What process `exec_id` of `container` got on stdin, and whether
    /// its stdin was closed.
    pub fn stdin(&self, container: &str, exec_id: &str) -> Option<(Vec<u8>, bool)> {
        self.guest
            .with_proc(container, exec_id, |p| (p.stdin.clone(), p.stdin_closed))
            .ok()
    }

    /// Every `ConfigureNetwork` request it got, in order.
    pub fn network_requests(&self) -> Vec<ConfigureNetworkRequest> {
        lock(&self.guest.networks).clone()
    }

    /// How many `DestroySandbox` calls it got.
    pub fn destroyed(&self) -> u32 {
        self.guest.destroyed.load(Ordering::SeqCst)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.cut();
    }
}

impl Sandbox {
    /// A sandbox around `agent` with no VMM: its state dir is made under
    /// `config.state_dir`, and its record names a process that is not its
    /// VMM (this one, with a start time it never had), so that teardown
    /// signals nothing.
    pub fn with_agent(config: &RuntimeConfig, agent: AgentClient) -> Self {
        let id = SandboxId::generate();
        let state = StateDir::create(&config.state_dir, &id).expect("a state dir");
        let record = SandboxRecord {
            id: id.to_string(),
            vmm_pid: std::process::id(),
            vmm_start_time: Some(u64::MAX),
            created_unix: 0,
            image: "fake".into(),
            vcpus: 1,
            memory_mib: 128,
            guest_cid: 3,
        };
        state.write_record(&record).expect("a sandbox record");
        Sandbox {
            id,
            state,
            record,
            agent,
            image_config: None,
            config: config.clone(),
        }
    }
}

/// A config for a sandbox of [`Sandbox::with_agent`]: its state under
/// `dir`, no jail.
pub fn config(dir: &Path) -> RuntimeConfig {
    let mut config = RuntimeConfig {
        state_dir: dir.join("state"),
        ..Default::default()
    };
    config.jail.enabled = false;
    config
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fake guest's state.
#[derive(Default)]
struct Guest {
    version: AtomicU32,
    silent: AtomicBool,
    destroyed: AtomicU32,
    containers: Mutex<HashMap<String, Container>>,
    outputs: Mutex<HashMap<String, Vec<u8>>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    networks: Mutex<Vec<ConfigureNetworkRequest>>,
    /// Woken on every exit and every new output.
    changed: Notify,
}

#[derive(Default)]
struct Container {
    processes: HashMap<String, Proc>,
}

#[derive(Default)]
struct Proc {
    started: bool,
    /// Status and signal, once it ended.
    exit: Option<(i32, i32)>,
    stdout: Vec<u8>,
    stdin: Vec<u8>,
    stdin_closed: bool,
}

fn not_found(what: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, what))
}

impl Guest {
    /// Runs `f` on process `exec_id` of `container`, or fails as the
    /// agent does for one it does not know.
    fn with_proc<T>(
        &self,
        container: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> T,
    ) -> ttrpc::Result<T> {
        let mut containers = lock(&self.containers);
        let c = containers
            .get_mut(container)
            .ok_or_else(|| not_found(format!("container {container} not found")))?;
        let p = c
            .processes
            .get_mut(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id:?} not found")))?;
        Ok(f(p))
    }

    fn new_proc(&self, exec_id: &str, started: bool) -> Proc {
        Proc {
            started,
            stdout: lock(&self.outputs)
                .get(exec_id)
                .cloned()
                .unwrap_or_default(),
            ..Default::default()
        }
    }
}

struct Service(Arc<Guest>);

#[async_trait::async_trait]
impl AgentService for Service {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        if self.0.silent.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(CheckResponse {
            protocol_version: self.0.version.load(Ordering::SeqCst),
            agent_version: "9.9.9".into(),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        _: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::default())
    }

    /// Records the request; a second one, or one after a container, is
    /// refused as the agent refuses it.
    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        let mut networks = lock(&self.0.networks);
        if !networks.is_empty() || !lock(&self.0.containers).is_empty() {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::FAILED_PRECONDITION,
                "the network is already configured: ConfigureNetwork is called once per VM",
            )));
        }
        networks.push(req);
        Ok(Empty::default())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.0.destroyed.fetch_add(1, Ordering::SeqCst);
        Ok(Empty::default())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let init = self.0.new_proc("", false);
        let mut containers = lock(&self.0.containers);
        if containers.contains_key(&req.container_id) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.container_id),
            )));
        }
        let processes = HashMap::from([(String::new(), init)]);
        containers.insert(req.container_id, Container { processes });
        Ok(Empty::default())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.0
            .with_proc(&req.container_id, "", |p| p.started = true)?;
        Ok(Empty::default())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        lock(&self.0.containers)
            .remove(&req.container_id)
            .ok_or_else(|| not_found(format!("container {} not found", req.container_id)))?;
        self.0.changed.notify_waiters();
        Ok(Empty::default())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.0.with_proc(&req.container_id, "", |_| ())?;
        Ok(StatsContainerResponse {
            memory_usage_bytes: 4096,
            pids_current: 1,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let p = self.0.new_proc(&req.exec_id, true);
        let mut containers = lock(&self.0.containers);
        let c = containers
            .get_mut(&req.container_id)
            .ok_or_else(|| not_found(format!("container {} not found", req.container_id)))?;
        c.processes.insert(req.exec_id, p);
        Ok(Empty::default())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        loop {
            let changed = self.0.changed.notified();
            let exit = self
                .0
                .with_proc(&req.container_id, &req.exec_id, |p| p.exit)?;
            if let Some((status, signal)) = exit {
                return Ok(WaitProcessResponse {
                    exit_status: status,
                    signal,
                    ..Default::default()
                });
            }
            changed.await;
        }
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let signal = i32::try_from(req.signal).unwrap_or(i32::MAX);
        self.0.with_proc(&req.container_id, &req.exec_id, |p| {
            if p.started && p.exit.is_none() {
                p.exit = Some((128_i32.saturating_add(signal), signal));
            }
        })?;
        self.0.changed.notify_waiters();
        Ok(Empty::default())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        loop {
            let changed = self.0.changed.notified();
            let read = self.0.with_proc(&req.container_id, &req.exec_id, |p| {
                let data = std::mem::take(&mut p.stdout);
                (data, p.exit.is_some())
            })?;
            match read {
                (data, _) if !data.is_empty() => {
                    return Ok(ReadStreamResponse {
                        data,
                        ..Default::default()
                    })
                }
                (_, true) => {
                    return Ok(ReadStreamResponse {
                        eof: true,
                        ..Default::default()
                    })
                }
                _ => changed.await,
            }
        }
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        // Nothing on stderr: it ends when the process does.
        loop {
            let changed = self.0.changed.notified();
            if self
                .0
                .with_proc(&req.container_id, &req.exec_id, |p| p.exit.is_some())?
            {
                return Ok(ReadStreamResponse {
                    eof: true,
                    ..Default::default()
                });
            }
            changed.await;
        }
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        let len = req.data.len();
        self.0.with_proc(&req.container_id, &req.exec_id, |p| {
            p.stdin.extend_from_slice(&req.data)
        })?;
        Ok(WriteStreamResponse {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.0
            .with_proc(&req.container_id, &req.exec_id, |p| p.stdin_closed = true)?;
        Ok(Empty::default())
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        self.0.with_proc(&req.container_id, &req.exec_id, |_| ())?;
        Ok(Empty::default())
    }

    async fn write_file(
        &self,
        _: &TtrpcContext,
        req: WriteFileRequest,
    ) -> ttrpc::Result<WriteFileResponse> {
        let mut files = lock(&self.0.files);
        let file = files.entry(req.path).or_default();
        if req.truncate {
            file.clear();
        }
        file.extend_from_slice(&req.data);
        Ok(WriteFileResponse::default())
    }

    async fn read_file(
        &self,
        _: &TtrpcContext,
        req: ReadFileRequest,
    ) -> ttrpc::Result<ReadFileResponse> {
        let files = lock(&self.0.files);
        let file = files
            .get(&req.path)
            .ok_or_else(|| not_found(format!("{} not found", req.path)))?;
        let start = usize::try_from(req.offset)
            .unwrap_or(usize::MAX)
            .min(file.len());
        let len = usize::try_from(req.len).unwrap_or(usize::MAX);
        let end = start.saturating_add(len).min(file.len());
        Ok(ReadFileResponse {
            data: file[start..end].to_vec(),
            eof: end == file.len(),
            ..Default::default()
        })
    }

    async fn stat(&self, _: &TtrpcContext, req: StatRequest) -> ttrpc::Result<StatResponse> {
        Err(not_found(format!("{} not found", req.path)))
    }
}
