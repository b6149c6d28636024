//! Kubernetes' view: CRI calls to a real containerd's CRI plugin, exactly
//! as the kubelet makes them (runtime handler `airlock`), with a pod of
//! two containers that must share one microVM.

use std::collections::HashMap;

use airlock_e2e::containerd::{Containerd, CRI_IMAGE};
use airlock_e2e::{on_real_kvm, processes_mentioning, vmm_processes};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

async fn connect(c: &Containerd) -> RuntimeServiceClient<Channel> {
    let socket = c.socket();
    let channel = Endpoint::try_from("http://[::]")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to containerd's CRI socket");
    RuntimeServiceClient::new(channel)
}

async fn state_of(cri: &mut RuntimeServiceClient<Channel>, id: &str) -> i32 {
    cri.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
    .state
}

fn pod_config(log_dir: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "agent-pod".into(),
            uid: "0f3c6a52-airlock-e2e".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "agent-pod".into(),
        log_directory: log_dir.into(),
        labels: HashMap::from([("app".into(), "agent".into())]),
        // Sizes the pod's VM (deploy/example-agent-pod.yaml does the same).
        annotations: HashMap::from([("io.airlock.memory-mib".into(), "384".into())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // The node's network: there is no CNI plugin in the test.
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: CRI_IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A containerd with the CRI plugin (and CNI with `conflist`), the test
/// image imported, and a directory for the pods' logs.
fn cri_containerd(conflist: Option<&str>) -> (Containerd, String) {
    let mut c = match conflist {
        Some(list) => Containerd::start_with_cni(list),
        None => Containerd::start(true),
    };
    // Imported before the CRI plugin loads its image list.
    c.import_image_as("k8s.io", CRI_IMAGE);
    c.restart();
    let log_dir = c.dir.join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    (c, log_dir.display().to_string())
}

#[test]
fn a_pod_through_cri_runs_in_one_vm_and_leaves_nothing() {
    on_real_kvm(
        "a_pod_through_cri_runs_in_one_vm_and_leaves_nothing",
        || {
            let (c, log_dir) = cri_containerd(None);

            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut cri = connect(&c).await;
                let version = cri
                    .version(VersionRequest::default())
                    .await
                    .unwrap_or_else(|e| panic!("Version: {e}\n{}", c.log()));
                println!("CRI: {:?}", version.get_ref());

                let config = pod_config(&log_dir);
                let pod = cri
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(config.clone()),
                        runtime_handler: "airlock".into(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()))
                    .into_inner()
                    .pod_sandbox_id;

                let mut ids = Vec::new();
                for (name, secs) in [("agent", 1001), ("sidecar", 1002)] {
                    let id = create_and_start(
                        &mut cri,
                        &c,
                        &pod,
                        container_config(
                            name,
                            &[
                                "sh",
                                "-c",
                                &format!("echo {name} started; exec sleep {secs}"),
                            ],
                        ),
                        &config,
                    )
                    .await;
                    ids.push(id);
                }

                // One VM (one VMM process, one shim) for the whole pod.
                let vmms = vmm_processes();
                assert_eq!(vmms.len(), 1, "{vmms:?}");
                let shims: Vec<_> = processes_mentioning("containerd-shim-airlock-v2")
                    .into_iter()
                    .filter(|p| p.contains("-socket"))
                    .collect();
                assert_eq!(shims.len(), 1, "{shims:?}");

                // ExecSync: output and exit code, in the right container.
                let out = cri
                    .exec_sync(ExecSyncRequest {
                        container_id: ids[0].clone(),
                        cmd: vec![
                            "sh".into(),
                            "-c".into(),
                            "echo out; echo err >&2; cat /proc/1/cmdline; exit 3".into(),
                        ],
                        timeout: 120,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(out.exit_code, 3);
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    stdout, "out\nsleep\x001001\x00",
                    "ExecSync runs in that container"
                );
                assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

                // UpdateContainerResources and ContainerStats reach the container's
                // cgroup inside the VM.
                cri.update_container_resources(UpdateContainerResourcesRequest {
                    container_id: ids[1].clone(),
                    linux: Some(LinuxContainerResources {
                        memory_limit_in_bytes: 200 << 20,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", c.log()));
                let out = cri
                    .exec_sync(ExecSyncRequest {
                        container_id: ids[1].clone(),
                        cmd: vec![
                            "sh".into(),
                            "-c".into(),
                            "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max".into(),
                        ],
                        timeout: 120,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    (200u64 << 20).to_string()
                );
                let stats = cri
                    .container_stats(ContainerStatsRequest {
                        container_id: ids[1].clone(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", c.log()))
                    .into_inner()
                    .stats
                    .unwrap();
                let memory = stats
                    .memory
                    .and_then(|m| m.working_set_bytes)
                    .map_or(0, |v| v.value);
                assert!(memory > 0, "{memory}");

                // The pod's annotation sized the VM.
                let out = cri
                    .exec_sync(ExecSyncRequest {
                        container_id: ids[1].clone(),
                        cmd: vec!["cat".into(), "/proc/meminfo".into()],
                        timeout: 120,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let meminfo = String::from_utf8_lossy(&out.stdout);
                let kib: u64 = meminfo
                    .lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{meminfo}"));
                assert!(kib > 300 * 1024 && kib <= 384 * 1024, "MemTotal {kib} KiB");

                assert_eq!(
                    state_of(&mut cri, &ids[1]).await,
                    ContainerState::ContainerRunning as i32
                );

                // The container's output reached its CRI log.
                let log =
                    std::fs::read_to_string(format!("{log_dir}/sidecar.log")).unwrap_or_default();
                assert!(log.contains("sidecar started"), "{log:?}");

                cri.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log()));
                assert_eq!(
                    state_of(&mut cri, &ids[0]).await,
                    ContainerState::ContainerExited as i32
                );
                cri.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log()));
                let left = cri
                    .list_containers(ListContainersRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .containers;
                assert!(left.is_empty(), "{left:?}");
            });

            // Nothing of the pod is left on the host.
            c.assert_nothing_left();
        },
    );
}

/// The pod network of the CNI test: Debian's bridge and host-local
/// plugins on a documentation subnet; the bridge is the node's gateway.
const CONFLIST: &str = r#"{"cniVersion": "1.0.0", "name": "airlock-e2e", "plugins": [
  {"type": "bridge", "bridge": "airlock-e2e0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.51.100.0/24", "gateway": "198.51.100.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}"#;

/// A pod on the CNI network (the pod network namespace, CRI's default).
fn net_pod_config(name: &str, log_dir: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.into(),
        ..Default::default()
    }
}

/// A container serving `text` over HTTP on port 8080 (busybox httpd).
fn web_container(name: &str, text: &str) -> ContainerConfig {
    container_config(
        name,
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p /www && echo {text} > /www/index.html && exec busybox httpd -f -p 8080 -h /www"
            ),
        ],
    )
}

/// Runs a pod with one web container through `handler`; (pod, container, pod IP).
async fn web_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    c: &Containerd,
    handler: &str,
    name: &str,
    log_dir: &str,
) -> (String, String, String) {
    let config = net_pod_config(name, log_dir);
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", c.log()))
        .into_inner()
        .pod_sandbox_id;
    let ip = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with("198.51.100."), "{handler} pod IP {ip:?}");
    let web = web_container("web", &format!("{name}-page"));
    let id = create_and_start(cri, c, &pod, web, &config).await;
    (pod, id, ip)
}

/// CreateContainer of `config` in `pod`, then StartContainer; its id.
async fn create_and_start(
    cri: &mut RuntimeServiceClient<Channel>,
    c: &Containerd,
    pod: &str,
    config: ContainerConfig,
    sandbox_config: &PodSandboxConfig,
) -> String {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", c.log()))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", c.log()));
    id
}

/// `cmd` in container `id`: (exit code, stdout).
async fn exec(cri: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &str) -> (i32, String) {
    let out = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!(
        "exec {cmd:?} in {id}: {} {stdout:?} {:?}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.exit_code, stdout)
}

/// An HTTP GET of `addr` (IP:PORT) in container `id`, retried for 20 s
/// (the server may still be starting).
async fn fetch_in(cri: &mut RuntimeServiceClient<Channel>, id: &str, addr: &str) -> String {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // busybox nc, not wget: the static busybox's wget crashes in a
        // root without NSS configuration (glibc's static NSS).
        let (ip, port) = addr.split_once(':').unwrap_or((addr, "80"));
        let (code, out) = exec(
            cri,
            id,
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {ip} {port}"),
        )
        .await;
        if code == 0 || std::time::Instant::now() > until {
            return out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// An HTTP GET from the node (this process), retried for 20 s.
fn fetch_from_node(addr: &str) -> String {
    use std::io::{Read, Write};
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = std::net::TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match got {
            Ok(text) => return text,
            Err(e) if std::time::Instant::now() > until => return format!("error: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

fn command_lines(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_pods_cni_ip_is_its_vms_and_reaches_the_node_and_a_runc_pod() {
    on_real_kvm(
        "a_pods_cni_ip_is_its_vms_and_reaches_the_node_and_a_runc_pod",
        || {
            let (c, log_dir) = cri_containerd(Some(CONFLIST));
            let netns_before = command_lines(&["ip", "netns", "list"]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut cri = connect(&c).await;
                let (vm_pod, vm_web, vm_ip) =
                    web_pod(&mut cri, &c, "airlock", "vm-pod", &log_dir).await;
                let (runc_pod, runc_web, runc_ip) =
                    web_pod(&mut cri, &c, "runc", "runc-pod", &log_dir).await;

                // The CNI IP is the VM's own: eth0 in the guest holds it.
                let (_, addrs) = exec(&mut cri, &vm_web, "busybox ip -4 -o addr show").await;
                assert!(
                    addrs.contains(&format!("eth0    inet {vm_ip}/24"))
                        || addrs.contains(&format!("inet {vm_ip}/24")),
                    "{addrs}"
                );
                let (_, kernel) = exec(&mut cri, &vm_web, "cat /proc/version").await;
                assert!(!kernel.is_empty());

                // The VM's server from the node and from the runc pod.
                // A second container of the VM's pod shares its network:
                // localhost reaches the first one's server.
                let sidecar = create_and_start(
                    &mut cri,
                    &c,
                    &vm_pod,
                    container_config("sidecar", &["sleep", "1000"]),
                    &net_pod_config("vm-pod", &log_dir),
                )
                .await;
                let page = fetch_in(&mut cri, &sidecar, "127.0.0.1:8080").await;
                assert!(page.contains("vm-pod-page"), "{page}");

                let page = fetch_from_node(&format!("{vm_ip}:8080"));
                assert!(page.contains("vm-pod-page"), "{page}");
                let page = fetch_in(&mut cri, &runc_web, &format!("{vm_ip}:8080")).await;
                assert!(page.contains("vm-pod-page"), "{page}");
                // And back: the VM reaches the runc pod and the node.
                let page = fetch_in(&mut cri, &vm_web, &format!("{runc_ip}:8080")).await;
                assert!(page.contains("runc-pod-page"), "{page}");
                let node =
                    std::net::TcpListener::bind("198.51.100.1:8081").expect("bind on the bridge");
                std::thread::spawn(move || {
                    use std::io::Write;
                    for mut s in node.incoming().flatten() {
                        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nnode-page\n");
                    }
                });
                let page = fetch_in(&mut cri, &vm_web, "198.51.100.1:8081").await;
                assert!(page.contains("node-page"), "{page}");

                let veths = |pods: usize| {
                    let links =
                        command_lines(&["ip", "-o", "link", "show", "master", "airlock-e2e0"]);
                    assert_eq!(links.len(), pods, "{links:#?}");
                };
                veths(2);
                for pod in [&vm_pod] {
                    cri.stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log()));
                    cri.remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log()));
                }
                // The VM pod's veth and namespace are gone; the runc pod's stay.
                veths(1);
                let netns_now = command_lines(&["ip", "netns", "list"]);
                assert_eq!(netns_now.len(), netns_before.len() + 1, "{netns_now:#?}");
                let vmms = vmm_processes();
                assert!(vmms.is_empty(), "{vmms:?}");
                let taps: Vec<String> = command_lines(&["ip", "-o", "link"])
                    .into_iter()
                    .filter(|l| l.contains("tap"))
                    .collect();
                assert!(taps.is_empty(), "{taps:?}");
                cri.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: runc_pod.clone(),
                })
                .await
                .unwrap();
                cri.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: runc_pod,
                })
                .await
                .unwrap();
                veths(0);
            });
            c.assert_nothing_left();
        },
    );
}
