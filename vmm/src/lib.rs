//! Airlock's virtual machine monitor: one KVM microVM per sandbox.
//!
//! ```no_run
//! use std::time::Instant;
//! use airlock_vmm::{Vmm, VmConfig};
//!
//! let mut config = airlock_vmm::config::with_defaults();
//! config.vcpus = 2;
//! config.extra_args.push("airlock.oneshot".into());
//! let report = Vmm::new(config, Instant::now()).run()?;
//! // Without a keeper process (see `keeper`), the VMM wipes guest memory.
//! let wiped = report.wipe.map_or(0, |w| w.wiped_pages);
//! println!("{} (wiped {wiped} pages)", report.exit);
//! # Ok::<(), airlock_vmm::VmmError>(())
//! ```
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod events;
pub mod exit;
pub mod jail;
pub mod keeper;
pub mod seccomp;
pub mod signal;
pub mod vmm;
pub mod vstate;

pub use config::{ConsoleOutput, VmConfig};
pub use exit::VmExit;
pub use vmm::{BootTimes, RunReport, Vmm, VmmError};
#[cfg(feature = "test-hooks")]
pub use vmm::{WipeHook, WipePhase};

/// Stack size of the VMM's own threads (vCPUs, device workers). Their
/// frames are shallow; Rust's default 2 MiB stack is a mapping the host may
/// back with one transparent huge page, 2 MiB of RSS for a few KiB used.
pub(crate) const THREAD_STACK: usize = 256 << 10;
