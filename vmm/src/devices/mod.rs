//! Emulated devices and the buses that route guest accesses to them.
pub mod bus;
pub mod legacy;
pub mod pseudo;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
