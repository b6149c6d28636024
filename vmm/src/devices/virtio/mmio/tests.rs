//! The transport driven as a guest driver drives it, in guest memory.

use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::ActivateError;

#[derive(Default)]
struct Record {
    activations: Vec<(usize, u64)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct Dummy(Arc<Mutex<Record>>);

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        4
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << 5
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        self.0
            .lock()
            .unwrap()
            .activations
            .push((q.queues.len(), q.acked_features));
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.0.lock().unwrap().resets += 1;
        true
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rec = Arc::new(Mutex::new(Record::default()));
    let t = MmioTransport::new(
        Box::new(Dummy(rec.clone())),
        mem,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    (t, rec)
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Plays the Linux driver's probe: features, then both queues, then
/// DRIVER_OK.
fn bring_up(t: &mut MmioTransport) {
    w(t, 0x70, status::ACKNOWLEDGE);
    w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(t, 0x24, 0);
    w(t, 0x20, 1 << 5 | 1 << 7); // bit 7 was not offered
    w(t, 0x24, 1);
    w(t, 0x20, 1); // VIRTIO_F_VERSION_1
    w(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (sel, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
        w(t, 0x30, sel);
        assert!(r(t, 0x34) >= 8);
        w(t, 0x38, 8);
        w(t, 0x80, base);
        w(t, 0x84, 0);
        w(t, 0x90, base + 0x1000);
        w(t, 0xa0, base + 0x2000);
        w(t, 0x44, 1);
    }
    w(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

#[test]
fn identifies_as_a_version_2_device() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, 0x00), MAGIC);
    assert_eq!(r(&mut t, 0x04), 2);
    assert_eq!(r(&mut t, 0x08), 4);
    w(&mut t, 0x14, 1);
    assert_eq!(r(&mut t, 0x10), 1);
    w(&mut t, 0x30, 1);
    assert_eq!(r(&mut t, 0x34), 8);
    w(&mut t, 0x30, 2);
    assert_eq!(r(&mut t, 0x34), 0);
}

#[test]
fn driver_ok_activates_with_accepted_features_only() {
    let (mut t, rec) = transport();
    bring_up(&mut t);
    assert!(t.is_active());
    assert_eq!(
        rec.lock().unwrap().activations,
        vec![(2, VIRTIO_F_VERSION_1 | 1 << 5)]
    );
    // Queue setup is frozen while running.
    w(&mut t, 0x30, 0);
    w(&mut t, 0x44, 0);
    assert_eq!(r(&mut t, 0x44), 1);
}

#[test]
fn reset_then_reactivate() {
    let (mut t, rec) = transport();
    bring_up(&mut t);
    w(&mut t, 0x70, 0);
    assert!(!t.is_active());
    assert_eq!(r(&mut t, 0x70), 0);
    assert_eq!(rec.lock().unwrap().resets, 1);
    bring_up(&mut t);
    assert_eq!(rec.lock().unwrap().activations.len(), 2);
}

#[test]
fn invalid_queues_do_not_activate() {
    let (mut t, rec) = transport();
    w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    // Queue 0 placed outside guest memory, never made ready.
    w(&mut t, 0x30, 0);
    w(&mut t, 0x80, 0xffff_f000);
    w(&mut t, 0x84, 0xffff_ffff);
    w(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!t.is_active());
    assert!(rec.lock().unwrap().activations.is_empty());
    assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, 0x60) & INT_CONFIG, 0);
}

#[test]
fn features_ok_needs_version_1() {
    let (mut t, _) = transport();
    w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
}

#[test]
fn config_space_passes_through() {
    let (mut t, rec) = transport();
    let mut b = [0u8; 2];
    t.read(0x104, &mut b);
    assert_eq!(b, [4, 4]);
    let gen = r(&mut t, 0xfc);
    t.write(0x108, &[1, 2, 3]);
    assert_eq!(rec.lock().unwrap().config_writes, vec![(8, vec![1, 2, 3])]);
    assert_ne!(r(&mut t, 0xfc), gen);
}

#[test]
fn notify_signals_the_queue_eventfd() {
    let (mut t, _) = transport();
    w(&mut t, QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    w(&mut t, QUEUE_NOTIFY, 7); // no such queue
}

#[test]
fn garbage_register_accesses_never_panic() {
    let (mut t, _) = transport();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut buf = [0u8; 8];
    for _ in 0..50_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = seed % 0x1100;
        let len = (seed >> 20) as usize % 9;
        buf.copy_from_slice(&seed.to_le_bytes());
        if seed & 1 == 0 {
            t.write(offset, &buf[..len]);
        } else {
            t.read(offset, &mut buf[..len]);
        }
    }
    // Unaligned and odd-sized register reads leave the buffer alone (the
    // bus hands devices a zeroed buffer, so the guest reads zero).
    let mut b = [0xffu8; 4];
    t.read(0x01, &mut b);
    assert_eq!(b, [0xff; 4]);
    let mut two = [0xffu8; 2];
    t.read(0x00, &mut two);
    assert_eq!(two, [0xff; 2]);
}

const BASE: u64 = 0xd000_0000;

fn bus_with(t: MmioTransport) -> (crate::devices::bus::Bus, Arc<Mutex<MmioTransport>>) {
    let notifier = t.notifier();
    let t = Arc::new(Mutex::new(t));
    let mut bus = crate::devices::bus::Bus::new();
    bus.insert_with_lock_free_writes(t.clone(), notifier, BASE, MMIO_WINDOW)
        .unwrap();
    (bus, t)
}

