//! The network tests' "internet": servers in a network namespace that the
//! test makes inside the test host, on documentation addresses, with a DNS
//! server of its own. The test host has no network device, so nothing
//! these tests send can leave it.
//!
//! ```text
//! test host (root namespace)        namespace airlock-e2e-inet
//!   e2e-inet 203.0.113.1/24  ─veth─  uplink 203.0.113.2/24
//!   HTTP 203.0.113.1:8080            lo: 198.51.100.10, .20, .21 (HTTP :8080,
//!   (the host's own address)             UDP echo :5353), 192.0.2.53 (DNS :53),
//!   routes to the right via .2           169.254.169.254 and 10.20.0.10 (HTTP)
//! ```
//! Every HTTP server answers `hello from ADDR host=HOST` (HOST: the
//! request's Host header), so a test sees which server it reached, under
//! which name.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

/// The namespace of the test's internet.
pub const NETNS: &str = "airlock-e2e-inet";
/// The test host's own address (on its side of the veth).
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The plain web server.
pub const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// What `api.example.test` resolves to.
pub const API: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// What `other.example.test` resolves to.
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 21);
/// The test's DNS server.
pub const DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
/// The cloud metadata address, served here.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A private (RFC 1918) server.
pub const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);
/// The HTTP port of every server.
pub const HTTP_PORT: u16 = 8080;
/// The UDP echo port.
pub const ECHO_PORT: u16 = 5353;

/// The names the test's DNS answers.
const NAMES: [(&str, Ipv4Addr); 2] = [("api.example.test", API), ("other.example.test", OTHER)];

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test's internet, torn down on drop.
pub struct Internet;

impl Internet {
    /// Makes the namespace, its addresses and routes, and starts the
    /// servers (threads of this process whose sockets live in it).
    pub fn start() -> Self {
        assert!(
            std::env::var_os("AIRLOCK_TESTHOST").is_some() || crate::real_kvm(),
            "the test internet is made only inside the test host (or on a KVM host)"
        );
        let _ = Command::new("ip").args(["netns", "delete", NETNS]).output();
        let _ = Command::new("ip")
            .args(["link", "delete", "e2e-inet"])
            .output();
        sh(&["ip", "netns", "add", NETNS]);
        sh(&[
            "ip", "link", "add", "e2e-inet", "type", "veth", "peer", "name", "uplink", "netns",
            NETNS,
        ]);
        sh(&["ip", "addr", "add", "203.0.113.1/24", "dev", "e2e-inet"]);
        sh(&["ip", "link", "set", "e2e-inet", "up"]);
        let n = |args: &[&str]| {
            let mut v = vec!["ip", "-n", NETNS];
            v.extend_from_slice(args);
            sh(&v);
        };
        n(&["link", "set", "lo", "up"]);
        n(&["addr", "add", "203.0.113.2/24", "dev", "uplink"]);
        n(&["link", "set", "uplink", "up"]);
        for a in [WEB, API, OTHER, DNS, METADATA, PRIVATE] {
            n(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        n(&["route", "add", "default", "via", "203.0.113.1"]);
        for net in [
            "198.51.100.0/24",
            "192.0.2.0/24",
            "169.254.169.254/32",
            "10.20.0.0/24",
        ] {
            sh(&["ip", "route", "add", net, "via", "203.0.113.2"]);
        }
        // The host's own server, in the root namespace.
        serve_http(TcpListener::bind((HOST_ADDR, HTTP_PORT)).expect("bind the host's server"));
        in_netns(|| {
            serve_http(TcpListener::bind((Ipv4Addr::UNSPECIFIED, HTTP_PORT)).expect("bind HTTP"));
            serve_dns(UdpSocket::bind((DNS, 53)).expect("bind DNS"));
            // Bound to each address: replies must come from the address
            // asked (a wildcard socket answers from the uplink's).
            for a in [WEB, API, OTHER] {
                serve_echo(UdpSocket::bind((a, ECHO_PORT)).expect("bind echo"));
            }
        });
        Internet
    }

    /// The runtime config that makes `airlock` use the test's DNS server.
    pub fn config_toml() -> String {
        format!("[network]\ndns = [\"{DNS}\"]\n")
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", NETNS]).output();
        let _ = Command::new("ip")
            .args(["link", "delete", "e2e-inet"])
            .output();
    }
}

/// Runs `f` on a thread inside the internet's namespace.
fn in_netns(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns =
                std::fs::File::open(format!("/run/netns/{NETNS}")).expect("open the namespace");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
            // SAFETY: setns on an open namespace descriptor; it changes
            // only this thread's network namespace.
            let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f();
        })
        .join()
        .expect("namespace thread");
    });
}

/// What each HTTP server received first on each connection: "ADDR:PORT
/// first bytes", so that a test can tell a connection the policy refused
/// from one the server answered.
static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The connections the servers have seen (and forgets them).
pub fn take_seen() -> Vec<String> {
    std::mem::take(&mut *SEEN.lock().unwrap_or_else(|e| e.into_inner()))
}

fn serve_http(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let seen_as = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if req.is_empty() {
                                let first = String::from_utf8_lossy(&buf[..n.min(64)]).into_owned();
                                SEEN.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(format!("{seen_as} {first}"));
                            }
                            req.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let host = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Host:").or_else(|| l.strip_prefix("host:")))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let local = conn
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let body = format!("hello from {local} host={host}\n");
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

fn serve_echo(socket: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
}

fn serve_dns(socket: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let Some(reply) = dns_reply(&buf[..n]) {
                let _ = socket.send_to(&reply, from);
            }
        }
    });
}

/// The answer to one query: A records for [`NAMES`], NXDOMAIN otherwise
/// (an empty answer for other types of a known name). Written out here:
/// the test's DNS server must not share code with the filter it tests.
pub fn dns_reply(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = query.get(12..i + 4)?;
    let name = labels.join(".");
    let addr = NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a);
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&query[..2]);
    let rcode = if addr.is_some() { 0 } else { 3 };
    r.extend_from_slice(&[0x81, 0x80 | rcode]);
    let answers = u16::from(addr.is_some() && qtype == 1);
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&answers.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    if let (Some(a), 1) = (addr, answers) {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

/// Whether a TCP connection from here (the host) to `addr` is accepted.
pub fn reachable(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_answers_known_names_and_nxdomain_otherwise() {
        let query = |name: &str| {
            let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for l in name.split('.') {
                q.push(l.len() as u8);
                q.extend_from_slice(l.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            q
        };
        let r = dns_reply(&query("API.example.test")).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(&r[r.len() - 4..], &API.octets());
        let r = dns_reply(&query("nope.example.test")).unwrap();
        assert_eq!(r[3] & 0x0f, 3);
        assert_eq!(dns_reply(&[1, 2, 3]), None);
    }
}
