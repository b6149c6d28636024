//! Booting a sandbox in three steps: [`prepare`] (checks, the image, the
//! state dir), [`spawn`] (the scratch disk, the jail, the VMM) and
//! [`connect`] (the agent, then its `CreateSandbox`). A failure in any of
//! them tears down what the earlier ones made.

use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_protocol::agent;

use super::teardown::teardown_state;
use super::{ctx, Sandbox, SandboxError, SandboxOptions, SCRATCH_DEVICE};
use crate::agent_client;
use crate::config::RuntimeConfig;
use crate::image::{self, ResolvedImage};
use crate::state::{SandboxId, SandboxRecord, StateDir};
use crate::{scratch, vmm};

/// What [`prepare`] made: nothing runs yet.
struct Prepared {
    vmm_binary: std::path::PathBuf,
    image: ResolvedImage,
    id: SandboxId,
    state: StateDir,
}

impl Sandbox {
    /// Boots a new sandbox. On failure everything it made is torn down.
    pub async fn create(
        config: &RuntimeConfig,
        opts: &SandboxOptions,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Self, SandboxError> {
        let prepared = prepare(config, opts, progress)?;
        // The started VMM, for the teardown after a failure (its record may
        // not have been written).
        let mut started: Option<SandboxRecord> = None;
        let result = async {
            let (record, net) = spawn(config, opts, &prepared, &mut started, progress)?;
            connect(config, &prepared, record, net.as_ref()).await
        }
        .await;
        match result {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                let state = &prepared.state;
                tracing::debug!(id = %prepared.id, "sandbox creation failed; tearing down: {e}");
                // A VMM that died on its own said why in its log, which the
                // teardown deletes: that line is the error to report.
                let e = match (&e, vmm::failure(state.path())) {
                    (SandboxError::Connect(agent_client::ConnectError::VmGone), Some(line)) => {
                        vmm::VmmError::Failed(line).into()
                    }
                    _ => e,
                };
                teardown_state(config, state, started.as_ref()).await;
                Err(e)
            }
        }
    }
}

