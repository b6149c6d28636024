//! The device (construction, config space) and its worker (activation,
//! reset, interrupts, bounded work per step).

use super::*;

#[test]
fn device_construction_and_config() {
    let dir = TempDir::new();
    let long = dir.0.join("x".repeat(120));
    assert!(matches!(
        Vsock::new(3, long, true),
        Err(VsockError::PathTooLong(_))
    ));
    assert!(matches!(
        Vsock::new(2, dir.sock(), true),
        Err(VsockError::InvalidCid(2))
    ));
    let file = dir.0.join("file");
    std::fs::write(&file, b"").unwrap();
    assert!(matches!(
        Vsock::new(3, file, true),
        Err(VsockError::PathExists(_))
    ));
    // A stale socket file is replaced; a live one is refused.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let dev = Vsock::new(0x1234_5678, stale.clone(), true).unwrap();
    assert!(matches!(
        Vsock::new(3, stale.clone(), true),
        Err(VsockError::PathInUse(_))
    ));
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    dev.read_config(u64::MAX, &mut hi);
    assert_eq!(hi, [0; 4]);
    drop(dev);
    assert!(!stale.exists());
}

/// A device worker as the transport starts it: the guest's three queues
/// at the start of `mem`, their kick eventfds and the interrupt.
struct Worker<'a> {
    rxvq: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_kick: vmm_sys_util::eventfd::EventFd,
    irq: Arc<IrqTrigger>,
}

