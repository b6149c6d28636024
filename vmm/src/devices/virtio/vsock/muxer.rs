//! The connection multiplexer: the host listener and the `CONNECT`
//! handshake, the map of connections, the rx queue of packets waiting for
//! guest buffers, and RSTs for packets that match no connection.
//!
//! It runs its own (non-blocking, level-triggered) epoll over the listener,
//! clients still handshaking, connection sockets and a timeout timerfd; the
//! device's worker waits on that epoll's fd and calls
//! [`Muxer::process_events`] when it is readable.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connect::{parse_connect, MAX_CONNECT_LINE};
use super::connection::Connection;
use super::packet::*;
use super::VsockError;
use crate::devices::ratelimit::ratelimited;

/// Connections (including clients still handshaking) at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// Clients still handshaking at most.
pub const MAX_HANDSHAKES: usize = 64;
/// Queued RSTs for unknown connections at most (more are dropped).
pub const MAX_RX_CTRL: usize = 1024;
/// First host-side port for host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// sun_path size.
const SUN_PATH_LEN: usize = 108;

const TOKEN_LISTENER: u64 = 1 << 40;
const TOKEN_TIMER: u64 = 2 << 40;
const TOKEN_HANDSHAKE: u64 = 3 << 40;
const TOKEN_CONN: u64 = 4 << 40;
const TOKEN_KIND: u64 = 0xff << 40;

/// The muxer's timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A host client must send its `CONNECT` line within this.
    pub handshake: Duration,
    /// The guest must answer a host-initiated REQUEST within this.
    pub request: Duration,
    /// A shutdown must complete (guest RST / flush) within this.
    pub shutdown: Duration,
    /// Period of the timeout sweep.
    pub tick: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(2),
            request: Duration::from_secs(2),
            shutdown: Duration::from_secs(2),
            tick: Duration::from_millis(250),
        }
    }
}

/// (host-side port, guest-side port).
type ConnKey = (u32, u32);

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// The vsock backend.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    rx_ctrl: VecDeque<Header>,
    rxq: VecDeque<ConnKey>,
    next_local_port: u32,
    timeouts: Timeouts,
    /// Whether the guest may connect to host ports (`<uds_path>_P`).
    guest_connect: bool,
}

