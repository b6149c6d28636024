//! The sandbox against the in-process fake agent: no VM, no KVM.

use std::time::Duration;

use super::container::GuestRootfs;
use super::io::Output;
use super::testing::{self, FakeAgent};
use super::*;

/// A sandbox on a fresh fake agent, with container `c` created.
async fn sandbox(dir: &std::path::Path) -> (FakeAgent, Sandbox) {
    let fake = FakeAgent::start(dir).await;
    let agent = fake.connect().await.unwrap();
    let sandbox = Sandbox::with_agent(&testing::config(dir), agent);
    let rootfs = GuestRootfs::image();
    sandbox
        .create_container_on("c", &oci_spec::runtime::Spec::default(), &rootfs)
        .await
        .unwrap();
    (fake, sandbox)
}

fn process() -> oci_spec::runtime::Process {
    oci_spec::runtime::Process::default()
}

/// Fails the test rather than hang it.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("still waiting after 10 s")
}

#[tokio::test]
async fn configure_network_sends_one_request_and_reports_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAgent::start(dir.path()).await;
    let agent = fake.connect().await.unwrap();
    let sandbox = Sandbox::with_agent(&testing::config(dir.path()), agent);
    let net = GuestNetwork {
        interfaces: vec![GuestInterface {
            mac: "02:00:00:00:00:01".into(),
            name: "eth0".into(),
            addresses: vec!["10.0.0.2/24".into()],
            mtu: 1500,
        }],
        routes: vec![GuestRoute {
            gateway: "10.0.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        nameservers: vec!["10.0.0.1".into()],
        hostname: Some("box".into()),
        ..Default::default()
    };
    sandbox.configure_network(&net).await.unwrap();
    let got = fake.network_requests();
    assert_eq!(got, [net.request()]);
    assert_eq!(got[0].version, airlock_protocol::NETWORK_CONFIG_VERSION);
    assert_eq!(got[0].hostname, "box");
    // A second call is refused, and the error names the call.
    let err = sandbox.configure_network(&net).await.unwrap_err();
    assert!(
        matches!(err, SandboxError::Agent("ConfigureNetwork", _)),
        "{err}"
    );
    assert!(err.to_string().contains("once per VM"), "{err}");
}

#[tokio::test]
async fn an_exec_streams_its_output_and_reports_its_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    fake.set_output("e", b"hello\n");
    let p = sandbox.exec_in("c", "e", &process()).await.unwrap();
    assert_eq!((p.container(), p.exec_id()), ("c", "e"));
    let mut out = Vec::new();
    let copy = p.copy_output(Output::Stdout, &mut out);
    let ended = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fake.exit("c", "e", 3);
    };
    let (copied, ()) = within(async { tokio::join!(copy, ended) }).await;
    copied.unwrap();
    assert_eq!(out, b"hello\n");
    let exit = within(p.wait()).await.unwrap();
    assert_eq!((exit.status, exit.signal, exit.oom_killed), (3, 0, false));
}

#[tokio::test]
async fn the_agent_gone_mid_stream_fails_the_copy_and_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    fake.set_output("e", b"first");
    let p = sandbox.exec_in("c", "e", &process()).await.unwrap();
    let mut out = Vec::new();
    let copy = p.copy_output(Output::Stdout, &mut out);
    let waited = p.wait();
    let cut = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.cut();
    };
    let (copied, waited, ()) = within(async { tokio::join!(copy, waited, cut) }).await;
    // What came before the cut is there; then the copy fails.
    assert_eq!(out, b"first");
    let err = copied.unwrap_err();
    assert!(matches!(err, SandboxError::Agent("ReadStdout", _)), "{err}");
    let err = waited.unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::AgentLost(..) | SandboxError::Agent("WaitProcess", _)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_exec_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, sandbox) = sandbox(dir.path()).await;
    let p = sandbox.process("c", "nope");
    let err = within(p.wait()).await.unwrap_err();
    assert_eq!(err.agent_message(), Some("process \"nope\" not found"));
    assert_eq!(
        err.to_string(),
        "the agent refused WaitProcess: process \"nope\" not found"
    );
    let err = p.signal(9, false).await.unwrap_err();
    assert!(
        matches!(err, SandboxError::Agent("SignalProcess", _)),
        "{err}"
    );
    let err = p.resize(24, 80).await.unwrap_err();
    assert!(
        matches!(err, SandboxError::Agent("TtyWinResize", _)),
        "{err}"
    );
    let err = sandbox.exec_in("nope", "e", &process()).await.unwrap_err();
    assert_eq!(err.agent_message(), Some("container nope not found"));
}

