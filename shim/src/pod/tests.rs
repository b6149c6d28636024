//! The pod against the runtime's in-process fake agent: no VM, no KVM.

use std::time::Duration;

use airlock_runtime::sandbox::container::GuestRootfs;
use airlock_runtime::sandbox::testing::{self, FakeAgent};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;

/// A pod whose VM (a sandbox on a fake agent) was booted by container
/// "c", which is created but not started.
struct Fixture {
    fake: FakeAgent,
    pod: Arc<Pod>,
    events: UnboundedReceiver<Event>,
    dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAgent::start(dir.path()).await;
    let agent = fake.connect().await.unwrap();
    let sandbox = Arc::new(Sandbox::with_agent(&testing::config(dir.path()), agent));
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let pod = Arc::new(Pod::new(tx));
    *pod.vm.lock().await = Some(Vm {
        sandbox: sandbox.clone(),
        owner: "c".into(),
    });
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    let req = CreateRequest {
        id: "c".into(),
        bundle,
        rootfs: vec![],
        stdio: Stdio::default(),
        options: Default::default(),
    };
    let rootfs = GuestRootfs::image();
    let oci = oci_spec::runtime::Spec::default();
    pod.add_container(req, oci, &sandbox, &rootfs)
        .await
        .unwrap();
    let mut f = Fixture {
        fake,
        pod,
        events,
        dir,
    };
    assert!(matches!(f.next().await, Event::Create { .. }));
    f
}

impl Fixture {
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("no event within 10 s")
            .expect("the event channel closed")
    }

    /// The exit status of the next event, an Exit of `exec_id`.
    async fn exit_of(&mut self, exec_id: &str) -> u32 {
        match self.next().await {
            Event::Exit {
                exec_id: e, exit, ..
            } if e == exec_id => exit.status,
            other => panic!("expected the exit of {exec_id}, got {other:?}"),
        }
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("still waiting after 10 s")
}

#[tokio::test]
async fn a_started_container_reports_its_exit() {
    let mut f = fixture().await;
    f.pod.start("c", "").await.unwrap();
    assert!(matches!(f.next().await, Event::Start { .. }));
    f.fake.exit("c", "", 3);
    // The init process's exit carries the container's id.
    assert_eq!(f.exit_of("c").await, 3);
    assert_eq!(within(f.pod.wait("c", "")).await.unwrap().status, 3);
    let err = f.pod.start("c", "").await.unwrap_err();
    assert!(matches!(err, PodError::Precondition(_)), "{err}");
}

#[tokio::test]
async fn an_unknown_exec_or_container_is_not_found() {
    let f = fixture().await;
    let err = f.pod.start("c", "nope").await.unwrap_err();
    assert!(matches!(err, PodError::NoProcess(..)), "{err}");
    let err = f.pod.kill("c", "nope", 9, false).await.unwrap_err();
    assert_eq!(err.to_string(), "process nope of container c not found");
    let err = f.pod.wait("x", "").await.unwrap_err();
    assert!(matches!(err, PodError::NoContainer(_)), "{err}");
    let err = f.pod.stats("x").await.unwrap_err();
    assert!(matches!(err, PodError::NoContainer(_)), "{err}");
    let err = f.pod.resize("c", "nope", 80, 24).await.unwrap_err();
    assert!(matches!(err, PodError::NoProcess(..)), "{err}");
}

#[tokio::test]
async fn a_wait_after_a_kill_sees_the_signal() {
    let mut f = fixture().await;
    let exec = oci_spec::runtime::Process::default();
    f.pod
        .add_exec("c", "e", Stdio::default(), exec.clone())
        .await
        .unwrap();
    assert!(matches!(f.next().await, Event::ExecAdded { .. }));
    f.pod.start("c", "e").await.unwrap();
    assert!(matches!(f.next().await, Event::ExecStarted { .. }));
    f.pod.kill("c", "e", 9, false).await.unwrap();
    assert_eq!(f.exit_of("e").await, 137);
    assert_eq!(within(f.pod.wait("c", "e")).await.unwrap().status, 137);
    // Killed again once stopped: it is gone.
    let err = f.pod.kill("c", "e", 9, false).await.unwrap_err();
    assert!(matches!(err, PodError::NoProcess(..)), "{err}");
    // Never started: the kill is its exit, without the guest.
    f.pod
        .add_exec("c", "n", Stdio::default(), exec)
        .await
        .unwrap();
    assert!(matches!(f.next().await, Event::ExecAdded { .. }));
    f.pod.kill("c", "n", 15, false).await.unwrap();
    assert_eq!(f.exit_of("n").await, 143);
    assert_eq!(within(f.pod.wait("c", "n")).await.unwrap().status, 143);
}

