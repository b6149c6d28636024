//! The typed contract between `airlock-runtime` (or any other launcher) and
//! `airlock-vmm`, kept free of KVM so that both sides link it:
//!
//! * [`config`]: what a VM is made of ([`VmConfig`]), written once by the
//!   launcher as JSON and read by `airlock-vmm --config FILE`;
//! * [`mac`]: the NIC's address ([`MacAddr`]) in its `02:00:00:00:00:01` form;
//! * [`limits`]: the bounds on vCPUs, memory and drives, checked by
//!   [`VmConfig::validate`] on both sides;
//! * [`event`]: what the VMM (and its keeper) report as the VM runs: one
//!   JSON line per [`Event`] in a file the launcher names;
//! * [`command`]: what a running VMM accepts on its control socket.
//!
//! ```
//! use airlock_vmm_api::{Event, VmConfig};
//!
//! let mut config = VmConfig::new("/boot/vmlinux".into());
//! config.vcpus = 2;
//! config.memory_mib = 256;
//! config.validate()?;
//! let json = serde_json::to_string(&config).unwrap();
//! assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);
//!
//! let line = Event::AgentReady { ms: 812.5 }.to_line();
//! assert_eq!(Event::from_line(&line), Some(Event::AgentReady { ms: 812.5 }));
//! # Ok::<(), airlock_vmm_api::ConfigError>(())
//! ```

pub mod command;
pub mod config;
pub mod event;
pub mod limits;
pub mod mac;

pub use command::{Command, Reply};
pub use config::{
    ConfigError, ConsoleOutput, DriveConfig, JailConfig, LoadError, NetConfig, VmConfig,
    VsockConfig,
};
pub use event::{Event, EventLog, EventSink};
pub use mac::MacAddr;
