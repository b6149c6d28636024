//! Airlock's boot-timer device: one-byte writes to I/O port 0x3f0 tell the
//! VMM how far the guest got, so it can time the boot phases (Firecracker
//! measures boot time the same way).
//!
//! Signalling is best effort: under another VMM, or when the port cannot be
//! opened, it does nothing.

/// The boot-timer device's I/O port.
const PORT: u16 = 0x3f0;

/// A boot milestone, written to the device as its byte value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    /// `/init` has started.
    InitEntered = 1,
    /// The agent is up and ready to serve.
    AgentReady = 2,
}

/// Tells the VMM that the guest reached `event`.
///
/// Access to the port is granted for the write and dropped again at once, so
/// processes that init starts later never inherit it.
pub fn signal(event: Event) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm takes no pointers; it only changes this thread's I/O
        // permission bitmap, for one port.
        if unsafe { libc::ioperm(PORT.into(), 1, 1) } != 0 {
            return;
        }
        // The port is Airlock's boot-timer device; a write to it has no
        // effect on the guest's memory or on this program's state.
        // SAFETY: access to the port was granted by ioperm just above.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") PORT,
                in("al") event as u8,
                options(nomem, nostack, preserves_flags)
            );
        }
        // SAFETY: as above; this revokes the permission.
        unsafe { libc::ioperm(PORT.into(), 1, 0) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (PORT, event);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_values_match_the_device_protocol() {
        assert_eq!(Event::InitEntered as u8, 1);
        assert_eq!(Event::AgentReady as u8, 2);
    }
}
