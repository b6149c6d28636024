//! Tests for virtio-rng: the test plays the driver in guest memory.

use std::sync::Arc;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::devices::virtio::testing::{steps_after_stop, wait_for_steps, EndlessRing};

const W: u16 = VRING_DESC_F_WRITE as u16;
const MEM_SIZE: usize = 0x10_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(i).unwrap().load();
    (elem.id(), elem.len())
}

fn unlimited(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> RngQueue {
    RngQueue::new(mem.clone(), vq.create_queue().unwrap(), None)
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// A queue behind a bucket of 1000 bytes/s with a 200-byte burst, full at `t0`.
fn limited_queue(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    t0: Instant,
) -> RngQueue {
    let limit = RateLimit {
        bytes_per_sec: 1000,
        burst: 200,
    };
    RngQueue::new(
        mem.clone(),
        vq.create_queue().unwrap(),
        Some(TokenBucket::new(limit, t0)),
    )
}

#[test]
fn reads_return_random_bytes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[
            desc(0x1_0000, 64, W, 0),
            desc(0x2_0000, 64, W, 0),
            // One request over two buffers.
            desc(0x3_0000, 16, W | VRING_DESC_F_NEXT as u16, 3),
            desc(0x4_0000, 16, W, 0),
        ],
        0,
    )
    .unwrap();
    let mut q = unlimited(&mem, &vq);
    let done = q.process_queue(Instant::now());
    assert!(done.needs_irq);
    assert_eq!(done.throttle, None);
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(used(&vq, 0), (0, 64));
    assert_eq!(used(&vq, 1), (1, 64));
    assert_eq!(used(&vq, 2), (2, 32));
    let (a, b) = (read(&mem, 0x1_0000, 64), read(&mem, 0x2_0000, 64));
    assert!(a.iter().any(|&x| x != 0));
    assert_ne!(a, b);
    assert!(read(&mem, 0x3_0000, 16).iter().any(|&x| x != 0));
    assert!(read(&mem, 0x4_0000, 16).iter().any(|&x| x != 0));
    // Nothing beyond the buffer.
    assert!(read(&mem, 0x1_0040, 64).iter().all(|&x| x == 0));
}

#[test]
fn requests_are_capped() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x2_0000, 0x8_0000, W, 0)], 0)
        .unwrap();
    unlimited(&mem, &vq).process_queue(Instant::now());
    assert_eq!(used(&vq, 0), (0, MAX_REQUEST as u32));
}

#[test]
fn malformed_requests_get_len_0() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[
            desc(0x1_0000, 64, 0, 0),                           // device-readable
            desc(0xffff_ffff_0000, 64, W, 0),                   // outside memory
            desc(MEM_SIZE as u64 - 8, 64, W, 0),                // straddles the end
            desc(0x1_0000, u32::MAX, W, 0),                     // huge
            desc(u64::MAX - 4, 64, W, 0),                       // wraps around
            desc(0x2_0000, 8, W | VRING_DESC_F_NEXT as u16, 6), // readable tail
            desc(0x3_0000, 8, 0, 0),
        ],
        0,
    )
    .unwrap();
    unlimited(&mem, &vq).process_queue(Instant::now());
    assert_eq!(vq.used().idx().load(), 6);
    for i in 0..6 {
        assert_eq!(used(&vq, i).1, 0, "request {i}");
    }
    assert!(read(&mem, 0x1_0000, 64).iter().all(|&x| x == 0));
    assert!(read(&mem, 0x2_0000, 8).iter().all(|&x| x == 0));
}

#[test]
fn descriptor_loop_terminates() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    // Descriptor 0 points back at itself.
    vq.add_desc_chains(&[desc(0x1_0000, 64, W | VRING_DESC_F_NEXT as u16, 0)], 0)
        .unwrap();
    unlimited(&mem, &vq).process_queue(Instant::now());
    assert_eq!(vq.used().idx().load(), 1);
    // The chain ends after queue-size descriptors (all the same buffer).
    assert_eq!(used(&vq, 0), (0, 16 * 64));
}

#[test]
fn token_bucket_refills_at_the_rate() {
    let t0 = Instant::now();
    let limit = RateLimit {
        bytes_per_sec: 1000,
        burst: 500,
    };
    let mut b = TokenBucket::new(limit, t0);
    assert_eq!(b.available(t0), 500);
    b.consume(800);
    assert_eq!(b.available(t0), 0);
    assert_eq!(b.wait_for(100), Duration::from_millis(100));
    assert_eq!(b.wait_for(10_000), Duration::from_millis(500));
    // 1.5 ms per step: fractions of a token carry over.
    let mut now = t0;
    for _ in 0..10 {
        now += Duration::from_micros(1500);
        b.refill(now);
    }
    assert_eq!(b.available(now), 15);
    // Never beyond the burst.
    assert_eq!(b.available(now + Duration::from_secs(3600)), 500);
    // Time going backwards is harmless.
    assert_eq!(b.available(t0), 500);
    // Degenerate limits do not divide by zero or stall forever.
    let mut z = TokenBucket::new(
        RateLimit {
            bytes_per_sec: 0,
            burst: 0,
        },
        t0,
    );
    assert_eq!(z.available(t0), 1);
    z.consume(1);
    assert_eq!(z.wait_for(REFILL_WAKE), Duration::from_secs(1));
}

