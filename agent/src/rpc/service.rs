//! The ttrpc `AgentService`: translates messages and status codes and
//! forwards every call to [`Sandbox`]; no logic of its own.

use std::sync::Arc;
use std::time::Duration;

use airlock_protocol::agent::*;
use airlock_protocol::agent_ttrpc::AgentService;
use airlock_protocol::{check_compatible, exec_failure_status, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::container::rootfs::RootfsError;
use crate::container::ContainerError;
use crate::files::{self, FileError};
use crate::launcher::{ExecKind, LaunchError};
use crate::network::{LinkError, NetworkError};
use crate::process::{StdioError, Stream};
use crate::sandbox::{Sandbox, SandboxError};

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    sandbox: Arc<Sandbox>,
}

impl Service {
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        Self { sandbox }
    }
}

type Result<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg.into()))
}

impl From<SandboxError> for TtrpcError {
    fn from(e: SandboxError) -> Self {
        let code = match &e {
            SandboxError::NoContainer(_) | SandboxError::NoProcess(..) => Code::NOT_FOUND,
            SandboxError::Exists(_) => Code::ALREADY_EXISTS,
            SandboxError::Invalid(_)
            | SandboxError::Archive(_)
            | SandboxError::Task(_)
            | SandboxError::Resources(_)
            | SandboxError::Update(..) => Code::INVALID_ARGUMENT,
            SandboxError::Container(c) => match c {
                ContainerError::BadId(_)
                | ContainerError::Spec(_)
                | ContainerError::Rootfs(RootfsError::Option(_)) => Code::INVALID_ARGUMENT,
                ContainerError::ExecExists(_) => Code::ALREADY_EXISTS,
                ContainerError::NotRunning => Code::FAILED_PRECONDITION,
                // An exec that failed (e.g. no such command) is the caller's
                // problem, as runc reports it.
                ContainerError::Launch(LaunchError::Failed { .. }) => Code::FAILED_PRECONDITION,
                ContainerError::Launch(LaunchError::Timeout(_)) => Code::DEADLINE_EXCEEDED,
                _ => Code::INTERNAL,
            },
            SandboxError::File(FileError::BadPath(_)) => Code::INVALID_ARGUMENT,
            SandboxError::File(FileError::Sys(_, errno)) => match errno {
                nix::Error::ENOENT => Code::NOT_FOUND,
                nix::Error::EEXIST => Code::ALREADY_EXISTS,
                nix::Error::EACCES | nix::Error::EPERM => Code::PERMISSION_DENIED,
                _ => Code::FAILED_PRECONDITION,
            },
            SandboxError::Network(n) => match n {
                NetworkError::Config(_) | NetworkError::Link(LinkError::UnknownMac(..)) => {
                    Code::INVALID_ARGUMENT
                }
                NetworkError::AlreadyConfigured | NetworkError::Sealed => Code::FAILED_PRECONDITION,
                _ => Code::INTERNAL,
            },
            SandboxError::Sys(..) => Code::INTERNAL,
        };
        let message = airlock_report::chain(&e);
        match exec_failure(&e) {
            Some(failure) => TtrpcError::RpcStatus(exec_failure_status(code, message, &failure)),
            None => status(code, message),
        }
    }
}

/// Why the program could not be run, when that is why `e` happened.
fn exec_failure(e: &SandboxError) -> Option<ExecFailure> {
    let SandboxError::Container(ContainerError::Launch(LaunchError::Failed {
        exec: Some(exec),
        ..
    })) = e
    else {
        return None;
    };
    let kind = match exec.kind {
        ExecKind::NotFound => ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND,
        ExecKind::PermissionDenied => ExecFailureKind::EXEC_FAILURE_KIND_PERMISSION_DENIED,
        ExecKind::Other => ExecFailureKind::EXEC_FAILURE_KIND_OTHER,
    };
    Some(ExecFailure::of(kind, exec.executable.clone()))
}

