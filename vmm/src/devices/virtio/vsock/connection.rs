//! One vsock stream connection: its state machine and credit accounting.
//!
//! The host end is a non-blocking Unix stream. "Local" is the host side,
//! "peer" the guest side. Host→guest data is read from the host socket
//! straight into the guest's rx buffer, and only as much as the guest's
//! advertised credit allows; guest→host data the host socket cannot take
//! right away waits in `tx_buf`, which the guest's use of our credit bounds
//! to [`BUF_ALLOC`] (a guest overrunning it is reset).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use crate::devices::ratelimit::ratelimited;

/// The buffer space we advertise to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Send the guest a credit update once its view of our free space drops
/// below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Credit accounting (virtio 1.2 §5.10.6.3), pure arithmetic.
#[derive(Debug, Default, Clone)]
pub struct Credit {
    /// Guest's buffer size, from its latest header.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed, from its latest header.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest.
    pub tx_cnt: Wrapping<u32>,
    /// Bytes the guest sent us.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes we forwarded to the host socket (freed from our buffer).
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
}

impl Credit {
    /// Records the credit fields of a guest header.
    pub fn update_from_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes we may still send the guest. A guest claiming to
    /// have consumed more than we sent, or shrinking its buffer, gets 0.
    pub fn peer_avail(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes the guest sent that we have not forwarded yet.
    pub fn unforwarded(&self) -> u32 {
        (self.rx_cnt - self.fwd_cnt).0
    }

    /// Whether the guest is low on credit and an update would give it more.
    pub fn needs_update(&self) -> bool {
        let used_in_guest_view = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        self.fwd_cnt != self.last_fwd_cnt_sent
            && BUF_ALLOC.saturating_sub(used_in_guest_view) < CREDIT_UPDATE_THRESHOLD
    }

    /// Fills a header's credit fields; the guest now knows our `fwd_cnt`.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest.
    LocalInit,
    /// Data flows (the guest may have shut one direction down).
    Established,
    /// The host socket hit EOF: SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed,
    /// Finished; dropped once `pending` is empty (an RST may be queued).
    Killed,
}

// Pending rx packets, in send order.
const P_RST: u8 = 1;
const P_REQUEST: u8 = 2;
const P_RESPONSE: u8 = 4;
const P_RW: u8 = 8;
const P_CREDIT_UPDATE: u8 = 16;
const P_SHUTDOWN: u8 = 32;

/// One connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    state: State,
    pending: u8,
    credit: Credit,
    tx_buf: VecDeque<u8>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,
    deadline: Option<Instant>,
    /// Epoll interest currently registered (kept by the muxer).
    pub registered: EventSet,
    /// Queued in the muxer's rx list.
    pub queued: bool,
}

