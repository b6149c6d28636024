//! virtio-vsock (device type 19) in Firecracker's hybrid mode: guest
//! streams are bridged to Unix sockets on the host.
//!
//! - Host → guest: a host process connects to the device's socket
//!   (`uds_path`), writes `CONNECT <port>\n`, and once the guest accepts
//!   reads `OK <host-side port>\n`; after that the socket carries the stream.
//! - Guest → host: a guest connection to CID 2, port P is bridged to the
//!   Unix socket `<uds_path>_P`, if something listens there (RST if not).
//!
//! Queues: rx (0), tx (1), event (2, unused). The worker thread waits on
//! the queue eventfds and on the [`muxer::Muxer`]'s epoll fd; the queue
//! processing is in the plain functions [`process_tx`] and [`process_rx`].
//!
//! The worker checks for a stop before each chain, on either queue: a step
//! of at most [`MAX_CHAIN_DESCS`] descriptors and one packet of at most
//! [`MAX_PKT_DATA`] bytes (copied, and written to or read from one host
//! socket without blocking), whatever the guest queued and however fast it
//! refills its rings; a longer tx chain is dropped as malformed.

pub mod connect;
pub mod connection;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::muxer::Muxer;
use self::packet::{Header, HEADER_SIZE, MAX_PKT_DATA, OP_RW};
use super::worker::{Stop, StopFlag, WorkerHandle};
use super::{
    device_type, wants_interrupt, ActivateError, ActiveQueues, IrqTrigger, VirtioDevice, INT_VRING,
    VIRTIO_F_VERSION_1,
};
use crate::devices::ratelimit::ratelimited;

/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Descriptors walked in one tx chain at most (the queue size: a longer
/// chain, possible only through an indirect table, is invalid).
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved and the driver reads only 32 bits in practice.
    #[error("invalid guest CID {0} (must be 3..=0xffff_fffe)")]
    InvalidCid(u64),
    #[error("vsock socket path {0:?} is too long for a Unix socket (max 107 bytes)")]
    PathTooLong(PathBuf),
    #[error("vsock socket path {0:?} exists and is not a socket")]
    PathExists(PathBuf),
    #[error("vsock socket path {0:?} is in use by a listening process")]
    PathInUse(PathBuf),
    #[error("cannot bind the vsock socket {0:?}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot set up the vsock event loop")]
    Epoll(#[source] std::io::Error),
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Present while inactive; the worker owns it while active.
    muxer: Option<Muxer>,
    worker: Option<WorkerHandle<Muxer>>,
    /// Whether this device bound `uds_path` (and so removes it).
    bound_here: bool,
}

impl Vsock {
    /// A device for a guest with `guest_cid`, listening for host clients on
    /// `uds_path` from now on (connections queue until the driver starts).
    /// With `guest_connect`, the guest may also connect to host ports
    /// (`<uds_path>_P`).
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        guest_connect: bool,
    ) -> Result<Vsock, VsockError> {
        if !(3..=0xffff_fffe).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let listener = muxer::bind_listener(&uds_path)?;
        let mut dev = Self::with_listener(guest_cid, uds_path, listener, guest_connect)?;
        dev.bound_here = true;
        Ok(dev)
    }

    /// As [`Vsock::new`], with `listener` already bound at `uds_path` and
    /// listening (by whoever started the VMM).
    pub fn with_listener(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: std::os::unix::net::UnixListener,
        guest_connect: bool,
    ) -> Result<Vsock, VsockError> {
        if !(3..=0xffff_fffe).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(uds_path.clone(), e))?;
        let mut muxer =
            Muxer::new(guest_cid, uds_path.clone(), listener).map_err(VsockError::Epoll)?;
        muxer.set_guest_connect(guest_connect);
        Ok(Vsock {
            guest_cid,
            uds_path,
            muxer: Some(muxer),
            worker: None,
            bound_here: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host socket path.
    pub fn uds_path(&self) -> &std::path::Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop();
        }
        if self.bound_here {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        if active.queues.len() != QUEUE_SIZES.len() || active.queue_evts.len() != QUEUE_SIZES.len()
        {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: active.queues.len(),
            });
        }
        let muxer = self.muxer.take().ok_or_else(|| {
            ActivateError::Backend("vsock already active or lost after a worker panic".into())
        })?;
        let worker =
            WorkerHandle::spawn("vsock", move |kill: Stop| run_worker(kill, active, muxer))
                .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        match self.worker.take() {
            Some(w) => match w.stop() {
                Some(mut muxer) => {
                    muxer.reset();
                    self.muxer = Some(muxer);
                    true
                }
                None => false,
            },
            None => self.muxer.is_some(),
        }
    }
}

