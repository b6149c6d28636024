//! Tests for virtio-blk: the test plays the driver in guest memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::devices::virtio::block::{MAX_REQUEST_BYTES, SEGMENT_MAX_BYTES};
use crate::devices::virtio::testing::{steps_after_stop, wait_for_steps, EndlessRing};

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;
const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x9_0000;
const SECTORS: u64 = 16;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// A temporary image of `SECTORS` sectors, byte `i` = `i % 251`.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("airlock-blk-dev-{}-{name}", std::process::id()));
        std::fs::write(&path, contents()).unwrap();
        Image(path)
    }

    /// A sparse image of `bytes` (zeros), for large requests.
    fn sparse(name: &str, bytes: u64) -> Self {
        let path =
            std::env::temp_dir().join(format!("airlock-blk-dev-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        Image(path)
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn contents() -> Vec<u8> {
    (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect()
}

struct Drive {
    mem: GuestMemoryMmap,
    q: BlockQueue,
    block_features: u64,
}

fn drive(image: &Image, read_only: bool) -> Drive {
    let mut block = Block::new(&image.0, read_only, "drive-0".into()).unwrap();
    let block_features = block.avail_features();
    let q = block.state.take().unwrap();
    Drive {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        q,
        block_features,
    }
}

/// A named chain of (address, length, flags) descriptors.
type Case<'a> = (&'a str, &'a [(u64, u32, u16)]);

fn d(addr: u64, len: u32, flags: u16) -> (u64, u32, u16) {
    (addr, len, flags)
}

impl Drive {
    fn header(&self, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    }

    /// Submits one chain of raw descriptors (without NEXT links) and
    /// returns (used len, status byte).
    fn submit_raw(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
        // A fresh queue over a zeroed ring area.
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(0))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(&self.mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        assert!(self
            .q
            .process_queue(&self.mem, &mut queue, &StopFlag::new()));
        assert_eq!(vq.used().idx().load(), 1);
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.id(), 0);
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (elem.len(), status)
    }

    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let (flags, next) = if i + 1 < descs.len() {
                    (flags | VRING_DESC_F_NEXT as u16, i as u16 + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.submit_raw(&raw)
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u32, u8) {
        self.header(kind, sector);
        let mut descs = vec![d(HDR, 16, R)];
        descs.extend_from_slice(data);
        descs.push(d(STATUS, 1, W));
        self.submit(&descs)
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

#[test]
fn read_returns_the_image() {
    let img = Image::new("read");
    let mut drv = drive(&img, false);
    let data = [d(DATA, 512, W), d(DATA + 0x1000, 1024, W)];
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 2, &data), (1537, OK));
    let want = contents();
    assert_eq!(drv.guest(DATA, 512), want[1024..1536]);
    assert_eq!(drv.guest(DATA + 0x1000, 1024), want[1536..2560]);
    // The last sector.
    assert_eq!(
        drv.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[d(DATA, 512, W)]),
        (513, OK)
    );
    assert_eq!(drv.guest(DATA, 512), want[want.len() - 512..]);
}

#[test]
fn write_lands_in_the_image_and_flush_succeeds() {
    let img = Image::new("write");
    let mut drv = drive(&img, false);
    drv.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    let data = [d(DATA, 1024, R)];
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 3, &data), (1, OK));
    let mut want = contents();
    want[1536..2560].fill(0xab);
    assert_eq!(img.read(), want);
    assert_eq!(drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
}

#[test]
fn get_id_returns_the_serial() {
    let img = Image::new("id");
    let mut drv = drive(&img, true);
    drv.mem
        .write_slice(&[0xff; 20], GuestAddress(DATA))
        .unwrap();
    let data = [d(DATA, 20, W)];
    assert_eq!(drv.request(VIRTIO_BLK_T_GET_ID, 0, &data), (21, OK));
    let mut want = b"drive-0".to_vec();
    want.resize(20, 0);
    assert_eq!(drv.guest(DATA, 20), want);
    // A short buffer gets what fits; a long id is truncated.
    drv.q.id = *b"0123456789abcdefghij";
    drv.mem
        .write_slice(&[0xff; 20], GuestAddress(DATA))
        .unwrap();
    let data = [d(DATA, 8, W)];
    assert_eq!(drv.request(VIRTIO_BLK_T_GET_ID, 0, &data), (9, OK));
    assert_eq!(drv.guest(DATA, 9), b"01234567\xff");
}

#[test]
fn out_of_range_is_an_io_error() {
    let img = Image::new("range");
    let mut drv = drive(&img, false);
    let one = [d(DATA, 512, W)];
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, SECTORS, &one), (1, IOERR));
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, u64::MAX, &one), (1, IOERR));
    assert_eq!(
        drv.request(VIRTIO_BLK_T_IN, u64::MAX / 512, &one),
        (1, IOERR)
    );
    let two = [d(DATA, 1024, R)];
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, SECTORS - 1, &two), (1, IOERR));
    assert_eq!(img.read(), contents());
}

