//! Device tests: the test plays the guest driver through `MockSplitQueue`
//! rings in guest memory, and host processes through real Unix sockets.
//! Here the harness; the connection protocol's tests in `connections.rs`,
//! the device and its worker's in `worker.rs`.

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

mod connections;
mod worker;
