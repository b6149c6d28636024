//! The TCP proxy nft sends a sandbox's connections to denied destinations to
//! (only when its policy has domain rules). A connection passes only if its
//! first bytes (a TLS ClientHello's SNI, or an HTTP request's Host) name a
//! domain the policy allows AND its original destination is one of the
//! addresses that name has (asked of the sandbox's upstream DNS, not the
//! tenant's): another name, an allowed name sent to another address, or an
//! address with no name is refused, at once, with a reset.
//!
//! A name never opens a destination in the default denials or the host's
//! own addresses (`guard`): `*.example.test` must not become a way to the
//! metadata service or the host through a name that resolves there. Only an
//! address rule opens those.
//!
//! The first bytes are read (up to [`SNIFF_MAX`], within [`SNIFF_TIMEOUT`])
//! rather than peeked: a peek returns at once with what has arrived and
//! cannot wait for more. They are sent on first once the destination is
//! connected (within [`CONNECT_TIMEOUT`], from the host's namespace); then
//! bytes are copied both ways until both sides have closed. At most
//! [`MAX_CONNECTIONS`] connections are handled at a time; more wait in the
//! listen backlog.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::ratelimit::RateLimit;
use super::resolver::Resolver;
use super::{http, sni, PolicyHandle, Sniff};

/// The most of a connection's first bytes read to find its name.
pub const SNIFF_MAX: usize = 16 * 1024;
/// How long the client has to send them.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination has to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handled at a time.
pub const MAX_CONNECTIONS: usize = 256;

static REFUSED_LOG: RateLimit = RateLimit::new();
static NO_DST_LOG: RateLimit = RateLimit::new();

/// Where a redirected connection was going.
pub trait OriginalDst: Send + Sync {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The destination before nft's DNAT, from conntrack (`SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let sin =
            nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::OriginalDst)?;
        let ip = u32::from_be(sin.sin_addr.s_addr);
        Ok(SocketAddrV4::new(ip.into(), u16::from_be(sin.sin_port)).into())
    }
}

/// One sandbox's proxy.
pub struct Proxy {
    pub policy: PolicyHandle,
    pub resolver: Arc<Resolver>,
    pub original_dst: Arc<dyn OriginalDst>,
    /// The host's own addresses: denied unless an address rule allows them.
    pub host_addrs: Vec<IpAddr>,
    /// What a name may never open (the daemon's: the default denials,
    /// [`crate::policy::Policy::default_denials`]).
    pub guard: Vec<IpNet>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No SNI or Host (an IP literal with no name, or another protocol).
    NoName,
    /// A name no domain rule allows (an address as the name included).
    NameNotAllowed(String),
    /// An allowed name, sent to the default denials or the host.
    Guarded(String),
    /// An allowed name, sent to an address that is not one of its own.
    NotTheNamesAddress(String),
}

impl Proxy {
    /// Serves `listener` until it fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Error {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return io::Error::other("the connection semaphore was closed");
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of descriptors or a connection reset before accept:
                // the next one may do.
                Err(e) if is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return e,
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.handle(stream).await;
                drop(permit);
            });
        }
    }

    /// Decides on one connection and, if allowed, carries it.
    pub async fn handle(&self, mut client: TcpStream) {
        let dst = match self.original_dst.original_dst(&client) {
            Ok(dst) => dst,
            Err(e) => {
                // A connection made to the proxy's address itself has none.
                if let Some(suppressed) = NO_DST_LOG.allow() {
                    tracing::warn!(error = %e, suppressed, "connection refused: no original destination (not redirected by nft)");
                }
                return reset(client);
            }
        };
        let mut first = vec![0; SNIFF_MAX];
        let mut len = 0;
        let policy = self.policy.get();
        if !policy.allows_ip(dst.ip(), &self.host_addrs) {
            let name = timeout(SNIFF_TIMEOUT, read_name(&mut client, &mut first, &mut len))
                .await
                .ok()
                .flatten();
            if let Err(refusal) = self.check(dst, name).await {
                if let Some(suppressed) = REFUSED_LOG.allow() {
                    tracing::warn!(%dst, ?refusal, suppressed, "connection refused by the sandbox's egress policy");
                }
                return reset(client);
            }
        }
        let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => {
                tracing::debug!(%dst, error = %e, "cannot connect to the destination");
                return reset(client);
            }
            Err(_) => {
                tracing::debug!(%dst, "the destination did not accept in time");
                return reset(client);
            }
        };
        let _ = carry(client, upstream, first.get(..len).unwrap_or_default()).await;
    }

    /// Whether `name` lets a connection to `dst` through.
    pub async fn check(&self, dst: SocketAddr, name: Option<String>) -> Result<(), Refusal> {
        let name = name.ok_or(Refusal::NoName)?;
        let policy = self.policy.get();
        if !policy.allows_name(&name) {
            return Err(Refusal::NameNotAllowed(name));
        }
        let ip = dst.ip().to_canonical();
        if self.guard.iter().any(|n| n.contains(&ip)) || self.host_addrs.contains(&ip) {
            return Err(Refusal::Guarded(name));
        }
        let IpAddr::V4(v4) = ip else {
            return Err(Refusal::NotTheNamesAddress(name));
        };
        let lookup = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
        if !self.resolver.addresses(&lookup).await.contains(&v4) {
            return Err(Refusal::NotTheNamesAddress(name));
        }
        Ok(())
    }
}

/// Reads the client's first bytes into `buf` until they name a host, or
/// cannot, or `buf` is full.
async fn read_name(client: &mut TcpStream, buf: &mut [u8], len: &mut usize) -> Option<String> {
    loop {
        let seen = buf.get(..*len)?;
        let sniff = match seen.first() {
            Some(&0x16) => sni::sniff(seen),
            _ => http::sniff(seen),
        };
        match sniff {
            Sniff::Name(name) => return Some(name),
            Sniff::NoName => return None,
            Sniff::Incomplete => {}
        }
        let n = client.read(buf.get_mut(*len..)?).await.ok()?;
        if n == 0 {
            return None;
        }
        *len = len.checked_add(n)?;
    }
}

/// Sends `first` to `upstream`, then copies both ways until both sides close.
async fn carry(mut client: TcpStream, mut upstream: TcpStream, first: &[u8]) -> io::Result<()> {
    upstream.write_all(first).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Closes `stream` with a reset, so the client learns at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
        )
    ) || e.kind() == io::ErrorKind::ConnectionReset
}