impl<'a> Worker<'a> {
    fn activate(dev: &mut Vsock, mem: &'a GuestMemoryMmap) -> Self {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        mem.write_slice(&[0u8; 0x3_0000], GuestAddress(0)).unwrap();
        let rxvq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let txvq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        let evvq = MockSplitQueue::create(mem, GuestAddress(0x2_0000), QUEUE_SIZE);
        let queues = vec![
            rxvq.create_queue().unwrap(),
            txvq.create_queue().unwrap(),
            evvq.create_queue().unwrap(),
        ];
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let rx_kick = evts[0].try_clone().unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(ActiveQueues {
            mem: mem.clone(),
            queues,
            queue_evts: evts,
            irq: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Worker { rxvq, rx_kick, irq }
    }

    /// Offers the rx buffer pair `n` (header, then 4 KiB) and kicks.
    fn offer_rx(&self, n: u16) {
        let w = VRING_DESC_F_WRITE as u16;
        let at = 0x10_0000 + u64::from(n) * 0x2000;
        Guest::publish(
            &self.rxvq,
            &[
                (2 * n, at, HEADER_SIZE as u32, w),
                (2 * n + 1, at + 0x1000, 4096, w),
            ],
        );
        self.rx_kick.write(1).unwrap();
    }

    /// Waits until the device has used `n` rx buffers.
    fn wait_rx_used(&self, n: u16) {
        let start = Instant::now();
        while self.rxvq.used().idx().load() < n && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(self.rxvq.used().idx().load(), n);
    }
}

#[test]
fn worker_activate_reset_activate() {
    let dir = TempDir::new();
    let mut dev = Vsock::new(CID, dir.sock(), true).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    for _round in 0..2 {
        let worker = Worker::activate(&mut dev, &mem);
        let mut host = UnixStream::connect(dir.sock()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        worker.offer_rx(0);
        worker.wait_rx_used(1);
        assert_ne!(worker.irq.status() & INT_VRING, 0);
        let mut raw = [0u8; HEADER_SIZE];
        mem.read_slice(&mut raw, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(Header::from_bytes(&raw).op, OP_REQUEST);
        assert!(dev.reset());
        // Reset drops connections.
        assert_closed(&mut host);
    }
}

#[test]
fn worker_interrupts_only_when_the_driver_wants_it() {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    let dir = TempDir::new();
    let mut dev = Vsock::new(CID, dir.sock(), true).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let worker = Worker::activate(&mut dev, &mem);
    let flags = worker.rxvq.avail_addr();
    // As Linux's rx worker does while it drains the queue.
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, flags).unwrap();
    let mut first = UnixStream::connect(dir.sock()).unwrap();
    first.write_all(b"CONNECT 52\n").unwrap();
    worker.offer_rx(0);
    worker.wait_rx_used(1);
    // The interrupt would come right after the buffer is used: give it
    // ample time.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        worker.irq.status() & INT_VRING,
        0,
        "interrupted against NO_INTERRUPT"
    );
    // Callbacks enabled again: the next packet interrupts.
    mem.write_obj(0u16, flags).unwrap();
    let mut second = UnixStream::connect(dir.sock()).unwrap();
    second.write_all(b"CONNECT 53\n").unwrap();
    worker.offer_rx(1);
    worker.wait_rx_used(2);
    let start = Instant::now();
    while worker.irq.status() & INT_VRING == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(worker.irq.status() & INT_VRING, 0);
    assert!(dev.reset());
    assert_closed(&mut first);
    assert_closed(&mut second);
}

#[test]
fn tx_chains_longer_than_the_queue_are_dropped_and_stops_are_checked() {
    let mut g = Guest::new();
    // An indirect table of 300 descriptors: header, then 299 of one byte.
    let table = g.alloc(300 * 16);
    let hdr_addr = g.alloc(HEADER_SIZE as u64);
    let byte = g.alloc(1);
    let mut hdr = g.pkt(OP_RW, 5000, 1234);
    hdr.len = 299;
    g.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(hdr_addr))
        .unwrap();
    for i in 0..300u16 {
        let (addr, len) = if i == 0 {
            (hdr_addr, HEADER_SIZE as u32)
        } else {
            (byte, 1)
        };
        let flags = if i < 299 { NEXT } else { 0 };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
        g.mem
            .write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
    let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    Guest::publish(&g.txvq, &[(0, table, 300 * 16, indirect)]);
    let stop = StopFlag::new();
    assert!(process_tx_until(g.mem, &mut g.txq, &mut g.muxer, &stop));
    // Dropped as malformed: no RST queued for it, as for a packet read.
    assert!(!g.muxer.has_pending_rx());
    // One step per chain taken (the last finds the ring empty).
    assert_eq!(stop.steps(), 2);
    Guest::publish(&g.txvq, &[(0, table, 300 * 16, indirect)]);
    stop.request();
    assert!(!process_tx_until(g.mem, &mut g.txq, &mut g.muxer, &stop));
    assert_eq!(g.txvq.used().idx().load(), 1);
}

/// The guest keeps the tx ring full of the longest packets it takes (a
/// header and 255 descriptors of 256 bytes), forever, each answered with
/// an RST. A stop, from another thread, lets the worker finish one chain
/// at most.
#[test]
fn a_stop_interrupts_an_endless_tx_ring_within_a_chain() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let dir = TempDir::new();
    let mut dev = Vsock::new(CID, dir.sock(), true).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let vqs: Vec<_> = [0u64, 0x1_0000, 0x2_0000]
        .iter()
        .map(|&at| MockSplitQueue::create(&mem, GuestAddress(at), QUEUE_SIZE))
        .collect();
    let txvq = &vqs[TXQ];
    let hdr_addr = 0x10_0000u64;
    let data_addr = 0x11_0000u64;
    let data_descs = QUEUE_SIZE - 1;
    let hdr = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1234,
        len: u32::from(data_descs) * 256,
        type_: TYPE_STREAM,
        op: OP_RW,
        ..Header::default()
    };
    mem.write_slice(&hdr.to_bytes(), GuestAddress(hdr_addr))
        .unwrap();
    for i in 0..QUEUE_SIZE {
        let (addr, len) = if i == 0 {
            (hdr_addr, HEADER_SIZE as u32)
        } else {
            (data_addr, 256)
        };
        let flags = if i + 1 < QUEUE_SIZE { NEXT } else { 0 };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
        txvq.desc_table().store(i, d).unwrap();
    }
    let evts: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let tx_kick = evts[TXQ].try_clone().unwrap();
    dev.activate(ActiveQueues {
        mem: mem.clone(),
        queues: vqs.iter().map(|vq| vq.create_queue().unwrap()).collect(),
        queue_evts: evts,
        irq: Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        acked_features: VIRTIO_F_VERSION_1,
    })
    .unwrap();
    let guest = EndlessRing::start(
        &mem,
        txvq.avail_addr(),
        txvq.used_addr(),
        QUEUE_SIZE,
        0,
        &tx_kick,
    );
    let flag = dev.worker.as_ref().unwrap().flag().clone();
    // Past a whole ring: the guest's refills are being served.
    wait_for_steps(&flag, 2 * u64::from(QUEUE_SIZE));
    let (after, took) = steps_after_stop(&flag, || dev.reset());
    drop(guest);
    assert!(after <= 1, "{after} chains after the stop");
    // Time only as a backstop (the count above is the bound): generous,
    // as the machine running the tests may be busy.
    assert!(took < Duration::from_secs(2), "the stop took {took:?}");
}
