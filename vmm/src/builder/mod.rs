//! Building a VM from a [`VmConfig`]: memory, KVM, the guest image, the
//! devices and the vCPUs, in that order.

mod legacy;
pub(crate) mod virtio;

use std::sync::Arc;
use std::time::Instant;

use crate::arch::x86_64::mptable::{self, MptableError};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::BusError;
use crate::devices::pseudo::boot_timer::BootClock;
use crate::devices::virtio::worker::{self, PoolError};
use crate::exit::ExitSignal;
use crate::seccomp;
use crate::vstate::memory::{self, GuestRam, MemoryError};
use crate::vstate::vcpu::{StartGate, Vcpu, VcpuContext, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Errors from building a VM. Each wraps the module error that says what
/// went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Workers(#[from] PoolError),
    /// The MP table could not be written.
    #[error("cannot write the MP table")]
    Mptable(#[source] MptableError),
    /// A device could not be placed on its bus.
    #[error("cannot attach a device")]
    Bus(#[source] BusError),
    /// The console file cannot be created.
    #[error("cannot create the console log {path}")]
    Console {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A virtio device could not be set up.
    #[error("cannot set up a virtio device")]
    Virtio(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Too many virtio devices for the interrupt lines.
    #[error("too many virtio devices ({0}): at most {1} fit")]
    TooManyDevices(usize, usize),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The host has fewer vCPUs to give than asked for.
    #[error("invalid vCPU count {requested}: this host's KVM supports at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
}

/// A running VM: its vCPUs are started.
pub struct RunningVm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestRam,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) virtio: Vec<virtio::SharedTransport>,
    pub(crate) exit: ExitSignal,
    pub(crate) clock: Arc<BootClock>,
    /// Holds the vCPUs before their first `KVM_RUN` (see [`StartGate`]).
    pub(crate) gate: Arc<StartGate>,
}

/// Builds the VM described by `config` and starts its vCPUs, which wait at
/// the returned VM's `gate` before they run the guest. `start` is the
/// moment boot timing counts from (normally the VMM process's start).
/// Guest RAM is `memfd` (made by [`memory::guest_memfd`], held by a keeper
/// that wipes it) or, without one, a memfd of the VM's own.
pub fn build_and_start(
    config: &VmConfig,
    start: Instant,
    memfd: Option<std::fs::File>,
) -> Result<RunningVm, BuildError> {
    let phase =
        |name: &str| tracing::debug!(ms = start.elapsed().as_secs_f64() * 1e3, "build: {name}");
    crate::config::validate(config)?;
    boot::check_files(&config.kernel, config.initrd.as_deref())?;
    // Devices open their backends (images, sockets) before KVM is touched,
    // so a bad path is reported as such on any host.
    let devices = virtio::devices_from_config(config)?;
    phase("device backends opened");
    if seccomp::enabled() {
        // One pooled thread per device, under the device filter, before
        // any guest code runs (see devices::virtio::worker).
        worker::start_pool(devices.len())?;
    }
    phase("device workers started");
    let vm = Vm::new()?;
    phase("KVM VM created");
    let max = vm.kvm().get_max_vcpus();
    if config.vcpus as usize > max {
        return Err(BuildError::TooManyVcpus {
            requested: config.vcpus,
            max,
        });
    }
    let num_vcpus = config.vcpus as u8; // validate() bounds it by MAX_VCPUS.
    let mem = match memfd {
        Some(file) => GuestRam::new(file, config.memory_mib)?,
        None => memory::create_guest_memory(config.memory_mib)?,
    };
    vm.register_memory(&mem)?;
    phase("guest memory mapped");

    let virtio = virtio::attach_virtio_devices(&vm, &mem, devices)?;
    let mut cmdline_parts = crate::config::cmdline_parts(config);
    cmdline_parts.extend(virtio.cmdline.iter().map(String::as_str));
    let cmdline = boot::build_cmdline(&cmdline_parts)?;
    let loaded = boot::load_guest(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
    mptable::setup_mptable(&mem, num_vcpus).map_err(BuildError::Mptable)?;

    phase("guest image loaded");

    let exit = ExitSignal::new().map_err(BuildError::EventFd)?;
    let clock = BootClock::new(start);
    let pio = legacy::legacy_devices(&vm, config, &mem, &exit, &clock)?;
    let gate = Arc::new(StartGate::default());
    let ctx = VcpuContext {
        pio,
        mmio: virtio.bus,
        exit: exit.clone(),
        clock: clock.clone(),
        gate: gate.clone(),
    };
    phase("devices attached");
    let vcpus = (0..num_vcpus)
        .map(|id| Vcpu::new(&vm, &mem, id, num_vcpus, loaded.entry))
        .collect::<Result<Vec<_>, _>>()?;
    phase("vCPUs configured");
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.start(ctx.clone()) {
            Ok(h) => handles.push(h),
            Err(e) => {
                gate.open();
                handles.into_iter().for_each(VcpuHandle::stop_and_join);
                virtio.transports.iter().for_each(virtio::stop);
                mem.wipe();
                return Err(e.into());
            }
        }
    }
    Ok(RunningVm {
        vm,
        mem,
        vcpus: handles,
        virtio: virtio.transports,
        exit,
        clock,
        gate,
    })
}
