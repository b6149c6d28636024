//! A device's worker thread: runs the device's event loop until it is told
//! to stop, then hands back what the loop returns (typically its queues and
//! backend, so that the device can be activated again after a reset).
//!
//! In `airlock-vmm` the workers run on a pool of threads started at build
//! time ([`start_pool`]), one per device, each under the device seccomp
//! filter. Devices are activated from a vCPU thread; a thread spawned there
//! would inherit the vCPU filter on top of its own. Without a pool (tests
//! that embed the devices) each worker gets a fresh thread.
//!
//! Stopping is bounded by the work between two checks, not by what the
//! guest queued: [`WorkerHandle::stop`] sets the worker's [`StopFlag`], then
//! wakes its epoll loop through the kill eventfd. The devices' processing
//! loops call [`StopFlag::should_stop`] before every *step*: one descriptor
//! chain, or one bounded piece of a long one (each device documents its
//! step's bound). Neither the stop nor the worker takes the transport's
//! lock, so a vCPU that resets a device while holding it waits for one step
//! at most.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{self, SeccompError, ThreadKind};

/// Errors starting the worker pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start a device worker thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("the device worker pool was already started")]
    AlreadyStarted,
}

type Job = Box<dyn FnOnce() + Send>;

/// Pooled worker threads, fed through one job queue.
#[derive(Debug)]
pub struct Pool {
    jobs: Sender<Job>,
}

/// The process's pool, once [`start_pool`] made it.
static POOL: OnceLock<Pool> = OnceLock::new();

/// Starts the process's pool of `threads` worker threads, which every
/// later [`WorkerHandle::spawn`] uses.
pub fn start_pool(threads: usize) -> Result<(), PoolError> {
    POOL.set(Pool::start(threads)?)
        .map_err(|_| PoolError::AlreadyStarted)
}

impl Pool {
    /// Starts `threads` threads, each under the device seccomp filter (when
    /// the process enabled filters). Returns once every thread has
    /// installed its filter.
    pub fn start(threads: usize) -> Result<Pool, PoolError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = mpsc::channel();
        for i in 0..threads {
            let rx = rx.clone();
            let ready = ready_tx.clone();
            std::thread::Builder::new()
                .name(format!("worker{i}"))
                .stack_size(crate::THREAD_STACK)
                .spawn(move || pool_thread(&rx, &ready))
                .map_err(PoolError::Thread)?;
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                // Every sender is gone: a thread died before it reported.
                Err(_) => {
                    return Err(PoolError::Thread(std::io::Error::other(
                        "a worker thread died while starting",
                    )))
                }
            }
        }
        Ok(Pool { jobs: tx })
    }
}

fn pool_thread(jobs: &Mutex<Receiver<Job>>, ready: &Sender<Result<(), SeccompError>>) {
    let filtered = seccomp::apply(ThreadKind::Device);
    let ok = filtered.is_ok();
    let _ = ready.send(filtered);
    if !ok {
        return;
    }
    loop {
        // A poisoned lock only means another pool thread panicked while
        // holding it, between two jobs; the queue itself is intact.
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        job();
    }
}

/// Names the calling thread (as `ps` and `/proc/<pid>/task/*/comm` show).
fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes; `buf` is 16 bytes with a NUL at index 15 at the latest.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// A worker's stop request, shared by its handle and its processing loops.
///
/// Also counts the steps taken, so that tests can measure the work a
/// worker did after a stop was requested (one relaxed increment per step).
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<StopState>);

#[derive(Debug, Default)]
struct StopState {
    requested: AtomicBool,
    steps: AtomicU64,
}

impl StopFlag {
    /// A flag not yet raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the worker to stop.
    pub fn request(&self) {
        self.0.requested.store(true, Ordering::Release);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.0.requested.load(Ordering::Acquire)
    }

    /// Called before each bounded step of work: `true` if the worker must
    /// stop instead (the step is not taken); otherwise counts the step.
    pub fn should_stop(&self) -> bool {
        if self.is_requested() {
            return true;
        }
        self.0.steps.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.0.steps.load(Ordering::Relaxed)
    }
}

/// What a worker body gets: the kill eventfd its epoll loop waits on (it
/// becomes readable once a stop is requested) and the flag its processing
/// loops check between steps.
#[derive(Debug)]
pub struct Stop {
    evt: EventFd,
    flag: StopFlag,
}

impl Stop {
    /// A stop request nobody has made yet, and the handle that makes it:
    /// for running a worker body on a thread of one's own (tests).
    pub fn new() -> std::io::Result<(Stop, StopRequester)> {
        let evt = EventFd::new(EFD_NONBLOCK)?;
        let requester = StopRequester {
            evt: evt.try_clone()?,
            flag: StopFlag::new(),
        };
        let stop = Stop {
            evt,
            flag: requester.flag.clone(),
        };
        Ok((stop, requester))
    }

    /// The kill eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The stop flag.
    pub fn flag(&self) -> &StopFlag {
        &self.flag
    }
}

impl AsRawFd for Stop {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

/// The side of a [`Stop`] that requests it.
#[derive(Debug)]
pub struct StopRequester {
    evt: EventFd,
    flag: StopFlag,
}

impl StopRequester {
    /// Raises the flag, then wakes the worker's epoll loop. Never blocks:
    /// the eventfd is non-blocking, and a full counter (the only failure)
    /// still wakes the worker.
    pub fn request(&self) {
        self.flag.request();
        let _ = self.evt.write(1);
    }

