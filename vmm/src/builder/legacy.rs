//! The legacy devices on the port-I/O bus.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::BuildError;
use crate::config::{ConsoleOutput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::{self, I8042};
use crate::devices::legacy::serial::{self, CappedWriter, SerialDevice};
use crate::devices::pseudo::boot_timer::{self, BootClock, BootTimer};
use crate::exit::ExitSignal;
use crate::vstate::vm::Vm;

/// The port-I/O devices: COM1, the i8042 reset line and the boot timer.
pub(super) fn legacy_devices(
    vm: &Vm,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    exit: &ExitSignal,
    clock: &Arc<BootClock>,
) -> Result<Bus, BuildError> {
    let out: Box<dyn Write + Send> = match &config.console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        // A file is capped: the guest writes what it likes to it.
        ConsoleOutput::File(path) => {
            let file = File::create(path).map_err(|source| BuildError::Console {
                path: path.clone(),
                source,
            })?;
            Box::new(CappedWriter::new(file, config.console_max_bytes))
        }
        ConsoleOutput::Off => Box::new(std::io::sink()),
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;

    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
    pio.insert(serial, serial::COM1_PORT, serial::PORT_COUNT)
        .map_err(BuildError::Bus)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), mem.clone())));
    pio.insert(i8042, i8042::I8042_PORT, i8042::PORT_COUNT)
        .map_err(BuildError::Bus)?;
    let timer = Arc::new(Mutex::new(BootTimer::new(clock.clone())));
    pio.insert(timer, boot_timer::BOOT_TIMER_PORT, 1)
        .map_err(BuildError::Bus)?;
    Ok(pio)
}
