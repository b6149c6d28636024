//! The ttrpc task service (containerd's task API v2): each call checks
//! and translates its message and forwards to [`Pod`], where the logic
//! lives. Events go out through containerd's publisher.

mod events;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};

use crate::pod::{CreateRequest, Pod, PodError};
use crate::process::Status;
use crate::stdio::Stdio;
use crate::{options, RUNTIME_ID};

pub use events::forward as forward_events;

/// The task service of one shim.
pub struct TaskService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(pod: Arc<Pod>, exit: Arc<ExitSignal>) -> Self {
        Self { pod, exit }
    }
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

impl From<PodError> for ttrpc::Error {
    fn from(e: PodError) -> Self {
        let code = match e {
            PodError::NoContainer(_) | PodError::NoProcess(..) => Code::NOT_FOUND,
            PodError::Exists(_) => Code::ALREADY_EXISTS,
            PodError::Precondition(_) => Code::FAILED_PRECONDITION,
            PodError::Unsupported(_) => Code::UNIMPLEMENTED,
            PodError::Failed(_)
            | PodError::Sandbox(_)
            | PodError::Rootfs(_)
            | PodError::Stdio(_) => Code::INTERNAL,
        };
        // The error with its causes: containerd shows this one line.
        status(code, airlock_report::one_line(&e))
    }
}

fn task_status(s: Status) -> TaskStatus {
    match s {
        Status::Created => TaskStatus::CREATED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let options = options::parse(req.options.as_ref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let pid = self
            .pod
            .create(CreateRequest {
                id: req.id.clone(),
                bundle: req.bundle.clone().into(),
                rootfs: req.rootfs.clone(),
                stdio: Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                options,
            })
            .await
            .inspect_err(|e| tracing::error!("create {}: {e}", req.id))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pid = self.pod.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let (p, bundle, pid) = self.pod.state(&req.id, &req.exec_id).await?;
        let exit = p.exit();
        Ok(StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: bundle.display().to_string(),
            pid,
            status: task_status(p.status()).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: MessageField::from_option(exit.map(|e| e.timestamp())),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let (pid, exit) = self.pod.delete(&req.id, &req.exec_id).await?;
        if req.exec_id.is_empty() && self.pod.is_empty().await {
            // containerd asks for Shutdown after the last Delete; when
            // that Delete outlasted containerd's patience (a VM teardown
            // on a busy host), it may never ask, and an empty shim would
            // linger: it leaves on its own if no Shutdown comes.
            let (pod, exit) = (self.pod.clone(), self.exit.clone());
            tokio::spawn(async move {
                tokio::time::sleep(UNASKED_SHUTDOWN).await;
                if pod.is_empty().await {
                    tracing::info!("no Shutdown after the last Delete: the shim exits");
                    shut_down(&pod, &exit).await;
                }
            });
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.pod.state(&req.id, "").await?;
        // Guest pids mean nothing on the host: the VMM stands for them.
        Ok(PidsResponse {
            processes: vec![ProcessInfo {
                pid: self.pod.pid().await,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.pod
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let process: oci_spec::runtime::Process =
            serde_json::from_slice(&spec.value).map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("malformed process spec: {e}"),
                )
            })?;
        self.pod
            .add_exec(
                &req.id,
                &req.exec_id,
                Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                process,
            )
            .await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.pod
            .resize(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if req.stdin {
            self.pod.close_stdin(&req.id, &req.exec_id).await?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("malformed resources: {e}")))?;
        self.pod.update(&req.id, &resources).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let exit = self.pod.wait(&req.id, &req.exec_id).await?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let s = self.pod.stats(&req.id).await?;
        let metrics = Metrics {
            memory: MessageField::some(MemoryStat {
                usage: s.memory_usage_bytes,
                usage_limit: s.memory_limit_bytes,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            ..Default::default()
        };
        let stats = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.pid().await,
            version: format!("{RUNTIME_ID} {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.pod.is_empty().await {
            shut_down(&self.pod, &self.exit).await;
        }
        Ok(Empty::new())
    }
}

/// How long an empty shim waits for containerd's Shutdown after the last
/// Delete before it leaves on its own.
const UNASKED_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// The shim's end: its socket, then the VM (if one is left), then exit.
async fn shut_down(pod: &Pod, exit: &ExitSignal) {
    // First, as runc's shim does, and before the teardown: once
    // containerd stops waiting for Shutdown (3 s, less than a wipe of a
    // large guest on a busy host) it deletes the bundle, `address` file
    // included, and the socket would be left in /run/containerd/s. The
    // daemon runs in the bundle `start` ran in. The connection containerd
    // holds outlives the path.
    crate::pod::remove_socket(std::path::Path::new("."), false);
    pod.destroy().await;
    exit.signal();
}
