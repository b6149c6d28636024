//! `airlock-runtime`: starts, drives and tears down Airlock sandboxes on
//! the host. The `airlock` CLI (`src/bin/airlock/`) and the containerd
//! shim are its users.
//!
//! * [`config`]: the TOML config, with compiled-in defaults;
//! * [`state`]: `/run/airlock/<id>/` and the sandbox record;
//! * [`image`]: workload images (named, or converted from a directory);
//! * [`scratch`]: the per-sandbox scratch disk, scrubbed at teardown;
//! * [`vmm`]: the `airlock-vmm` child process;
//! * [`jail`]: its namespaces and cgroup (the VMM finishes its own jail);
//! * [`procs`]: process start times and exits, executables, reserved slots;
//! * [`net`]: `--net egress`: the sandbox's network namespace, tap, policy
//!   (nftables) and filter (DNS, proxy by name), removed at teardown;
//! * [`agent_client`]: hybrid-vsock handshake, ttrpc, version check;
//! * [`sandbox`]: the lifecycle that ties them together.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use airlock_runtime::config::RuntimeConfig;
//! use airlock_runtime::sandbox::{io, spec, Sandbox, SandboxOptions, Teardown, CONTAINER_ID};
//!
//! let config = RuntimeConfig::load(None)?;
//! let sandbox = Sandbox::create(&config, &SandboxOptions::from_config(&config), &mut |_| {}).await?;
//! let opts = spec::ProcessOptions { args: vec!["echo".into(), "hi".into()], ..Default::default() };
//! let spec = spec::container_spec(None, "demo", &opts, &Default::default())?;
//! sandbox.create_container(&spec).await?;
//! let init = sandbox.process(CONTAINER_ID, "");
//! let exit = init.attach(io::Attach::default()).await?;
//! let report = sandbox.teardown(Teardown::Graceful).await; // memory wiped, scratch scrubbed
//! # let _ = (exit, report); Ok(()) }
//! ```

pub mod agent_client;
pub mod config;
pub mod image;
pub mod jail;
pub mod net;
pub mod preflight;
pub mod procs;
pub mod sandbox;
pub mod scratch;
pub mod state;
pub mod vmm;
