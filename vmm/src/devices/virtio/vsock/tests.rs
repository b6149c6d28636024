//! Device tests: the test plays the guest driver through `MockSplitQueue`
//! rings in guest memory, and host processes through real Unix sockets.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::connection::BUF_ALLOC;
use super::muxer::{bind_listener, Muxer, Timeouts};
use super::packet::*;
use super::*;
use crate::devices::virtio::testing::{steps_after_stop, wait_for_steps, EndlessRing};

const CID: u64 = 3;
const MEM_SIZE: u64 = 0x100_0000;
const NEXT: u16 = 1; // VRING_DESC_F_NEXT

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "avs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest driver: rx and tx rings plus a bump allocator for buffers.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rxvq: MockSplitQueue<'static, GuestMemoryMmap>,
    txvq: MockSplitQueue<'static, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    muxer: Muxer,
    next_addr: u64,
    rx_desc: u16,
    tx_desc: u16,
    rx_seen: u16,
    tx_seen: u16,
    rx_bufs: HashMap<u16, (u64, u64)>,
    _dir: TempDir,
    uds: PathBuf,
}

impl Guest {
    fn new() -> Self {
        Self::with_timeouts(Timeouts::default())
    }

    fn with_timeouts(t: Timeouts) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        ));
        let rxvq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let txvq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        let rxq = rxvq.create_queue().unwrap();
        let txq = txvq.create_queue().unwrap();
        let dir = TempDir::new();
        let uds = dir.sock();
        let mut muxer = Muxer::new(CID, uds.clone(), bind_listener(&uds).unwrap()).unwrap();
        muxer.set_timeouts(t);
        Guest {
            mem,
            rxvq,
            txvq,
            rxq,
            txq,
            muxer,
            next_addr: 0x10_0000,
            rx_desc: 0,
            tx_desc: 0,
            rx_seen: 0,
            tx_seen: 0,
            rx_bufs: HashMap::new(),
            _dir: dir,
            uds,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_addr;
        self.next_addr += (len + 15) & !15;
        assert!(self.next_addr < MEM_SIZE, "test ran out of guest memory");
        a
    }

    fn publish(vq: &MockSplitQueue<'_, GuestMemoryMmap>, descs: &[(u16, u64, u32, u16)]) {
        for (i, &(idx, addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match descs.get(i + 1) {
                Some(&(n, ..)) => (flags | NEXT, n),
                None => (flags, 0),
            };
            vq.desc_table()
                .store(
                    idx,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        let avail = vq.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(descs[0].0);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Adds `n` rx buffers with `data_len` bytes of payload room each.
    fn give_rx(&mut self, n: usize, data_len: u32) {
        for _ in 0..n {
            let h = self.alloc(HEADER_SIZE as u64);
            let d = self.alloc(u64::from(data_len));
            let (i0, i1) = (self.rx_desc, (self.rx_desc + 1) % QUEUE_SIZE);
            self.rx_desc = (self.rx_desc + 2) % QUEUE_SIZE;
            let w = VRING_DESC_F_WRITE as u16;
            Self::publish(
                &self.rxvq,
                &[(i0, h, HEADER_SIZE as u32, w), (i1, d, data_len, w)],
            );
            self.rx_bufs.insert(i0, (h, d));
        }
    }

    /// Adds a raw tx chain and processes the tx queue.
    fn send_raw(&mut self, descs: &[(u64, u32)]) {
        let chain: Vec<_> = descs
            .iter()
            .map(|&(a, l)| {
                let i = self.tx_desc;
                self.tx_desc = (self.tx_desc + 1) % QUEUE_SIZE;
                (i, a, l, 0)
            })
            .collect();
        Self::publish(&self.txvq, &chain);
        let before = self.tx_seen;
        assert!(process_tx(self.mem, &mut self.txq, &mut self.muxer));
        self.tx_seen = self.txvq.used().idx().load();
        assert_eq!(
            self.tx_seen,
            before.wrapping_add(1),
            "tx chain not returned"
        );
    }

    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let h = self.alloc(HEADER_SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.send_raw(&[(h, HEADER_SIZE as u32)]);
        } else {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.send_raw(&[(h, HEADER_SIZE as u32), (d, data.len() as u32)]);
        }
    }

    fn pkt(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Header::default()
        }
    }

    /// Runs the device side once and returns the packets the guest got.
    fn pump(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.muxer.process_events();
        let mut data = vec![0u8; MAX_PKT_DATA as usize];
        process_rx(self.mem, &mut self.rxq, &mut self.muxer, &mut data);
        let mut out = Vec::new();
        let used = self.rxvq.used();
        let end = used.idx().load();
        while self.rx_seen != end {
            let e = used
                .ring()
                .ref_at(usize::from(self.rx_seen % QUEUE_SIZE))
                .unwrap()
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let (h, d) = self.rx_bufs.remove(&(e.id() as u16)).unwrap();
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(e.len(), HEADER_SIZE as u32 + hdr.len);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Pumps until the guest got at least one packet (or a timeout).
    fn wait_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let start = Instant::now();
        loop {
            let got = self.pump();
            if !got.is_empty() || start.elapsed() > Duration::from_secs(5) {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Host connects with `CONNECT port`, guest accepts: returns the host
    /// stream and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.give_rx(1, 4096);
        let got = self.wait_rx();
        assert_eq!(got.len(), 1);
        let req = got[0].0;
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (OP_REQUEST, HOST_CID, CID, port, TYPE_STREAM)
        );
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        let mut resp = self.pkt(OP_RESPONSE, port, req.src_port);
        resp.buf_alloc = 1 << 20;
        self.send(resp, &[]);
        let line = format!("OK {}\n", req.src_port);
        let mut buf = vec![0u8; line.len()];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_exact(&mut buf).unwrap();
        assert_eq!(buf, line.as_bytes());
        (host, req.src_port)
    }
}

fn read_host(host: &mut UnixStream, n: usize) -> Vec<u8> {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    host.read_exact(&mut buf).unwrap();
    buf
}

fn assert_closed(host: &mut UnixStream) {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match host.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("host socket not closed: {other:?}"),
    }
}

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
