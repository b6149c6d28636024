//! virtio-rng (virtio 1.2, section 5.4): an entropy source for the guest.
//!
//! The single request queue holds device-writable buffers; the device fills
//! each with bytes from the host's `getrandom(2)`. A token bucket limits the
//! rate so that a guest cannot make the host burn CPU on its behalf: when it
//! runs dry the worker stops taking requests and arms a timerfd, and resumes
//! when enough tokens have accumulated.
//!
//! The worker checks for a stop before each chain: a step of at most
//! [`MAX_CHAIN_DESCS`] + 1 descriptors read and [`MAX_REQUEST`] random
//! bytes written, whatever the guest queued (and however fast it refills
//! the ring), so a stop waits for one such step at most.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{Stop, StopFlag, WorkerHandle};
use super::{device_type, ActivateError, ActiveQueues, IrqTrigger, SingleQueue, VirtioDevice};
use super::{wants_interrupt, INT_VRING, VIRTIO_F_VERSION_1};
use crate::devices::ratelimit::ratelimited;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets; a larger buffer is filled partially.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Descriptors accepted in one chain (indirect tables can be longer).
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// When throttled, wait until the bucket holds this many bytes (or the
/// burst, if smaller) rather than waking up for every byte.
const REFILL_WAKE: u64 = 4096;
/// Each request costs at least this many tokens, so that a stream of tiny
/// (or malformed) requests is limited too.
const MIN_REQUEST_COST: u64 = 64;

/// Errors from serving entropy requests.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("virtio-rng request has a device-readable descriptor")]
    ReadableDescriptor,
    #[error("virtio-rng request buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("virtio-rng request has more than {MAX_CHAIN_DESCS} descriptors")]
    ChainTooLong,
    #[error("getrandom failed")]
    GetRandom(#[source] io::Error),
    #[error("cannot write random bytes to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("virtio-rng event loop failed")]
    EventLoop(#[source] io::Error),
}

/// A rate limit on the bytes handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate, in bytes per second (0 is treated as 1).
    pub bytes_per_sec: u64,
    /// Bytes that can be handed out at once after a quiet period (0 is
    /// treated as 1).
    pub burst: u64,
}

impl Default for RateLimit {
    /// 1 MiB/s with a 64 KiB burst.
    fn default() -> Self {
        RateLimit {
            bytes_per_sec: 1 << 20,
            burst: 64 << 10,
        }
    }
}

/// A token bucket, one token per byte. Time is passed in, for testing.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

impl TokenBucket {
    /// A full bucket.
    fn new(limit: RateLimit, now: Instant) -> Self {
        let burst = limit.burst.max(1);
        TokenBucket {
            rate: limit.bytes_per_sec.max(1),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Adds the tokens accumulated since the last refill.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let added = elapsed.saturating_mul(u128::from(self.rate)) / NANOS_PER_SEC;
        if added == 0 {
            return;
        }
        let total = u128::from(self.tokens).saturating_add(added);
        if total >= u128::from(self.burst) {
            self.tokens = self.burst;
            self.last = now;
        } else {
            // Below the burst, so `added` fits in u64. Only advance by the
            // time those tokens took, keeping the fraction of the next one.
            self.tokens = total as u64;
            let spent = added.saturating_mul(NANOS_PER_SEC) / u128::from(self.rate);
            let spent = Duration::from_nanos(u64::try_from(spent).unwrap_or(u64::MAX));
            self.last = self.last.checked_add(spent).unwrap_or(now).min(now);
        }
    }

    /// Tokens available after refilling at `now`.
    fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens
    }

    /// Takes `n` tokens (at most what is there).
    fn consume(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// How long until the bucket holds `want` tokens (capped at the burst).
    fn wait_for(&self, want: u64) -> Duration {
        let deficit = want.min(self.burst).saturating_sub(self.tokens);
        let nanos = (u128::from(deficit) * NANOS_PER_SEC).div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Fills `buf` from getrandom(2), retrying on EINTR and short reads.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call; getrandom writes at most that many.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // 0 <= ret <= rest.len().
        filled += usize::try_from(ret).unwrap_or(0);
    }
    Ok(())
}

/// What one pass over the queue did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Processed {
    /// Used buffers were added: interrupt the guest.
    needs_irq: bool,
    /// The bucket is empty; resume after this long.
    throttle: Option<Duration>,
}

/// The queue and its state, owned by the worker.
struct RngQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    bucket: Option<TokenBucket>,
    buf: Vec<u8>,
    /// Checked before each chain.
    stop: StopFlag,
}

impl RngQueue {
    fn new(mem: GuestMemoryMmap, queue: Queue, bucket: Option<TokenBucket>) -> Self {
        RngQueue {
            mem,
            queue,
            bucket,
            buf: vec![0; MAX_REQUEST],
            stop: StopFlag::new(),
        }
    }

