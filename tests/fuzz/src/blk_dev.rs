//! virtio-blk through the device itself: a [`Block`] over a temporary
//! image (read-write, read-only, or a one-sector one) is activated on a
//! queue of fuzz input, notified, and reset once it interrupted, so its
//! worker's `process_queue` serves the chains: parsing, the read-only
//! check, the I/O, the status byte and the used ring.
//!
//! The input is guest memory, as for `blk_queue` ([`crate::guest`]),
//! behind a byte that picks the image. The avail ring is the driver's
//! (fixed here: no NO_INTERRUPT flag, an index at most the queue size,
//! heads within the queue), so that every input ends with an interrupt;
//! everything it points to is the fuzzer's.

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use airlock_vmm::devices::virtio::block::Block;
use airlock_vmm::devices::virtio::{ActiveQueues, IrqTrigger, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::memory_and_queues;

/// How long the worker may take to serve one input's queue.
const SERVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The images: (read-only, size).
const IMAGES: [(bool, u64); 3] = [(false, 64 << 10), (true, 64 << 10), (false, 512)];

/// The images' files, made once for every run.
pub fn image(i: usize) -> &'static std::path::Path {
    static FILES: OnceLock<Vec<tempfile::NamedTempFile>> = OnceLock::new();
    FILES
        .get_or_init(|| {
            IMAGES
                .iter()
                .map(|&(_, size)| {
                    let f = tempfile::NamedTempFile::new().expect("a temporary drive image");
                    f.as_file().set_len(size).expect("size the drive image");
                    f
                })
                .collect()
        })
        .get(i % IMAGES.len())
        .expect("an image")
        .path()
}

/// What a run did.
#[derive(Debug)]
pub struct BlkRun {
    /// Whether the device interrupted the guest (it used a buffer).
    pub interrupted: bool,
    /// The used ring's entries: (descriptor head, length written).
    pub used: Vec<(u32, u32)>,
    /// Guest memory afterwards (status bytes, data read).
    pub mem: GuestMemoryMmap,
}

/// The cargo fuzz target `blk_device`.
pub fn blk_device(data: &[u8]) {
    let _ = blk_device_run(data);
}

/// Runs one input: the first byte picks the image (see [`IMAGES`]), the
/// rest is [`memory_and_queues`]'s.
pub fn blk_device_run(data: &[u8]) -> Option<BlkRun> {
    let (&pick, rest) = data.split_first()?;
    crate::workers::start();
    let (read_only, _) = IMAGES[usize::from(pick) % IMAGES.len()];
    let mut block = Block::new(image(usize::from(pick)), read_only, "fuzz-drive".into()).ok()?;
    let (mem, mut queues) = memory_and_queues(rest, 1)?;
    let queue = queues.pop()?;
    // The driver's avail ring: interrupts wanted, 1 to size chains (the
    // input's index, or the whole ring when it is 0), heads within the
    // queue.
    let size = queue.size();
    let avail = queue.avail_ring();
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).ok()?;
    let count = idx.wrapping_sub(1) % size + 1;
    mem.write_obj(0u16, GuestAddress(avail)).ok()?;
    mem.write_obj(count, GuestAddress(avail + 2)).ok()?;
    for i in 0..u64::from(count) {
        let at = GuestAddress(avail + 4 + 2 * i);
        let head: u16 = mem.read_obj(at).ok()?;
        mem.write_obj(head % size, at).ok()?;
    }
    let used_ring = queue.used_ring();

    let irq_evt = EventFd::new(EFD_NONBLOCK).ok()?;
    let irq = Arc::new(IrqTrigger::new(irq_evt.try_clone().ok()?));
    let kick = EventFd::new(EFD_NONBLOCK).ok()?;
    let epoll = Epoll::new().ok()?;
    epoll
        .ctl(
            ControlOperation::Add,
            irq_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .ok()?;
    let active = ActiveQueues {
        mem: mem.clone(),
        queues: vec![queue],
        queue_evts: vec![kick.try_clone().ok()?],
        irq,
        acked_features: block.avail_features(),
    };
    block.activate(active).ok()?;
    let _ = kick.write(1);
    let mut events = [EpollEvent::default(); 1];
    let interrupted = loop {
        match epoll.wait(SERVE_TIMEOUT.as_millis() as i32, &mut events) {
            Ok(n) => break n > 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    // Stops the worker (between two steps) and takes the image back.
    block.reset();
    drop(block);

    let used_idx: u16 = mem.read_obj(GuestAddress(used_ring + 2)).ok()?;
    let used = (0..u64::from(used_idx.min(size)))
        .map(|i| {
            let at = used_ring + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
            (id, len)
        })
        .collect();
    Some(BlkRun {
        interrupted,
        used,
        mem,
    })
}
