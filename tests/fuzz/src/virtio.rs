//! Device targets: a guest's queues of fuzz input, walked by each device's
//! own code, and the hybrid-vsock `CONNECT` parser.

use std::sync::OnceLock;

use airlock_vmm::devices::virtio::block::backend::DiskFile;
use airlock_vmm::devices::virtio::block::{request, ID_BYTES};
use airlock_vmm::devices::virtio::net::tap::Tap;
use airlock_vmm::devices::virtio::net::{NetQueues, AVAIL_FEATURES, FRAME_BUDGET};
use airlock_vmm::devices::virtio::rng::{fill_chain, MAX_REQUEST};
use airlock_vmm::devices::virtio::vsock::connect::parse_connect;
use airlock_vmm::devices::virtio::vsock::muxer::{bind_listener, Muxer};
use airlock_vmm::devices::virtio::vsock::packet::MAX_PKT_DATA;
use airlock_vmm::devices::virtio::vsock::{process_rx, process_tx};
use airlock_vmm::devices::virtio::wants_interrupt;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

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

/// Where `virtio_net` reads the lengths of the frames the network sends
/// the guest: four little-endian `u16`s in guest memory.
pub const NET_FRAME_LENS: u64 = 0x7f00;

/// What a `virtio_net` run did, for the seeds' checks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetTrace {
    /// Frames that reached the network.
    pub sent: usize,
    /// Used entries in the rx queue.
    pub rx_used: u16,
    /// Frames dropped, either way.
    pub dropped: u64,
}

/// virtio-net: the tx queue's chains are sent to the network (one end of
/// a datagram socketpair, as the tap), then four frames of lengths read
/// from guest memory at [`NET_FRAME_LENS`] (runts, mergeable spans, up to
/// 64 KiB) are offered to the rx queue's chains, before and after a guest
/// notification. The first byte's top bit turns mergeable buffers off.
pub fn virtio_net(data: &[u8]) {
    let _ = virtio_net_trace(data);
}

/// [`virtio_net`], reporting what it did.
pub fn virtio_net_trace(data: &[u8]) -> Option<NetTrace> {
    let mrg = data.first()? & 0x80 == 0;
    let (mem, queues) = memory_and_queues(data, 2)?;
    let mut queues = queues.into_iter();
    let (rx, tx) = (queues.next()?, queues.next()?);
    let (dev_end, network) = std::os::unix::net::UnixDatagram::pair().ok()?;
    network.set_nonblocking(true).ok()?;
    let tap = Tap::frame_fd(dev_end.into()).ok()?;
    let features = if mrg {
        AVAIL_FEATURES
    } else {
        AVAIL_FEATURES & !(1 << VIRTIO_NET_F_MRG_RXBUF)
    };
    let mut q = NetQueues::new(mem.clone(), rx, tx, tap, features);
    let passes = MAX_CHAINS / FRAME_BUDGET;
    for _ in 0..passes {
        if !q.process_tx().more {
            break;
        }
    }
    let mut trace = NetTrace::default();
    let mut buf = vec![0u8; 1 << 16];
    while network.recv(&mut buf).is_ok() {
        trace.sent += 1;
    }
    for i in 0..4u64 {
        let len: u16 = mem.read_obj(GuestAddress(NET_FRAME_LENS + 2 * i)).ok()?;
        let frame: Vec<u8> = (0..usize::from(len)).map(|b| b as u8).collect();
        let _ = network.send(&frame);
    }
    for _ in 0..passes {
        if !q.process_rx().more {
            break;
        }
    }
    q.rx_notified();
    q.process_rx();
    wants_interrupt(&mut q.rx, &mem);
    wants_interrupt(&mut q.tx, &mem);
    trace.rx_used = mem.read_obj(GuestAddress(0x2002)).ok()?;
    trace.dropped = q.dropped();
    Some(trace)
}