/// Why a TX chain was not a packet.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("a device-writable descriptor in a TX chain")]
    WriteOnly,
    #[error("the chain holds fewer bytes than the header and its length field")]
    TooShort,
    #[error("data length {0} is over the maximum")]
    TooLong(u32),
    #[error("a descriptor points outside guest memory")]
    Memory,
    #[error("the chain has more than {MAX_CHAIN_DESCS} descriptors")]
    ChainTooLong,
}

/// Reads one TX packet: its header, then `len` bytes of data gathered from
/// the chain's descriptors, however the guest split them (header and data
/// in one descriptor or several, across guest memory regions). Written
/// here rather than with `VsockPacket::from_tx_virtq_chain`, which wants the
/// data in one descriptor and one memory region and rejects the packet
/// otherwise: for a stream socket that silently loses data.
fn read_tx_packet<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    data: &mut Vec<u8>,
) -> Result<Header, TxError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut head = [0u8; HEADER_SIZE];
    let mut head_len = 0usize;
    let mut want: Option<usize> = None;
    data.clear();
    for (walked, desc) in chain.enumerate() {
        if walked >= MAX_CHAIN_DESCS {
            return Err(TxError::ChainTooLong);
        }
        if desc.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;
        if head_len < HEADER_SIZE {
            let n = left.min(HEADER_SIZE - head_len);
            mem.read_slice(&mut head[head_len..head_len + n], addr)
                .map_err(|_| TxError::Memory)?;
            head_len += n;
            left -= n;
            addr = addr.checked_add(n as u64).ok_or(TxError::Memory)?;
            if head_len < HEADER_SIZE {
                continue;
            }
            let hdr = Header::from_bytes(&head);
            if hdr.op == OP_RW && hdr.len > MAX_PKT_DATA {
                return Err(TxError::TooLong(hdr.len));
            }
            // Only RW carries data; another op's length is ignored.
            want = Some(if hdr.op == OP_RW { hdr.len as usize } else { 0 });
        }
        let Some(total) = want else { continue };
        let n = left.min(total - data.len());
        if n > 0 {
            let from = data.len();
            data.resize(from + n, 0);
            mem.read_slice(&mut data[from..], addr)
                .map_err(|_| TxError::Memory)?;
        }
        if data.len() == total {
            break;
        }
    }
    match want {
        Some(total) if data.len() == total => Ok(Header::from_bytes(&head)),
        _ => Err(TxError::TooShort),
    }
}

/// Moves the guest's tx packets to the muxer. Returns whether any
/// descriptor was used (the guest should be interrupted).
pub fn process_tx(mem: &GuestMemoryMmap, queue: &mut Queue, muxer: &mut Muxer) -> bool {
    process_tx_until(mem, queue, muxer, &StopFlag::new())
}

/// [`process_tx`], checking `stop` before each chain.
pub fn process_tx_until(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    stop: &StopFlag,
) -> bool {
    let mut used = false;
    let mut data = Vec::new();
    while !stop.should_stop() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match read_tx_packet(mem, chain, &mut data) {
            Ok(hdr) => muxer.send_from_guest(&hdr, &data),
            Err(e) => tracing::debug!("vsock: dropping malformed tx packet: {e}"),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            ratelimited!(warn, "vsock: tx add_used: {e}");
        }
        used = true;
    }
    used
}

/// Fills the guest's rx buffers with the muxer's pending packets, reading
/// host data through `data` (at least [`MAX_PKT_DATA`] bytes, allocated
/// once per worker: this runs after every event). Returns whether any
/// descriptor was used.
pub fn process_rx(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    data: &mut [u8],
) -> bool {
    process_rx_until(mem, queue, muxer, data, &StopFlag::new())
}