fn stdio_err(e: StdioError) -> TtrpcError {
    let code = match e {
        StdioError::Io(_) => Code::INTERNAL,
        _ => Code::FAILED_PRECONDITION,
    };
    status(code, airlock_report::chain(&e))
}

fn file_info(i: files::Info) -> FileInfo {
    FileInfo {
        name: i.name,
        file_type: match i.kind {
            files::Kind::Regular => FileType::FILE_TYPE_REGULAR,
            files::Kind::Directory => FileType::FILE_TYPE_DIRECTORY,
            files::Kind::Symlink => FileType::FILE_TYPE_SYMLINK,
            files::Kind::Other => FileType::FILE_TYPE_OTHER,
        }
        .into(),
        size: i.size,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        mtime_seconds: i.mtime_seconds,
        mtime_nanos: i.mtime_nanos,
        link_target: i.link_target,
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl AgentService for Service {
    async fn check(&self, _: &TtrpcContext, req: CheckRequest) -> Result<CheckResponse> {
        // Answer even on a mismatch, so the runtime can name both versions;
        // but say it here too, on the console.
        if let Err(e) = check_compatible(req.protocol_version) {
            crate::console::warn(format_args!("airlock-agent: runtime mismatch: {e}"));
        }
        Ok(CheckResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn create_sandbox(&self, _: &TtrpcContext, req: CreateSandboxRequest) -> Result<Empty> {
        self.sandbox
            .setup(&req.hostname, req.epoch_seconds, &req.scratch_device)
            .await?;
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> Result<Empty> {
        self.sandbox.configure_network(&req).await?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: DestroySandboxRequest) -> Result<Empty> {
        self.sandbox.destroy().await;
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> Result<Empty> {
        let rootfs = req.rootfs.into_option().unwrap_or_default();
        self.sandbox
            .create_container(
                &req.container_id,
                &req.oci_spec,
                &rootfs.source,
                &rootfs.fstype,
                &rootfs.options,
            )
            .await?;
        Ok(Empty::new())
    }

    async fn start_container(&self, _: &TtrpcContext, req: StartContainerRequest) -> Result<Empty> {
        self.sandbox.start_container(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> Result<Empty> {
        let grace = Duration::from_secs(req.timeout_seconds.into());
        self.sandbox
            .remove_container(&req.container_id, grace)
            .await?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> Result<StatsContainerResponse> {
        let s = self
            .sandbox
            .container(&req.container_id)
            .await?
            .cgroup()
            .stats();
        Ok(StatsContainerResponse {
            memory_usage_bytes: s.memory_usage,
            memory_limit_bytes: s.memory_limit,
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            oom_kills: s.oom_kills,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> Result<Empty> {
        self.sandbox
            .update_container(&req.container_id, &req.resources)
            .await?;
        Ok(Empty::new())
    }

    async fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> Result<Empty> {
        self.sandbox
            .exec(&req.container_id, &req.exec_id, &req.process_spec, req.tty)
            .await?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> Result<WaitProcessResponse> {
        let p = self
            .sandbox
            .process(&req.container_id, &req.exec_id)
            .await?;
        let info = p.wait().await;
        Ok(WaitProcessResponse {
            exit_status: info.exit.status(),
            signal: info.exit.signal(),
            oom_killed: info.oom_killed,
            ..Default::default()
        })
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> Result<Empty> {
        self.sandbox
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Result<ReadStreamResponse> {
        self.read(req, Stream::Stdout).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> Result<ReadStreamResponse> {
        self.read(req, Stream::Stderr).await
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> Result<WriteStreamResponse> {
        let p = self
            .sandbox
            .process(&req.container_id, &req.exec_id)
            .await?;
        let n = p.write_stdin(&req.data).await.map_err(stdio_err)?;
        Ok(WriteStreamResponse {
            len: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> Result<Empty> {
        let p = self
            .sandbox
            .process(&req.container_id, &req.exec_id)
            .await?;
        p.close_stdin().await.map_err(stdio_err)?;
        Ok(Empty::new())
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: TtyWinResizeRequest) -> Result<Empty> {
        let p = self
            .sandbox
            .process(&req.container_id, &req.exec_id)
            .await?;
        let rows = u16::try_from(req.rows).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.columns).unwrap_or(u16::MAX);
        p.resize(rows, cols).map_err(stdio_err)?;
        Ok(Empty::new())
    }

    async fn read_file(&self, _: &TtrpcContext, req: ReadFileRequest) -> Result<ReadFileResponse> {
        let root = self.sandbox.root(&req.container_id).await?;
        let (data, eof) = root
            .read(&req.path, req.offset, req.len as usize)
            .map_err(SandboxError::from)?;
        Ok(ReadFileResponse {
            data,
            eof,
            ..Default::default()
        })
    }

    async fn write_file(
        &self,
        _: &TtrpcContext,
        req: WriteFileRequest,
    ) -> Result<WriteFileResponse> {
        let root = self.sandbox.root(&req.container_id).await?;
        let len = root
            .write(
                &req.path,
                req.offset,
                &req.data,
                req.create,
                req.truncate,
                req.mode,
            )
            .map_err(SandboxError::from)?;
        Ok(WriteFileResponse {
            len,
            ..Default::default()
        })
    }

    async fn list_dir(&self, _: &TtrpcContext, req: ListDirRequest) -> Result<ListDirResponse> {
        let root = self.sandbox.root(&req.container_id).await?;
        let entries = root.list(&req.path).map_err(SandboxError::from)?;
        Ok(ListDirResponse {
            entries: entries.into_iter().map(file_info).collect(),
            ..Default::default()
        })
    }

    async fn stat(&self, _: &TtrpcContext, req: StatRequest) -> Result<StatResponse> {
        let root = self.sandbox.root(&req.container_id).await?;
        let info = root
            .stat(&req.path, req.follow_symlinks)
            .map_err(SandboxError::from)?;
        Ok(StatResponse {
            info: Some(file_info(info)).into(),
            ..Default::default()
        })
    }

    async fn make_dir(&self, _: &TtrpcContext, req: MakeDirRequest) -> Result<Empty> {
        let root = self.sandbox.root(&req.container_id).await?;
        root.mkdir(&req.path, req.mode, req.parents)
            .map_err(SandboxError::from)?;
        Ok(Empty::new())
    }

    async fn remove(&self, _: &TtrpcContext, req: RemoveRequest) -> Result<Empty> {
        let root = self.sandbox.root(&req.container_id).await?;
        root.remove(&req.path, req.recursive)
            .map_err(SandboxError::from)?;
        Ok(Empty::new())
    }
}

impl Service {
    async fn read(&self, req: ReadStreamRequest, stream: Stream) -> Result<ReadStreamResponse> {
        let p = self
            .sandbox
            .process(&req.container_id, &req.exec_id)
            .await?;
        let data = p.read(stream, req.len as usize).await.map_err(stdio_err)?;
        Ok(ReadStreamResponse {
            eof: data.is_empty(),
            data,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use airlock_protocol::exec_failure;

    use super::*;
    use crate::launcher::ExecFailure as LaunchExecFailure;

    fn launch_failed(exec: Option<LaunchExecFailure>) -> SandboxError {
        SandboxError::Container(ContainerError::Launch(LaunchError::Failed {
            message: "executable 'nosuch' not found in $PATH".into(),
            exec,
        }))
    }

    fn rpc_status(e: SandboxError) -> ttrpc::Status {
        match TtrpcError::from(e) {
            TtrpcError::RpcStatus(s) => s,
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn an_exec_failure_carries_its_kind_in_the_details() {
        for (kind, want) in [
            (
                ExecKind::NotFound,
                ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND,
            ),
            (
                ExecKind::PermissionDenied,
                ExecFailureKind::EXEC_FAILURE_KIND_PERMISSION_DENIED,
            ),
            (ExecKind::Other, ExecFailureKind::EXEC_FAILURE_KIND_OTHER),
        ] {
            let s = rpc_status(launch_failed(Some(LaunchExecFailure {
                kind,
                executable: "nosuch".into(),
            })));
            assert_eq!(s.code(), Code::FAILED_PRECONDITION);
            assert!(s.message().contains("not found"), "{}", s.message());
            let failure = exec_failure(&s).expect("details");
            assert_eq!(failure.kind_or_other(), want);
            assert_eq!(failure.executable, "nosuch");
        }
    }

    #[test]
    fn other_failures_have_no_details() {
        let s = rpc_status(launch_failed(None));
        assert_eq!(s.code(), Code::FAILED_PRECONDITION);
        assert!(exec_failure(&s).is_none());
        let s = rpc_status(SandboxError::NoContainer("c".into()));
        assert_eq!(s.code(), Code::NOT_FOUND);
        assert!(s.details.is_empty());
    }

    // The handlers over a sandbox on the fake machine (no KVM, no launcher).

    fn service() -> (tempfile::TempDir, Service) {
        let dir = tempfile::tempdir().unwrap();
        let machine = crate::machine::Fake::new(dir.path()).unwrap();
        let exits = Arc::new(crate::process::exits::Exits::default());
        let sandbox = Sandbox::with_machine(exits, Box::new(machine));
        (dir, Service::new(Arc::new(sandbox)))
    }

    fn ctx() -> TtrpcContext {
        TtrpcContext {
            mh: ttrpc::MessageHeader::default(),
            metadata: Default::default(),
            timeout_nano: 0,
        }
    }

    fn code<T: std::fmt::Debug>(res: Result<T>) -> Code {
        match res {
            Err(TtrpcError::RpcStatus(s)) => s.code(),
            other => panic!("not an error status: {other:?}"),
        }
    }

    #[tokio::test]
    async fn calls_on_a_missing_container_are_not_found() {
        let (_dir, svc) = service();
        let c = || "c".to_string();
        let exec = ExecProcessRequest {
            container_id: c(),
            exec_id: "e".into(),
            process_spec: br#"{"args":["nosuch"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(code(svc.exec_process(&ctx(), exec).await), Code::NOT_FOUND);
        let wait = WaitProcessRequest {
            container_id: c(),
            ..Default::default()
        };
        assert_eq!(code(svc.wait_process(&ctx(), wait).await), Code::NOT_FOUND);
        let read = ReadStreamRequest {
            container_id: c(),
            len: 10,
            ..Default::default()
        };
        assert_eq!(code(svc.read_stdout(&ctx(), read).await), Code::NOT_FOUND);
        let start = StartContainerRequest {
            container_id: c(),
            ..Default::default()
        };
        assert_eq!(
            code(svc.start_container(&ctx(), start).await),
            Code::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn a_second_delete_is_not_found_and_leaves_the_sandbox_usable() {
        let (dir, svc) = service();
        let create = CreateSandboxRequest {
            hostname: "h".into(),
            ..Default::default()
        };
        svc.create_sandbox(&ctx(), create.clone()).await.unwrap();
        // Twice is fine: the scratch disk is mounted once.
        svc.create_sandbox(&ctx(), create).await.unwrap();
        let remove = RemoveContainerRequest {
            container_id: "c".into(),
            ..Default::default()
        };
        for _ in 0..2 {
            let res = svc.remove_container(&ctx(), remove.clone()).await;
            assert_eq!(code(res), Code::NOT_FOUND);
        }
        // The file API still answers.
        let write = WriteFileRequest {
            path: "/f".into(),
            data: b"x".to_vec(),
            create: true,
            ..Default::default()
        };
        svc.write_file(&ctx(), write).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("root/f")).unwrap(), b"x");
    }

    #[tokio::test]
    async fn bad_arguments_are_invalid_before_any_lookup() {
        let (_dir, svc) = service();
        let signal = SignalProcessRequest {
            container_id: "c".into(),
            signal: u32::MAX,
            ..Default::default()
        };
        let res = svc.signal_process(&ctx(), signal).await;
        assert_eq!(code(res), Code::INVALID_ARGUMENT);
        let update = UpdateContainerRequest {
            container_id: "c".into(),
            resources: b"{not json".to_vec(),
            ..Default::default()
        };
        let res = svc.update_container(&ctx(), update).await;
        assert_eq!(code(res), Code::INVALID_ARGUMENT);
        let create = CreateContainerRequest {
            container_id: "../c".into(),
            ..Default::default()
        };
        let res = svc.create_container(&ctx(), create).await;
        assert_eq!(code(res), Code::INVALID_ARGUMENT);
    }

    fn network(mac: &str) -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            version: airlock_protocol::NETWORK_CONFIG_VERSION,
            interfaces: vec![Interface {
                mac: mac.into(),
                addresses: vec!["10.0.0.2/24".into()],
                mtu: 1500,
                ..Default::default()
            }],
            routes: vec![Route {
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn configure_network_checks_its_input_and_runs_once() {
        let (_dir, svc) = service();
        let mac = crate::machine::Fake::NIC_MAC;
        let mut bad = network(mac);
        bad.version = 9;
        let s = match svc.configure_network(&ctx(), bad).await {
            Err(TtrpcError::RpcStatus(s)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.code(), Code::INVALID_ARGUMENT);
        assert!(
            s.message().contains("upgrade the guest image"),
            "{}",
            s.message()
        );
        let mut bad = network(mac);
        bad.interfaces[0].mtu = 10;
        let res = svc.configure_network(&ctx(), bad).await;
        assert_eq!(code(res), Code::INVALID_ARGUMENT);
        let res = svc
            .configure_network(&ctx(), network("02:00:00:00:00:99"))
            .await;
        assert_eq!(code(res), Code::INVALID_ARGUMENT);
        svc.configure_network(&ctx(), network(mac)).await.unwrap();
        let res = svc.configure_network(&ctx(), network(mac)).await;
        assert_eq!(code(res), Code::FAILED_PRECONDITION);
    }

    #[tokio::test]
    async fn configure_network_after_a_container_is_refused() {
        let (dir, svc) = service();
        let create = CreateContainerRequest {
            container_id: "c".into(),
            oci_spec: br#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#.to_vec(),
            rootfs: protobuf::MessageField::some(Rootfs {
                source: "/img".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // The fake refuses the mount, but the network is fixed all the same,
        // and the files a container mounts are there.
        assert!(svc.create_container(&ctx(), create).await.is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("net/hosts")).unwrap(),
            "127.0.0.1\tlocalhost\n"
        );
        let mac = crate::machine::Fake::NIC_MAC;
        let res = svc.configure_network(&ctx(), network(mac)).await;
        assert_eq!(code(res), Code::FAILED_PRECONDITION);
    }

    #[tokio::test]
    async fn exec_not_found_reaches_the_caller_as_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let machine = crate::machine::Fake::with_processes(dir.path()).unwrap();
        let exits = Arc::new(crate::process::exits::Exits::default());
        let svc = Service::new(Arc::new(Sandbox::with_machine(exits, Box::new(machine))));
        let process = |prog: &str| {
            format!(
                r#"{{"args":["{prog}"],"env":["PATH=/usr/bin:/bin"],"cwd":"/","user":{{"uid":0,"gid":0}}}}"#
            )
        };
        let spec = format!(
            r#"{{"ociVersion":"1.0.2","process":{},"root":{{"path":"rootfs"}}}}"#,
            process("nosuch-init")
        );
        let create = CreateContainerRequest {
            container_id: "fake-svc".into(),
            oci_spec: spec.into_bytes(),
            rootfs: protobuf::MessageField::some(Rootfs {
                source: "/img".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = match svc.create_container(&ctx(), create).await {
            Err(TtrpcError::RpcStatus(s)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.code(), Code::FAILED_PRECONDITION);
        let failure = exec_failure(&s).expect("details");
        assert_eq!(
            failure.kind_or_other(),
            ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND
        );
        assert_eq!(failure.executable, "nosuch-init");
        // Nothing of the container is left.
        assert!(!dir.path().join("bundles/fake-svc").exists());
    }
}
