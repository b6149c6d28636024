//! The VMM's life: wait for the guest (or a signal) to end the VM, stop the
//! vCPUs, wipe guest memory, then release it.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_and_start, BuildError, RunningVm};
use airlock_vmm_api::Event;

use crate::config::VmConfig;
use crate::control::Control;
use crate::events;
use crate::exit::{ExitSignal, VmExit};
use crate::seccomp::{self, ThreadKind};
use crate::signal;
use crate::vstate::memory::{MemoryError, WipeReport};

/// Errors from running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Why it stopped.
    pub exit: VmExit,
    /// What the memory wipe did; `None` when a keeper holds guest memory
    /// and wipes it after this process is gone (see `keeper.rs`).
    pub wipe: Option<WipeReport>,
    /// Time from the VMM's start to guest kernel entry, `/init` and agent
    /// ready, where the guest got that far.
    pub boot: BootTimes,
}

/// Boot-phase times, measured from the VMM's start.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub kernel_entry: Option<Duration>,
    pub init: Option<Duration>,
    pub ready: Option<Duration>,
}

/// Called with the guest memory just before and just after the wipe, while
/// it is still mapped. For tests that prove the wipe.
#[cfg(feature = "test-hooks")]
pub type WipeHook = Box<dyn FnMut(WipePhase, &vm_memory::GuestMemoryMmap) + Send>;

/// When a [`WipeHook`] is called.
#[cfg(feature = "test-hooks")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipePhase {
    /// The vCPUs are stopped; nothing is wiped yet.
    BeforeWipe,
    /// The wipe is done; the memory is unmapped after the hook returns.
    AfterWipe,
}

/// A VM, from build to wipe.
pub struct Vmm {
    config: VmConfig,
    start: Instant,
    kept: Option<KeptMemory>,
    control: Option<std::os::unix::net::UnixListener>,
    #[cfg(feature = "test-hooks")]
    wipe_hook: Option<WipeHook>,
}

impl Vmm {
    /// A VMM for `config`; boot timing counts from `start`.
    pub fn new(config: VmConfig, start: Instant) -> Self {
        Vmm {
            config,
            start,
            kept: None,
            control: None,
            #[cfg(feature = "test-hooks")]
            wipe_hook: None,
        }
    }

    /// Puts guest RAM in `memfd` (from `memory::guest_memfd`), which the
    /// keeper process `keeper` holds too and wipes once this process is
    /// gone. This VMM then wipes it only if its keeper is gone first.
    pub fn with_keeper(mut self, memfd: File, keeper: u32) -> Self {
        self.kept = Some(KeptMemory { memfd, keeper });
        self
    }

    /// Serves the control socket `listener` (from `control::bind`) while
    /// the VM runs.
    pub fn with_control(mut self, listener: std::os::unix::net::UnixListener) -> Self {
        self.control = Some(listener);
        self
    }

    /// Installs a hook that sees guest memory around the wipe.
    #[cfg(feature = "test-hooks")]
    pub fn set_wipe_hook(&mut self, hook: WipeHook) {
        self.wipe_hook = Some(hook);
    }

    /// Boots the VM and runs it until it stops; always wipes guest memory.
    pub fn run(mut self) -> Result<RunReport, VmmError> {
        let term = signal::termination_event().map_err(VmmError::Signals)?;
        let memfd = self.kept.as_ref().map(|k| k.memfd.try_clone()).transpose();
        let memfd = memfd.map_err(|source| {
            BuildError::Memory(MemoryError::Memfd {
                mib: self.config.memory_mib,
                source,
            })
        })?;
        let running = build_and_start(&self.config, self.start, memfd)?;
        match seccomp::apply(ThreadKind::Main) {
            // Every thread is filtered now: the vCPUs may run the guest.
            Ok(()) => running.gate.open(),
            // Never run unfiltered in a process that asked for filters; the
            // gate opens at teardown, for the vCPUs to end.
            Err(e) => running.exit.signal(VmExit::Error(e.to_string())),
        }
        // Whoever started the VMM may wait for this event (airlock-runtime
        // does): past it, setup errors are behind us.
        let ms = events::ms(self.start.elapsed());
        tracing::info!(ms, "VM running");
        events::emit(Event::Running { ms });
        let control = self
            .control
            .take()
            .map(|l| Control::new(l, running.exit.clone()));
        let loop_result = wait_for_exit(&running.exit, term, control);
        let exit = match (&loop_result, running.exit.reason()) {
            (_, Some(reason)) => reason,
            (Err(e), None) => VmExit::Error(format!("event loop failed: {e:?}")),
            (Ok(()), None) => VmExit::Error("the VM stopped for no recorded reason".into()),
        };
        let boot = BootTimes {
            kernel_entry: running.clock.kernel_entry(),
            init: running.clock.init(),
            ready: running.clock.ready(),
        };
        let wipe = self.teardown(running);
        if let Some(wipe) = &wipe {
            log_wipe(wipe);
        }
        Ok(RunReport { exit, wipe, boot })
    }

