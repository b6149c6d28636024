//! The KVM VM and its vCPUs and guest memory.
pub mod memory;
pub mod vcpu;
pub mod vm;
