//! vCPUs: configuration for boot, and the thread that runs each one and
//! dispatches its exits to the device buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::pseudo::boot_timer::BootClock;
use crate::exit::{ExitSignal, VmExit};
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vm::Vm;

/// Errors from creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot set up vCPU {id}: {what}")]
    Kvm {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up the registers of vCPU {id}")]
    Regs {
        id: u8,
        #[source]
        source: regs::RegsError,
    },
    #[error("cannot set up the MSRs of vCPU {id}")]
    Msrs {
        id: u8,
        #[source]
        source: msr::MsrError,
    },
    #[error("cannot set up the local APIC of vCPU {id}")]
    Lapic {
        id: u8,
        #[source]
        source: interrupts::InterruptsError,
    },
    #[error("cannot start the thread of vCPU {id}")]
    Thread {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// The Xen PVH entry of an ELF `vmlinux`, with its `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// The 64-bit Linux boot protocol, with its `boot_params` (zero page).
    Linux64 {
        entry: GuestAddress,
        boot_params: GuestAddress,
    },
}

/// What a vCPU thread needs besides its KVM handle.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Where the vCPU reports why the VM must stop.
    pub exit: ExitSignal,
    /// Boot-phase timestamps.
    pub clock: Arc<BootClock>,
    /// Holds the vCPU before its first `KVM_RUN`.
    pub gate: Arc<StartGate>,
}

