//! The bodies of Airlock's fuzz targets. `fuzz/` (cargo-fuzz, nightly)
//! calls them with libFuzzer's inputs; `cargo test` replays the seed corpus
//! in `fuzz/corpus/<target>/` through them on stable, so they always build
//! and the seeds always pass.
//!
//! Every body takes arbitrary bytes, as a hostile guest or a bad file
//! would give them, and must neither panic nor hang:
//!
//! ```
//! airlock_fuzz::run("vsock_connect", b"CONNECT 1024\n");
//! ```

pub mod agent;
pub mod blk_dev;
pub mod config;
pub mod driver;
pub mod egress;
pub mod guest;
pub mod layer;
pub mod mmio;
pub mod virtio;
pub mod vsock_conn;
pub mod workers;

/// A target's body: takes any bytes, must not panic or hang.
pub type Body = fn(&[u8]);

/// The targets, by name: the names of `fuzz/fuzz_targets/*.rs`.
pub const TARGETS: &[(&str, Body)] = &[
    ("vsock_queues", virtio::vsock_queues),
    ("blk_queue", virtio::blk_queue),
    ("rng_queue", virtio::rng_queue),
    ("vsock_connect", virtio::vsock_connect),
    ("agent_request", agent::agent_request),
    ("oci_spec_and_config", config::oci_spec_and_config),
    ("layer", layer::layer),
    ("vsock_connection", vsock_conn::vsock_connection),
    ("blk_device", blk_dev::blk_device),
    ("mmio_transport", mmio::mmio_transport),
    ("virtio_net", virtio::virtio_net),
    ("egress_first_bytes", egress::egress_first_bytes),
];

/// Runs target `name` on `data`.
///
/// # Panics
/// On an unknown target name.
pub fn run(name: &str, data: &[u8]) {
    let (_, body) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"));
    body(data);
}
