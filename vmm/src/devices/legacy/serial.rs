//! The 8250 UART at COM1 (port 0x3f8, IRQ 4), as the guest's console.
//!
//! The register model is `vm-superio`'s; this file only adapts it to the bus
//! and to an eventfd that KVM injects as the interrupt (irqfd).

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// COM1's first port.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports an 8250 decodes.
pub const PORT_COUNT: u64 = 8;
/// COM1's legacy interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART interrupt by writing to an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1 on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART that writes guest output to `out` and interrupts through `irq`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Feeds host input (such as stdin) to the guest. Returns how many bytes
    /// the receive FIFO took; the rest must be offered again later.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read as zero.
        if let ([byte], Ok(off)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *byte) {
                // A console that cannot be written (closed pipe, full disk)
                // must not stop the guest.
                tracing::debug!("serial output failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, SharedBuf) {
        let out = SharedBuf::default();
        let dev = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(out.clone()));
        (dev, out)
    }

    #[test]
    fn guest_output_reaches_the_console() {
        let (mut dev, out) = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_read_back_by_the_guest() {
        let (mut dev, _) = device();
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [b'a']);
    }

    #[test]
    fn garbage_accesses_do_not_panic() {
        let (mut dev, _) = device();
        let mut wide = [0u8; 8];
        for off in [0u64, 1, 7, 8, 255, 256, u64::MAX] {
            for v in [0u8, 0x80, 0xff] {
                dev.write(off, &[v]);
                dev.write(off, &[v, v]);
                dev.read(off, &mut wide);
                dev.read(off, &mut wide[..1]);
                dev.read(off, &mut []);
            }
        }
        // A flood of input beyond the FIFO is refused, not buffered forever.
        let big = vec![b'x'; 1 << 16];
        let taken = dev.enqueue_input(&big);
        assert!(taken < big.len());
        assert_eq!(dev.enqueue_input(&big), 0);
    }
}
