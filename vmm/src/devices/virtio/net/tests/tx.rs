//! The transmit queue: frames reach the tap whole; malformed chains are
//! dropped and returned; the work per pass is bounded.

use super::*;

/// Puts `data` in guest memory at `addr`.
fn put(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}

#[test]
fn a_frame_reaches_the_peer_whole_with_its_header() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    // Header split over two descriptors, payload over two more.
    let f = frame(3000, 1);
    put(mem, BUFS, &f[..5]);
    put(mem, BUFS + 0x100, &f[5..12]);
    put(mem, BUFS + 0x1000, &f[12..1000]);
    put(mem, BUFS + 0x2000, &f[1000..]);
    tx.add_desc_chains(
        &[
            desc(BUFS, 5, NEXT, 1),
            desc(BUFS + 0x100, 7, NEXT, 2),
            desc(BUFS + 0x1000, 988, NEXT, 3),
            desc(BUFS + 0x2000, 2000, 0, 0),
        ],
        0,
    )
    .unwrap();
    let done = q.process_tx();
    assert_eq!(
        done,
        Processed {
            used: true,
            more: false
        }
    );
    // The tap takes the vnet header with the frame, as the guest wrote it.
    assert_eq!(recv(&peer), f);
    assert_eq!(used_idx(mem, &tx), 1);
    assert_eq!(used(mem, &tx, 0), (0, 0));
    assert_eq!(q.dropped(), 0);
}

#[test]
fn the_largest_frame_passes_and_one_byte_more_does_not() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    let f = frame(MAX_FRAME_LEN, 2);
    put(mem, BUFS, &f);
    let half = (MAX_FRAME_LEN / 2) as u32;
    let rest = MAX_FRAME_LEN as u32 - half;
    tx.add_desc_chains(
        &[
            desc(BUFS, half, NEXT, 1),
            desc(BUFS + u64::from(half), rest, 0, 0),
            desc(BUFS, half, NEXT, 3),
            desc(BUFS + u64::from(half), rest + 1, 0, 0),
        ],
        0,
    )
    .unwrap();
    q.process_tx();
    assert_eq!(recv(&peer), f);
    assert!(!peer_has_frame(&peer), "the oversized frame was sent");
    assert_eq!(used_idx(mem, &tx), 2);
    assert_eq!(used(mem, &tx, 1), (2, 0));
    assert_eq!(q.dropped(), 1);
}

#[test]
fn malformed_chains_are_dropped_and_returned() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    let f = frame(100, 3);
    put(mem, BUFS, &f);
    tx.add_desc_chains(
        &[
            desc(BUFS, 100, W, 0),                 // 0: device-writable
            desc(0xffff_ffff_0000, 100, 0, 0),     // 1: outside memory
            desc(MEM_SIZE as u64 - 50, 100, 0, 0), // 2: straddles the end
            desc(u64::MAX - 10, 100, 0, 0),        // 3: wraps around
            desc(BUFS, 8, 0, 0),                   // 4: shorter than a header
            desc(BUFS, 50_000, NEXT, 6),           // 5: 100 000 bytes in all
            desc(BUFS, 50_000, 0, 0),              // 6
            desc(BUFS, 10, NEXT, 8),               // 7: loops 7 -> 8 -> 7
            desc(BUFS, 10, NEXT, 7),               // 8
        ],
        0,
    )
    .unwrap();
    // Next index out of the table (a chain of its own, then a good one).
    tx.add_desc_chains(&[desc(BUFS, 10, NEXT, 200)], 9).unwrap();
    tx.add_desc_chains(&[desc(BUFS, 100, 0, 0)], 10).unwrap();
    q.process_tx();
    // Only the good frame went out; every chain came back.
    assert_eq!(recv(&peer), f);
    assert!(!peer_has_frame(&peer));
    assert_eq!(used_idx(mem, &tx), 9);
    for i in 0..8 {
        assert_eq!(used(mem, &tx, i).1, 0, "chain {i}");
    }
    assert_eq!(q.dropped(), 8);
}