#[tokio::test]
async fn a_wait_after_a_kill_reports_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, sandbox) = sandbox(dir.path()).await;
    let p = sandbox.exec_in("c", "e", &process()).await.unwrap();
    sandbox.signal("c", "e", 9, false).await.unwrap();
    let exit = within(p.wait()).await.unwrap();
    assert_eq!((exit.status, exit.signal), (137, 9));
    // Again: the exit stays.
    assert_eq!(within(p.wait()).await.unwrap(), exit);
}

#[tokio::test]
async fn a_second_teardown_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    let state = sandbox.state.path().to_path_buf();
    assert!(state.exists());
    let first = sandbox.teardown(Teardown::Graceful).await;
    assert!(first.state_removed, "{first:?}");
    assert_eq!(first.wiped_mib, None);
    assert!(!state.exists());
    assert_eq!(fake.destroyed(), 1);
    // The state dir is gone already: still gone, and a kill does not ask
    // the agent.
    let second = sandbox.teardown(Teardown::Kill).await;
    assert!(second.state_removed, "{second:?}");
    assert_eq!(second.scratch_scrubbed_bytes, 0);
    assert_eq!(fake.destroyed(), 1);
}

#[tokio::test]
async fn a_teardown_on_a_dead_agent_still_removes_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    fake.cut();
    let report = within(sandbox.teardown(Teardown::Graceful)).await;
    assert!(report.state_removed, "{report:?}");
}

#[tokio::test]
async fn a_container_removed_twice_is_not_found_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    sandbox.remove_container("c").await.unwrap();
    assert!(!fake.has_container("c"));
    let err = sandbox.remove_container("c").await.unwrap_err();
    assert_eq!(err.agent_message(), Some("container c not found"));
}

#[tokio::test]
async fn stats_and_files_go_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    let stats = sandbox.container_stats("c").await.unwrap();
    assert_eq!((stats.memory_usage_bytes, stats.pids_current), (4096, 1));
    assert!(sandbox.container_stats("nope").await.is_err());
    let src = dir.path().join("f");
    std::fs::write(&src, b"data").unwrap();
    let n = sandbox.write_file_from("", &src, "/x/f").await.unwrap();
    assert_eq!(n, 4);
    assert_eq!(fake.file("/x/f").unwrap(), b"data");
}

#[tokio::test]
async fn stdin_goes_in_and_is_closed_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, sandbox) = sandbox(dir.path()).await;
    let p = sandbox.exec_in("c", "e", &process()).await.unwrap();
    let mut input: &[u8] = b"typed";
    within(p.copy_input(&mut input)).await.unwrap();
    assert_eq!(fake.stdin("c", "e"), Some((b"typed".to_vec(), true)));
    let err = sandbox.process("c", "x").close_stdin().await.unwrap_err();
    assert!(matches!(err, SandboxError::Agent("CloseStdin", _)), "{err}");
}

#[tokio::test]
async fn a_file_copied_in_comes_back_out_and_a_failed_copy_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, sandbox) = sandbox(dir.path()).await;
    let src = dir.path().join("in.txt");
    std::fs::write(&src, b"round trip").unwrap();
    // Not a directory in the guest: the path is the file's.
    assert_eq!(sandbox.copy_in(&src, "/tmp/f").await.unwrap(), 10);
    // Into a directory: named after the source.
    assert_eq!(sandbox.copy_in(&src, "/tmp/").await.unwrap(), 10);
    let out = dir.path().join("out.txt");
    assert_eq!(sandbox.copy_out("/tmp/in.txt", &out).await.unwrap(), 10);
    assert_eq!(std::fs::read(&out).unwrap(), b"round trip");
    let missing = dir.path().join("missing.txt");
    let err = sandbox.copy_out("/nope", &missing).await.unwrap_err();
    assert_eq!(err.agent_message(), Some("/nope not found"));
    assert!(!missing.exists());
    assert!(!missing.with_extension("airlock-partial").exists());
    let err = sandbox.copy_in(dir.path(), "/tmp/").await.unwrap_err();
    assert!(matches!(err, SandboxError::NotAFile(_)), "{err}");
}
