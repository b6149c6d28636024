//! The `airlock-netfilter` daemon: the sandbox's sockets bound in its network
//! namespace, the forwarder and the proxy served on a small tokio runtime,
//! `ready` on stdout (then stdout closed), the policy file re-read on SIGHUP,
//! a clean exit on SIGTERM.

use std::io::Write;
use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use super::config::{load_policy, ConfigError, FilterConfig};
use super::dns::Forwarder;
use super::netns::{self, NetnsError};
use super::proxy::{Proxy, SoOriginalDst};
use super::resolver::Resolver;
use super::PolicyHandle;
use crate::policy::Policy;

/// Worker threads: one sandbox's DNS and connections are light, and many
/// sandboxes each run one daemon.
const WORKERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot load the configuration")]
    Config(#[from] ConfigError),
    #[error("cannot create the listening sockets")]
    Netns(#[from] NetnsError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("cannot tell the runtime we are ready (stdout)")]
    Ready(#[source] std::io::Error),
    #[error("the DNS forwarder stopped")]
    Dns(#[source] std::io::Error),
    #[error("the proxy stopped")]
    Proxy(#[source] std::io::Error),
}

/// Runs the filter described by the file `config` until SIGTERM.
pub fn run(config: &Path) -> Result<(), DaemonError> {
    let config = FilterConfig::load(config)?;
    let policy = PolicyHandle::new(load_policy(&config.policy_file)?);
    let (udp, tcp) = netns::bind_in(
        &config.netns,
        SocketAddrV4::new(config.listen, config.dns_port),
        SocketAddrV4::new(config.listen, config.proxy_port),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("netfilter")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async move {
        let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(DaemonError::Runtime)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(DaemonError::Runtime)?;
        let resolver = Arc::new(Resolver::new(config.upstream_dns.clone()));
        let forwarder = Forwarder {
            socket: Arc::new(udp),
            upstream: config.upstream_dns.clone().into(),
            policy: policy.clone(),
            resolver: resolver.clone(),
        };
        let proxy = Arc::new(Proxy {
            policy: policy.clone(),
            resolver,
            original_dst: Arc::new(SoOriginalDst),
            host_addrs: config.host_addrs.clone(),
            guard: Policy::default_denials(),
        });
        let mut dns = tokio::spawn(forwarder.serve());
        let mut proxied = tokio::spawn(proxy.serve(tcp));
        ready().map_err(DaemonError::Ready)?;
        tracing::info!(listen = %config.listen, dns_port = config.dns_port, proxy_port = config.proxy_port, "filtering");
        loop {
            tokio::select! {
                _ = hup.recv() => reload(&config.policy_file, &policy),
                _ = term.recv() => return Ok(()),
                e = &mut dns => return Err(DaemonError::Dns(e.unwrap_or_else(std::io::Error::other))),
                e = &mut proxied => return Err(DaemonError::Proxy(e.unwrap_or_else(std::io::Error::other))),
            }
        }
    })
}

/// Puts the policy in `path` in force; a policy file that cannot be read
/// leaves the one in force as it is (and says so in the log).
pub fn reload(path: &Path, policy: &PolicyHandle) {
    match load_policy(path) {
        Ok(new) => {
            tracing::info!(policy = %path.display(), "policy reloaded");
            policy.set(new);
        }
        Err(e) => tracing::error!(
            "policy not reloaded, the previous one stays in force: {}",
            airlock_report::one_line(&e)
        ),
    }
}

/// Writes `ready` and closes stdout (fd 1 then points at /dev/null, so that
/// no later descriptor takes its number).
fn ready() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(b"ready\n")?;
    out.flush()?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(null)?;
    Ok(())
}
