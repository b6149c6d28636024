//! `containerd-shim-airlock-v2`: containerd's runtime `io.containerd.airlock.v2`.
//! One shim process per pod (or per `ctr run` container) drives one
//! microVM through `airlock-runtime`; see ARCHITECTURE.md.

mod logging;
mod net;
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

fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (mkfs.ext4 through
        // std::process, the VMM through airlock-runtime); the crate's
        // SIGCHLD reaper would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Some(id) = std::env::var_os(shim::CLEANUP_ENV) {
        // Detached by `delete`, with stderr on the cleanup log (shim.rs).
        logging::to_writer(std::io::stderr);
        let id = id.to_string_lossy().into_owned();
        let config = std::env::var_os(shim::CLEANUP_CONFIG_ENV)
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
        if let Err(e) = rt.block_on(shim::cleanup(&id, config.as_deref())) {
            tracing::error!(
                "cleanup of microVM {id} after a dead shim: {e}: its VMM may still run"
            );
            std::process::exit(1);
        }
        return;
    }
    rt.block_on(containerd_shim::asynchronous::run::<shim::AirlockShim>(
        RUNTIME_ID,
        Some(config),
    ));
    // A stdin copy may still sit in a blocking open() of a FIFO whose
    // writer went away before connecting: do not wait for it, exit.
    rt.shutdown_background();
}