#[test]
fn rate_limit_throttles_the_queue() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 300, W, 0), desc(0x2_0000, 300, W, 0)], 0)
        .unwrap();
    let t0 = Instant::now();
    let mut q = limited_queue(&mem, &vq, t0);
    // The burst serves the first request partially, then the bucket is dry.
    let done = q.process_queue(t0);
    assert!(done.needs_irq);
    assert_eq!(done.throttle, Some(Duration::from_millis(200)));
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 200));
    // Still dry: nothing consumed, the request stays available.
    let done = q.process_queue(t0);
    assert!(!done.needs_irq);
    assert!(done.throttle.is_some());
    assert_eq!(vq.used().idx().load(), 1);
    // 50 ms later, 50 bytes.
    let done = q.process_queue(t0 + Duration::from_millis(50));
    assert_eq!(used(&vq, 1), (1, 50));
    assert_eq!(done.throttle, None);
}

#[test]
fn tiny_requests_cost_a_minimum() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let tiny: Vec<_> = (0..5)
        .map(|i| desc(0x1_0000 + i * 0x100, 1, W, 0))
        .collect();
    vq.add_desc_chains(&tiny, 0).unwrap();
    let t0 = Instant::now();
    let mut q = limited_queue(&mem, &vq, t0);
    // 200 tokens: three requests at 64, a fourth with the remaining 8.
    let done = q.process_queue(t0);
    assert_eq!(vq.used().idx().load(), 4);
    assert!(done.throttle.is_some());
}

fn wait_used(vq: &MockSplitQueue<GuestMemoryMmap>, idx: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() != idx {
        assert!(Instant::now() < deadline, "device did not answer");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn activate(rng: &mut Rng, mem: &GuestMemoryMmap, queue: Queue) -> (EventFd, Arc<IrqTrigger>) {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    rng.activate(ActiveQueues {
        mem: mem.clone(),
        queues: vec![queue],
        queue_evts: vec![evt.try_clone().unwrap()],
        irq: irq.clone(),
        acked_features: VIRTIO_F_VERSION_1,
    })
    .unwrap();
    (evt, irq)
}

#[test]
fn worker_serves_and_reactivates_after_reset() {
    let mut rng = Rng::new(Some(RateLimit::default()));
    assert_eq!(rng.device_type(), device_type::RNG);
    assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
    for round in 0..2 {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x1_0000, 64, W, 0)], 0).unwrap();
        let (evt, irq) = activate(&mut rng, &mem, vq.create_queue().unwrap());
        evt.write(1).unwrap();
        wait_used(&vq, 1);
        assert_eq!(used(&vq, 0), (0, 64), "round {round}");
        assert_eq!(irq.status() & INT_VRING, INT_VRING);
        assert!(rng.reset());
    }
}

#[test]
fn worker_resumes_after_throttling() {
    // 64-byte burst at 6400 B/s: the second request waits ~10 ms.
    let mut rng = Rng::new(Some(RateLimit {
        bytes_per_sec: 6400,
        burst: 64,
    }));
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 64, W, 0), desc(0x2_0000, 64, W, 0)], 0)
        .unwrap();
    let (evt, _irq) = activate(&mut rng, &mem, vq.create_queue().unwrap());
    let start = Instant::now();
    evt.write(1).unwrap();
    wait_used(&vq, 2);
    assert!(start.elapsed() >= Duration::from_millis(9));
    assert_eq!(used(&vq, 0), (0, 64));
    assert_eq!(used(&vq, 1), (1, 64));
}

#[test]
fn activate_rejects_wrong_queue_count() {
    let mut rng = Rng::new(None);
    let err = rng
        .activate(ActiveQueues {
            mem: memory(),
            queues: vec![],
            queue_evts: vec![],
            irq: Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
}

#[test]
fn chains_are_checked_for_a_stop() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 64, W, 0), desc(0x2_0000, 64, W, 0)], 0)
        .unwrap();
    let mut q = unlimited(&mem, &vq);
    // One step per chain taken from the ring (the last finds it empty).
    q.process_queue(Instant::now());
    assert_eq!(q.stop.steps(), 3);
    vq.add_desc_chains(&[desc(0x1_0000, 64, W, 0)], 2).unwrap();
    q.stop.request();
    assert_eq!(q.process_queue(Instant::now()), Processed::default());
    assert_eq!(vq.used().idx().load(), 2);
}

/// The guest keeps an unlimited device's ring full of the longest chains
/// it takes (256 descriptors of 64 KiB over one buffer), forever. A stop,
/// from another thread, lets the worker finish one chain at most.
#[test]
fn a_stop_interrupts_an_endless_ring_within_a_chain() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let next = VRING_DESC_F_NEXT as u16;
    for i in 0..QUEUE_SIZE {
        let flags = if i + 1 < QUEUE_SIZE { W | next } else { W };
        let d = desc(0x10_0000, MAX_REQUEST as u32, flags, i + 1);
        vq.desc_table().store(i, d).unwrap();
    }
    let mut rng = Rng::new(None);
    let (evt, _irq) = activate(&mut rng, &mem, vq.create_queue().unwrap());
    let guest = EndlessRing::start(&mem, vq.avail_addr(), vq.used_addr(), QUEUE_SIZE, 0, &evt);
    let flag = rng.worker.as_ref().unwrap().flag().clone();
    // Past a whole ring: the guest's refills are being served.
    wait_for_steps(&flag, 2 * u64::from(QUEUE_SIZE));
    let (after, took) = steps_after_stop(&flag, || rng.reset());
    drop(guest);
    assert!(after <= 1, "{after} chains after the stop");
    // Time only as a backstop (the count above is the bound): generous,
    // as the machine running the tests may be busy.
    assert!(took < Duration::from_secs(2), "the stop took {took:?}");
}
