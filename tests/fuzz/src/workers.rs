//! The device worker pool, started once per process as the VMM starts it
//! (without seccomp filters: the fuzz process never asks for them), so
//! that activating a device does not cost a thread per input.

use std::sync::Once;

use airlock_vmm::devices::virtio::worker::start_pool;

/// Pool threads: a device per input runs at a time, but `cargo test` runs
/// the seeds of several targets at once.
const THREADS: usize = 4;

/// Starts the pool if this process has none yet.
pub fn start() {
    static START: Once = Once::new();
    START.call_once(|| {
        // Only fails if the pool exists, or cannot start: then each worker
        // gets a thread of its own.
        let _ = start_pool(THREADS);
    });
}