/// Checks what the sandbox needs, resolves its image and makes its state
/// dir. Nothing to tear down on failure but what it returns.
fn prepare(
    config: &RuntimeConfig,
    opts: &SandboxOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Prepared, SandboxError> {
    // Whoever asked for the size (pod annotations, the pod's limits,
    // --cpus/--memory), it stays within the config's [limits].
    config
        .check_vm_size(u64::from(opts.vcpus), u64::from(opts.memory_mib))
        .map_err(SandboxError::Size)?;
    crate::preflight::check_user(config)?;
    config.check_artifacts()?;
    let vmm_binary = config.vmm_binary_path()?;
    let image = image::resolve(&opts.image, config, progress)?;
    // The host, most basic first: a usable KVM, then the jail's cgroup
    // v2, as `airlock doctor` lists them. After the input's own checks,
    // so that bad input is named as such on any host.
    crate::preflight::check_host(config)?;
    let id = SandboxId::generate();
    let state = StateDir::create(&config.state_dir, &id)?;
    Ok(Prepared {
        vmm_binary,
        image,
        id,
        state,
    })
}

/// Makes the scratch disk, reserves the jail and starts the VMM; its
/// record goes into `started` (for the teardown after a failure) and the
/// state dir.
fn spawn(
    config: &RuntimeConfig,
    opts: &SandboxOptions,
    prepared: &Prepared,
    started: &mut Option<SandboxRecord>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(SandboxRecord, Option<crate::net::GuestLink>), SandboxError> {
    let Prepared {
        vmm_binary,
        image: resolved,
        id,
        state,
    } = prepared;
    scratch::check_memory_backed(state.path())?;
    scratch::create(&state.scratch_path(), config.scratch_mib)?;
    let guest_cid = super::random_cid();
    let jail = match config.jail.enabled {
        true => {
            let mut jail = crate::jail::JailSpec::new(
                &config.jail,
                id.as_str(),
                &state.jail_root(),
                opts.memory_mib,
                config.scratch_mib,
            );
            (jail.uid, jail.gid) =
                crate::jail::reserve_uid(&config.jail, &config.state_dir, id.as_str())
                    .map_err(vmm::VmmError::from)?;
            Some(jail)
        }
        false => None,
    };
    let mut vm = vmm::VmConfig::new(config.kernel.clone());
    vm.initrd = Some(config.initrd.clone());
    vm.vcpus = u32::from(opts.vcpus);
    vm.memory_mib = u64::from(opts.memory_mib);
    vm.vsock = Some(vmm::VsockConfig {
        guest_cid: u64::from(guest_cid),
        uds: state.vsock_uds(),
        guest_connect: false,
        listen_fd: None,
    });
    vm.drives = vec![
        vmm::DriveConfig {
            path: resolved.path.clone(),
            read_only: true,
            id: "image".into(),
        },
        vmm::DriveConfig {
            path: state.scratch_path(),
            read_only: false,
            id: "scratch".into(),
        },
    ];
    vm.console = vmm::ConsoleOutput::File(state.console_path());
    vm.stop_grace_secs = config.timeouts.teardown_secs;
    if opts.net.mode != crate::net::NetMode::None || opts.net.pod_netns.is_some() {
        progress("setting up the network");
    }
    let net = crate::net::setup(
        &config.network,
        &config.state_dir,
        state.path(),
        id.as_str(),
        &opts.net,
        opts.ephemeral,
    )?;
    if let Some(net) = &net {
        vm.net = Some(vmm::NetConfig {
            tap_fd: net.tap.as_raw_fd(),
            mac: net.mac,
        });
    }
    let spec = vmm::VmmSpec {
        vm,
        dir: state.path().to_path_buf(),
        die_with_parent: opts.ephemeral,
        jail,
    };
    if !config.jail.enabled {
        tracing::warn!(id = %id, "[jail] enabled = false: the VMM runs unjailed, with its seccomp filters only");
    }
    progress("booting the microVM");
    let process = vmm::VmmProcess::spawn(vmm_binary, &spec)?;
    // The VMM has its own copy of the tap: ours closes here.
    let guest_net = net.map(|n| n.guest);
    let record = SandboxRecord {
        id: id.to_string(),
        vmm_pid: process.pid(),
        vmm_start_time: Some(process.start_time()),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        image: resolved.name.clone(),
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        guest_cid,
    };
    *started = Some(record.clone());
    state.write_record(&record)?;
    Ok((record, guest_net))
}

/// Connects to the agent of the VMM of `record` once it is ready, and has
/// it set up the sandbox.
async fn connect(
    config: &RuntimeConfig,
    prepared: &Prepared,
    record: SandboxRecord,
    net: Option<&crate::net::GuestLink>,
) -> Result<Sandbox, SandboxError> {
    let state = &prepared.state;
    let deadline = Duration::from_secs(config.timeouts.agent_connect_secs);
    let pid = record.vmm_pid;
    let alive = move || !vmm::exited(pid);
    let agent = agent_client::connect_when_ready(
        &state.vsock_uds(),
        &vmm::events_path(state.path()),
        deadline,
        alive,
    )
    .await?;
    let sandbox = Sandbox {
        id: prepared.id.clone(),
        state: state.clone(),
        record,
        agent,
        image_config: prepared.image.config.clone(),
        config: config.clone(),
    };
    sandbox.setup().await?;
    // Before any workload runs: the guest's NIC, routes and DNS.
    if let Some(net) = net {
        sandbox.configure_network(&guest_network(net)).await?;
    }
    Ok(sandbox)
}

impl Sandbox {
    /// The agent's `CreateSandbox`: hostname, clock, scratch disk.
    async fn setup(&self) -> Result<(), SandboxError> {
        let req = agent::CreateSandboxRequest {
            sandbox_id: self.id.to_string(),
            hostname: self.id.to_string(),
            epoch_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            scratch_device: SCRATCH_DEVICE.into(),
            ..Default::default()
        };
        self.call("CreateSandbox", |c| c.create_sandbox(ctx(), &req))
            .await?;
        Ok(())
    }
}

/// What the agent's `ConfigureNetwork` is told of the guest's link.
fn guest_network(link: &crate::net::GuestLink) -> super::GuestNetwork {
    super::GuestNetwork {
        interfaces: vec![super::GuestInterface {
            mac: link.mac.clone(),
            name: "eth0".into(),
            addresses: vec![format!("{}/{}", link.address, link.prefix)],
            mtu: link.mtu,
        }],
        routes: link
            .gateway
            .map(|gw| super::GuestRoute {
                destination: "0.0.0.0/0".into(),
                gateway: gw.to_string(),
                device: "eth0".into(),
            })
            .into_iter()
            .collect(),
        nameservers: link.nameservers.iter().map(|a| a.to_string()).collect(),
        search: vec![],
        hostname: None,
    }
}
