//! `airlock-agent`: PID 1 inside every Airlock microVM.
//!
//! The one binary (`main.rs`) plays three parts, chosen by its first
//! argument:
//! * no argument: PID 1 — mounts, reaping, the ttrpc server on vsock port
//!   1024 (`init/`, `rpc/`, `sandbox.rs`, `container/`, `process/`,
//!   `files.rs`, `network/`);
//! * `launch`: the single-threaded launcher that PID 1 starts for each OCI
//!   operation, because youki's libcontainer must not run in a process with
//!   other threads (`launcher/`);
//! * `pause`: the placeholder init process of a long-lived sandbox's
//!   container, which sleeps until it is killed (`pause.rs`).
//!
//! The library exists so that the fuzz target `agent_request` (tests/fuzz)
//! can call the RPC handlers: [`rpc::Service`] over a
//! [`sandbox::Sandbox`] built on a [`machine::Fake`], a directory that
//! stands for the guest (see `machine/` for what the fake refuses to do).
//! Everything else stays private to the crate.

mod boot_timer;
mod cmdline;
pub mod console;
mod container;
mod files;
pub mod init;
pub mod launcher;
pub mod machine;
pub mod network;
pub mod pause;
pub mod process;
pub mod rpc;
pub mod sandbox;
mod sysinfo;
