//! A guest's side of the virtqueues, made of fuzz input: 64 KiB of guest
//! memory filled with the input, and queues whose descriptor tables and
//! rings lie in it. Everything the device then reads is the fuzzer's.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size.
pub const MEM_SIZE: usize = 0x1_0000;

/// Where queue `i`'s descriptor table, available and used rings lie.
fn layout(i: u64) -> (u64, u64, u64) {
    let base = i * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}

/// Guest memory holding `data` (the rest zero) and `n` queues. The first
/// byte of `data` picks the queue size (a power of two up to 256).
pub fn memory_and_queues(data: &[u8], n: u64) -> Option<(GuestMemoryMmap, Vec<Queue>)> {
    let (&selector, rest) = data.split_first()?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    mem.write_slice(&rest[..rest.len().min(MEM_SIZE)], GuestAddress(0))
        .ok()?;
    let size = 1u16 << (selector % 9);
    let queues = (0..n)
        .map(|i| {
            let (desc, avail, used) = layout(i);
            let mut q = Queue::new(256).ok()?;
            q.set_size(size);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            Some(q)
        })
        .collect::<Option<Vec<_>>>()?;
    Some((mem, queues))
}