fn bus_w(bus: &crate::devices::bus::Bus, offset: u64, v: u32) {
    assert!(bus.write(BASE + offset, &v.to_le_bytes()));
}

fn bus_r(bus: &crate::devices::bus::Bus, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(bus.read(BASE + offset, &mut b));
    u32::from_le_bytes(b)
}

#[test]
fn a_kick_does_not_wait_for_the_transport_lock() {
    let (t, _) = transport();
    let evt = t.queue_evts()[1].try_clone().unwrap();
    let (bus, t) = bus_with(t);
    // vCPU 0 holds the lock (as while it resets the device).
    let held = t.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let kicker = std::thread::spawn(move || {
        bus_w(&bus, QUEUE_NOTIFY, 1);
        bus_w(&bus, QUEUE_NOTIFY, 9); // no such queue: ignored
        assert!(bus.write(BASE + QUEUE_NOTIFY, &[1, 0])); // wrong width: ignored
        tx.send(()).unwrap();
    });
    // Generous: the kick takes microseconds, but the machine running
    // the tests may be busy; a kick that waits for the lock never ends.
    rx.recv_timeout(std::time::Duration::from_secs(2))
        .expect("the kick waited for the transport lock");
    kicker.join().unwrap();
    drop(held);
    assert_eq!(evt.read().unwrap(), 1);
}

/// Two vCPUs: vCPU 0 brings the rng device up and resets it, again and
/// again (holding the transport's lock while the device's worker
/// stops), while vCPU 1 kicks its queue and reads and writes registers
/// in a loop, and the guest keeps the ring full. Both finish.
#[test]
fn reset_while_another_vcpu_kicks_does_not_deadlock() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use crate::devices::virtio::rng::{Rng, QUEUE_SIZE};
    use crate::devices::virtio::testing::EndlessRing;

    const ROUNDS: usize = 20;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    let w = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    let desc = SplitDescriptor::new(0x10_0000, 4096, w, 0);
    vq.desc_table().store(0, RawDescriptor::from(desc)).unwrap();
    let t = MmioTransport::new(
        Box::new(Rng::new(None)),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let kick = t.queue_evts()[0].try_clone().unwrap();
    let (bus, _t) = bus_with(t);
    let guest = EndlessRing::start(&mem, vq.avail_addr(), vq.used_addr(), QUEUE_SIZE, 0, &kick);
    let used_idx = GuestAddress(vq.used_addr().0 + 2);
    let rings = [vq.desc_table_addr(), vq.avail_addr(), vq.used_addr()];

    let done = Arc::new(AtomicBool::new(false));
    let (finished_tx, finished) = std::sync::mpsc::channel();
    let vcpu0 = {
        let (bus, mem, done, finished_tx) =
            (bus.clone(), mem.clone(), done.clone(), finished_tx.clone());
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                // A driver starts its rings afresh after a reset.
                mem.write_obj(0u16, used_idx).unwrap();
                bus_w(&bus, 0x70, status::ACKNOWLEDGE | status::DRIVER);
                bus_w(&bus, 0x24, 1);
                bus_w(&bus, 0x20, 1); // VIRTIO_F_VERSION_1
                let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
                bus_w(&bus, 0x70, features_ok);
                bus_w(&bus, 0x30, 0);
                bus_w(&bus, 0x38, u32::from(QUEUE_SIZE));
                for (reg, addr) in [0x80, 0x90, 0xa0].into_iter().zip(rings) {
                    bus_w(&bus, reg, addr.0 as u32);
                    bus_w(&bus, reg + 4, (addr.0 >> 32) as u32);
                }
                bus_w(&bus, 0x44, 1);
                bus_w(&bus, 0x70, features_ok | status::DRIVER_OK);
                assert_eq!(bus_r(&bus, 0x70), features_ok | status::DRIVER_OK);
                // The worker is busy with the guest's ring.
                let start = Instant::now();
                while mem.read_obj::<u16>(used_idx).unwrap() < 64 {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "round {round}: idle"
                    );
                    std::thread::yield_now();
                }
                bus_w(&bus, 0x70, 0);
                assert_eq!(bus_r(&bus, 0x70), 0, "round {round}: not reset");
            }
            done.store(true, Ordering::SeqCst);
            finished_tx.send("vcpu0").unwrap();
        })
    };
    let vcpu1 = std::thread::spawn(move || {
        let mut kicks = 0u64;
        while !done.load(Ordering::SeqCst) {
            bus_w(&bus, QUEUE_NOTIFY, 0);
            bus_w(&bus, 0x64, super::super::INT_VRING); // InterruptACK
            let _ = bus_r(&bus, 0x60);
            let _ = bus_r(&bus, 0x70);
            bus_w(&bus, 0x30, 0); // QueueSel
            kicks += 1;
        }
        finished_tx.send("vcpu1").unwrap();
        kicks
    });
    // Generous, as the machine running the tests may be busy: the
    // rounds take milliseconds; a deadlock never ends.
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a vCPU is stuck: deadlock between reset and kicks");
    }
    vcpu0.join().unwrap();
    assert!(vcpu1.join().unwrap() > 0);
    drop(guest);
}
