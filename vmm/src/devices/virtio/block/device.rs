//! The virtio-blk device: configuration space, feature bits, and the worker
//! that serves the request queue.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_S_OK,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskFile;
use super::request::{parse, RequestError};
use super::{BlockError, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEGMENT_MAX_BYTES, SEG_MAX};
use crate::devices::ratelimit::ratelimited;
use crate::devices::virtio::worker::{Stop, StopFlag, WorkerHandle};
use crate::devices::virtio::{
    device_type, wants_interrupt, ActivateError, ActiveQueues, IrqTrigger, SingleQueue,
    VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};

/// Length of the configuration space we fill (capacity, size_max, seg_max).
const CONFIG_LEN: usize = 16;

/// The queue and the image, owned by the worker while the device is active.
pub(super) struct BlockQueue {
    pub(super) disk: DiskFile,
    pub(super) id: [u8; ID_BYTES],
}

impl BlockQueue {
    /// Serves every available request, checking `stop` before each step
    /// (see the module doc); returns whether any was completed (the guest
    /// needs an interrupt).
    pub(super) fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        stop: &StopFlag,
    ) -> bool {
        let mut used = false;
        while !stop.should_stop() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(len) = self.handle(mem, chain, stop) else {
                break; // Stopped: the request is abandoned.
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                ratelimited!(error, "virtio-blk: cannot add a used buffer: {e}");
                break;
            }
            used = true;
        }
        used
    }

    /// Handles one chain; returns the used length, or `None` if `stop` was
    /// raised before it was done.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        stop: &StopFlag,
    ) -> Option<u32> {
        let parsed = parse(mem, chain, self.disk.size());
        let Some(status_addr) = parsed.status else {
            if let Err(e) = parsed.request {
                ratelimited!(warn, "virtio-blk: dropping request: {e}");
            }
            return Some(0);
        };
        let (status, data_len) = match parsed
            .request
            .and_then(|r| r.execute_until(mem, &mut self.disk, &self.id, stop))
        {
            Ok(len) => (VIRTIO_BLK_S_OK as u8, len),
            Err(RequestError::Stopped) => return None,
            Err(e) => {
                tracing::debug!("virtio-blk: request failed: {e}");
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            ratelimited!(warn, "virtio-blk: cannot write the status: {e}");
            return Some(0);
        }
        Some(data_len.saturating_add(1))
    }
}

/// The worker's epoll tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Kill = 0,
    Queue = 1,
}

/// The worker's event loop: returns on the kill event (or on an error).
fn run(
    q: &mut BlockQueue,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    queue_evt: &EventFd,
    irq: &IrqTrigger,
    kill: &Stop,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (kill.as_raw_fd(), Token::Kill),
        (queue_evt.as_raw_fd(), Token::Queue),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token as u64),
        )?;
    }
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut process = false;
        for event in events.iter().take(n) {
            if event.data() == Token::Kill as u64 {
                return Ok(());
            }
            if event.data() == Token::Queue as u64 {
                let _ = queue_evt.read();
                process = true;
            }
        }
        if kill.flag().is_requested() {
            return Ok(());
        }
        if process && q.process_queue(mem, queue, kill.flag()) && wants_interrupt(queue, mem) {
            if let Err(e) = irq.trigger(INT_VRING) {
                ratelimited!(error, "virtio-blk: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// A virtio-blk drive backed by a raw image.
pub struct Block {
    /// The image, here while the device is inactive.
    state: Option<BlockQueue>,
    worker: Option<WorkerHandle<BlockQueue>>,
    read_only: bool,
    config: [u8; CONFIG_LEN],
}

impl Block {
    /// Opens the image at `path` (read-only if `read_only`); `id` is the
    /// drive's serial for GET_ID, truncated to 20 bytes.
    pub fn new(path: &Path, read_only: bool, id: String) -> Result<Block, BlockError> {
        let disk = DiskFile::open(path, read_only)?;
        let mut config = [0u8; CONFIG_LEN];
        let capacity = disk.size() / SECTOR_SIZE;
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_MAX_BYTES.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            state: Some(BlockQueue { disk, id: serial }),
            worker: None,
            read_only,
            config,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        let mut le = [0u8; 8];
        le.copy_from_slice(&self.config[0..8]);
        u64::from_le_bytes(le)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        self.reset();
        let SingleQueue {
            mem,
            mut queue,
            queue_evt,
            irq,
        } = active.into_single()?;
        let Some(mut q) = self.state.take() else {
            return Err(ActivateError::Backend("the drive's image was lost".into()));
        };
        let worker = WorkerHandle::spawn("airlock-blk", move |kill: Stop| {
            if let Err(e) = run(&mut q, &mem, &mut queue, &queue_evt, &irq, &kill) {
                ratelimited!(error, "virtio-blk worker stopped: {e}");
            }
            q
        });
        match worker {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            // The closure, and the image with it, is gone.
            Err(e) => Err(ActivateError::Worker(e)),
        }
    }

    fn reset(&mut self) -> bool {
        if let Some(worker) = self.worker.take() {
            self.state = worker.stop();
        }
        self.state.is_some()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
