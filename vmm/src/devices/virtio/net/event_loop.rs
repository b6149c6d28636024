//! The net worker's event loop: one epoll over the kill eventfd, the two
//! queue eventfds and the tap.
//!
//! The tap is in the set (for `EPOLLIN`, level-triggered) only while the
//! worker wants frames ([`NetQueues::rx_wants_frames`]): without guest
//! buffers a readable tap would wake the worker for nothing, again and
//! again. Writes to the tap never wait (a frame it cannot take is
//! dropped), so `EPOLLOUT` is never needed. When a queue's budget ran out
//! with work left, the loop polls its events without waiting and goes on,
//! so a stop, a kick of the other queue or a tap frame is seen between
//! two batches.

use std::io;
use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{NetError, NetQueues};
use crate::devices::ratelimit::ratelimited;
use crate::devices::virtio::worker::Stop;
use crate::devices::virtio::{wants_interrupt, IrqTrigger, INT_VRING};

/// The worker's epoll tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Kill = 0,
    RxQueue = 1,
    TxQueue = 2,
    Tap = 3,
}

impl Token {
    fn from_u64(v: u64) -> Option<Token> {
        [Token::Kill, Token::RxQueue, Token::TxQueue, Token::Tap]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

/// Runs the device until the kill eventfd (or the stop flag) says stop,
/// or the event loop fails.
pub fn run(
    q: &mut NetQueues,
    rx_evt: &EventFd,
    tx_evt: &EventFd,
    irq: &IrqTrigger,
    kill: &Stop,
) -> Result<(), NetError> {
    let epoll = Epoll::new().map_err(NetError::EventLoop)?;
    for (fd, token) in [
        (kill.as_raw_fd(), Token::Kill),
        (rx_evt.as_raw_fd(), Token::RxQueue),
        (tx_evt.as_raw_fd(), Token::TxQueue),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token as u64),
            )
            .map_err(NetError::EventLoop)?;
    }
    let mut events = [EpollEvent::default(); 4];
    let mut tap_armed = false;
    // Chains the driver posted before the device started are served
    // without waiting for a notification.
    let (mut rx_work, mut tx_work) = (true, true);
    loop {
        if kill.flag().is_requested() {
            return Ok(());
        }
        let (mut rx_used, mut tx_used) = (false, false);
        let (mut rx_more, mut tx_more) = (false, false);
        if tx_work {
            let done = q.process_tx();
            (tx_used, tx_more) = (done.used, done.more);
        }
        if rx_work {
            let done = q.process_rx();
            (rx_used, rx_more) = (done.used, done.more);
        }
        let interrupt = (tx_used && wants_interrupt(&mut q.tx, &q.mem))
            | (rx_used && wants_interrupt(&mut q.rx, &q.mem));
        if interrupt {
            if let Err(e) = irq.trigger(INT_VRING) {
                ratelimited!(error, "virtio-net: cannot interrupt the guest: {e}");
            }
        }
        let want = q.rx_wants_frames();
        if want != tap_armed {
            let op = if want {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            epoll
                .ctl(
                    op,
                    q.tap.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, Token::Tap as u64),
                )
                .map_err(NetError::EventLoop)?;
            tap_armed = want;
        }
        let timeout = if rx_more || tx_more { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(NetError::EventLoop(e)),
        };
        (rx_work, tx_work) = (rx_more, tx_more);
        for event in events.iter().take(n) {
            match Token::from_u64(event.data()) {
                Some(Token::Kill) => return Ok(()),
                Some(Token::RxQueue) => {
                    let _ = rx_evt.read();
                    q.rx_notified();
                    rx_work = true;
                }
                Some(Token::TxQueue) => {
                    let _ = tx_evt.read();
                    tx_work = true;
                }
                Some(Token::Tap) => rx_work = true,
                None => {}
            }
        }
    }
}