/// [`process_rx`], checking `stop` before each chain.
pub fn process_rx_until(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    data: &mut [u8],
    stop: &StopFlag,
) -> bool {
    let mut used = false;
    while muxer.has_pending_rx() && !stop.should_stop() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => {
                let cap = pkt.data_slice().map_or(0, |s| s.len()).min(data.len());
                let Some(mut hdr) = muxer.next_rx(&mut data[..cap]) else {
                    // Nothing after all: give the buffer back.
                    queue.go_to_previous_position();
                    break;
                };
                let n = if hdr.op == OP_RW {
                    (hdr.len as usize).min(cap)
                } else {
                    0
                };
                hdr.len = n as u32;
                let wrote = match (n, pkt.data_slice()) {
                    (0, _) => true,
                    (_, Some(slice)) => data
                        .get(..n)
                        .is_some_and(|d| slice.write_slice(d, 0).is_ok()),
                    (_, None) => false,
                };
                if wrote && pkt.set_header_from_raw(&hdr.to_bytes()).is_ok() {
                    (HEADER_SIZE + n) as u32
                } else {
                    ratelimited!(warn, "vsock: cannot write an rx packet to guest memory");
                    0
                }
            }
            Err(e) => {
                tracing::debug!("vsock: unusable rx buffer: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            ratelimited!(warn, "vsock: rx add_used: {e}");
        }
        used = true;
    }
    used
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Token {
    Kill,
    RxQueue,
    TxQueue,
    EvQueue,
    Muxer,
}

const TOKENS: [Token; 5] = [
    Token::Kill,
    Token::RxQueue,
    Token::TxQueue,
    Token::EvQueue,
    Token::Muxer,
];

fn run_worker(kill: Stop, active: ActiveQueues, mut muxer: Muxer) -> Muxer {
    let ActiveQueues {
        mem,
        mut queues,
        queue_evts,
        irq,
        ..
    } = active;
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            ratelimited!(error, "vsock: epoll: {e}");
            return muxer;
        }
    };
    let fds = [
        (kill.as_raw_fd(), Token::Kill),
        (queue_evts[RXQ].as_raw_fd(), Token::RxQueue),
        (queue_evts[TXQ].as_raw_fd(), Token::TxQueue),
        (queue_evts[EVQ].as_raw_fd(), Token::EvQueue),
        (muxer.epoll_fd(), Token::Muxer),
    ];
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token as u64),
        ) {
            ratelimited!(error, "vsock: epoll_ctl: {e}");
            return muxer;
        }
    }
    let (rxq, rest) = queues.split_at_mut(TXQ);
    let (Some(rxq), Some(txq)) = (rxq.first_mut(), rest.first_mut()) else {
        return muxer;
    };
    let signal = |irq: &Arc<IrqTrigger>| {
        if let Err(e) = irq.trigger(INT_VRING) {
            ratelimited!(warn, "vsock: irq: {e}");
        }
    };
    let mut events = [EpollEvent::default(); 8];
    let mut rx_data = vec![0u8; MAX_PKT_DATA as usize];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                ratelimited!(error, "vsock: epoll_wait: {e}");
                return muxer;
            }
        };
        let mut tx_used = false;
        for ev in events.iter().take(n) {
            let Some(&token) = TOKENS.get(ev.data() as usize) else {
                continue;
            };
            match token {
                Token::Kill => return muxer,
                Token::RxQueue => {
                    let _ = queue_evts[RXQ].read();
                }
                Token::TxQueue => {
                    let _ = queue_evts[TXQ].read();
                    tx_used |= process_tx_until(&mem, txq, &mut muxer, kill.flag());
                }
                Token::EvQueue => {
                    let _ = queue_evts[EVQ].read();
                }
                Token::Muxer => muxer.process_events(),
            }
        }
        if kill.flag().is_requested() {
            return muxer;
        }
        // Whatever happened may have produced packets for the guest.
        let rx_used = process_rx_until(&mem, rxq, &mut muxer, &mut rx_data, kill.flag());
        if (tx_used && wants_interrupt(txq, &mem)) || (rx_used && wants_interrupt(rxq, &mem)) {
            signal(&irq);
        }
    }
}

use std::os::fd::AsRawFd;
