//! Device targets: a guest's queues of fuzz input, walked by each device's
//! own code, and the hybrid-vsock `CONNECT` parser.

use std::sync::OnceLock;

use airlock_vmm::devices::virtio::block::backend::DiskFile;
use airlock_vmm::devices::virtio::block::{request, ID_BYTES};
use airlock_vmm::devices::virtio::rng::{fill_chain, MAX_REQUEST};
use airlock_vmm::devices::virtio::vsock::connect::parse_connect;
use airlock_vmm::devices::virtio::vsock::muxer::{bind_listener, Muxer};
use airlock_vmm::devices::virtio::vsock::packet::MAX_PKT_DATA;
use airlock_vmm::devices::virtio::vsock::{process_rx, process_tx};
use airlock_vmm::devices::virtio::wants_interrupt;
use virtio_queue::QueueT;

use crate::guest::memory_and_queues;

/// At most this many chains are taken from a queue per input: the avail
/// index is the fuzzer's, and may run far ahead.
const MAX_CHAINS: usize = 512;

/// vsock: the TX queue's packets reach the muxer (connection requests to
/// host ports that nobody serves, data, credit updates, resets, garbage),
/// then the RX queue takes whatever the muxer has for the guest, and each
/// queue's avail ring says whether the guest wants an interrupt.
pub fn vsock_queues(data: &[u8]) {
    let Some((mem, mut queues)) = memory_and_queues(data, 2) else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let uds = dir.path().join("v.sock");
    let Ok(listener) = bind_listener(&uds) else {
        return;
    };
    let Ok(mut muxer) = Muxer::new(3, uds, listener) else {
        return;
    };
    let (rx, tx) = queues.split_at_mut(1);
    process_tx(&mem, &mut tx[0], &mut muxer);
    muxer.process_events();
    let mut scratch = vec![0u8; MAX_PKT_DATA as usize];
    process_rx(&mem, &mut rx[0], &mut muxer, &mut scratch);
    wants_interrupt(&mut rx[0], &mem);
    wants_interrupt(&mut tx[0], &mem);
    muxer.reset();
}

/// A 64 KiB drive image shared by every run (its contents do not matter).
fn disk_path() -> &'static std::path::Path {
    static DISK: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    DISK.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().expect("a temporary drive image");
        f.as_file().set_len(64 << 10).expect("size the drive image");
        f
    })
    .path()
}

/// virtio-blk: each chain parsed and checked against the drive, and
/// executed (reads, writes, flush, get-id) when it is valid.
pub fn blk_queue(data: &[u8]) {
    let Some((mem, mut queues)) = memory_and_queues(data, 1) else {
        return;
    };
    let Ok(mut disk) = DiskFile::open(disk_path(), false) else {
        return;
    };
    let capacity = 64 << 10;
    let id = [b'f'; ID_BYTES];
    let q = &mut queues[0];
    for _ in 0..MAX_CHAINS {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let parsed = request::parse(&mem, chain, capacity);
        if let Ok(req) = parsed.request {
            let _ = req.execute(&mem, &mut disk, &id);
        }
    }
}

/// virtio-rng: each chain's writable buffers filled.
pub fn rng_queue(data: &[u8]) {
    let Some((mem, mut queues)) = memory_and_queues(data, 1) else {
        return;
    };
    let mut buf = vec![0u8; MAX_REQUEST];
    let q = &mut queues[0];
    for _ in 0..MAX_CHAINS {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let _ = fill_chain(&mem, chain, &mut buf, MAX_REQUEST);
    }
}

/// The hybrid-vsock `CONNECT <port>\n` line a host client writes.
pub fn vsock_connect(data: &[u8]) {
    let _ = parse_connect(data);
}
