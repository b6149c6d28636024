//! A device's worker thread: runs the device's event loop until it is told
//! to stop, then hands back what the loop returns (typically its queues and
//! backend, so that the device can be activated again after a reset).

use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle<T> {
    kill: EventFd,
    thread: JoinHandle<T>,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Starts `body` on a thread named `name`. `body` gets the kill eventfd
    /// and must return once it becomes readable.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(EventFd) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(crate::THREAD_STACK)
            .spawn(move || body(worker_kill))?;
        Ok(WorkerHandle { kill, thread })
    }

    /// Tells the worker to stop and waits for it. `None` if it panicked.
    pub fn stop(self) -> Option<T> {
        // The only failure is a full counter, which still wakes the worker.
        let _ = self.kill.write(1);
        self.thread.join().ok()
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::*;

    #[test]
    fn stop_wakes_the_loop_and_returns_its_state() {
        let worker = WorkerHandle::spawn("test-worker", |kill| {
            let epoll = Epoll::new().unwrap();
            epoll
                .ctl(
                    ControlOperation::Add,
                    kill.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )
                .unwrap();
            let mut events = [EpollEvent::default(); 1];
            let mut woke = 0;
            while woke == 0 {
                woke = epoll.wait(-1, &mut events).unwrap();
            }
            42
        })
        .unwrap();
        assert_eq!(worker.stop(), Some(42));
    }

    use std::os::fd::AsRawFd;
}
