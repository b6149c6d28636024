//! The 8250 UART at COM1 (port 0x3f8, IRQ 4), as the guest's console.
//!
//! The register model is `vm-superio`'s; this file only adapts it to the bus
//! and to an eventfd that KVM injects as the interrupt (irqfd), and caps
//! what a guest can write to a console file ([`CappedWriter`]).

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

/// A writer that takes at most `cap` bytes. The first byte past the cap
/// writes one line saying so (`[airlock: console output truncated at N
/// bytes]`, after a newline if the output stopped mid-line); everything
/// after it is dropped, reported as written so that the guest's console
/// goes on. The output is at most `cap` bytes plus that line.
#[derive(Debug)]
pub struct CappedWriter<W> {
    inner: W,
    cap: u64,
    written: u64,
    last: Option<u8>,
    truncated: bool,
}

impl<W: Write> CappedWriter<W> {
    /// `inner`, taking at most `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Self {
        CappedWriter {
            inner,
            cap,
            written: 0,
            last: None,
            truncated: false,
        }
    }

    /// The line written once the cap is reached.
    pub fn marker(cap: u64) -> String {
        format!("[airlock: console output truncated at {cap} bytes]\n")
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.truncated || buf.is_empty() {
            return Ok(buf.len());
        }
        let room = self.cap.saturating_sub(self.written);
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        if n > 0 {
            let wrote = self.inner.write(&buf[..n])?;
            self.written = self.written.saturating_add(wrote as u64);
            if let Some(last) = wrote.checked_sub(1).and_then(|i| buf.get(i)) {
                self.last = Some(*last);
            }
            return Ok(wrote);
        }
        // The cap is reached and there is more: say so, once.
        self.truncated = true;
        let newline = if self.last.is_some_and(|b| b != b'\n') {
            "\n"
        } else {
            ""
        };
        let marker = format!("{newline}{}", Self::marker(self.cap));
        // Nothing more can be done if even this fails (a full disk).
        let _ = self.inner.write_all(marker.as_bytes());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

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
    fn output_past_the_cap_is_dropped_after_one_line() {
        let out = SharedBuf::default();
        let capped = CappedWriter::new(out.clone(), 10);
        let mut dev = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(capped));
        for b in b"hello world, and more\nand more\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            String::from_utf8(out.0.lock().unwrap().clone()).unwrap(),
            "hello worl\n[airlock: console output truncated at 10 bytes]\n"
        );
        // Output that ends exactly at the cap, at the end of a line: no
        // marker until more comes, and then no extra newline.
        let out = SharedBuf::default();
        let mut capped = CappedWriter::new(out.clone(), 3);
        capped.write_all(b"ok\n").unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
        capped.write_all(b"more").unwrap();
        capped.write_all(b"and more").unwrap();
        let want = format!("ok\n{}", CappedWriter::<SharedBuf>::marker(3));
        assert_eq!(*out.0.lock().unwrap(), want.as_bytes());
        // A cap of 0: the marker alone.
        let out = SharedBuf::default();
        let mut capped = CappedWriter::new(out.clone(), 0);
        capped.write_all(b"x").unwrap();
        assert_eq!(
            *out.0.lock().unwrap(),
            CappedWriter::<SharedBuf>::marker(0).as_bytes()
        );
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
