//! The sandbox: this VM's state as the agent API sees it — the scratch
//! disk, the containers and their processes. The ttrpc service (`rpc/`)
//! only translates messages and forwards here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};

use crate::container::{self, Container, ContainerError};
use crate::files::{FileError, Root};
use crate::machine::{Guest, Machine};
use crate::network::{self, Network, NetworkError};
use crate::process::exits::Exits;
use crate::process::Process;

/// Errors from sandbox operations, sorted by the status code they map to.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no container {0:?}")]
    NoContainer(String),
    #[error("no process {1:?} in container {0:?}")]
    NoProcess(String, String),
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Archive(#[from] container::unpack::UnpackError),
    #[error("the unpack task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("malformed resources")]
    Resources(#[source] serde_json::Error),
    #[error("cannot apply the resources to container {0}")]
    Update(String, #[source] std::io::Error),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
}

/// The one sandbox of this VM.
pub struct Sandbox {
    pub exits: Arc<Exits>,
    /// The VM itself, or a fake for fuzzing and tests (see `machine/`).
    machine: Box<dyn Machine>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    scratch_ready: Mutex<bool>,
    /// The VM's network, which every container shares.
    network: Network,
    /// Notified when the runtime asked the VM to shut down.
    pub shutdown: Notify,
}

impl Sandbox {
    /// The sandbox of this VM: PID 1's.
    pub fn new(exits: Arc<Exits>) -> Self {
        Self::with_machine(exits, Box::new(Guest))
    }

    /// A sandbox acting on `machine` (a `machine::Fake` in the fuzz target).
    pub fn with_machine(exits: Arc<Exits>, machine: Box<dyn Machine>) -> Self {
        Self {
            exits,
            machine,
            containers: Mutex::new(HashMap::new()),
            scratch_ready: Mutex::new(false),
            network: Network::default(),
            shutdown: Notify::new(),
        }
    }

    /// Sets the hostname and clock, and mounts the scratch disk.
    pub async fn setup(
        &self,
        hostname: &str,
        epoch_seconds: i64,
        scratch_device: &str,
    ) -> Result<(), SandboxError> {
        if !hostname.is_empty() {
            self.machine
                .set_hostname(hostname)
                .map_err(|e| SandboxError::Sys("sethostname", e))?;
            self.network.set_hostname(hostname).await;
        }
        if epoch_seconds > 0 {
            self.machine
                .set_clock(epoch_seconds)
                .map_err(|e| SandboxError::Sys("clock_settime", e))?;
        }
        self.mount_scratch(scratch_device).await
    }

    async fn mount_scratch(&self, device: &str) -> Result<(), SandboxError> {
        let mut ready = self.scratch_ready.lock().await;
        if *ready {
            return Ok(());
        }
        std::fs::create_dir_all(self.machine.scratch()).map_err(|e| {
            SandboxError::Sys(
                "mkdir scratch",
                nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        self.machine
            .mount_scratch(device)
            .map_err(|e| SandboxError::Sys("mounting the scratch disk", e))?;
        *ready = true;
        Ok(())
    }

    /// Configures the VM's network (see `network/`): once, before the
    /// first container.
    pub async fn configure_network(
        &self,
        req: &airlock_protocol::agent::ConfigureNetworkRequest,
    ) -> Result<(), SandboxError> {
        let config = network::Config::parse(req).map_err(NetworkError::from)?;
        Ok(self.network.configure(&*self.machine, config).await?)
    }

    /// Creates a container; its init process waits for `start_container`.
    /// The first attempt fixes the network (writing the DNS files that
    /// every container mounts), whether or not the container comes to be.
    pub async fn create_container(
        &self,
        id: &str,
        spec: &[u8],
        source: &str,
        fstype: &str,
        options: &[String],
    ) -> Result<(), SandboxError> {
        container::check_id(id)?;
        self.mount_scratch("").await?;
        let mut containers = self.containers.lock().await;
        if containers.contains_key(id) {
            return Err(SandboxError::Exists(id.into()));
        }
        if source.is_empty() {
            return Err(SandboxError::Invalid("rootfs.source is empty".into()));
        }
        self.network.seal(&*self.machine).await?;
        let scratch = self.machine.scratch();
        let writable = scratch.join(id);
        // A tar archive on the scratch disk (a container joining a running
        // VM): unpacked next to the container's writable layer.
        let (source, fstype) = if fstype == "tar" {
            let archive = container::unpack::check_place(source, &scratch.to_string_lossy())?;
            let dest = writable.join("image");
            let d = dest.clone();
            tokio::task::spawn_blocking(move || container::unpack::unpack(&archive, &d))
                .await
                .map_err(SandboxError::Task)??;
            (dest.to_string_lossy().into_owned(), String::new())
        } else {
            (source.to_string(), fstype.to_string())
        };
        let c = Container::create(
            &self.exits,
            &*self.machine,
            id,
            spec,
            (&source, &fstype, options),
            &writable,
        )
        .await;
        if c.is_err() {
            std::fs::remove_dir_all(&writable).ok();
        }
        let c = c?;
        containers.insert(id.to_string(), Arc::new(c));
        Ok(())
    }

    pub async fn container(&self, id: &str) -> Result<Arc<Container>, SandboxError> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NoContainer(id.into()))
    }

    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let c = self.container(id).await?;
        Ok(c.start(&self.exits, &*self.machine).await?)
    }

    pub async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        let c = self
            .containers
            .lock()
            .await
            .remove(id)
            .ok_or_else(|| SandboxError::NoContainer(id.into()))?;
        c.remove(&self.exits, &*self.machine, grace).await;
        // Its writable layer (and an unpacked image) on the scratch disk.
        std::fs::remove_dir_all(self.machine.scratch().join(id)).ok();
        Ok(())
    }

    /// New cgroup limits for container `id` (OCI `LinuxResources` JSON).
    pub async fn update_container(&self, id: &str, resources: &[u8]) -> Result<(), SandboxError> {
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources).map_err(SandboxError::Resources)?;
        let c = self.container(id).await?;
        c.cgroup()
            .update(&r)
            .map_err(|e| SandboxError::Update(id.into(), e))
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &[u8],
        tty: bool,
    ) -> Result<(), SandboxError> {
        self.container(id)
            .await?
            .exec(&self.exits, &*self.machine, exec_id, process, tty)
            .await?;
        Ok(())
    }

    pub async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, SandboxError> {
        self.container(id)
            .await?
            .process(exec_id)
            .await
            .ok_or_else(|| SandboxError::NoProcess(id.into(), exec_id.into()))
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let signal = i32::try_from(signal)
            .map_err(|_| SandboxError::Invalid(format!("bad signal {signal}")))?;
        self.container(id)
            .await?
            .signal(exec_id, signal, all)
            .await
            .map_err(|e| SandboxError::Sys("kill", e))
    }

    /// The root that file API paths of container `id` ("" = the guest)
    /// resolve in.
    pub async fn root(&self, id: &str) -> Result<Root, SandboxError> {
        if id.is_empty() {
            return Ok(Root::open(self.machine.root())?);
        }
        let pid = self
            .container(id)
            .await?
            .root_pid()
            .ok_or(ContainerError::NotRunning)?;
        Ok(Root::open(&PathBuf::from(format!("/proc/{pid}/root")))?)
    }

    /// Removes every container and asks init to shut the VM down.
    pub async fn destroy(&self) {
        let ids: Vec<String> = self.containers.lock().await.keys().cloned().collect();
        for id in ids {
            self.remove_container(&id, Duration::from_secs(1))
                .await
                .ok();
        }
        self.shutdown.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Fake;

    fn fake() -> (tempfile::TempDir, Sandbox) {
        let dir = tempfile::tempdir().unwrap();
        let machine = Fake::new(dir.path()).unwrap();
        let sandbox = Sandbox::with_machine(Arc::new(Exits::default()), Box::new(machine));
        (dir, sandbox)
    }

    fn mount_refused(e: &SandboxError) -> bool {
        use crate::container::rootfs::RootfsError;
        matches!(
            e,
            SandboxError::Container(ContainerError::Rootfs(RootfsError::Image(..)))
        )
    }

    const SPEC: &[u8] =
        br#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#;

    #[tokio::test]
    async fn on_a_fake_machine_containers_fail_before_any_launch_and_leave_nothing() {
        let (dir, sandbox) = fake();
        sandbox.setup("host", 1, "/dev/vdb").await.unwrap();
        let no_opts: &[String] = &[];
        // A valid spec gets as far as mounting, which the fake refuses.
        let err = sandbox
            .create_container("c", SPEC, "/img", "", no_opts)
            .await
            .unwrap_err();
        assert!(mount_refused(&err), "{err}");
        // A bad spec, id or option is refused before that.
        for (id, spec, opts) in [
            ("c", &b"{}"[..], no_opts),
            ("../c", SPEC, no_opts),
            ("c", SPEC, &["data=journal".to_string()][..]),
        ] {
            let err = sandbox
                .create_container(id, spec, "/img", "", opts)
                .await
                .unwrap_err();
            assert!(!mount_refused(&err), "{err}");
        }
        assert!(matches!(
            sandbox.process("c", "").await,
            Err(SandboxError::NoContainer(_))
        ));
        // No bundle or writable layer is left behind.
        for sub in ["bundles", "scratch"] {
            let left: Vec<_> = std::fs::read_dir(dir.path().join(sub)).unwrap().collect();
            assert!(left.is_empty(), "{sub}: {left:?}");
        }
        // The guest's "/" is the fake's root directory.
        let root = sandbox.root("").await.unwrap();
        root.write("/f", 0, b"x", true, false, 0).unwrap();
        assert_eq!(std::fs::read(dir.path().join("root/f")).unwrap(), b"x");
        sandbox.destroy().await;
    }

    // A fake machine that starts host processes: the error paths of a
    // container's life, without KVM.

    fn with_processes() -> (tempfile::TempDir, Sandbox) {
        let dir = tempfile::tempdir().unwrap();
        let machine = Fake::with_processes(dir.path()).unwrap();
        let sandbox = Sandbox::with_machine(Arc::new(Exits::default()), Box::new(machine));
        (dir, sandbox)
    }

    fn spec(args: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": "1.0.2",
            "process": process(args),
            "root": {"path": "rootfs"},
        }))
        .unwrap()
    }

    fn process(args: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
        })
    }

    async fn created(sandbox: &Sandbox, id: &str, args: &[&str]) {
        sandbox
            .create_container(id, &spec(args), "/img", "", &[])
            .await
            .unwrap();
        sandbox.start_container(id).await.unwrap();
    }

    async fn wait(sandbox: &Sandbox, id: &str, exec_id: &str) -> crate::process::ExitInfo {
        let p = sandbox.process(id, exec_id).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .expect("the process exits")
    }

    #[tokio::test]
    async fn a_container_shares_the_vms_network_and_gets_its_dns_files() {
        let (dir, sandbox) = with_processes();
        let mut json = spec(&["sleep", "30"]);
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["linux"] = serde_json::json!({"namespaces": [{"type": "network"}]});
        json = serde_json::to_vec(&v).unwrap();
        sandbox
            .create_container("fake-net", &json, "/img", "", &[])
            .await
            .unwrap();
        let bundle = dir.path().join("bundles/fake-net/config.json");
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle).unwrap()).unwrap();
        let namespaces = written["linux"]["namespaces"].as_array().unwrap();
        assert!(
            namespaces.iter().all(|n| n["type"] != "network"),
            "{namespaces:?}"
        );
        let net = dir.path().join("net");
        for (dest, file) in [("/etc/resolv.conf", "resolv.conf"), ("/etc/hosts", "hosts")] {
            let m = written["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == dest)
                .expect(dest);
            assert_eq!(m["source"], net.join(file).to_str().unwrap());
            assert!(net.join(file).is_file());
        }
        sandbox.signal("fake-net", "", 9, false).await.unwrap();
        sandbox
            .remove_container("fake-net", Duration::ZERO)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_process_runs_and_its_output_and_status_arrive() {
        let (_dir, sandbox) = with_processes();
        created(&sandbox, "fake-run", &["sh", "-c", "echo hi; exit 3"]).await;
        let p = sandbox.process("fake-run", "").await.unwrap();
        let out = p.read(crate::process::Stream::Stdout, 64).await.unwrap();
        assert_eq!(out, b"hi\n");
        assert_eq!(wait(&sandbox, "fake-run", "").await.exit.status(), 3);
        sandbox
            .remove_container("fake-run", Duration::ZERO)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn exec_of_a_missing_or_unrunnable_program_carries_its_kind() {
        use crate::launcher::{ExecKind, LaunchError};
        let (dir, sandbox) = with_processes();
        created(&sandbox, "fake-exec", &["sleep", "30"]).await;
        let data = dir.path().join("root/data");
        std::fs::write(&data, "x").unwrap();
        for (program, want) in [
            ("nosuch-program", ExecKind::NotFound),
            (data.to_str().unwrap(), ExecKind::PermissionDenied),
        ] {
            let json = serde_json::to_vec(&process(&[program])).unwrap();
            let err = sandbox
                .exec("fake-exec", "e1", &json, false)
                .await
                .unwrap_err();
            let SandboxError::Container(ContainerError::Launch(LaunchError::Failed {
                exec: Some(exec),
                ..
            })) = &err
            else {
                panic!("{err}");
            };
            assert_eq!((exec.kind, exec.executable.as_str()), (want, program));
            // The exec id was not taken.
            assert!(matches!(
                sandbox.process("fake-exec", "e1").await,
                Err(SandboxError::NoProcess(..))
            ));
        }
        sandbox.signal("fake-exec", "", 9, false).await.unwrap();
        sandbox
            .remove_container("fake-exec", Duration::ZERO)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn wait_after_kill_reports_the_signal_and_a_second_delete_is_refused() {
        let (dir, sandbox) = with_processes();
        created(&sandbox, "fake-kill", &["sleep", "30"]).await;
        let json = serde_json::to_vec(&process(&["sleep", "30"])).unwrap();
        sandbox.exec("fake-kill", "e1", &json, false).await.unwrap();
        sandbox.signal("fake-kill", "e1", 9, false).await.unwrap();
        for _ in 0..2 {
            let info = wait(&sandbox, "fake-kill", "e1").await;
            assert_eq!(info.exit.signal(), 9);
            assert_eq!(info.exit.status(), 137);
        }
        // A signal to a process that has exited: ESRCH.
        let err = sandbox
            .signal("fake-kill", "e1", 9, false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, SandboxError::Sys("kill", nix::Error::ESRCH)),
            "{err}"
        );
        sandbox.signal("fake-kill", "", 9, false).await.unwrap();
        wait(&sandbox, "fake-kill", "").await;
        sandbox
            .remove_container("fake-kill", Duration::ZERO)
            .await
            .unwrap();
        let again = sandbox.remove_container("fake-kill", Duration::ZERO).await;
        assert!(
            matches!(again, Err(SandboxError::NoContainer(_))),
            "{again:?}"
        );
        // Nothing is left of it.
        assert!(!dir.path().join("bundles/fake-kill").exists());
        assert!(!dir.path().join("scratch/fake-kill").exists());
    }

    #[tokio::test]
    async fn a_stream_whose_process_is_gone_ends_and_refuses_input() {
        let (_dir, sandbox) = with_processes();
        created(&sandbox, "fake-gone", &["true"]).await;
        wait(&sandbox, "fake-gone", "").await;
        let p = sandbox.process("fake-gone", "").await.unwrap();
        assert!(p
            .read(crate::process::Stream::Stdout, 64)
            .await
            .unwrap()
            .is_empty());
        assert!(p.write_stdin(b"x").await.is_err());
        // An exec into a container whose init has exited is refused.
        let json = serde_json::to_vec(&process(&["true"])).unwrap();
        let err = sandbox
            .exec("fake-gone", "e1", &json, false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, SandboxError::Container(ContainerError::NotRunning)),
            "{err}"
        );
        sandbox
            .remove_container("fake-gone", Duration::ZERO)
            .await
            .unwrap();
    }
}
