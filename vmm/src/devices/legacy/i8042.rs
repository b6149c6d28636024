//! Just enough of the i8042 keyboard controller for the guest to reset the
//! machine: Linux (booted with `reboot=k`) writes 0xFE, "pulse reset line",
//! to the command port. There is no keyboard.
//!
//! A reset ends the VM. A guest whose kernel panicked resets too, so the
//! device reads the BIOS warm-reboot flag that the guest kernel leaves at
//! physical 0x472 (0x1234 for a warm reboot; booted with `reboot=panic_warm`
//! only a panic makes the reboot warm) to tell the two apart.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// The controller's data port; the command/status port is `I8042_PORT + 4`.
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const PORT_COUNT: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;
/// Where the BIOS data area keeps the reboot flag.
pub const WARM_REBOOT_FLAG_ADDR: GuestAddress = GuestAddress(0x472);
/// The flag's value for a warm reboot.
pub const WARM_REBOOT_MAGIC: u16 = 0x1234;

/// The reset-only keyboard controller.
pub struct I8042 {
    exit: ExitSignal,
    mem: GuestMemoryMmap,
}

impl I8042 {
    /// A controller that stops the VM through `exit` when the guest resets it.
    pub fn new(exit: ExitSignal, mem: GuestMemoryMmap) -> Self {
        I8042 { exit, mem }
    }

    fn reset_reason(&self) -> VmExit {
        // Guest-controlled, so any value other than the magic means a normal
        // reboot; an unreadable address cannot happen for RAM at 0x472 but
        // is treated the same way.
        match self.mem.read_obj::<u16>(WARM_REBOOT_FLAG_ADDR) {
            Ok(WARM_REBOOT_MAGIC) => VmExit::GuestPanic,
            _ => VmExit::Reboot,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            self.exit.signal(self.reset_reason());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (I8042, ExitSignal, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let exit = ExitSignal::new().unwrap();
        (I8042::new(exit.clone(), mem.clone()), exit, mem)
    }

    #[test]
    fn reset_is_a_clean_reboot() {
        let (mut dev, exit, _) = setup();
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reboot));
    }

    #[test]
    fn warm_reset_is_a_panic() {
        let (mut dev, exit, mem) = setup();
        mem.write_obj(WARM_REBOOT_MAGIC, WARM_REBOOT_FLAG_ADDR)
            .unwrap();
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::GuestPanic));
    }

    #[test]
    fn other_writes_and_reads_do_nothing() {
        let (mut dev, exit, _) = setup();
        let mut b = [0xffu8; 4];
        for off in 0..8u64 {
            dev.write(off, &[0xfd]);
            dev.write(off, &[0xfe, 0xfe]);
            dev.read(off, &mut b);
            assert_eq!(b, [0; 4]);
        }
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
    }
}