#[tokio::test]
async fn the_agent_gone_mid_stream_ends_the_process_with_255() {
    let mut f = fixture().await;
    f.fake.set_output("e", b"some output");
    let exec = oci_spec::runtime::Process::default();
    f.pod
        .add_exec("c", "e", Stdio::default(), exec)
        .await
        .unwrap();
    f.pod.start("c", "e").await.unwrap();
    assert!(matches!(f.next().await, Event::ExecAdded { .. }));
    assert!(matches!(f.next().await, Event::ExecStarted { .. }));
    f.fake.cut();
    assert_eq!(f.exit_of("e").await, 255);
    assert_eq!(within(f.pod.wait("c", "e")).await.unwrap().status, 255);
}

#[tokio::test]
async fn a_second_delete_finds_nothing() {
    let mut f = fixture().await;
    let exec = oci_spec::runtime::Process::default();
    f.pod
        .add_exec("c", "e", Stdio::default(), exec)
        .await
        .unwrap();
    assert!(matches!(f.next().await, Event::ExecAdded { .. }));
    let err = f.pod.delete("c", "").await;
    assert!(err.is_ok(), "a created container may be deleted: {err:?}");
    assert!(matches!(f.next().await, Event::Delete { .. }));
    // The container booted the VM: it went with it.
    assert_eq!(f.fake.destroyed(), 1);
    assert_eq!(f.pod.pid().await, 0);
    assert!(f.pod.is_empty().await);
    let err = f.pod.delete("c", "").await.unwrap_err();
    assert!(matches!(err, PodError::NoContainer(_)), "{err}");
    let err = f.pod.delete("c", "e").await.unwrap_err();
    assert!(matches!(err, PodError::NoContainer(_)), "{err}");
}

#[tokio::test]
async fn a_running_process_is_not_deleted_and_an_exited_exec_only_once() {
    let f = fixture().await;
    let exec = oci_spec::runtime::Process::default();
    f.pod
        .add_exec("c", "e", Stdio::default(), exec)
        .await
        .unwrap();
    f.pod.start("c", "e").await.unwrap();
    let err = f.pod.delete("c", "e").await.unwrap_err();
    assert!(matches!(err, PodError::Precondition(_)), "{err}");
    f.fake.exit("c", "e", 0);
    within(f.pod.wait("c", "e")).await.unwrap();
    f.pod.delete("c", "e").await.unwrap();
    let err = f.pod.delete("c", "e").await.unwrap_err();
    assert!(matches!(err, PodError::NoProcess(..)), "{err}");
    assert_eq!(f.fake.destroyed(), 0);
}

/// A bundle for container `id` whose spec says it belongs to `pod`.
fn bundle_in_pod(dir: &std::path::Path, id: &str, pod: Option<&str>) -> CreateRequest {
    let bundle = dir.join(id);
    std::fs::create_dir(&bundle).unwrap();
    let mut spec = oci_spec::runtime::Spec::default();
    if let Some(pod) = pod {
        spec.set_annotations(Some(HashMap::from([
            (
                "io.kubernetes.cri.container-type".into(),
                "container".into(),
            ),
            ("io.kubernetes.cri.sandbox-id".into(), pod.into()),
        ])));
    }
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    CreateRequest {
        id: id.into(),
        bundle,
        rootfs: vec![],
        stdio: Stdio::default(),
        options: Default::default(),
    }
}

#[tokio::test]
async fn a_pod_container_joins_the_vm_and_leaves_it_running_when_deleted() {
    let mut f = fixture().await;
    let req = bundle_in_pod(f.dir.path(), "other", None);
    let err = f.pod.create(req).await.unwrap_err();
    assert!(matches!(err, PodError::Unsupported(_)), "{err}");
    let req = bundle_in_pod(f.dir.path(), "c2", Some("pod"));
    let bundle = req.bundle.clone();
    f.pod.create(req).await.unwrap();
    assert!(matches!(f.next().await, Event::Create { .. }));
    // Its rootfs went in as an archive on the scratch disk.
    let archive = format!("{}/c2.tar", airlock_runtime::sandbox::GUEST_SCRATCH_DIR);
    assert!(f.fake.file(&archive).is_some_and(|a| !a.is_empty()));
    assert!(f.fake.has_container("c2"));
    assert!(!bundle.join(crate::rootfs::ARCHIVE_FILE).exists());
    // The same id again is refused.
    let again = CreateRequest {
        id: "c2".into(),
        ..bundle_in_pod(f.dir.path(), "c2-again", Some("pod"))
    };
    let err = f.pod.create(again).await.unwrap_err();
    assert!(matches!(err, PodError::Exists(_)), "{err}");
    // Deleting it removes it in the guest; the VM stays.
    f.pod.delete("c2", "").await.unwrap();
    assert!(!f.fake.has_container("c2"));
    assert_eq!(f.fake.destroyed(), 0);
    assert_ne!(f.pod.pid().await, 0);
    assert_eq!(f.pod.stats("c").await.unwrap().pids_current, 1);
    // The shim going away takes the VM whatever state it is in.
    f.pod.destroy().await;
    assert_eq!(f.fake.destroyed(), 1);
    assert_eq!(f.pod.pid().await, 0);
}