impl Connection {
    /// A host-initiated connection: REQUEST the guest within `deadline`.
    pub fn new_local(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        c.pending = P_REQUEST;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection whose host socket is connected:
    /// RESPONSE queued.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            req.dst_port,
            req.src_port,
            State::Established,
        );
        c.credit.update_from_peer(req.buf_alloc, req.fwd_cnt);
        c.pending = P_RESPONSE;
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: State,
    ) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            pending: 0,
            credit: Credit::default(),
            tx_buf: VecDeque::new(),
            peer_shutdown: 0,
            host_write_shut: false,
            deadline: None,
            registered: EventSet::empty(),
            queued: false,
        }
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Finished and nothing left to tell the guest: drop it.
    pub fn is_done(&self) -> bool {
        self.state == State::Killed && self.pending & P_RST == 0
    }

    /// Something to send the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0 || (self.state == State::Established && self.credit.needs_update())
    }

    /// Ends the connection; `rst`: tell the guest.
    pub fn kill(&mut self, rst: bool) {
        if self.state != State::Killed {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        self.state = State::Killed;
        self.pending = if rst { P_RST } else { 0 };
        self.deadline = None;
        self.tx_buf = VecDeque::new();
    }

    /// Ends the connection and logs why (the host side sees only EOF).
    fn kill_because(&mut self, rst: bool, why: &str) {
        if self.state != State::Killed {
            ratelimited!(info, port = self.local_port, state = ?self.state, "vsock: closing a connection: {why}");
        }
        self.kill(rst);
    }

    /// The timeout for the current state passed: reset.
    pub fn check_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            self.kill_because(true, "timed out");
        }
    }

    fn reads_host(&self) -> bool {
        self.state == State::Established && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The epoll events wanted on the host socket.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.reads_host() && self.pending & P_RW == 0 && self.credit.peer_avail() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() && self.state != State::Killed {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Handles an epoll event on the host socket.
    pub fn notify(&mut self, ev: EventSet) {
        if ev.intersects(EventSet::OUT) {
            self.flush_tx();
        }
        if ev
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            && self.reads_host()
        {
            // Read when the guest gives us an rx buffer.
            self.pending |= P_RW;
        } else if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) && self.state != State::Killed
        {
            // Not reading (or not yet connected), so a hangup would spin.
            self.kill_because(true, &format!("host socket event {ev:?} while not reading"));
        }
    }

    /// Handles a guest packet addressed to this connection (type and
    /// addresses already checked by the muxer).
    pub fn recv_from_guest(
        &mut self,
        hdr: &Header,
        data: &[u8],
        now: Instant,
        shutdown_timeout: std::time::Duration,
    ) {
        if self.state == State::Killed {
            return;
        }
        self.credit.update_from_peer(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, self.state) {
            (OP_RST, _) => self.kill_because(false, "the guest reset it"),
            (OP_RESPONSE, State::LocalInit) => {
                self.state = State::Established;
                self.deadline = None;
                let ok = format!("OK {}\n", self.local_port);
                // Not guest data: no credit accounting.
                self.write_host(ok.as_bytes(), false);
            }
            (OP_RW, State::Established | State::LocalClosed) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    self.kill(true);
                    return;
                }
                self.credit.rx_cnt += Wrapping(data.len() as u32);
                self.write_host(data, true);
            }
            (OP_CREDIT_UPDATE, State::Established | State::LocalClosed) => {}
            (OP_CREDIT_REQUEST, State::Established | State::LocalClosed) => {
                self.pending |= P_CREDIT_UPDATE;
            }
            (OP_SHUTDOWN, State::Established | State::LocalClosed) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                    self.pending &= !P_RW;
                }
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && self.deadline.is_none() {
                    self.deadline = Some(now + shutdown_timeout);
                }
                self.after_tx_progress();
            }
            // Anything else (REQUEST on a live connection, data before the
            // guest accepted, an unknown op) is a protocol error.
            _ => self.kill_because(true, "unexpected packet from the guest"),
        }
    }

    /// Sends `data` to the host, buffering what doesn't fit now.
    fn write_host(&mut self, data: &[u8], counted: bool) {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write(data) {
                Ok(n) => written = n,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.kill_because(true, &format!("writing to the host socket: {e}"));
                    return;
                }
            }
        }
        if counted {
            self.credit.fwd_cnt += Wrapping(written as u32);
        }
        let rest = data.get(written..).unwrap_or_default();
        // Bytes the guest has in flight are bounded by the credit we gave it.
        if self.tx_buf.len().saturating_add(rest.len()) > BUF_ALLOC as usize + MAX_CONNECT_OK_LINE {
            ratelimited!(
                warn,
                port = self.local_port,
                "vsock: guest overran its credit, resetting"
            );
            self.kill(true);
            return;
        }
        self.tx_buf.extend(rest);
        self.after_tx_progress();
    }

    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    // The "OK" line is counted too; harmless (a few bytes of
                    // extra credit once per connection).
                    self.credit.fwd_cnt += Wrapping(n as u32);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    break
                }
                Err(e) => {
                    self.kill_because(true, &format!("writing to the host socket: {e}"));
                    return;
                }
            }
        }
        self.after_tx_progress();
    }

    /// Applies the guest's shutdown once buffered data is out.
    fn after_tx_progress(&mut self) {
        if self.state == State::Killed || !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // Both directions done: finish with an RST, as Linux expects.
            self.kill(true);
        }
    }

    /// Produces the next packet for the guest, reading host data into
    /// `data` (at most its length and the guest's credit). `None`: nothing
    /// to send after all.
    pub fn send_to_guest(
        &mut self,
        data: &mut [u8],
        now: Instant,
        shutdown_timeout: std::time::Duration,
    ) -> Option<Header> {
        if self.pending & (P_RST | P_REQUEST | P_RESPONSE) == 0 {
            if let Some(h) = self.read_host(data, now, shutdown_timeout) {
                return Some(h);
            }
        }
        let op = if self.pending & P_RST != 0 {
            self.pending = 0;
            OP_RST
        } else if self.state == State::Killed {
            return None;
        } else if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            OP_REQUEST
        } else if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            OP_RESPONSE
        } else if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            let mut h = self.header(OP_SHUTDOWN);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            return Some(h);
        } else if self.pending & P_CREDIT_UPDATE != 0
            || (self.state == State::Established && self.credit.needs_update())
        {
            self.pending &= !P_CREDIT_UPDATE;
            OP_CREDIT_UPDATE
        } else {
            return None;
        };
        Some(self.header(op))
    }

    fn header(&mut self, op: u16) -> Header {
        let mut h = Header::to_guest(self.guest_cid, self.local_port, self.peer_port, op);
        self.credit.stamp(&mut h);
        h
    }

    fn read_host(
        &mut self,
        data: &mut [u8],
        now: Instant,
        shutdown_timeout: std::time::Duration,
    ) -> Option<Header> {
        if self.pending & P_RW == 0 {
            return None;
        }
        self.pending &= !P_RW;
        if !self.reads_host() {
            return None;
        }
        let max = data.len().min(self.credit.peer_avail() as usize);
        if max == 0 {
            return None;
        }
        match self.stream.read(&mut data[..max]) {
            Ok(0) => {
                // Host EOF: tell the guest, expect its RST.
                self.state = State::LocalClosed;
                self.pending |= P_SHUTDOWN;
                self.deadline = Some(now + shutdown_timeout);
                None
            }
            Ok(n) => {
                // More may be waiting: read again on the next buffer.
                self.pending |= P_RW;
                self.credit.tx_cnt += Wrapping(n as u32);
                let mut h = self.header(OP_RW);
                h.len = n as u32;
                Some(h)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                None
            }
            Err(e) => {
                self.kill_because(true, &format!("reading the host socket: {e}"));
                None
            }
        }
    }

    #[cfg(test)]
    pub fn credit(&self) -> &Credit {
        &self.credit
    }
}

