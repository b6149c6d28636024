//! A well-behaved guest driver's side of a split virtqueue, for targets
//! whose fuzz input is a sequence of actions rather than raw guest memory:
//! the driver lays out the rings itself, puts buffers on the avail ring
//! and reads back what the device put on the used ring.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// A descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;

/// One queue, as its driver sees it.
pub struct DriverQueue {
    /// The device's view (what the transport would hand the device).
    pub queue: Queue,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A ready queue of `size` entries whose descriptor table, avail and
    /// used rings start at `base`, `base + 0x1000` and `base + 0x2000`
    /// (`size` at most 256, so that each fits in its page).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Option<Self> {
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        let mut queue = Queue::new(size).ok()?;
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        // Fresh rings: the previous user of this memory may have left indexes.
        for addr in [avail, avail + 2, used, used + 2] {
            mem.write_obj(0u16, GuestAddress(addr)).ok()?;
        }
        queue.is_valid(mem).then_some(DriverQueue {
            queue,
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// Writes descriptor `index` (taken modulo the queue size).
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(next % self.size).to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head % self.size, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// The used entries (descriptor head, length written) added since the
    /// last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let mut out = Vec::new();
        while self.used_seen != idx && out.len() < usize::from(self.size) {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(0);
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(0);
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Entries made available and not yet used.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_seen)
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
}

/// Fuzz input read as a stream of numbers; past its end every read is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}
