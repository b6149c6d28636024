//! The boot-timer device: the guest's `/init` writes to an I/O port, and the
//! VMM reports (events `KernelEntered`, `InitStarted`, `AgentReady`) and
//! logs how long boot took, measured from the VMM process's start. This is
//! Firecracker's way of timing boots, on a port instead of MMIO so that the
//! guest needs only `ioperm`, not `/dev/mem`.
//!
//! Values the guest writes (one byte):
//! * [`INIT_STARTED`]: `/init` has begun to run;
//! * [`AGENT_READY`]: the agent is ready for work.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use airlock_vmm_api::Event;

use crate::devices::bus::BusDevice;
use crate::events;

/// The boot timer's port.
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// `/init` has started.
pub const INIT_STARTED: u8 = 1;
/// The agent is ready.
pub const AGENT_READY: u8 = 2;
/// Test builds only (feature `seccomp-probe`): the vCPU thread that handles
/// this write makes a syscall outside its seccomp filter, which must kill
/// the VMM with SIGSYS.
#[cfg(feature = "seccomp-probe")]
pub const SECCOMP_PROBE: u8 = 0xee;

/// Timestamps of the boot phases, shared by the vCPUs and the device.
#[derive(Debug)]
pub struct BootClock {
    start: Instant,
    kernel_entry: OnceLock<Duration>,
    init: OnceLock<Duration>,
    ready: OnceLock<Duration>,
}

impl BootClock {
    /// A clock whose zero is `start`, normally the VMM process's start.
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(BootClock {
            start,
            kernel_entry: OnceLock::new(),
            init: OnceLock::new(),
            ready: OnceLock::new(),
        })
    }

    /// Records the first entry into guest code (the boot vCPU's first run).
    pub fn mark_kernel_entry(&self) {
        let _ = self.kernel_entry.set(self.start.elapsed());
    }

    /// Time from start to guest kernel entry.
    pub fn kernel_entry(&self) -> Option<Duration> {
        self.kernel_entry.get().copied()
    }

    /// Time from start to `/init`.
    pub fn init(&self) -> Option<Duration> {
        self.init.get().copied()
    }

    /// Time from start to agent ready.
    pub fn ready(&self) -> Option<Duration> {
        self.ready.get().copied()
    }
}

fn millis(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// The device on the port-I/O bus.
pub struct BootTimer {
    clock: Arc<BootClock>,
}

impl BootTimer {
    /// A boot timer recording into `clock`.
    pub fn new(clock: Arc<BootClock>) -> Self {
        BootTimer { clock }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.start.elapsed();
        // Each phase is logged once; repeats and unknown values are ignored.
        match (offset, data) {
            (0, [INIT_STARTED]) if self.clock.init.set(now).is_ok() => {
                if let Some(entry) = self.clock.kernel_entry() {
                    events::emit(Event::KernelEntered {
                        ms: events::ms(entry),
                    });
                }
                events::emit(Event::InitStarted {
                    ms: events::ms(now),
                });
                tracing::info!(
                    target: "boot_timer",
                    kernel_entry_ms = millis(self.clock.kernel_entry()),
                    init_ms = millis(Some(now)),
                    "boot timing: process start to guest kernel entry and to /init"
                );
            }
            #[cfg(feature = "seccomp-probe")]
            (0, [SECCOMP_PROBE]) => {
                tracing::warn!("seccomp probe: calling getppid(2), outside the vCPU filter");
                // SAFETY: getppid takes no arguments and changes nothing.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            (0, [AGENT_READY]) if self.clock.ready.set(now).is_ok() => {
                events::emit(Event::AgentReady {
                    ms: events::ms(now),
                });
                tracing::info!(
                    target: "boot_timer",
                    ready_ms = millis(Some(now)),
                    "boot timing: process start to agent ready"
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_each_phase_once() {
        let clock = BootClock::new(Instant::now());
        let mut dev = BootTimer::new(clock.clone());
        clock.mark_kernel_entry();
        dev.write(0, &[INIT_STARTED]);
        let init = clock.init().unwrap();
        dev.write(0, &[INIT_STARTED]);
        assert_eq!(clock.init(), Some(init));
        assert!(clock.ready().is_none());
        dev.write(0, &[AGENT_READY]);
        assert!(clock.ready().unwrap() >= init);
        assert!(clock.kernel_entry().unwrap() <= init);
    }

    #[test]
    fn garbage_is_ignored() {
        let clock = BootClock::new(Instant::now());
        let mut dev = BootTimer::new(clock.clone());
        for off in [0u64, 1, u64::MAX] {
            for data in [&[][..], &[0], &[3], &[1, 2], &[0xff; 8]] {
                if off == 0 && data == [1] {
                    continue;
                }
                dev.write(off, data);
            }
        }
        dev.write(1, &[INIT_STARTED]);
        assert!(clock.init().is_none());
        let mut b = [0xffu8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