/// Room for the `OK <port>\n` line on top of the guest's credit.
const MAX_CONNECT_OK_LINE: usize = 16;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn credit(peer_buf_alloc: u32, peer_fwd: u32, tx: u32) -> Credit {
        Credit {
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(peer_fwd),
            tx_cnt: Wrapping(tx),
            ..Credit::default()
        }
    }

    #[test]
    fn peer_credit_arithmetic() {
        assert_eq!(credit(1000, 0, 0).peer_avail(), 1000);
        assert_eq!(credit(1000, 0, 400).peer_avail(), 600);
        assert_eq!(credit(1000, 400, 1000).peer_avail(), 400);
        assert_eq!(credit(1000, 0, 1000).peer_avail(), 0);
        // Wrapping counters.
        assert_eq!(credit(1000, u32::MAX - 9, 90).peer_avail(), 900);
        // A guest shrinking its buffer or lying about fwd_cnt gets nothing.
        assert_eq!(credit(100, 0, 500).peer_avail(), 0);
        assert_eq!(credit(1000, 50, 10).peer_avail(), 0);
    }

    #[test]
    fn credit_update_when_guest_runs_low() {
        let mut c = Credit {
            rx_cnt: Wrapping(BUF_ALLOC - 1000),
            ..Credit::default()
        };
        assert!(!c.needs_update(), "nothing forwarded yet");
        c.fwd_cnt = Wrapping(BUF_ALLOC - 1000);
        assert!(c.needs_update());
        let mut h = Header::default();
        c.stamp(&mut h);
        assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, BUF_ALLOC - 1000));
        assert!(!c.needs_update());
        c.rx_cnt += Wrapping(10);
        c.fwd_cnt += Wrapping(10);
        assert!(!c.needs_update(), "guest still has plenty");
    }

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            op: OP_REQUEST,
            type_: TYPE_STREAM,
            buf_alloc: 100,
            ..Default::default()
        };
        (Connection::new_peer(a, 3, &req), b)
    }

    fn guest(op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            op,
            flags,
            buf_alloc,
            fwd_cnt,
            type_: TYPE_STREAM,
            ..Default::default()
        }
    }

    #[test]
    fn reads_only_up_to_guest_credit() {
        let (mut c, mut host) = pair();
        let now = Instant::now();
        let mut buf = [0u8; 4096];
        assert_eq!(c.send_to_guest(&mut buf, now, T).unwrap().op, OP_RESPONSE);
        host.write_all(&[7u8; 300]).unwrap();
        assert!(c.interest().contains(EventSet::IN));
        c.notify(EventSet::IN);
        assert!(!c.interest().contains(EventSet::IN), "read is pending");
        let h = c.send_to_guest(&mut buf, now, T).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 100));
        // No credit left: nothing more, and no interest in reading.
        assert!(c.send_to_guest(&mut buf, now, T).is_none());
        assert!(!c.interest().contains(EventSet::IN));
        // The guest consumed 100 bytes.
        c.recv_from_guest(&guest(OP_CREDIT_UPDATE, 0, 100, 100), &[], now, T);
        assert!(c.interest().contains(EventSet::IN));
        c.notify(EventSet::IN);
        assert_eq!(c.send_to_guest(&mut buf, now, T).unwrap().len, 100);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut c, _host) = pair();
        let now = Instant::now();
        let chunk = vec![0u8; MAX_PKT_DATA as usize];
        // The host never reads: the socket buffer fills, then tx_buf.
        for _ in 0..64 {
            c.recv_from_guest(&guest(OP_RW, 0, 100, 0), &chunk, now, T);
            if c.state() == State::Killed {
                break;
            }
        }
        assert_eq!(c.state(), State::Killed);
        let mut buf = [0u8; 64];
        let _ = c.send_to_guest(&mut buf, now, T); // RESPONSE dropped by kill
        assert!(c.is_done());
    }

    #[test]
    fn shutdown_both_flushes_then_resets() {
        let (mut c, mut host) = pair();
        let now = Instant::now();
        c.recv_from_guest(&guest(OP_RW, 0, 100, 0), b"bye", now, T);
        c.recv_from_guest(
            &guest(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 100, 0),
            &[],
            now,
            T,
        );
        assert_eq!(c.state(), State::Killed);
        let mut buf = [0u8; 64];
        assert_eq!(c.send_to_guest(&mut buf, now, T).unwrap().op, OP_RST);
        assert!(c.is_done());
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
    }

    #[test]
    fn host_eof_sends_shutdown_and_times_out() {
        let (mut c, host) = pair();
        let now = Instant::now();
        let mut buf = [0u8; 64];
        c.send_to_guest(&mut buf, now, T);
        drop(host);
        c.notify(EventSet::IN);
        let h = c.send_to_guest(&mut buf, now, T).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, 3));
        assert_eq!(c.state(), State::LocalClosed);
        c.check_deadline(now + T / 2);
        assert_eq!(c.state(), State::LocalClosed);
        c.check_deadline(now + T);
        assert_eq!(c.send_to_guest(&mut buf, now, T).unwrap().op, OP_RST);
        assert!(c.is_done());
    }

    #[test]
    fn data_before_response_is_a_protocol_error() {
        let (a, _b) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Connection::new_local(a, 3, 1 << 30, 52, now + T);
        c.recv_from_guest(&guest(OP_RW, 0, 100, 0), b"x", now, T);
        assert_eq!(c.state(), State::Killed);
        let mut buf = [0u8; 8];
        assert_eq!(c.send_to_guest(&mut buf, now, T).unwrap().op, OP_RST);
    }
}
