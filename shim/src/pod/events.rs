//! The task events a pod emits for containerd.

use crate::process::Exited;

/// A task event for containerd.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create {
        id: String,
        pid: u32,
    },
    Start {
        id: String,
        pid: u32,
    },
    Exit {
        id: String,
        exec_id: String,
        pid: u32,
        exit: Exited,
    },
    Delete {
        id: String,
        pid: u32,
        exit: Exited,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
}

/// Where events go (the publisher to containerd, or a test's channel).
pub type Events = tokio::sync::mpsc::UnboundedSender<Event>;
