//! `containerd-shim-airlock-v2`: containerd's runtime `io.containerd.airlock.v2`.
//! One shim process per pod (or per `ctr run` container) drives one
//! microVM through `airlock-runtime`; see ARCHITECTURE.md.

mod options;
mod pod;
mod process;
mod rootfs;
mod shim;
mod spec;
mod stdio;
mod task;

/// The runtime name containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.airlock.v2";

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (mkfs.ext4 through
        // std::process, the VMM through airlock-runtime); the crate's
        // SIGCHLD reaper would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::AirlockShim>(RUNTIME_ID, Some(config)).await;
}
