//! The receive queue: frames land in the guest's buffers with their
//! header and `num_buffers`, over as many mergeable buffers as they need;
//! the tap is read only when the guest has posted buffers.

use super::*;

/// `VIRTIO_NET_F_MRG_RXBUF` not accepted.
const NO_MRG: u64 = AVAIL_FEATURES & !(1 << VIRTIO_NET_F_MRG_RXBUF);

/// Posts one one-descriptor chain of `len` bytes per entry of `lens`,
/// from descriptor `first` on, each in its own 64 KiB of guest memory.
fn post(vq: &MockSplitQueue<'static, GuestMemoryMmap>, first: u16, lens: &[u32]) {
    let chains: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| desc(buf_addr(first + i as u16), len, W, 0))
        .collect();
    vq.add_desc_chains(&chains, first).unwrap();
}

fn buf_addr(desc: u16) -> u64 {
    BUFS + u64::from(desc) * 0x1_0000
}

/// The frame as the guest sees it: `num_buffers` set.
fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[10..12].copy_from_slice(&n.to_le_bytes());
    f
}

#[test]
fn a_frame_lands_with_its_header_and_num_buffers() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    post(&rx, 0, &[1526]);
    let f = frame(100, 1);
    peer.send(&f).unwrap();
    let done = q.process_rx();
    assert!(done.used && !done.more);
    assert_eq!(used_idx(mem, &rx), 1);
    assert_eq!(used(mem, &rx, 0), (0, 100));
    assert_eq!(read(mem, buf_addr(0), 100), with_num_buffers(&f, 1));
    assert!(read(mem, buf_addr(0) + 100, 100).iter().all(|&b| b == 0));
}

#[test]
fn a_frame_spans_several_mergeable_buffers() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    // Three chains; the second of two descriptors.
    rx.add_desc_chains(
        &[
            desc(buf_addr(0), 1500, W, 0),
            desc(buf_addr(1), 700, W | NEXT, 2),
            desc(buf_addr(2), 800, W, 0),
            desc(buf_addr(3), 4000, W, 0),
        ],
        0,
    )
    .unwrap();
    let f = frame(5000, 2);
    peer.send(&f).unwrap();
    q.process_rx();
    assert_eq!(used_idx(mem, &rx), 3);
    assert_eq!(used(mem, &rx, 0), (0, 1500));
    assert_eq!(used(mem, &rx, 1), (1, 1500));
    assert_eq!(used(mem, &rx, 2), (3, 2000));
    let mut got = read(mem, buf_addr(0), 1500);
    got.extend(read(mem, buf_addr(1), 700));
    got.extend(read(mem, buf_addr(2), 800));
    got.extend(read(mem, buf_addr(3), 2000));
    assert_eq!(got, with_num_buffers(&f, 3));
}

#[test]
fn a_frame_waits_for_enough_buffers_and_the_tap_is_not_read_meanwhile() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    post(&rx, 0, &[1000, 1000]);
    let (a, b) = (frame(3000, 3), frame(200, 4));
    peer.send(&a).unwrap();
    peer.send(&b).unwrap();
    assert_eq!(q.process_rx(), Processed::default());
    assert_eq!(
        used_idx(mem, &rx),
        0,
        "the two buffers are still the guest's"
    );
    assert!(!q.rx_wants_frames(), "a frame waits: the tap is not read");
    post(&rx, 2, &[1000, 1000]);
    q.rx_notified();
    q.process_rx();
    // The waiting frame over three buffers, then the next in the fourth.
    assert_eq!(used_idx(mem, &rx), 4);
    assert_eq!(
        (
            used(mem, &rx, 0),
            used(mem, &rx, 1),
            used(mem, &rx, 2),
            used(mem, &rx, 3)
        ),
        ((0, 1000), (1, 1000), (2, 1000), (3, 200))
    );
    assert_eq!(read(mem, buf_addr(2), 1000), a[2000..]);
    assert_eq!(read(mem, buf_addr(3), 200), with_num_buffers(&b, 1));
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped_and_the_buffers_kept() {
    let mem = memory();
    let (rx, tx) = rings(mem, 4);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    post(&rx, 0, &[100, 100, 100, 100]);
    peer.send(&frame(1000, 5)).unwrap();
    let small = frame(90, 6);
    peer.send(&small).unwrap();
    q.process_rx();
    assert_eq!(q.dropped(), 1);
    assert_eq!(used_idx(mem, &rx), 1);
    assert_eq!(used(mem, &rx, 0), (0, 90));
    assert_eq!(read(mem, buf_addr(0), 90), with_num_buffers(&small, 1));
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain_or_is_dropped() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, NO_MRG);
    post(&rx, 0, &[1526, 1526]);
    peer.send(&frame(3000, 7)).unwrap();
    let f = frame(1526, 8);
    peer.send(&f).unwrap();
    q.process_rx();
    assert_eq!(q.dropped(), 1);
    assert_eq!(used_idx(mem, &rx), 1);
    assert_eq!(used(mem, &rx, 0), (0, 1526));
    assert_eq!(read(mem, buf_addr(0), 1526), with_num_buffers(&f, 1));
}