#[test]
fn read_only_drive_refuses_writes() {
    let img = Image::new("ro");
    let mut drv = drive(&img, true);
    assert_ne!(drv.block_features & (1 << VIRTIO_BLK_F_RO), 0);
    drv.mem
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    let data = [d(DATA, 512, R)];
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 0, &data), (1, IOERR));
    assert_eq!(img.read(), contents());
    assert_eq!(
        drv.request(VIRTIO_BLK_T_IN, 0, &[d(DATA, 512, W)]),
        (513, OK)
    );
    assert_eq!(drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
}

#[test]
fn unknown_type_is_unsupported() {
    let img = Image::new("unsupp");
    let mut drv = drive(&img, false);
    let status = VIRTIO_BLK_S_UNSUPP as u8;
    assert_eq!(drv.request(42, 0, &[d(DATA, 512, W)]), (1, status));
    assert_eq!(drv.request(11 /* DISCARD */, 0, &[]), (1, status));
}

#[test]
fn malformed_chains_get_an_error_status() {
    let img = Image::new("malformed");
    let mut drv = drive(&img, false);
    drv.header(VIRTIO_BLK_T_IN, 0);
    let cases: &[Case] = &[
        (
            "short header",
            &[d(HDR, 8, R), d(DATA, 512, W), d(STATUS, 1, W)],
        ),
        (
            "writable header",
            &[d(HDR, 16, W), d(DATA, 512, W), d(STATUS, 1, W)],
        ),
        (
            "header outside memory",
            &[d(MEM_SIZE - 8, 16, R), d(STATUS, 1, W)],
        ),
        ("no header", &[d(STATUS, 1, W)]),
        (
            "data outside memory",
            &[d(HDR, 16, R), d(MEM_SIZE, 512, W), d(STATUS, 1, W)],
        ),
        (
            "data straddling the end",
            &[d(HDR, 16, R), d(MEM_SIZE - 512, 1024, W), d(STATUS, 1, W)],
        ),
        (
            "data at the top of the address space",
            &[d(HDR, 16, R), d(u64::MAX - 511, 512, W), d(STATUS, 1, W)],
        ),
        (
            "zero-length data",
            &[d(HDR, 16, R), d(DATA, 0, W), d(STATUS, 1, W)],
        ),
        ("no data", &[d(HDR, 16, R), d(STATUS, 1, W)]),
        (
            "huge data",
            &[d(HDR, 16, R), d(DATA, 0xffff_0000, W), d(STATUS, 1, W)],
        ),
        (
            "unaligned data",
            &[d(HDR, 16, R), d(DATA, 100, W), d(STATUS, 1, W)],
        ),
        (
            "read into a readable buffer",
            &[d(HDR, 16, R), d(DATA, 512, R), d(STATUS, 1, W)],
        ),
    ];
    for (name, descs) in cases {
        assert_eq!(drv.submit(descs), (1, IOERR), "{name}");
    }
    drv.header(VIRTIO_BLK_T_OUT, 0);
    let write_from_writable = [d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, W)];
    assert_eq!(drv.submit(&write_from_writable), (1, IOERR));
    assert_eq!(img.read(), contents());
}

