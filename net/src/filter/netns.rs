//! The listening sockets, created inside the sandbox's network namespace by
//! a short-lived thread that joins it (setns(2) changes only the calling
//! thread's namespace) and hands them back: a socket stays in the namespace
//! it was created in, so the daemon serves the guest's gateway address while
//! its own outbound connections and queries leave from the host's namespace.

use std::fs::File;
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open the sandbox's network namespace {path}; is the sandbox running?")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {path}; airlock-netfilter needs CAP_SYS_ADMIN")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot listen on {addr} ({what}) in the sandbox's network namespace; is the address on the sandbox's tap, and the port free?")]
    Bind {
        addr: SocketAddrV4,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread that joins the sandbox's network namespace failed")]
    Thread(#[source] std::io::Error),
    #[error("the thread that joins the sandbox's network namespace panicked")]
    Panicked,
}

/// A UDP socket bound to `dns` and a TCP listener on `proxy`, both in the
/// network namespace `netns` (a bind-mounted nsfs file), non-blocking.
pub fn bind_in(
    netns: &Path,
    dns: SocketAddrV4,
    proxy: SocketAddrV4,
) -> Result<(UdpSocket, TcpListener), NetnsError> {
    let ns = File::open(netns).map_err(|source| NetnsError::Open {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("netns-bind".into())
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { path, source })?;
            bind(dns, proxy)
        })
        .map_err(NetnsError::Thread)?;
    thread.join().map_err(|_| NetnsError::Panicked)?
}

/// Binds both sockets in the calling thread's namespace.
pub fn bind(
    dns: SocketAddrV4,
    proxy: SocketAddrV4,
) -> Result<(UdpSocket, TcpListener), NetnsError> {
    let bind_err = |addr, what| move |source| NetnsError::Bind { addr, what, source };
    let udp = UdpSocket::bind(dns).map_err(bind_err(dns, "DNS"))?;
    udp.set_nonblocking(true).map_err(bind_err(dns, "DNS"))?;
    let tcp = TcpListener::bind(proxy).map_err(bind_err(proxy, "proxy"))?;
    tcp.set_nonblocking(true)
        .map_err(bind_err(proxy, "proxy"))?;
    Ok((udp, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn binds_on_loopback() {
        let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let (udp, tcp) = bind(any, any).unwrap();
        assert_ne!(udp.local_addr().unwrap().port(), 0);
        assert_ne!(tcp.local_addr().unwrap().port(), 0);
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let e = bind_in(Path::new("/nonexistent/netns"), any, any).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    }
}