#[test]
fn malformed_chains_drop_the_frame_and_come_back_empty() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    rx.add_desc_chains(
        &[
            desc(buf_addr(0), 100, 0, 0),          // 0: device-readable
            desc(0xffff_ffff_0000, 100, W, 0),     // 1: outside memory
            desc(MEM_SIZE as u64 - 50, 100, W, 0), // 2: straddles the end
            desc(buf_addr(3), 10, W, 0),           // 3: good, but ...
            desc(buf_addr(4), 10, W | NEXT, 5),    // 4: ... then a loop
            desc(buf_addr(5), 10, W | NEXT, 4),    // 5
        ],
        0,
    )
    .unwrap();
    post(&rx, 6, &[200]);
    for seed in 0..5 {
        peer.send(&frame(100, seed)).unwrap();
    }
    q.process_rx();
    // Four frames dropped (the fourth over two chains), the fifth written.
    assert_eq!(q.dropped(), 4);
    assert_eq!(used_idx(mem, &rx), 6);
    for i in 0..5 {
        assert_eq!(used(mem, &rx, i).1, 0, "entry {i}");
    }
    assert_eq!(used(mem, &rx, 5), (6, 100));
    for d in [0u16, 3, 4, 5] {
        assert!(read(mem, buf_addr(d), 100).iter().all(|&b| b == 0), "{d}");
    }
    assert_eq!(
        read(mem, buf_addr(6), 100),
        with_num_buffers(&frame(100, 4), 1)
    );
}

#[test]
fn a_guest_without_buffers_makes_the_device_read_nothing() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    for seed in 0..50 {
        peer.send(&frame(1000, seed)).unwrap();
    }
    assert!(!q.rx_wants_frames());
    assert_eq!(q.process_rx(), Processed::default());
    // All 50 frames are still in the socket, in order.
    post(&rx, 0, &[1500; 16]);
    assert!(q.rx_wants_frames());
    q.process_rx();
    assert_eq!(q.dropped(), 0);
    assert_eq!(used_idx(mem, &rx), 16);
    for i in 0..16 {
        let got = read(mem, buf_addr(i), 1000);
        assert_eq!(got, with_num_buffers(&frame(1000, i as u8), 1), "{i}");
    }
}

#[test]
fn runt_frames_from_the_tap_are_dropped() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    post(&rx, 0, &[100]);
    peer.send(&[1, 2, 3]).unwrap();
    let f = frame(50, 9);
    peer.send(&f).unwrap();
    q.process_rx();
    assert_eq!(q.dropped(), 1);
    assert_eq!(used(mem, &rx, 0), (0, 50));
}

#[test]
fn a_pass_takes_a_budget_of_frames_and_checks_for_a_stop_before_each() {
    let mem = memory();
    let (rx, tx) = rings(mem, 256);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    post(&rx, 0, &[100; 100]);
    for _ in 0..100 {
        peer.send(&frame(60, 0)).unwrap();
    }
    let done = q.process_rx();
    assert!(done.used && done.more);
    assert_eq!(used_idx(mem, &rx), FRAME_BUDGET as u16);
    assert_eq!(q.stop.steps(), FRAME_BUDGET as u64);
    q.stop.request();
    assert_eq!(q.process_rx(), Processed::default());
    assert_eq!(used_idx(mem, &rx), FRAME_BUDGET as u16);
}

#[test]
fn a_closed_backend_stops_the_reads_until_the_next_notification() {
    use std::os::fd::FromRawFd;
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    // A SOCK_SEQPACKET pair: its reads give an end of file once the far
    // end is closed (a datagram pair's do not).
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which lives
    // across the call.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0);
    // SAFETY: both descriptors were just made and are owned here alone.
    let (dev, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = Tap::frame_fd(dev).unwrap();
    let mut q = NetQueues::new(mem.clone(), queue(&rx), queue(&tx), tap, AVAIL_FEATURES);
    post(&rx, 0, &[100]);
    drop(peer);
    assert_eq!(q.process_rx(), Processed::default());
    assert!(
        !q.rx_wants_frames(),
        "an end of file is not read again and again"
    );
    assert_eq!(q.stop.steps(), 1);
    q.rx_notified();
    assert!(q.rx_wants_frames());
    assert_eq!(used_idx(mem, &rx), 0);
}

#[test]
fn a_frame_over_more_than_256_descriptors_is_dropped_and_the_buffers_kept() {
    let mem = memory();
    let (rx, tx) = rings(mem, 256);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    // 16 chains of 16 ten-byte descriptors (160 bytes each), which fill
    // the descriptor table; their buffers follow one another.
    let descs: Vec<_> = (0..256u16)
        .map(|i| {
            let flags = if i % 16 < 15 { W | NEXT } else { W };
            desc(BUFS + 10 * u64::from(i), 10, flags, (i + 1) % 256)
        })
        .collect();
    rx.add_desc_chains(&descs, 0).unwrap();
    // 3000 bytes would need 19 chains, 304 descriptors: dropped.
    peer.send(&frame(3000, 1)).unwrap();
    let f = frame(2000, 2);
    peer.send(&f).unwrap();
    q.process_rx();
    assert_eq!(q.dropped(), 1);
    // 2000 bytes in 13 chains, 208 descriptors.
    assert_eq!(used_idx(mem, &rx), 13);
    assert_eq!(used(mem, &rx, 12), (192, 80));
    assert_eq!(read(mem, BUFS, 2000), with_num_buffers(&f, 13));
}
