//! vsock connections through their whole life: the fuzz input is a script
//! of host and guest actions on the device's muxer, its queues and its
//! host socket, so that connections get established and then fed data,
//! credit updates and requests, shutdowns and resets in any order.
//!
//! The host side is real: clients connect to the muxer's listening socket
//! (in a temporary directory) and write `CONNECT <port>\n`, and a guest
//! connection to host port [`HOST_PORT`] reaches a listener at
//! `<socket>_<port>`. The guest side is a driver ([`crate::driver`]) that
//! puts packets on the TX queue and buffers on the RX queue, and reads the
//! device's packets back from guest memory, as the device's worker would
//! call [`process_tx`] and [`process_rx`] (without its thread).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use airlock_vmm::devices::virtio::vsock::connection::BUF_ALLOC;
use airlock_vmm::devices::virtio::vsock::muxer::{bind_listener, Muxer, Timeouts};
use airlock_vmm::devices::virtio::vsock::packet::*;
use airlock_vmm::devices::virtio::vsock::{process_rx, process_tx};
use airlock_vmm::devices::virtio::wants_interrupt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::driver::{DriverQueue, Input, F_NEXT, F_WRITE};

/// The guest's CID.
const GUEST_CID: u64 = 3;
/// The host port the guest can connect to (a listener waits there).
pub const HOST_PORT: u32 = 1234;
/// The first host-side port of host-initiated connections (the muxer's).
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Guest memory.
const MEM_SIZE: usize = 0x10_0000;
const RX_BASE: u64 = 0x0;
const TX_BASE: u64 = 0x3000;
const QUEUE_SIZE: u16 = 64;
/// Where the TX packet being sent lies.
const TX_BUF: u64 = 0x2_0000;
/// RX buffers: [`RX_SLOTS`] of them, [`RX_SLOT_SIZE`] apart.
const RX_BUF: u64 = 0x4_0000;
const RX_SLOTS: u16 = 8;
const RX_SLOT_SIZE: u64 = 0x1_1000;
/// Where an RX slot's data descriptor starts, in the split layout.
const RX_DATA_OFFSET: u64 = 0x100;
/// Actions per input at most.
const MAX_ACTIONS: usize = 128;
/// Host clients per input at most.
const MAX_CLIENTS: usize = 8;
/// Sleeps (to let the muxer's short timeouts expire) per input at most.
const MAX_TICKS: usize = 2;
/// The short timeouts' sweep period, and a sleep's length.
const TICK: Duration = Duration::from_millis(1);

/// The bytes host clients and the guest send: a pattern, made once.
const PATTERN_LEN: usize = MAX_PKT_DATA as usize;

fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| (0..PATTERN_LEN).map(|i| (i % 251) as u8).collect())
}

/// What a run did, for tests that check a seed reaches the states it is
/// meant to reach.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// The ops of the packets the device gave the guest, in order.
    pub to_guest: Vec<u16>,
    /// Payload bytes the guest received (OP_RW).
    pub guest_bytes: usize,
    /// Bytes the host clients read (including the `OK <port>\n` lines).
    pub host_bytes: usize,
    /// `OK <port>` lines host clients received: host-initiated
    /// connections the guest accepted (the connection is established).
    pub host_ok: usize,
    /// Host clients that saw their connection end (EOF or error).
    pub host_eof: usize,
    /// Guest-initiated connections the host listener accepted.
    pub host_accepted: usize,
    /// The most live connections the muxer had at once.
    pub max_connections: usize,
}

/// A connection as the guest knows it.
#[derive(Debug, Clone, Copy)]
struct GuestConn {
    host_port: u32,
    guest_port: u32,
    /// Payload bytes received on it (the honest fwd_cnt).
    received: u32,
}

/// A host client: its socket and whether its `OK` line was read.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
    ok_seen: bool,
    eof: bool,
}

struct Run {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    muxer: Muxer,
    uds: std::path::PathBuf,
    host_listener: UnixListener,
    clients: Vec<Client>,
    conns: Vec<GuestConn>,
    /// RX slots in flight, oldest first.
    rx_slots: std::collections::VecDeque<u16>,
    next_slot: u16,
    scratch: Vec<u8>,
    short_timeouts: bool,
    ticks: usize,
    trace: Trace,
}

/// The cargo fuzz target `vsock_connection`.
pub fn vsock_connection(data: &[u8]) {
    let _ = vsock_connection_trace(data);
}

