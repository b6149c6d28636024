//! x86_64 guest setup: memory layout, CPUID, MSRs, registers, the boot GDT,
//! the local APIC's LINT pins and the MP table.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

/// Most vCPUs a guest may have: bounded by the MP table, which has to fit in
/// the EBDA (see [`mptable::MAX_CPUS_IN_EBDA`]).
pub use airlock_vmm_api::limits::MAX_VCPUS;

// The MP table for MAX_VCPUS processors must fit below the end of the EBDA.
const _: () = assert!(MAX_VCPUS as usize <= mptable::MAX_CPUS_IN_EBDA);
