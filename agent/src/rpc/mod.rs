//! The agent's ttrpc server on vsock port 1024, and the tasks PID 1 runs
//! beside it (reaping on SIGCHLD, shutdown on request).

mod service;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use airlock_protocol::agent_ttrpc::create_agent_service;
use airlock_protocol::AGENT_VSOCK_PORT;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;

use crate::init::reaper::{Event, Signals};
use crate::process::exits::Exits;
use crate::sandbox::Sandbox;
pub use service::Service;

/// Errors running the server.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("Cannot listen on vsock port {AGENT_VSOCK_PORT}")]
    Listen(#[source] ttrpc::Error),
    #[error("Cannot start the ttrpc server")]
    Start(#[source] ttrpc::Error),
    #[error("Cannot watch signals")]
    Signals(#[source] std::io::Error),
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// A shutdown signal (SIGTERM and friends) arrived.
    Signal(Signal),
    /// The runtime called DestroySandbox.
    Destroyed,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(sig) => write!(f, "{sig} received"),
            Stop::Destroyed => f.write_str("sandbox destroyed"),
        }
    }
}

/// Serves the agent API until a shutdown signal or DestroySandbox;
/// `ready` runs once the server listens.
pub async fn serve(signals: &mut Signals, ready: impl FnOnce()) -> Result<Stop, RpcError> {
    let exits = Arc::new(Exits::default());
    let sandbox = Arc::new(Sandbox::new(exits.clone()));
    let service = create_agent_service(Arc::new(Service::new(sandbox.clone())));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("vsock://-1:{AGENT_VSOCK_PORT}"))
        .map_err(RpcError::Listen)?
        .register_service(service);
    server.start().await.map_err(RpcError::Start)?;
    ready();

    // SAFETY: the signalfd is owned by `signals`, which outlives `fd` (a
    // local of this function); nothing closes it meanwhile.
    let fd = unsafe {
        AsyncFd::register_with_interest(signals.as_raw_fd(), tokio::io::Interest::READABLE)
    }
    .map_err(|e| RpcError::Signals(e.into()))?;
    let stop = 'serve: loop {
        tokio::select! {
            readable = fd.readable() => {
                let mut guard = readable.map_err(RpcError::Signals)?;
                guard.clear_ready();
                // Drain every pending signal without blocking.
                loop {
                    match signals.try_next() {
                        Ok(Some(Event::Child)) => {
                            exits.reap().ok();
                        }
                        Ok(Some(Event::Shutdown(sig))) => break 'serve Stop::Signal(sig),
                        Ok(Some(Event::Timeout) | None) => break,
                        Err(e) => return Err(RpcError::Signals(std::io::Error::other(e))),
                    }
                }
            }
            _ = sandbox.shutdown.notified() => break Stop::Destroyed,
        }
    };
    // Let the last replies (DestroySandbox's) reach the host.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    server.shutdown().await.ok();
    Ok(stop)
}
