//! One DNS exchange with the sandbox's upstream servers over UDP, from the
//! host's root network namespace: each server in turn, 2 s each, on a fresh
//! socket (a random source port) connected to that server, so that only its
//! datagrams are read, and only one carrying the query's id is taken.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::timeout_at;

/// How long one upstream server has to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest UDP DNS message.
const MAX_MESSAGE: usize = 65535;

/// The first answer to `query` from `servers`, tried in turn; `None` if
/// none answered in time.
pub async fn exchange(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for &server in servers {
        match ask(query, id, server).await {
            Ok(Some(answer)) => return Some(answer),
            Ok(None) => tracing::debug!(%server, "no answer from upstream DNS in time"),
            Err(e) => tracing::debug!(%server, error = %e, "upstream DNS failed"),
        }
    }
    None
}

async fn ask(query: &[u8], id: &[u8], server: SocketAddr) -> std::io::Result<Option<Vec<u8>>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let Ok(received) = timeout_at(deadline, socket.recv(&mut buf)).await else {
            return Ok(None);
        };
        let n = received?;
        let answer = buf.get(..n).unwrap_or_default();
        if answer.get(..2) == Some(id) {
            return Ok(Some(answer.to_vec()));
        }
    }
}