    /// Whether this process wipes guest memory: unless its keeper, which
    /// would, is still there.
    fn wipes(&self) -> bool {
        self.kept
            .as_ref()
            .is_none_or(|k| std::os::unix::process::parent_id() != k.keeper)
    }

    fn teardown(&mut self, running: RunningVm) -> Option<WipeReport> {
        let RunningVm {
            vm,
            mem,
            vcpus,
            virtio,
            exit: _,
            clock: _,
            gate,
        } = running;
        // A vCPU still at the gate sees its stop flag once through it.
        gate.open();
        vcpus.into_iter().for_each(|v| v.stop_and_join());
        // Device workers write guest memory: stop them before the wipe.
        virtio.iter().for_each(crate::builder::virtio::stop);
        drop(virtio);
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = self.wipe_hook.as_mut() {
            hook(WipePhase::BeforeWipe, &mem);
        }
        let report = self.wipes().then(|| mem.wipe());
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = self.wipe_hook.as_mut() {
            hook(WipePhase::AfterWipe, &mem);
        }
        drop(vm);
        drop(mem);
        report
    }
}

/// Guest memory that a keeper process holds too.
struct KeptMemory {
    memfd: File,
    keeper: u32,
}

/// Logs and reports (the `Wiped` event, which the runtime reads) that
/// guest memory was wiped, with its figures (MiB touched and wiped, MiB of
/// guest memory, time, method).
pub fn log_wipe(wipe: &WipeReport) {
    let (touched_mib, total_mib) = (wipe.wiped_pages / 256, wipe.total_pages / 256);
    let ms = events::ms(wipe.duration);
    tracing::info!(
        wiped_mib = touched_mib,
        guest_mib = total_mib,
        wipe_ms = ms,
        method = ?wipe.method,
        "guest memory wiped"
    );
    events::emit(Event::Wiped {
        touched_mib,
        total_mib,
        ms,
    });
}

/// Watches the exit eventfd and the termination signals.
struct ExitWatcher {
    exit: ExitSignal,
    term: &'static EventFd,
    done: bool,
}

const EXIT_TOKEN: u32 = 1;
const TERM_TOKEN: u32 = 2;

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EXIT_TOKEN => {
                let _ = self.exit.eventfd().read();
            }
            TERM_TOKEN => {
                let _ = self.term.read();
                let sig = signal::received_signal().unwrap_or(libc::SIGTERM);
                tracing::info!(signal = sig, "termination signal received; stopping the VM");
                self.exit.signal(VmExit::Signal(sig));
            }
            _ => {}
        }
        self.done = self.exit.reason().is_some();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let exit = Events::with_data(self.exit.eventfd(), EXIT_TOKEN, EventSet::IN);
        let term = Events::with_data(self.term, TERM_TOKEN, EventSet::IN);
        for ev in [exit, term] {
            if let Err(e) = ops.add(ev) {
                tracing::error!("cannot watch for VM exit: {e:?}");
            }
        }
    }
}

fn wait_for_exit(
    exit: &ExitSignal,
    term: &'static EventFd,
    control: Option<Control>,
) -> Result<(), event_manager::Error> {
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
    if let Some(control) = control {
        manager.add_subscriber(Arc::new(Mutex::new(control)));
    }
    let watcher = Arc::new(Mutex::new(ExitWatcher {
        exit: exit.clone(),
        term,
        done: false,
    }));
    manager.add_subscriber(watcher.clone());
    // A signal may have arrived before the watcher was registered.
    if signal::received_signal().is_some() {
        let _ = term.write(1);
    }
    loop {
        if watcher.lock().unwrap_or_else(|e| e.into_inner()).done {
            return Ok(());
        }
        manager.run()?;
    }
}
