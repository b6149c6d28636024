//! Test helpers shared by the devices' tests: a guest that never lets its
//! ring run dry, and the measure of a worker's work after a stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::StopFlag;

/// A hostile driver that keeps a ring full forever: every slot of the
/// avail ring holds `head`, and a thread keeps the avail index a whole
/// ring ahead of the used index, so the device always finds `size` chains
/// waiting (the same chain, again and again), and kicks `kick` after each
/// refill, as a driver does. Stopped when dropped.
pub(crate) struct EndlessRing {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EndlessRing {
    /// Starts refilling the ring whose avail and used rings are at `avail`
    /// and `used` in `mem`.
    pub(crate) fn start(
        mem: &GuestMemoryMmap,
        avail: GuestAddress,
        used: GuestAddress,
        size: u16,
        head: u16,
        kick: &EventFd,
    ) -> Self {
        let kick = kick.try_clone().unwrap();
        for i in 0..u64::from(size) {
            mem.write_obj(head, GuestAddress(avail.0 + 4 + 2 * i))
                .unwrap();
        }
        let done = Arc::new(AtomicBool::new(false));
        let thread_done = done.clone();
        let mem = mem.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while !thread_done.load(Ordering::Relaxed) {
                let used_idx: u16 = mem
                    .load(GuestAddress(used.0 + 2), Ordering::Acquire)
                    .unwrap();
                let idx = used_idx.wrapping_add(size);
                if last != Some(idx) {
                    mem.store(idx, GuestAddress(avail.0 + 2), Ordering::Release)
                        .unwrap();
                    let _ = kick.write(1);
                    last = Some(idx);
                }
                std::thread::yield_now();
            }
        });
        EndlessRing {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for EndlessRing {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the worker behind `flag` has taken `steps` steps (so that
/// it is busy with the guest's queue); panics after a minute.
pub(crate) fn wait_for_steps(flag: &StopFlag, steps: u64) {
    let start = Instant::now();
    while flag.steps() < steps {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker took {} of {steps} steps",
            flag.steps()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Raises `flag` as `WorkerHandle::stop` does, then runs `stop` (a device's
/// reset, which stops the worker and waits for it). Returns the steps the
/// worker took after the flag was raised, and how long `stop` took.
pub(crate) fn steps_after_stop(flag: &StopFlag, stop: impl FnOnce() -> bool) -> (u64, Duration) {
    flag.request();
    let at_stop = flag.steps();
    let start = Instant::now();
    assert!(stop(), "the device did not stop");
    (flag.steps() - at_stop, start.elapsed())
}
