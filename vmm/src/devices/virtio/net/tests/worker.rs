//! The device and its worker: activation, the configuration space, the
//! event loop serving both queues, interrupts, and stops under a flood.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::testing::{steps_after_stop, wait_for_steps, EndlessRing};
use crate::devices::virtio::{IrqTrigger, INT_VRING, VRING_AVAIL_F_NO_INTERRUPT};

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

/// The queue eventfds (rx, tx) and the interrupt of an activated device.
struct Active {
    rx_evt: EventFd,
    tx_evt: EventFd,
    irq: Arc<IrqTrigger>,
}

fn activate(
    dev: &mut Net,
    mem: &'static GuestMemoryMmap,
    rx: &MockSplitQueue<'static, GuestMemoryMmap>,
    tx: &MockSplitQueue<'static, GuestMemoryMmap>,
) -> Active {
    let (rx_evt, tx_evt) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.activate(ActiveQueues {
        mem: mem.clone(),
        queues: vec![queue(rx), queue(tx)],
        queue_evts: vec![rx_evt.try_clone().unwrap(), tx_evt.try_clone().unwrap()],
        irq: irq.clone(),
        acked_features: AVAIL_FEATURES,
    })
    .unwrap();
    Active {
        rx_evt,
        tx_evt,
        irq,
    }
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A device on a socketpair; also a second descriptor of the device's
/// end, to see what the device left unread.
fn device() -> (Net, UnixDatagram, UnixDatagram) {
    let (dev_end, peer) = UnixDatagram::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    let unread = dev_end.try_clone().unwrap();
    let tap = Tap::frame_fd(OwnedFd::from(dev_end)).unwrap();
    (Net::new(tap, MAC), peer, unread)
}

#[test]
fn the_device_describes_itself() {
    let (mut dev, _peer, _) = device();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.avail_features();
    for bit in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    // No control queue, no status field.
    assert_eq!(f & (1 << 17 | 1 << 16), 0);
    let mut mac = [0xff; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    let mut tail = [0xff; 4];
    dev.read_config(4, &mut tail);
    assert_eq!(tail, [0, 7, 0, 0]);
    dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
    dev.write_config(0, &[9; 6]);
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC, "the MAC is read-only");
    let err = dev
        .activate(ActiveQueues {
            mem: memory().clone(),
            queues: vec![],
            queue_evts: vec![],
            irq: Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 2,
            got: 0
        }
    ));
}

#[test]
fn the_worker_serves_both_queues_and_again_after_a_reset() {
    let (mut dev, peer, _) = device();
    for round in 0..2u8 {
        let mem = memory();
        let (rx, tx) = rings(mem, 16);
        let a = activate(&mut dev, mem, &rx, &tx);
        // Guest to network.
        let out = frame(500, round);
        mem.write_slice(&out, GuestAddress(BUFS)).unwrap();
        tx.add_desc_chains(&[desc(BUFS, 500, 0, 0)], 0).unwrap();
        a.tx_evt.write(1).unwrap();
        assert_eq!(recv(&peer), out, "round {round}");
        wait_until("the tx buffer", || used_idx(mem, &tx) == 1);
        // Network to guest.
        rx.add_desc_chains(&[desc(BUFS + 0x1_0000, 2000, W, 0)], 0)
            .unwrap();
        a.rx_evt.write(1).unwrap();
        let inbound = frame(1500, round + 10);
        peer.send(&inbound).unwrap();
        wait_until("the rx buffer", || used_idx(mem, &rx) == 1);
        assert_eq!(used(mem, &rx, 0), (0, 1500));
        let got = read(mem, BUFS + 0x1_0000, 1500);
        assert_eq!(got[VNET_HDR_LEN..], inbound[VNET_HDR_LEN..]);
        assert_eq!(got[10..12], [1, 0], "num_buffers");
        assert_eq!(a.irq.status() & INT_VRING, INT_VRING);
        assert!(dev.reset());
    }
}

#[test]
fn the_worker_interrupts_only_when_the_driver_wants_it() {
    let (mut dev, peer, _) = device();
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let a = activate(&mut dev, mem, &rx, &tx);
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, tx.avail_addr())
        .unwrap();
    mem.write_slice(&frame(100, 1), GuestAddress(BUFS)).unwrap();
    tx.add_desc_chains(&[desc(BUFS, 100, 0, 0)], 0).unwrap();
    a.tx_evt.write(1).unwrap();
    recv(&peer);
    wait_until("the tx buffer", || used_idx(mem, &tx) == 1);
    // The interrupt would follow the used buffer at once: give it time.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.irq.status(), 0, "interrupted against NO_INTERRUPT");
    assert!(a.irq.eventfd().read().is_err(), "the irqfd was signalled");
    mem.write_obj(0u16, tx.avail_addr()).unwrap();
    tx.add_desc_chains(&[desc(BUFS, 100, 0, 0)], 1).unwrap();
    a.tx_evt.write(1).unwrap();
    recv(&peer);
    wait_until("the interrupt", || a.irq.status() & INT_VRING != 0);
}

#[test]
fn a_guest_that_posts_no_rx_buffers_leaves_every_frame_in_the_tap() {
    let (mut dev, peer, unread) = device();
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let a = activate(&mut dev, mem, &rx, &tx);
    for seed in 0..20 {
        peer.send(&frame(1000, seed)).unwrap();
    }
    // Kicks without buffers wake the worker, which still reads nothing.
    a.rx_evt.write(1).unwrap();
    a.tx_evt.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(dev.reset());
    unread.set_nonblocking(true).unwrap();
    let mut buf = vec![0; 2000];
    for seed in 0..20 {
        let n = unread.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], frame(1000, seed), "frame {seed}");
    }
    assert_eq!(used_idx(mem, &rx), 0);
}

/// The guest keeps the tx ring full of the same frame forever and the
/// network never reads: the worker drops frame after frame, yet a frame
/// for the guest still gets through, and a stop ends it within one frame.
#[test]
fn a_tx_flood_neither_starves_rx_nor_delays_a_stop() {
    let (mut dev, peer, _) = device();
    let mem = memory();
    let (rx, tx) = rings(mem, QUEUE_SIZE);
    mem.write_slice(&frame(MAX_FRAME_LEN, 1), GuestAddress(BUFS))
        .unwrap();
    tx.desc_table()
        .store(0, desc(BUFS, MAX_FRAME_LEN as u32, 0, 0))
        .unwrap();
    let a = activate(&mut dev, mem, &rx, &tx);
    let guest = EndlessRing::start(
        mem,
        tx.avail_addr(),
        used_addr(&tx),
        QUEUE_SIZE,
        0,
        &a.tx_evt,
    );
    let flag = dev.worker.as_ref().unwrap().flag().clone();
    wait_for_steps(&flag, 2 * u64::from(QUEUE_SIZE));
    rx.add_desc_chains(&[desc(0x30_0000, 2000, W, 0)], 0)
        .unwrap();
    a.rx_evt.write(1).unwrap();
    let inbound = frame(1000, 2);
    peer.send(&inbound).unwrap();
    wait_until("the rx frame during the flood", || used_idx(mem, &rx) == 1);
    assert_eq!(read(mem, 0x30_0000 + 12, 988), inbound[12..]);
    let before = flag.steps();
    wait_for_steps(&flag, before + u64::from(QUEUE_SIZE));
    let (after, took) = steps_after_stop(&flag, || dev.reset());
    drop(guest);
    assert!(after <= 1, "{after} frames after the stop");
    assert!(took < Duration::from_secs(2), "the stop took {took:?}");
}
