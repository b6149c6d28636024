//! Local APIC wiring: LINT0 receives the PIC's ExtINT, LINT1 is the NMI pin.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the local APIC page.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the local APIC page.
pub const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode: ExtINT (the vector comes from the 8259 PIC).
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Bits 8-10 of an LVT register: its delivery mode.
const DELIVERY_MODE_MASK: u32 = 0x700;

/// Errors wiring a vCPU's local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptsError {
    /// `KVM_GET_LAPIC` failed.
    #[error("failed to read the local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("failed to write the local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("local APIC register offset {0:#x} is out of range")]
    OutOfRange(usize),
}

/// Reads the 32-bit little-endian register at `offset` of a local APIC state.
pub fn get_lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> Result<u32, InterruptsError> {
    let end = offset
        .checked_add(4)
        .ok_or(InterruptsError::OutOfRange(offset))?;
    let bytes = lapic
        .regs
        .get(offset..end)
        .ok_or(InterruptsError::OutOfRange(offset))?;
    let mut value = [0u8; 4];
    for (dst, src) in value.iter_mut().zip(bytes) {
        // c_char is i8 here: reinterpret the byte.
        *dst = *src as u8;
    }
    Ok(u32::from_le_bytes(value))
}

/// Writes `value` to the 32-bit little-endian register at `offset`.
pub fn set_lapic_reg(
    lapic: &mut kvm_lapic_state,
    offset: usize,
    value: u32,
) -> Result<(), InterruptsError> {
    let end = offset
        .checked_add(4)
        .ok_or(InterruptsError::OutOfRange(offset))?;
    let bytes = lapic
        .regs
        .get_mut(offset..end)
        .ok_or(InterruptsError::OutOfRange(offset))?;
    for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *dst = src as std::os::raw::c_char;
    }
    Ok(())
}

/// Replaces the delivery mode of an LVT register value, keeping its other bits.
pub fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a local APIC state (virtual-wire
/// mode, as the MP table describes it).
pub fn configure_lint(lapic: &mut kvm_lapic_state) -> Result<(), InterruptsError> {
    let lint0 = get_lapic_reg(lapic, APIC_LVT_LINT0)?;
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    )?;
    let lint1 = get_lapic_reg(lapic, APIC_LVT_LINT1)?;
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    )
}

/// Wires the vCPU's LINT pins (see [`configure_lint`]). Needs the in-kernel
/// irqchip.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptsError> {
    let mut lapic = vcpu.get_lapic().map_err(InterruptsError::GetLapic)?;
    configure_lint(&mut lapic)?;
    vcpu.set_lapic(&lapic).map_err(InterruptsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, 0x20, 0xdead_beef).unwrap();
        assert_eq!(get_lapic_reg(&lapic, 0x20).unwrap(), 0xdead_beef);
        assert_eq!(lapic.regs[0x20] as u8, 0xef);
        assert_eq!(lapic.regs[0x23] as u8, 0xde);
        set_lapic_reg(&mut lapic, 1020, 7).unwrap();
        assert_eq!(get_lapic_reg(&lapic, 1020).unwrap(), 7);
    }

    #[test]
    fn out_of_range_offsets_are_rejected() {
        let mut lapic = kvm_lapic_state::default();
        assert!(matches!(
            get_lapic_reg(&lapic, 1021),
            Err(InterruptsError::OutOfRange(1021))
        ));
        assert!(matches!(
            set_lapic_reg(&mut lapic, 1024, 0),
            Err(InterruptsError::OutOfRange(_))
        ));
        assert!(matches!(
            get_lapic_reg(&lapic, usize::MAX),
            Err(InterruptsError::OutOfRange(_))
        ));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        // Reset state: both masked (bit 16), fixed delivery.
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x1_0000).unwrap();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT1, 0x1_0400 | 0x300).unwrap();
        configure_lint(&mut lapic).unwrap();
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT_LINT0).unwrap(), 0x1_0700);
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT_LINT1).unwrap(), 0x1_0400);
    }
}