#[test]
fn chains_without_a_status_byte_are_dropped() {
    let img = Image::new("nostatus");
    let mut drv = drive(&img, false);
    drv.header(VIRTIO_BLK_T_IN, 0);
    let cases: &[Case] = &[
        (
            "readable status",
            &[d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, R)],
        ),
        (
            "empty status",
            &[d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 0, W)],
        ),
        (
            "status outside memory",
            &[d(HDR, 16, R), d(DATA, 512, W), d(MEM_SIZE, 1, W)],
        ),
        ("status missing", &[d(HDR, 16, R), d(DATA, 512, R)]),
        ("header only", &[d(HDR, 16, R)]),
        // More than 4 GiB in one chain: virtio-queue ends the chain
        // before the offending descriptor, leaving no status.
        (
            "chain over 4 GiB",
            &[d(HDR, 16, R), d(DATA, u32::MAX, W), d(STATUS, 1, W)],
        ),
    ];
    for (name, descs) in cases {
        assert_eq!(drv.submit(descs), (0, 0xff), "{name}");
    }
    // Nothing was read into guest memory either.
    assert!(drv.guest(DATA, 512).iter().all(|&b| b == 0));
}

#[test]
fn descriptor_loops_and_long_chains_terminate() {
    let img = Image::new("loop");
    let mut drv = drive(&img, false);
    drv.header(VIRTIO_BLK_T_IN, 0);
    let raw = |addr, len, flags: u16, next| {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    };
    let next = VRING_DESC_F_NEXT as u16;
    // Header -> data -> back to the data descriptor, forever.
    let looped = [raw(HDR, 16, next, 1), raw(DATA, 512, W | next, 1)];
    let (_, status) = drv.submit_raw(&looped);
    assert_ne!(status, OK);
    // A descriptor that is its own successor.
    let (len, _) = drv.submit_raw(&[raw(STATUS, 1, W | next, 0)]);
    assert!(len <= 1);
    // An indirect table with more descriptors than the queue.
    let table = 0x5_0000u64;
    for i in 0..300u16 {
        let desc = raw(DATA, 512, W | next, i + 1);
        drv.mem
            .write_obj(desc, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
    let indirect = raw(table, 300 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    assert_eq!(drv.submit_raw(&[indirect]), (0, 0xff));
}

#[test]
fn config_space_and_features() {
    let img = Image::new("config");
    let block = Block::new(&img.0, false, "x".into()).unwrap();
    assert_eq!(block.device_type(), device_type::BLOCK);
    assert_eq!(block.capacity(), SECTORS);
    let f = block.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut cap = [0xffu8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut seg = [0xffu8; 4];
    block.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), u32::from(QUEUE_SIZE) - 2);
    let mut tail = [0xffu8; 8];
    block.read_config(12, &mut tail);
    assert_eq!(tail[4..], [0; 4]);
    for offset in [16, 100, u64::MAX] {
        let mut beyond = [0xffu8; 4];
        block.read_config(offset, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }
    let err = Block::new(Path::new("/nonexistent/airlock.img"), false, String::new())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("/nonexistent/airlock.img"),
        "{err}"
    );
}

#[test]
fn worker_serves_and_reactivates_after_reset() {
    let img = Image::new("worker");
    let mut block = Block::new(&img.0, false, "w".into()).unwrap();
    for round in 0..2 {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut raw = [0u8; 16];
        raw[8..].copy_from_slice(&1u64.to_le_bytes()); // IN, sector 1
        mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [(HDR, 16, R, 1), (DATA, 512, W, 2), (STATUS, 1, W, 0)];
        let descs: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f, n)| {
                let f = if n != 0 {
                    f | VRING_DESC_F_NEXT as u16
                } else {
                    f
                };
                RawDescriptor::from(SplitDescriptor::new(a, l, f, n))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        block
            .activate(ActiveQueues {
                mem: mem.clone(),
                queues: vec![vq.create_queue().unwrap()],
                queue_evts: vec![evt.try_clone().unwrap()],
                irq: irq.clone(),
                acked_features: block.avail_features(),
            })
            .unwrap();
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.used().idx().load() != 1 {
            assert!(Instant::now() < deadline, "round {round}: no answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.len(), 513);
        assert_eq!(irq.status() & INT_VRING, INT_VRING);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got[..], contents()[512..1024]);
        assert!(block.reset());
    }
}

#[test]
fn io_is_checked_for_a_stop_every_64_kib() {
    let img = Image::sparse("steps", 1 << 20);
    let mut drv = drive(&img, false);
    drv.header(VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&drv.mem, 16);
    let descs = [
        (HDR, 16, R, 1),
        (DATA, 3 * 64 * 1024, W, 2), // three pieces
        (DATA, 512, W, 3),           // and one more
        (STATUS, 1, W, 0),
    ];
    let descs: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, f, n)| {
            let f = if n != 0 {
                f | VRING_DESC_F_NEXT as u16
            } else {
                f
            };
            RawDescriptor::from(SplitDescriptor::new(a, l, f, n))
        })
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let stop = StopFlag::new();
    assert!(drv.q.process_queue(&drv.mem, &mut queue, &stop));
    assert_eq!(
        vq.used().ring().ref_at(0).unwrap().load().len(),
        3 * 65536 + 512 + 1
    );
    // One step per chain taken from the ring (the last finds it empty) and
    // one per piece of I/O.
    assert_eq!(stop.steps(), 2 + 4);
    // Raised before the pass: nothing is taken from the ring.
    vq.add_desc_chains(&descs, 0).unwrap();
    stop.request();
    assert!(!drv.q.process_queue(&drv.mem, &mut queue, &stop));
    assert_eq!(vq.used().idx().load(), 1);
}

#[test]
fn requests_over_the_maximum_are_io_errors() {
    let img = Image::sparse("toolarge", 512 << 20);
    let mut drv = drive(&img, false);
    // Fourteen descriptors of 20 MiB over the same buffer: 280 MiB.
    drv.mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    drv.header(VIRTIO_BLK_T_IN, 0);
    let data: Vec<_> = (0..14).map(|_| d(0x10_0000, 20 << 20, W)).collect();
    const { assert!(14 * (20 << 20) > MAX_REQUEST_BYTES) };
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 0, &data), (1, IOERR));
    // Just under it is served.
    let data: Vec<_> = (0..12).map(|_| d(0x10_0000, 20 << 20, W)).collect();
    assert_eq!(
        drv.request(VIRTIO_BLK_T_IN, 0, &data),
        (240 * (1 << 20) + 1, OK)
    );
    // The device says so: size_max and seg_max.
    let block = Block::new(&img.0, false, "x".into()).unwrap();
    assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
    let mut size_max = [0u8; 4];
    block.read_config(8, &mut size_max);
    assert_eq!(u32::from_le_bytes(size_max), SEGMENT_MAX_BYTES);
    assert_eq!(
        MAX_REQUEST_BYTES,
        u64::from(SEG_MAX) * u64::from(SEGMENT_MAX_BYTES)
    );
}