/// Binds the listening socket at `path`, replacing a stale socket file
/// that nothing listens on.
pub fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    if path.as_os_str().as_bytes().len() >= SUN_PATH_LEN {
        return Err(VsockError::PathTooLong(path.to_path_buf()));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(VsockError::PathExists(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(VsockError::PathInUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
            }
            Err(e) => return Err(VsockError::Bind(path.to_path_buf(), e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
    Ok(listener)
}

/// Connects to the Unix socket at `path` without blocking (a full backlog
/// fails with EAGAIN rather than waiting).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::from(ErrorKind::InvalidInput));
    }
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` is within it.
    let r = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl Muxer {
    /// A muxer for a guest with `guest_cid`, accepting host clients on
    /// `listener` (bound at `uds_path`).
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            handshakes: HashMap::new(),
            rx_ctrl: VecDeque::new(),
            rxq: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
            timeouts: Timeouts::default(),
            guest_connect: true,
        })
    }

    /// Lets the guest connect to host ports, or not (then every guest
    /// connection request is answered with a reset, and the device opens
    /// no socket for the guest). On unless turned off here.
    pub fn set_guest_connect(&mut self, allowed: bool) {
        self.guest_connect = allowed;
    }

    /// Overrides the timeouts.
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// The fd to wait on: readable when [`Muxer::process_events`] has work.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection and pending client (closing their sockets);
    /// keeps the listener.
    pub fn reset(&mut self) {
        for (fd, _) in self.handshakes.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        for (_, c) in self.conns.drain() {
            if !c.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.fd_keys.clear();
        self.rx_ctrl.clear();
        self.rxq.clear();
        let _ = self.timer.clear();
        self.timer_armed = false;
    }

    /// Handles whatever the muxer's epoll reports, without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                ratelimited!(warn, "vsock: muxer epoll: {e}");
                return;
            }
        };
        for ev in events.iter().take(n) {
            let data = ev.data();
            let fd = (data & 0xffff_ffff) as RawFd;
            let set = ev.event_set();
            match data & TOKEN_KIND {
                TOKEN_LISTENER => self.accept(),
                TOKEN_TIMER => self.sweep(),
                TOKEN_HANDSHAKE => self.handshake_readable(fd),
                TOKEN_CONN => {
                    if let Some(&key) = self.fd_keys.get(&fd) {
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.notify(set);
                        }
                        self.sync(key);
                    }
                }
                _ => {}
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE: leave it in the backlog for later.
                    ratelimited!(warn, "vsock: accept: {e}");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES
                || self.handshakes.len() + self.conns.len() >= MAX_CONNECTIONS
            {
                ratelimited!(warn, "vsock: too many connections, refusing a host client");
                continue;
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err()
                || self
                    .epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, TOKEN_HANDSHAKE | fd as u32 as u64),
                    )
                    .is_err()
            {
                continue;
            }
            let deadline = Instant::now() + self.timeouts.handshake;
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    buf: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline,
                },
            );
            self.arm_timer();
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        let hs = self.handshakes.remove(&fd)?;
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        Some(hs)
    }

    fn handshake_readable(&mut self, fd: RawFd) {
        loop {
            let Some(hs) = self.handshakes.get_mut(&fd) else {
                return;
            };
            let mut byte = [0u8; 1];
            // One byte at a time: data after the newline belongs to the guest.
            match hs.stream.read(&mut byte) {
                Ok(0) => {
                    self.drop_handshake(fd);
                    return;
                }
                Ok(_) => {
                    hs.buf.push(byte[0]);
                    match parse_connect(&hs.buf) {
                        Ok(None) => {}
                        Ok(Some(port)) => {
                            if let Some(hs) = self.drop_handshake(fd) {
                                self.connect_to_guest(hs.stream, port);
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!("vsock: bad CONNECT line: {e}");
                            self.drop_handshake(fd);
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_handshake(fd);
                    return;
                }
            }
        }
    }

    /// A host client asked for guest port `peer_port`: send the guest a REQUEST.
    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        // Bounded search for a free host-side port (the map is bounded too).
        let mut local_port = None;
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(p, peer_port)) {
                local_port = Some(p);
                break;
            }
        }
        let Some(local_port) = local_port else { return };
        let deadline = Instant::now() + self.timeouts.request;
        let conn = Connection::new_local(stream, self.guest_cid, local_port, peer_port, deadline);
        self.insert(conn);
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        self.fd_keys.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.sync(key);
    }

    /// After anything touched connection `key`: drop it if finished, update
    /// its epoll interest, queue it for rx, arm the timer for its deadline.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_done() {
            if !conn.registered.is_empty() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_keys.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        // An fd with no interest is left out of the epoll altogether, as
        // hangups cannot be masked and would spin the loop.
        let want = conn.interest();
        if want != conn.registered {
            let op = if conn.registered.is_empty() {
                ControlOperation::Add
            } else if want.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            if let Err(e) =
                self.epoll
                    .ctl(op, fd, EpollEvent::new(want, TOKEN_CONN | fd as u32 as u64))
            {
                ratelimited!(warn, "vsock: epoll_ctl: {e}");
                conn.kill(true);
            } else {
                conn.registered = want;
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(key);
        }
        if conn.deadline().is_some() {
            self.arm_timer();
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let tick = self.timeouts.tick;
            match self.timer.reset(tick, Some(tick)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => ratelimited!(warn, "vsock: timerfd: {e}"),
            }
        }
    }

    fn sweep(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now >= h.deadline)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            tracing::debug!("vsock: host client sent no CONNECT in time");
            self.drop_handshake(fd);
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| now >= d))
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                c.check_deadline(now);
            }
            self.sync(key);
        }
        if self.handshakes.is_empty() && !self.conns.values().any(|c| c.deadline().is_some()) {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    fn push_ctrl(&mut self, hdr: Header) {
        if self.rx_ctrl.len() < MAX_RX_CTRL {
            self.rx_ctrl.push_back(hdr);
        }
    }

    /// Handles one packet from the guest's tx queue. `data` is its payload
    /// (`hdr.len` bytes, already checked against the descriptors).
    pub fn send_from_guest(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(
                src_cid = hdr.src_cid,
                "vsock: dropping packet with a spoofed source"
            );
            return;
        }
        let known_op = (OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op);
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM || !known_op {
            if hdr.op != OP_RST {
                self.push_ctrl(hdr.rst_reply());
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.recv_from_guest(hdr, data, Instant::now(), self.timeouts.shutdown);
            self.sync(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.connect_to_host(hdr),
            OP_RST => {}
            _ => self.push_ctrl(hdr.rst_reply()),
        }
    }

    /// The guest connects to host port P: `<uds_path>_P`.
    fn connect_to_host(&mut self, hdr: &Header) {
        if !self.guest_connect {
            self.push_ctrl(hdr.rst_reply());
            return;
        }
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            self.push_ctrl(hdr.rst_reply());
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => self.insert(Connection::new_peer(stream, self.guest_cid, hdr)),
            Err(e) => {
                tracing::debug!(port = hdr.dst_port, "vsock: guest connect failed: {e}");
                self.push_ctrl(hdr.rst_reply());
            }
        }
    }

    /// Something waits for an rx buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.rx_ctrl.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest; its payload (`len` bytes) is written
    /// to the front of `data`. `None`: nothing to send.
    pub fn next_rx(&mut self, data: &mut [u8]) -> Option<Header> {
        if let Some(h) = self.rx_ctrl.pop_front() {
            return Some(h);
        }
        let now = Instant::now();
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let hdr = match self.conns.get_mut(&key) {
                Some(c) => {
                    c.queued = false;
                    c.send_to_guest(data, now, self.timeouts.shutdown)
                }
                None => continue,
            };
            self.sync(key);
            if hdr.is_some() {
                return hdr;
            }
        }
        None
    }
}

impl AsRawFd for Muxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