/// Runs the script in `data`; what happened.
pub fn vsock_connection_trace(data: &[u8]) -> Trace {
    let mut input = Input::new(data);
    let Some(dir) = tempfile::tempdir().ok() else {
        return Trace::default();
    };
    let Some(mut run) = Run::new(dir.path(), input.u8()) else {
        return Trace::default();
    };
    for _ in 0..MAX_ACTIONS {
        if input.is_empty() {
            break;
        }
        run.step(&mut input);
        run.trace.max_connections = run.trace.max_connections.max(run.muxer.connection_count());
    }
    // Whatever is left for the guest, as the worker would deliver it.
    run.drain_rx(RX_SLOTS, 4096, false);
    run.muxer.reset();
    run.trace
}

impl Run {
    /// `mode`: bit 0, short timeouts (a 1 ms sweep; handshakes, requests
    /// and shutdowns expire at once); bit 1, guest connections refused.
    fn new(dir: &std::path::Path, mode: u8) -> Option<Run> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
        let rx = DriverQueue::new(&mem, RX_BASE, QUEUE_SIZE)?;
        let tx = DriverQueue::new(&mem, TX_BASE, QUEUE_SIZE)?;
        let uds = dir.join("v.sock");
        let listener = bind_listener(&uds).ok()?;
        let mut muxer = Muxer::new(GUEST_CID, uds.clone(), listener).ok()?;
        if mode & 1 != 0 {
            muxer.set_timeouts(Timeouts {
                handshake: Duration::ZERO,
                request: Duration::ZERO,
                shutdown: Duration::ZERO,
                tick: TICK,
            });
        }
        muxer.set_guest_connect(mode & 2 == 0);
        let host_listener = UnixListener::bind(dir.join(format!("v.sock_{HOST_PORT}"))).ok()?;
        host_listener.set_nonblocking(true).ok()?;
        Some(Run {
            mem,
            rx,
            tx,
            muxer,
            uds,
            host_listener,
            clients: Vec::new(),
            conns: Vec::new(),
            rx_slots: std::collections::VecDeque::new(),
            next_slot: 0,
            scratch: vec![0u8; MAX_PKT_DATA as usize],
            short_timeouts: mode & 1 != 0,
            ticks: 0,
            trace: Trace::default(),
        })
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 11 {
            0 => self.host_connect(input),
            1 => {
                let (c, len) = (input.u8(), input.u16());
                self.host_write(c, usize::from(len));
            }
            2 => {
                let c = input.u8();
                self.host_read(c);
            }
            3 => {
                let (c, how) = (input.u8(), input.u8());
                self.host_shutdown(c, how);
            }
            4 => self.guest_packet(input),
            5 => self.raw_packet(input),
            6 => {
                let (count, size, split) = (input.u8(), input.u8(), input.u8());
                let size = match size % 6 {
                    0 => 0,
                    1 => 1,
                    2 => 64,
                    3 => 4096,
                    4 => MAX_PKT_DATA,
                    _ => u32::from(size),
                };
                self.drain_rx(1 + u16::from(count) % RX_SLOTS, size, split & 1 != 0);
            }
            7 => self.muxer.process_events(),
            8 => {
                // Only the short timeouts expire within a run.
                if self.short_timeouts && self.ticks < MAX_TICKS {
                    self.ticks += 1;
                    std::thread::sleep(TICK);
                }
                self.muxer.process_events();
            }
            9 => self.guest_connect(input),
            _ => {
                // The driver reset the device: every connection is dropped.
                self.muxer.reset();
                self.conns.clear();
            }
        }
    }

    /// A host client connects and sends its CONNECT line (or not).
    fn host_connect(&mut self, input: &mut Input) {
        let port = match input.u8() % 4 {
            0 => 52,
            1 => 1024,
            2 => u32::from(input.u8()),
            _ => input.u32(),
        };
        let how = input.u8();
        if self.clients.len() >= MAX_CLIENTS {
            return;
        }
        let Ok(mut stream) = UnixStream::connect(&self.uds) else {
            return;
        };
        let line = format!("CONNECT {port}\n");
        let sent: Vec<u8> = match how % 5 {
            0 => line.into_bytes(),
            // Data right behind the line belongs to the guest.
            1 => [line.as_bytes(), b"early data"].concat(),
            2 => line.as_bytes()[..line.len() - 1].to_vec(),
            3 => b"GET / HTTP/1.0\r\n".to_vec(),
            _ => Vec::new(),
        };
        let _ = stream.write_all(&sent);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        self.clients.push(Client {
            stream,
            line: Vec::new(),
            ok_seen: false,
            eof: false,
        });
        // Accept, then read the line (the client is only watched once accepted).
        self.muxer.process_events();
        self.muxer.process_events();
    }

    fn client(&mut self, c: u8) -> Option<&mut Client> {
        let n = self.clients.len();
        (n > 0).then(|| &mut self.clients[usize::from(c) % n])
    }

    fn host_write(&mut self, c: u8, len: usize) {
        let Some(client) = self.client(c) else { return };
        let _ = client.stream.write(&pattern()[..len.min(PATTERN_LEN)]);
        self.muxer.process_events();
    }

    fn host_read(&mut self, c: u8) {
        let Some(client) = self.client(c) else { return };
        let mut buf = [0u8; 16 << 10];
        let (mut bytes, mut ok, mut eof) = (0, 0, 0);
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    if !client.eof {
                        client.eof = true;
                        eof += 1;
                    }
                    break;
                }
                Ok(n) => {
                    bytes += n;
                    if !client.ok_seen {
                        client.line.extend_from_slice(&buf[..n]);
                        if client.line.starts_with(b"OK ") && client.line.contains(&b'\n') {
                            client.ok_seen = true;
                            ok += 1;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    if !client.eof {
                        client.eof = true;
                        eof += 1;
                    }
                    break;
                }
            }
        }
        self.trace.host_bytes += bytes;
        self.trace.host_ok += ok;
        self.trace.host_eof += eof;
        // What was read frees the socket for the guest's data.
        self.muxer.process_events();
    }

    fn host_shutdown(&mut self, c: u8, how: u8) {
        if self.clients.is_empty() {
            return;
        }
        let i = usize::from(c) % self.clients.len();
        match how % 4 {
            0 => drop(self.clients[i].stream.shutdown(Shutdown::Write)),
            1 => drop(self.clients[i].stream.shutdown(Shutdown::Read)),
            2 => drop(self.clients[i].stream.shutdown(Shutdown::Both)),
            _ => drop(self.clients.swap_remove(i)),
        }
        self.muxer.process_events();
    }

    /// The connection the guest means by `c`; before the guest has heard
    /// of any, the first host-initiated one the muxer would make (to 52).
    fn conn(&self, c: u8) -> GuestConn {
        match self.conns.len() {
            0 => GuestConn {
                host_port: LOCAL_PORT_BASE,
                guest_port: 52,
                received: 0,
            },
            n => self.conns[usize::from(c) % n],
        }
    }

    /// A well-addressed packet on connection `c`: the op and the credit
    /// fields are the input's, the payload a pattern of its length, and
    /// the descriptors split where the input says.
    fn guest_packet(&mut self, input: &mut Input) {
        let conn = self.conn(input.u8());
        const OPS: [u16; 9] = [
            OP_RESPONSE,
            OP_RW,
            OP_CREDIT_UPDATE,
            OP_CREDIT_REQUEST,
            OP_SHUTDOWN,
            OP_RST,
            OP_REQUEST,
            OP_RW,
            0,
        ];
        let op = OPS[usize::from(input.u8()) % OPS.len()];
        let flags = u32::from(input.u8());
        let (buf_alloc, fwd_cnt) = match input.u8() % 4 {
            0 => (BUF_ALLOC, conn.received),
            1 => (0, conn.received),
            2 => (4096, conn.received),
            _ => (input.u32(), input.u32()),
        };
        let len = if op == OP_RW {
            u32::from(input.u16()) % (MAX_PKT_DATA + 1)
        } else {
            0
        };
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: conn.guest_port,
            dst_port: conn.host_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: if op == OP_SHUTDOWN { flags & 3 } else { flags },
            buf_alloc,
            fwd_cnt,
        };
        let payload = &pattern()[..len as usize];
        let split = (input.u8(), input.u8());
        self.send_tx(&hdr.to_bytes(), payload, split);
    }

    /// A packet whose header is the input's, as is its payload.
    fn raw_packet(&mut self, input: &mut Input) {
        let mut head = [0u8; HEADER_SIZE];
        let got = input.bytes(HEADER_SIZE);
        head[..got.len()].copy_from_slice(got);
        let hdr = Header::from_bytes(&head);
        let payload = input.bytes((hdr.len as usize).min(256)).to_vec();
        let split = (input.u8(), input.u8());
        self.send_tx(&head, &payload, split);
    }

    /// Puts header and payload, in one to three descriptors, on the TX
    /// queue, and lets the device take them. `split`: where the first two
    /// descriptors end (0: no split there) and, in the second byte's top
    /// bit, a device-writable descriptor (invalid in TX).
    fn send_tx(&mut self, head: &[u8], payload: &[u8], split: (u8, u8)) {
        let bytes = [head, payload].concat();
        let _ = self.mem.write_slice(&bytes, GuestAddress(TX_BUF));
        let total = bytes.len() as u32;
        let a = u32::from(split.0).min(total);
        let b = (a + u32::from(split.1 & 0x7f) * 4).min(total);
        let mut cuts = vec![0u32];
        for cut in [a, b] {
            if cut > *cuts.last().unwrap_or(&0) && cut < total {
                cuts.push(cut);
            }
        }
        cuts.push(total);
        let n = cuts.len() - 1;
        for (i, w) in cuts.windows(2).enumerate() {
            let mut flags = if i + 1 < n { F_NEXT } else { 0 };
            if split.1 & 0x80 != 0 && i + 1 == n {
                flags |= F_WRITE;
            }
            self.tx.set_desc(
                &self.mem,
                i as u16,
                TX_BUF + u64::from(w[0]),
                w[1] - w[0],
                flags,
                i as u16 + 1,
            );
        }
        self.tx.push(&self.mem, 0);
        process_tx(&self.mem, &mut self.tx.queue, &mut self.muxer);
        wants_interrupt(&mut self.tx.queue, &self.mem);
        self.tx.take_used(&self.mem);
    }

    /// The guest connects to a host port: [`HOST_PORT`] (where a listener
    /// waits) or another (nobody).
    fn guest_connect(&mut self, input: &mut Input) {
        let guest_port = u32::from(input.u16());
        let host_port = match input.u8() % 3 {
            0 | 1 => HOST_PORT,
            _ => input.u32(),
        };
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: BUF_ALLOC,
            ..Header::default()
        };
        self.send_tx(&hdr.to_bytes(), &[], (0, 0));
        if self.conns.len() < 16 {
            self.conns.push(GuestConn {
                host_port,
                guest_port,
                received: 0,
            });
        }
        while let Ok((stream, _)) = self.host_listener.accept() {
            self.trace.host_accepted += 1;
            if self.clients.len() < MAX_CLIENTS && stream.set_nonblocking(true).is_ok() {
                self.clients.push(Client {
                    stream,
                    line: b"OK \n".to_vec(),
                    ok_seen: true,
                    eof: false,
                });
            }
        }
    }

    /// Gives the device `count` RX buffers of `size` data bytes (one
    /// descriptor for header and data, or two when `split`), lets it fill
    /// them, and reads what it wrote.
    fn drain_rx(&mut self, count: u16, size: u32, split: bool) {
        for _ in 0..count {
            if self.rx_slots.len() >= usize::from(RX_SLOTS) {
                break;
            }
            let slot = self.next_slot;
            self.next_slot = (self.next_slot + 1) % RX_SLOTS;
            let base = RX_BUF + u64::from(slot) * RX_SLOT_SIZE;
            let head = slot * 2;
            if split {
                self.rx.set_desc(
                    &self.mem,
                    head,
                    base,
                    HEADER_SIZE as u32,
                    F_WRITE | F_NEXT,
                    head + 1,
                );
                self.rx
                    .set_desc(&self.mem, head + 1, base + RX_DATA_OFFSET, size, F_WRITE, 0);
            } else {
                let len = HEADER_SIZE as u32 + size;
                self.rx.set_desc(&self.mem, head, base, len, F_WRITE, 0);
            }
            self.rx.push(&self.mem, head);
            self.rx_slots.push_back(slot);
        }
        process_rx(
            &self.mem,
            &mut self.rx.queue,
            &mut self.muxer,
            &mut self.scratch,
        );
        wants_interrupt(&mut self.rx.queue, &self.mem);
        for (id, len) in self.rx.take_used(&self.mem) {
            // Buffers are used in the order they were made available.
            let Some(slot) = self.rx_slots.pop_front() else {
                break;
            };
            if id != slot * 2 {
                continue;
            }
            if (len as usize) < HEADER_SIZE {
                continue; // an unusable buffer, returned empty
            }
            let base = RX_BUF + u64::from(slot) * RX_SLOT_SIZE;
            let mut head = [0u8; HEADER_SIZE];
            if self.mem.read_slice(&mut head, GuestAddress(base)).is_err() {
                continue;
            }
            self.on_device_packet(&Header::from_bytes(&head));
        }
    }

    /// The guest driver's reaction to a packet from the device.
    fn on_device_packet(&mut self, hdr: &Header) {
        self.trace.to_guest.push(hdr.op);
        let key = (hdr.src_port, hdr.dst_port);
        let known = self
            .conns
            .iter()
            .position(|c| (c.host_port, c.guest_port) == key);
        match (hdr.op, known) {
            (OP_REQUEST, None) if self.conns.len() < 16 => self.conns.push(GuestConn {
                host_port: hdr.src_port,
                guest_port: hdr.dst_port,
                received: 0,
            }),
            (OP_RW, Some(i)) => {
                self.conns[i].received = self.conns[i].received.wrapping_add(hdr.len);
                self.trace.guest_bytes += hdr.len as usize;
            }
            (OP_RST, Some(i)) => {
                self.conns.swap_remove(i);
            }
            _ => {}
        }
    }
}