/// The guest queues the largest requests the device takes (254 data
/// descriptors of 1 MiB over one buffer: 254 MiB each), the same chain in
/// every slot of a ring it keeps full. A stop, from another thread, lets
/// the worker finish one step at most (64 KiB of I/O).
#[test]
fn a_stop_interrupts_huge_requests_within_a_step() {
    let img = Image::sparse("huge", MAX_REQUEST_BYTES + (1 << 20));
    let mut block = Block::new(&img.0, false, "w".into()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let next = VRING_DESC_F_NEXT as u16;
    let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1))];
    for i in 1..=SEG_MAX as u16 {
        let desc = SplitDescriptor::new(0x10_0000, SEGMENT_MAX_BYTES, W | next, i + 1);
        descs.push(RawDescriptor::from(desc));
    }
    descs.push(RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)));
    assert_eq!(descs.len(), usize::from(QUEUE_SIZE));
    for (i, desc) in descs.into_iter().enumerate() {
        vq.desc_table().store(i as u16, desc).unwrap();
    }
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let guest = EndlessRing::start(&mem, vq.avail_addr(), vq.used_addr(), QUEUE_SIZE, 0, &evt);
    block
        .activate(ActiveQueues {
            mem: mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
            queue_evts: vec![evt.try_clone().unwrap()],
            irq: Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            acked_features: block.avail_features(),
        })
        .unwrap();
    let flag = block.worker.as_ref().unwrap().flag().clone();
    // Inside the first request: 100 pieces of 64 KiB into it.
    wait_for_steps(&flag, 100);
    let (after, took) = steps_after_stop(&flag, || block.reset());
    drop(guest);
    assert!(after <= 1, "{after} steps after the stop");
    // The queue held 63.5 GiB of reads; the stop waited for 64 KiB of it.
    // Time only as a backstop (the count above is the bound): generous,
    // as the machine running the tests may be busy.
    assert!(took < Duration::from_secs(2), "the stop took {took:?}");
    // Abandoned mid-request: no status written for it.
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, if vq.used().idx().load() == 0 { 0 } else { OK });
}
