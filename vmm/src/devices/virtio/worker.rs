//! A device's worker thread: runs the device's event loop until it is told
//! to stop, then hands back what the loop returns (typically its queues and
//! backend, so that the device can be activated again after a reset).
//!
//! In `airlock-vmm` the workers run on a pool of threads started at build
//! time ([`start_pool`]), one per device, each under the device seccomp
//! filter. Devices are activated from a vCPU thread; a thread spawned there
//! would inherit the vCPU filter on top of its own. Without a pool (tests
//! that embed the devices) each worker gets a fresh thread.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{self, SeccompError, ThreadKind};

/// Errors starting the worker pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Cannot start a device worker thread: {0}
    #[error("Cannot start a device worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// {0}
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The device worker pool was already started
    #[error("The device worker pool was already started")]
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

#[derive(Debug)]
enum Runner<T> {
    Thread(JoinHandle<T>),
    Pooled(Receiver<Option<T>>),
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle<T> {
    kill: EventFd,
    runner: Runner<T>,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Starts `body` on a worker thread named `name`. `body` gets the kill
    /// eventfd and must return once it becomes readable.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(EventFd) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_in(POOL.get(), name, body)
    }

    fn spawn_in(
        pool: Option<&Pool>,
        name: &str,
        body: impl FnOnce(EventFd) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
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
        Ok(WorkerHandle { kill, runner })
    }

    /// Tells the worker to stop and waits for it. `None` if it panicked
    /// (only in builds that unwind: release builds abort).
    pub fn stop(self) -> Option<T> {
        // The only failure is a full counter, which still wakes the worker.
        let _ = self.kill.write(1);
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
    fn wait_for_kill(kill: EventFd) -> u32 {
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
        let w = WorkerHandle::spawn_in(Some(&pool), "test-panic", |_kill: EventFd| -> u32 {
            panic!("worker panics")
        })
        .unwrap();
        assert_eq!(w.stop(), None);
        // The other pool thread still takes jobs.
        let w = WorkerHandle::spawn_in(Some(&pool), "test-after", wait_for_kill).unwrap();
        assert_eq!(w.stop(), Some(42));
    }
}