/// Holds every vCPU, filtered already, before its first `KVM_RUN` until
/// the main thread is filtered too (see `Vmm::run`): no guest instruction
/// runs while any VMM thread is unfiltered. Opened once, never closed.
#[derive(Debug, Default)]
pub struct StartGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl StartGate {
    /// Lets every vCPU run (or, once they are told to stop, end).
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }

    /// Waits until the gate is open.
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` and sets up its CPUID, MSRs, FPU and local APIC;
    /// the boot vCPU (0) also gets the registers for `boot`.
    pub fn new(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: u8,
        num_vcpus: u8,
        boot: BootEntry,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create"))?;
        let mut cpuid_entries = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("query supported CPUID"))?;
        cpuid::filter_cpuid(&mut cpuid_entries, id, num_vcpus);
        if vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            cpuid::set_tsc_deadline(&mut cpuid_entries);
        }
        fd.set_cpuid2(&cpuid_entries)
            .map_err(kvm_err("set CPUID"))?;
        msr::setup_msrs(&fd).map_err(|source| VcpuError::Msrs { id, source })?;
        regs::setup_fpu(&fd).map_err(|source| VcpuError::Regs { id, source })?;
        interrupts::set_lint(&fd).map_err(|source| VcpuError::Lapic { id, source })?;
        if id == 0 {
            let r = match boot {
                BootEntry::Pvh { entry, start_info } => {
                    regs::setup_pvh_regs(&fd, mem, entry, start_info)
                }
                BootEntry::Linux64 { entry, boot_params } => {
                    regs::setup_linux64_regs(&fd, mem, entry, boot_params)
                }
            };
            r.map_err(|source| VcpuError::Regs { id, source })?;
        }
        Ok(Vcpu { id, fd })
    }

    /// Starts the vCPU on its own thread.
    pub fn start(self, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(crate::THREAD_STACK)
            .spawn(move || self.run(ctx, &thread_stop))
            .map_err(|source| VcpuError::Thread { id, source })?;
        Ok(VcpuHandle { thread, stop })
    }

    fn run(mut self, ctx: VcpuContext, stop: &AtomicBool) {
        if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
            // Never run guest code unfiltered in a process that asked for
            // filters.
            ctx.exit
                .signal(VmExit::Error(format!("vCPU {}: {e}", self.id)));
            return;
        }
        ctx.gate.wait();
        if self.id == 0 {
            // The boot vCPU's first KVM_RUN enters the guest kernel.
            ctx.clock.mark_kernel_entry();
        }
        while !stop.load(Ordering::Acquire) {
            let outcome = match self.fd.run() {
                Ok(exit) => handle_exit(exit, self.id, &ctx.pio, &ctx.mmio),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VmExit::Error(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.id
                ))),
            };
            if let Some(exit) = outcome {
                if matches!(exit, VmExit::TripleFault { .. }) {
                    self.log_state("triple fault");
                }
                ctx.exit.signal(exit);
                return;
            }
        }
    }
}

impl Vcpu {
    /// Logs where the vCPU stopped, for a guest that died without a word
    /// (a triple fault leaves nothing on the guest's console). On AMD, KVM
    /// has already reset the vCPU at a shutdown, so the state is the reset
    /// state there.
    fn log_state(&self, why: &str) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => tracing::error!(
                vcpu = self.id,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                cr0 = format_args!("{:#x}", s.cr0),
                cr2 = format_args!("{:#x}", s.cr2),
                cr3 = format_args!("{:#x}", s.cr3),
                cr4 = format_args!("{:#x}", s.cr4),
                idt = format_args!("{:#x}/{}", s.idt.base, s.idt.limit),
                "vCPU state at the {why}"
            ),
            (r, s) => tracing::error!(
                vcpu = self.id,
                "vCPU state at the {why} unreadable: {:?} {:?}",
                r.err(),
                s.err()
            ),
        }
    }
}

/// Dispatches one exit. Returns a reason when the VM must stop.
fn handle_exit(exit: VcpuExit, id: u8, pio: &Bus, mmio: &Bus) -> Option<VmExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                // Nothing decodes the port: the bus floats high.
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt => Some(VmExit::Poweroff),
        VcpuExit::Shutdown => Some(VmExit::TripleFault { vcpu: id }),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Some(VmExit::Poweroff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Some(VmExit::Reboot),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => Some(VmExit::GuestPanic),
        VcpuExit::FailEntry(reason, cpu) => Some(VmExit::Error(format!(
            "KVM could not enter vCPU {id} (hardware entry failure {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::InternalError => Some(VmExit::Error(format!(
            "KVM internal error on vCPU {id} (emulation failure)"
        ))),
        other => Some(VmExit::Error(format!(
            "unexpected exit on vCPU {id}: {other:?}"
        ))),
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // Interrupting KVM_RUN with EINTR is all the signal is for.
        if let Err(e) = register_signal_handler(SIGRTMIN(), noop) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Stops the vCPU and waits for its thread to end.
    pub fn stop_and_join(self) {
        self.stop.store(true, Ordering::Release);
        // The thread may be blocked in KVM_RUN (or about to enter it), so
        // keep kicking it out until it has seen the flag.
        while !self.thread.is_finished() {
            if let Err(e) = self.thread.kill(SIGRTMIN()) {
                tracing::debug!("kicking a vCPU failed: {e}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn the_gate_holds_until_opened() {
        let gate = Arc::new(StartGate::default());
        let passed = Arc::new(AtomicBool::new(false));
        let (g, p) = (gate.clone(), passed.clone());
        let t = std::thread::spawn(move || {
            g.wait();
            p.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!passed.load(Ordering::SeqCst), "through a closed gate");
        gate.open();
        t.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
        // Open for good.
        gate.wait();
    }
    use crate::devices::bus::BusDevice;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn buses() -> (Bus, Bus) {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Echo)), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(Echo)), 0xd000_0000, 0x1000)
            .unwrap();
        (pio, mmio)
    }

    #[test]
    fn io_exits_reach_devices_and_unclaimed_reads_float_high() {
        let (pio, mmio) = buses();
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f8, &mut data[..1]), 0, &pio, &mmio),
            None
        );
        assert_eq!(data[0], 0x42);
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x2f8, &mut data), 0, &pio, &mmio),
            None
        );
        assert_eq!(data, [0xff, 0xff]);
        let mut wide = [0u8; 8];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(u64::MAX - 3, &mut wide), 0, &pio, &mmio),
            None
        );
        assert_eq!(wide, [0xff; 8]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xd000_0ffc, &wide), 0, &pio, &mmio),
            None
        );
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0xffff, &wide), 0, &pio, &mmio),
            None
        );
    }

    #[test]
    fn stopping_exits_are_classified() {
        let (pio, mmio) = buses();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, 1, &pio, &mmio),
            Some(VmExit::TripleFault { vcpu: 1 })
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                0,
                &pio,
                &mmio
            ),
            Some(VmExit::Reboot)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]),
                0,
                &pio,
                &mmio
            ),
            Some(VmExit::GuestPanic)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, 0, &pio, &mmio),
            Some(VmExit::Error(m)) if m.contains("internal error")
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(7, 2), 0, &pio, &mmio),
            Some(VmExit::Error(_))
        ));
        assert!(matches!(
            handle_exit(VcpuExit::SystemEvent(99, &[]), 0, &pio, &mmio),
            Some(VmExit::Error(_))
        ));
    }
}