#[test]
fn an_indirect_table_longer_than_the_queue_is_refused() {
    let mem = memory();
    let (rx, tx) = rings(mem, 16);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    let f = frame(MAX_CHAIN_DESCS + 1, 4);
    put(mem, BUFS, &f);
    // Indirect tables of N one-byte descriptors over the frame.
    let table = |at: u64, n: u16| {
        for i in 0..n {
            let flags = if i + 1 < n { NEXT } else { 0 };
            let d = desc(BUFS + u64::from(i), 1, flags, i + 1);
            mem.write_obj(d, GuestAddress(at + 16 * u64::from(i)))
                .unwrap();
        }
    };
    let n_ok = MAX_CHAIN_DESCS as u16;
    let n_bad = n_ok + 1;
    table(0x30_0000, n_bad);
    table(0x38_0000, n_ok);
    const INDIRECT: u16 = 0x4;
    tx.add_desc_chains(
        &[
            desc(0x30_0000, 16 * u32::from(n_bad), INDIRECT, 0),
            desc(0x38_0000, 16 * u32::from(n_ok), INDIRECT, 0),
        ],
        0,
    )
    .unwrap();
    q.process_tx();
    assert_eq!(recv(&peer), f[..MAX_CHAIN_DESCS]);
    assert!(!peer_has_frame(&peer));
    assert_eq!(used_idx(mem, &tx), 2);
    assert_eq!(q.dropped(), 1);
}

#[test]
fn a_pass_takes_a_budget_of_frames_and_checks_for_a_stop_before_each() {
    let mem = memory();
    let (rx, tx) = rings(mem, 256);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    put(mem, BUFS, &frame(60, 5));
    let chains: Vec<_> = (0..100).map(|_| desc(BUFS, 60, 0, 0)).collect();
    tx.add_desc_chains(&chains, 0).unwrap();
    let done = q.process_tx();
    assert!(done.used && done.more);
    assert_eq!(used_idx(mem, &tx), FRAME_BUDGET as u16);
    assert_eq!(q.stop.steps(), FRAME_BUDGET as u64);
    let done = q.process_tx();
    assert!(done.used && !done.more);
    assert_eq!(used_idx(mem, &tx), 100);
    for _ in 0..100 {
        assert_eq!(recv(&peer).len(), 60);
    }
    tx.add_desc_chains(&[desc(BUFS, 60, 0, 0)], 100).unwrap();
    q.stop.request();
    assert_eq!(q.process_tx(), Processed::default());
    assert_eq!(used_idx(mem, &tx), 100);
}

#[test]
fn a_full_tap_drops_frames_without_holding_them() {
    let mem = memory();
    let (rx, tx) = rings(mem, 256);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    put(mem, BUFS, &frame(60_000, 6));
    // Far more than the socket buffers hold: the peer never reads.
    let chains: Vec<_> = (0..256).map(|_| desc(BUFS, 60_000, 0, 0)).collect();
    tx.add_desc_chains(&chains, 0).unwrap();
    while q.process_tx().more {}
    assert_eq!(used_idx(mem, &tx), 256);
    assert!(q.dropped() > 0, "the socket took 256 frames of 60 KB");
    let mut got = 0;
    while peer_has_frame(&peer) {
        recv(&peer);
        got += 1;
    }
    assert_eq!(got + q.dropped(), 256);
}

#[test]
fn kicks_are_off_while_frames_are_sent_and_back_on_when_the_ring_is_empty() {
    let mem = memory();
    let (rx, tx) = rings(mem, 256);
    let (mut q, peer) = queues(mem, &rx, &tx, AVAIL_FEATURES);
    put(mem, BUFS, &frame(60, 7));
    let chains: Vec<_> = (0..100).map(|_| desc(BUFS, 60, 0, 0)).collect();
    tx.add_desc_chains(&chains, 0).unwrap();
    let used_flags = |mem: &GuestMemoryMmap| -> u16 { mem.read_obj(used_addr(&tx)).unwrap() };
    assert!(q.process_tx().more);
    assert_eq!(used_flags(mem), 1, "VRING_USED_F_NO_NOTIFY while busy");
    assert!(!q.process_tx().more);
    assert_eq!(used_flags(mem), 0, "kicks back on once the ring is empty");
    assert_eq!(used_idx(mem, &tx), 100);
    for _ in 0..100 {
        recv(&peer);
    }
}
