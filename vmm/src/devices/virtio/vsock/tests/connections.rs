//! The connection protocol: handshakes, data and credit both ways,
//! shutdowns, resets and the caps on connections, handshakes and resets.

use super::*;
#[test]
fn host_initiated_connect_and_data_both_ways() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(52);
    assert!(local >= 1 << 30);
    host.write_all(b"hello").unwrap();
    g.give_rx(1, 4096);
    let got = g.wait_rx();
    assert_eq!(got.len(), 1);
    let (h, d) = &got[0];
    assert_eq!((h.op, h.src_port, h.dst_port, h.len), (OP_RW, local, 52, 5));
    assert_eq!(d, b"hello");
    g.send(g.pkt(OP_RW, 52, local), b"world");
    assert_eq!(read_host(&mut host, 5), b"world");
    // A second connection gets another host-side port.
    let (_host2, local2) = g.host_connect(52);
    assert_ne!(local, local2);
    assert_eq!(g.muxer.connection_count(), 2);
}

#[test]
fn guest_data_split_over_descriptors_arrives_whole() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(52);
    // Header and data in one descriptor.
    let mut hdr = g.pkt(OP_RW, 52, local);
    hdr.len = 3;
    let a = g.alloc(HEADER_SIZE as u64 + 3);
    g.mem.write_slice(&hdr.to_bytes(), GuestAddress(a)).unwrap();
    g.mem
        .write_slice(b"one", GuestAddress(a + HEADER_SIZE as u64))
        .unwrap();
    g.send_raw(&[(a, HEADER_SIZE as u32 + 3)]);
    assert_eq!(read_host(&mut host, 3), b"one");
    // Header split in two, data in three pieces of odd sizes.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    hdr.len = data.len() as u32;
    let bytes = hdr.to_bytes();
    let (h1, h2) = (g.alloc(10), g.alloc(HEADER_SIZE as u64 - 10));
    g.mem.write_slice(&bytes[..10], GuestAddress(h1)).unwrap();
    g.mem.write_slice(&bytes[10..], GuestAddress(h2)).unwrap();
    let mut descs = vec![(h1, 10u32), (h2, HEADER_SIZE as u32 - 10)];
    for piece in [&data[..1], &data[1..4097], &data[4097..]] {
        let d = g.alloc(piece.len() as u64);
        g.mem.write_slice(piece, GuestAddress(d)).unwrap();
        descs.push((d, piece.len() as u32));
    }
    g.send_raw(&descs);
    assert_eq!(read_host(&mut host, data.len()), data);
    // Fewer bytes in the chain than its header says: dropped, not padded.
    hdr.len = 100;
    let h = g.alloc(HEADER_SIZE as u64 + 10);
    g.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
    g.send_raw(&[(h, HEADER_SIZE as u32 + 10)]);
    g.send(g.pkt(OP_RW, 52, local), b"after");
    assert_eq!(read_host(&mut host, 5), b"after");
}

#[test]
fn host_data_waits_for_rx_buffers_and_splits_over_them() {
    let mut g = Guest::new();
    let (mut host, _) = g.host_connect(7);
    host.write_all(&[1u8; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.pump().is_empty(), "no rx buffer yet");
    g.give_rx(4, 300);
    let mut total = 0;
    let start = Instant::now();
    while total < 1000 && start.elapsed() < Duration::from_secs(5) {
        for (h, d) in g.pump() {
            assert_eq!(h.op, OP_RW);
            assert!(d.len() <= 300);
            total += d.len();
        }
    }
    assert_eq!(total, 1000);
}

#[test]
fn device_respects_guest_credit() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(9);
    // The guest shrinks its buffer to 100 bytes, nothing consumed.
    let mut upd = g.pkt(OP_CREDIT_UPDATE, 9, local);
    upd.buf_alloc = 100;
    g.send(upd, &[]);
    host.write_all(&[5u8; 300]).unwrap();
    g.give_rx(8, 4096);
    let got = g.wait_rx();
    let n: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(n, 100);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.pump().is_empty(), "sent beyond the guest's credit");
    // The guest consumed 100 bytes.
    upd.fwd_cnt = 100;
    g.send(upd, &[]);
    let got = g.wait_rx();
    assert_eq!(got.iter().map(|(_, d)| d.len()).sum::<usize>(), 100);
}

#[test]
fn credit_update_sent_when_guest_runs_low_and_on_request() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(9);
    let reader = std::thread::spawn(move || {
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        while total < 200 * 1024 {
            total += host.read(&mut buf).unwrap();
        }
        host
    });
    let chunk = vec![3u8; 50 * 1024];
    for _ in 0..4 {
        g.send(g.pkt(OP_RW, 9, local), &chunk);
    }
    let start = Instant::now();
    let mut host = None;
    while start.elapsed() < Duration::from_secs(5) {
        g.muxer.process_events();
        if reader.is_finished() {
            host = Some(reader.join().unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _host = host.expect("host did not get the data");
    g.give_rx(2, 4096);
    let got = g.wait_rx();
    let (h, _) = got
        .iter()
        .find(|(h, _)| h.op == OP_CREDIT_UPDATE)
        .expect("no credit update");
    assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, 200 * 1024));
    // Explicit request.
    g.send(g.pkt(OP_CREDIT_REQUEST, 9, local), &[]);
    let got = g.wait_rx();
    assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(got[0].0.fwd_cnt, 200 * 1024);
}

