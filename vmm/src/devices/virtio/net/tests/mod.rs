//! virtio-net tests: the test plays the guest driver through
//! `MockSplitQueue` rings in guest memory, and the tap's far side through
//! the other end of a `SOCK_DGRAM` socketpair (which keeps frame
//! boundaries as a tap does). Here the harness; the queues' tests in
//! `tx.rs` and `rx.rs`, the device and its worker's in `worker.rs`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tap::{Tap, VNET_HDR_LEN};
use super::*;

mod rx;
mod tx;
mod worker;

const MEM_SIZE: usize = 0x40_0000;
/// Where the guest's frame buffers start (the rings are below).
const BUFS: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Guest memory that outlives the rings that borrow it.
fn memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ))
}

/// The rx ring at 0 and the tx ring at 64 KiB, of `size` entries each.
fn rings(
    mem: &'static GuestMemoryMmap,
    size: u16,
) -> (
    MockSplitQueue<'static, GuestMemoryMmap>,
    MockSplitQueue<'static, GuestMemoryMmap>,
) {
    (
        MockSplitQueue::create(mem, GuestAddress(0), size),
        MockSplitQueue::create(mem, GuestAddress(0x1_0000), size),
    )
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Where a ring's used ring lies, from its descriptor table: the mock
/// places it right after the avail ring's first few entries (its `end` is
/// short), where the used entries would overwrite the avail ring's later
/// ones; the queues here use their own, well apart.
const USED_OFFSET: u64 = 0x8000;

fn used_addr(vq: &MockSplitQueue<'static, GuestMemoryMmap>) -> GuestAddress {
    GuestAddress(vq.desc_table_addr().0 + USED_OFFSET)
}

/// The queue of the ring `vq`, with its used ring at [`used_addr`].
fn queue(vq: &MockSplitQueue<'static, GuestMemoryMmap>) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    let addr = used_addr(vq).0;
    q.set_used_ring_address(Some(addr as u32), Some((addr >> 32) as u32));
    q
}

/// A backend on one end of a datagram socketpair; the other end is the
/// network's side of the tap.
fn backend() -> (Tap, UnixDatagram) {
    let (dev, peer) = UnixDatagram::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    (Tap::frame_fd(OwnedFd::from(dev)).unwrap(), peer)
}

/// The worker's state over the two rings, with `features` accepted.
fn queues(
    mem: &'static GuestMemoryMmap,
    rx: &MockSplitQueue<'static, GuestMemoryMmap>,
    tx: &MockSplitQueue<'static, GuestMemoryMmap>,
    features: u64,
) -> (NetQueues, UnixDatagram) {
    let (tap, peer) = backend();
    let q = NetQueues::new(mem.clone(), queue(rx), queue(tx), tap, features);
    (q, peer)
}

/// A frame as the tap carries it: a vnet header (`gso_type` 0, the rest
/// marked so that it can be told apart), then `len - 12` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    f[..VNET_HDR_LEN].copy_from_slice(&[1, 0, 0x22, 0, 0x33, 0, 0x44, 0, 0x55, 0, 0, 0]);
    f
}

/// Used ring entry `i` of `vq`: (id, len).
fn used(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'static, GuestMemoryMmap>,
    i: usize,
) -> (u32, u32) {
    let at = used_addr(vq).0 + 4 + 8 * i as u64;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'static, GuestMemoryMmap>) -> u16 {
    mem.load(
        GuestAddress(used_addr(vq).0 + 2),
        std::sync::atomic::Ordering::Acquire,
    )
    .unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Receives one frame from the peer, waiting up to 5 s.
fn recv(peer: &UnixDatagram) -> Vec<u8> {
    let mut buf = vec![0; MAX_FRAME_LEN + 100];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return buf;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no frame reached the peer");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Whether the peer has a frame waiting (without taking it).
fn peer_has_frame(peer: &UnixDatagram) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most one byte into `b`, which lives across
    // the call.
    let n = unsafe {
        libc::recv(
            peer.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0
}