    /// The flag (to read the steps taken).
    pub fn flag(&self) -> &StopFlag {
        &self.flag
    }
}

#[derive(Debug)]
enum Runner<T> {
    Thread(JoinHandle<T>),
    Pooled(Receiver<Option<T>>),
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle<T> {
    stop: StopRequester,
    runner: Runner<T>,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Starts `body` on a worker thread named `name`. `body` gets its
    /// [`Stop`] and must return once the kill eventfd becomes readable, and
    /// between two steps of work once the flag is raised.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(Stop) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_in(POOL.get(), name, body)
    }

    fn spawn_in(
        pool: Option<&Pool>,
        name: &str,
        body: impl FnOnce(Stop) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let (worker_kill, stop) = Stop::new()?;
        let runner = match pool {
            Some(pool) => {
                let (done_tx, done_rx): (SyncSender<Option<T>>, _) = mpsc::sync_channel(1);
                let name = name.to_string();
                let job = move || {
                    set_thread_name(&name);
                    // No catch_unwind: release builds abort on a panic
                    // (`panic = "abort"`), and the VMM's keeper wipes guest
                    // memory after any end of the VMM (see keeper.rs). In
                    // test builds a panic ends this pool thread and drops
                    // `done_tx`: `stop` then returns `None`.
                    let out = body(worker_kill);
                    set_thread_name("idle-worker");
                    let _ = done_tx.send(Some(out));
                };
                pool.jobs
                    .send(Box::new(job))
                    .map_err(|_| std::io::Error::other("the device worker pool is gone"))?;
                Runner::Pooled(done_rx)
            }
            None => Runner::Thread(
                std::thread::Builder::new()
                    .name(name.to_string())
                    .stack_size(crate::THREAD_STACK)
                    .spawn(move || body(worker_kill))?,
            ),
        };
        Ok(WorkerHandle { stop, runner })
    }

    /// The worker's stop flag (to read the steps it took).
    pub fn flag(&self) -> &StopFlag {
        self.stop.flag()
    }

    /// Tells the worker to stop and waits for it. `None` if it panicked
    /// (only in builds that unwind: release builds abort). The wait is for
    /// the step in progress, at most: raising the flag and writing the
    /// eventfd never block, and the worker holds no lock a vCPU may hold.
    pub fn stop(self) -> Option<T> {
        self.stop.request();
        match self.runner {
            Runner::Thread(thread) => thread.join().ok(),
            Runner::Pooled(done) => done.recv().ok().flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::*;

    /// A worker body: waits until its kill eventfd is readable, returns 42.
    fn wait_for_kill(kill: Stop) -> u32 {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        while epoll.wait(-1, &mut events).unwrap() == 0 {}
        42
    }

    #[test]
    fn stop_wakes_the_loop_and_returns_its_state() {
        let worker = WorkerHandle::spawn_in(None, "test-worker", wait_for_kill).unwrap();
        assert_eq!(worker.stop(), Some(42));
    }

    #[test]
    fn pooled_workers_run_on_the_pool_and_threads_are_reused() {
        let pool = Pool::start(2).unwrap();
        for _ in 0..3 {
            let a = WorkerHandle::spawn_in(Some(&pool), "test-a", wait_for_kill).unwrap();
            let b = WorkerHandle::spawn_in(Some(&pool), "test-b", |kill| {
                let name = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                wait_for_kill(kill) + u32::from(name.trim() == "test-b")
            })
            .unwrap();
            assert_eq!(b.stop(), Some(43), "the job runs under its own name");
            assert_eq!(a.stop(), Some(42));
        }
    }

    #[test]
    fn a_panicking_pooled_worker_reports_none() {
        let pool = Pool::start(2).unwrap();
        let w = WorkerHandle::spawn_in(Some(&pool), "test-panic", |_kill: Stop| -> u32 {
            panic!("worker panics")
        })
        .unwrap();
        assert_eq!(w.stop(), None);
        // The other pool thread still takes jobs.
        let w = WorkerHandle::spawn_in(Some(&pool), "test-after", wait_for_kill).unwrap();
        assert_eq!(w.stop(), Some(42));
    }

    #[test]
    fn a_worker_that_checks_its_flag_stops_between_steps() {
        // A body that never looks at its eventfd: it works in steps, as
        // the devices' processing loops do, until the flag says stop.
        let worker = WorkerHandle::spawn_in(None, "test-steps", |stop: Stop| {
            while !stop.flag().should_stop() {
                std::hint::spin_loop();
            }
            7
        })
        .unwrap();
        let flag = worker.flag().clone();
        while flag.steps() < 1000 {
            std::thread::yield_now();
        }
        assert_eq!(worker.stop(), Some(7));
        let steps = flag.steps();
        assert!(flag.is_requested());
        assert!(flag.should_stop());
        assert_eq!(flag.steps(), steps, "no step is counted after a stop");
    }

    #[test]
    fn a_stop_before_the_job_runs_is_seen_at_once() {
        let (stop, requester) = Stop::new().unwrap();
        requester.request();
        assert!(stop.flag().should_stop());
        assert_eq!(stop.flag().steps(), 0);
        assert_eq!(stop.eventfd().read().unwrap(), 1);
    }
}