#[test]
fn guest_initiated_connect() {
    let mut g = Guest::new();
    let mut path = g.uds.clone().into_os_string();
    path.push("_1234");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(g.pkt(OP_REQUEST, 40000, 1234), &[]);
    g.give_rx(2, 4096);
    let got = g.wait_rx();
    assert_eq!(got.len(), 1);
    let h = got[0].0;
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (OP_RESPONSE, HOST_CID, CID, 1234, 40000)
    );
    let (mut host, _) = listener.accept().unwrap();
    g.send(g.pkt(OP_RW, 40000, 1234), b"ping");
    assert_eq!(read_host(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let got = g.wait_rx();
    assert_eq!(got[0].1, b"pong");

    // Nobody listens on port 99: RST.
    g.send(g.pkt(OP_REQUEST, 40001, 99), &[]);
    g.give_rx(1, 4096);
    let got = g.wait_rx();
    let h = got[0].0;
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 99, 40001));
    assert_eq!(g.muxer.connection_count(), 1);
}

#[test]
fn a_guest_that_may_not_connect_is_reset_and_no_socket_is_opened() {
    let mut g = Guest::new();
    g.muxer.set_guest_connect(false);
    let mut path = g.uds.clone().into_os_string();
    path.push("_1234");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    g.send(g.pkt(OP_REQUEST, 40000, 1234), &[]);
    g.give_rx(1, 4096);
    let got = g.wait_rx();
    let h = got[0].0;
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 1234, 40000));
    assert_eq!(g.muxer.connection_count(), 0);
    // Nothing ever connected to the host socket.
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[test]
fn a_device_removes_only_the_socket_it_bound() {
    let dir = TempDir::new();
    let own = dir.sock();
    drop(Vsock::new(CID, own.clone(), false).unwrap());
    assert!(!own.exists(), "its own socket is removed");
    let handed = dir.0.join("handed.sock");
    let listener = UnixListener::bind(&handed).unwrap();
    drop(Vsock::with_listener(CID, handed.clone(), listener, false).unwrap());
    assert!(
        handed.exists(),
        "a socket handed over is the binder's to remove"
    );
}