    /// Serves the available requests until the queue is empty, the bucket
    /// runs dry or a stop is requested.
    fn process_queue(&mut self, now: Instant) -> Processed {
        let mut done = Processed::default();
        while !self.stop.should_stop() {
            let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let allowance = match self.bucket.as_mut() {
                Some(bucket) => bucket.available(now).min(MAX_REQUEST as u64) as usize,
                None => MAX_REQUEST,
            };
            if allowance == 0 {
                self.queue.go_to_previous_position();
                done.throttle = self.bucket.as_ref().map(|b| b.wait_for(REFILL_WAKE));
                break;
            }
            let head = chain.head_index();
            let len = match fill_chain(&self.mem, chain, &mut self.buf, allowance) {
                Ok(len) => len,
                Err(e) => {
                    ratelimited!(warn, "virtio-rng: {e}");
                    0
                }
            };
            if let Some(bucket) = self.bucket.as_mut() {
                bucket.consume(u64::from(len).max(MIN_REQUEST_COST));
            }
            if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                ratelimited!(error, "virtio-rng: cannot add a used buffer: {e}");
                break;
            }
            done.needs_irq = true;
        }
        done
    }
}

/// Fills the device-writable buffers of `chain` with up to `limit` random
/// bytes; returns how many were written. Public for the fuzz targets
/// (`tests/fuzz`).
pub fn fill_chain<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    buf: &mut [u8],
    limit: usize,
) -> Result<u32, RngError> {
    let mut descs = Vec::new();
    for desc in chain.take(MAX_CHAIN_DESCS + 1) {
        if !desc.is_write_only() {
            return Err(RngError::ReadableDescriptor);
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(RngError::OutOfRange {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        descs.push((desc.addr(), desc.len() as usize));
    }
    if descs.len() > MAX_CHAIN_DESCS {
        return Err(RngError::ChainTooLong);
    }
    let mut left = limit.min(buf.len());
    let mut written = 0usize;
    for (addr, len) in descs {
        let n = len.min(left);
        let Some(chunk) = buf.get_mut(..n) else { break };
        if n == 0 {
            break;
        }
        fill_random(chunk).map_err(RngError::GetRandom)?;
        mem.write_slice(chunk, addr)
            .map_err(RngError::GuestMemory)?;
        left -= n;
        written += n;
    }
    // written <= MAX_REQUEST.
    Ok(u32::try_from(written).unwrap_or(0))
}

/// The worker's epoll tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Kill = 0,
    Queue = 1,
    Timer = 2,
}

impl Token {
    fn from_u64(v: u64) -> Option<Token> {
        [Token::Kill, Token::Queue, Token::Timer]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

fn timer_err(e: vmm_sys_util::errno::Error) -> RngError {
    RngError::EventLoop(io::Error::from_raw_os_error(e.errno()))
}

/// The worker's event loop: returns on the kill event (or on an error).
fn run(
    q: &mut RngQueue,
    queue_evt: &EventFd,
    irq: &IrqTrigger,
    kill: &Stop,
) -> Result<(), RngError> {
    let mut timer = TimerFd::new().map_err(timer_err)?;
    let epoll = Epoll::new().map_err(RngError::EventLoop)?;
    for (fd, token) in [
        (kill.as_raw_fd(), Token::Kill),
        (queue_evt.as_raw_fd(), Token::Queue),
        (timer.as_raw_fd(), Token::Timer),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token as u64),
            )
            .map_err(RngError::EventLoop)?;
    }
    let mut events = [EpollEvent::default(); 3];
    let mut throttled = false;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RngError::EventLoop(e)),
        };
        let mut process = false;
        for event in events.iter().take(n) {
            match Token::from_u64(event.data()) {
                Some(Token::Kill) => return Ok(()),
                Some(Token::Queue) => {
                    let _ = queue_evt.read();
                    process |= !throttled;
                }
                Some(Token::Timer) => {
                    let _ = timer.wait();
                    throttled = false;
                    process = true;
                }
                None => {}
            }
        }
        if !process {
            continue;
        }
        if kill.flag().is_requested() {
            return Ok(());
        }
        let done = q.process_queue(Instant::now());
        if done.needs_irq && wants_interrupt(&mut q.queue, &q.mem) {
            if let Err(e) = irq.trigger(INT_VRING) {
                ratelimited!(error, "virtio-rng: cannot interrupt the guest: {e}");
            }
        }
        if let Some(wait) = done.throttle {
            // A zero duration would disarm the timer.
            let wait = wait.max(Duration::from_micros(50));
            timer.reset(wait, None).map_err(timer_err)?;
            throttled = true;
        }
    }
}

/// The virtio-rng device.
pub struct Rng {
    rate_limit: Option<RateLimit>,
    /// The bucket, kept across resets so that a reset does not refill it.
    bucket: Option<TokenBucket>,
    worker: Option<WorkerHandle<Option<TokenBucket>>>,
}

impl Rng {
    /// A device limited to `rate_limit` (`None`: unlimited).
    pub fn new(rate_limit: Option<RateLimit>) -> Self {
        Rng {
            rate_limit,
            bucket: None,
            worker: None,
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // No configuration space.
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        self.reset();
        let SingleQueue {
            mem,
            queue,
            queue_evt,
            irq,
        } = active.into_single()?;
        let bucket = self
            .bucket
            .take()
            .or_else(|| self.rate_limit.map(|l| TokenBucket::new(l, Instant::now())));
        let worker = WorkerHandle::spawn("airlock-rng", move |kill: Stop| {
            let mut q = RngQueue::new(mem, queue, bucket);
            q.stop = kill.flag().clone();
            if let Err(e) = run(&mut q, &queue_evt, &irq, &kill) {
                ratelimited!(error, "virtio-rng worker stopped: {e}");
            }
            q.bucket
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(worker) = self.worker.take() {
            self.bucket = worker.stop().flatten();
        }
        true
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