#[test]
fn shutdowns_both_ways() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(5);
    // Guest stops sending: the host reads EOF but can still write.
    let mut sd = g.pkt(OP_SHUTDOWN, 5, local);
    sd.flags = SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert_closed(&mut host);
    host.write_all(b"late").unwrap();
    g.give_rx(4, 4096);
    assert_eq!(g.wait_rx()[0].1, b"late");
    // Host closes: SHUTDOWN to the guest, then the guest's RST ends it.
    drop(host);
    let got = g.wait_rx();
    assert_eq!(
        (got[0].0.op, got[0].0.flags),
        (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    g.send(g.pkt(OP_RST, 5, local), &[]);
    assert_eq!(g.muxer.connection_count(), 0);

    // Guest shuts down both directions: RST from the device, host sees EOF.
    let (mut host, local) = g.host_connect(6);
    let mut sd = g.pkt(OP_SHUTDOWN, 6, local);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(sd, &[]);
    assert_closed(&mut host);
    g.give_rx(1, 4096);
    assert_eq!(g.wait_rx()[0].0.op, OP_RST);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn shutdown_times_out_without_guest_rst() {
    let t = Timeouts {
        shutdown: Duration::from_millis(100),
        tick: Duration::from_millis(20),
        ..Timeouts::default()
    };
    let mut g = Guest::with_timeouts(t);
    let (host, _) = g.host_connect(5);
    drop(host);
    g.give_rx(4, 4096);
    assert_eq!(g.wait_rx()[0].0.op, OP_SHUTDOWN);
    assert_eq!(g.wait_rx()[0].0.op, OP_RST);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn rst_for_unknown_connections() {
    let mut g = Guest::new();
    g.give_rx(4, 4096);
    g.send(g.pkt(OP_RW, 1, 2), b"x");
    let got = g.wait_rx();
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (OP_RST, 2, 1)
    );
    g.send(g.pkt(OP_RST, 1, 2), &[]);
    g.send(g.pkt(OP_RESPONSE, 1, 2), &[]);
    let got = g.wait_rx();
    assert_eq!(got.len(), 1, "no answer to an RST");
}

#[test]
fn malformed_packets_are_reset_or_dropped() {
    let mut g = Guest::new();
    g.give_rx(16, 4096);
    // Bad op, bad type, wrong destination CID: RST.
    g.send(g.pkt(99, 1, 2), &[]);
    let mut bad_type = g.pkt(OP_REQUEST, 1, 2);
    bad_type.type_ = 2;
    g.send(bad_type, &[]);
    let mut bad_dst = g.pkt(OP_REQUEST, 1, 2);
    bad_dst.dst_cid = 7;
    g.send(bad_dst, &[]);
    let got = g.wait_rx();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(h, _)| h.op == OP_RST));
    // Spoofed source CID: dropped silently.
    let mut spoofed = g.pkt(OP_REQUEST, 1, 2);
    spoofed.src_cid = 9;
    g.send(spoofed, &[]);
    // len larger than the data descriptor.
    let mut long = g.pkt(OP_RW, 1, 2);
    long.len = 100;
    let h = g.alloc(64);
    g.mem
        .write_slice(&long.to_bytes(), GuestAddress(h))
        .unwrap();
    let d = g.alloc(10);
    g.send_raw(&[(h, HEADER_SIZE as u32), (d, 10)]);
    // len beyond the maximum payload.
    long.len = u32::MAX;
    g.mem
        .write_slice(&long.to_bytes(), GuestAddress(h))
        .unwrap();
    g.send_raw(&[(h, HEADER_SIZE as u32), (d, 10)]);
    // Descriptors outside guest memory, or too short for a header.
    g.send_raw(&[(MEM_SIZE - 8, HEADER_SIZE as u32)]);
    g.send_raw(&[(u64::MAX - 8, 64)]);
    g.send_raw(&[(h, 8)]);
    long.len = 10;
    g.mem
        .write_slice(&long.to_bytes(), GuestAddress(h))
        .unwrap();
    g.send_raw(&[(h, HEADER_SIZE as u32), (MEM_SIZE - 4, 10)]);
    std::thread::sleep(Duration::from_millis(10));
    assert!(g.pump().is_empty());
    // Unusable rx buffers are returned empty; the next good one is used.
    let w = VRING_DESC_F_WRITE as u16;
    Guest::publish(&g.rxvq, &[(200, MEM_SIZE - 8, 64, w)]);
    Guest::publish(&g.rxvq, &[(201, 0x20_0000, 64, 0), (202, 0x20_1000, 64, 0)]);
    g.send(g.pkt(OP_RW, 1, 2), b"x");
    let _ = g.pump();
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn bad_or_missing_connect_line_closes_the_client() {
    let t = Timeouts {
        handshake: Duration::from_millis(100),
        tick: Duration::from_millis(20),
        ..Timeouts::default()
    };
    let mut g = Guest::with_timeouts(t);
    let mut bad = UnixStream::connect(&g.uds).unwrap();
    bad.write_all(b"CONNECT x\n").unwrap();
    let mut silent = UnixStream::connect(&g.uds).unwrap();
    let mut long = UnixStream::connect(&g.uds).unwrap();
    long.write_all(b"CONNECT 1234567890123\n").unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        g.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_closed(&mut bad);
    assert_closed(&mut silent);
    assert_closed(&mut long);
    assert_eq!(g.muxer.connection_count(), 0);
}

/// Whether the host socket was closed by the device (without waiting).
fn closed_now(host: &UnixStream) -> bool {
    host.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let mut reader = host;
    match reader.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn host_clients_beyond_the_handshake_cap_are_refused_at_once() {
    use super::muxer::MAX_HANDSHAKES;
    let mut g = Guest::new();
    // Clients that connect and never send CONNECT.
    let idle: Vec<UnixStream> = (0..MAX_HANDSHAKES + 36)
        .map(|_| UnixStream::connect(&g.uds).unwrap())
        .collect();
    g.muxer.process_events();
    let refused = idle.iter().filter(|s| closed_now(s)).count();
    // The handshake timeout (2 s) is far off: only the cap closed them.
    assert_eq!(refused, 36, "the cap of {MAX_HANDSHAKES} handshakes");
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn resets_for_unknown_connections_are_capped() {
    use super::muxer::MAX_RX_CTRL;
    let mut g = Guest::new();
    // Data for connections that do not exist, and no rx buffer to answer
    // into: each would queue a reset.
    for port in 0..(MAX_RX_CTRL as u32 + 500) {
        let mut h = g.pkt(OP_RW, 50_000 + port, 7);
        h.len = 0;
        g.muxer.send_from_guest(&h, &[]);
    }
    let mut queued = 0;
    let mut data = vec![0u8; 4096];
    while let Some(h) = g.muxer.next_rx(&mut data) {
        assert_eq!(h.op, OP_RST);
        queued += 1;
    }
    assert_eq!(queued, MAX_RX_CTRL, "resets queued at most");
}

#[test]
fn unanswered_request_times_out() {
    let t = Timeouts {
        request: Duration::from_millis(100),
        tick: Duration::from_millis(20),
        ..Timeouts::default()
    };
    let mut g = Guest::with_timeouts(t);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    g.give_rx(4, 4096);
    let req = g.wait_rx()[0].0;
    assert_eq!(req.op, OP_REQUEST);
    let rst = g.wait_rx()[0].0;
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, req.src_port, 77)
    );
    assert_closed(&mut host);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut g = Guest::new();
    let (_host, local) = g.host_connect(5);
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..16 {
        g.send(g.pkt(OP_RW, 5, local), &chunk);
    }
    g.give_rx(1, 4096);
    assert_eq!(g.wait_rx()[0].0.op, OP_RST);
    assert_eq!(g.muxer.connection_count(), 0);
}
