//! The proxy end to end on 127.0.0.1: a client, the proxy (the original
//! destination supplied by the test, as conntrack would), an echo server as
//! the destination, and a fake upstream DNS server for the proxy's lookups.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_net::filter::proxy::{OriginalDst, Proxy, Refusal};
use airlock_net::filter::resolver::Resolver;
use airlock_net::filter::PolicyHandle;
use airlock_net::policy::Policy;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{client_hello, FakeUpstream};

/// The destination every connection was "redirected from".
struct Fixed(SocketAddr);

impl OriginalDst for Fixed {
    fn original_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

/// A server that reads until the client half-closes, then answers
/// `echo:` and what it read, counting the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(b"echo:").await.unwrap();
                s.write_all(&got).await.unwrap();
            });
        }
    });
    (addr, accepted)
}

const POLICY: &str =
    r#"{"allow": ["api.example.test", "elsewhere.example.test"], "deny": ["0.0.0.0/0"]}"#;

/// A proxy on 127.0.0.1 for connections "to" `dst`; `api.example.test`
/// resolves to 127.0.0.1, `elsewhere.example.test` to 127.0.0.2. `guard` is
/// empty (the test servers are on loopback, which the daemon's guard, the
/// default denials, closes to names) unless given.
async fn proxy(dst: SocketAddr, policy: &str, guard: Vec<IpNet>) -> SocketAddr {
    let upstream = FakeUpstream::start(&[
        ("api.example.test", &[Ipv4Addr::LOCALHOST]),
        ("elsewhere.example.test", &[Ipv4Addr::new(127, 0, 0, 2)]),
    ])
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Arc::new(Proxy {
        policy: PolicyHandle::new(serde_json::from_str::<Policy>(policy).unwrap()),
        resolver: Arc::new(Resolver::new(vec![upstream.addr])),
        original_dst: Arc::new(Fixed(dst)),
        host_addrs: Vec::new(),
        guard,
    });
    tokio::spawn(proxy.serve(listener));
    addr
}

/// Sends `bytes` through the proxy, half-closes, and returns what came
/// back (`None`: the connection was reset or closed with nothing).
async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut c = TcpStream::connect(proxy).await.unwrap();
    // A refused connection may be reset before or after these.
    let _ = c.write_all(bytes).await;
    let _ = c.shutdown().await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .expect("the proxy neither answered nor closed");
    match read {
        Ok(_) if !got.is_empty() => Some(got),
        _ => None,
    }
}

fn request(host: &str) -> Vec<u8> {
    format!("POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n\r\nbody").into_bytes()
}

#[tokio::test]
async fn an_allowed_host_passes_both_ways() {
    let (server, accepted) = echo_server().await;
    let p = proxy(server, POLICY, Vec::new()).await;
    let req = request("API.example.test:8080");
    let got = exchange(p, &req).await.expect("refused");
    assert_eq!(got, [&b"echo:"[..], &req].concat());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_allowed_sni_passes_both_ways() {
    let (server, _) = echo_server().await;
    let p = proxy(server, POLICY, Vec::new()).await;
    let hello = [client_hello("api.example.test"), b"more".to_vec()].concat();
    let got = exchange(p, &hello).await.expect("refused");
    assert_eq!(got, [&b"echo:"[..], &hello].concat());
}

#[tokio::test]
async fn other_names_literals_and_wrong_addresses_are_refused() {
    let (server, accepted) = echo_server().await;
    let p = proxy(server, POLICY, Vec::new()).await;
    for (what, bytes) in [
        ("another Host", request("other.test")),
        ("an IP-literal Host", request("127.0.0.1")),
        (
            "an allowed Host whose addresses are elsewhere",
            request("elsewhere.example.test"),
        ),
        ("another SNI", client_hello("other.test")),
        (
            "an allowed SNI whose addresses are elsewhere",
            client_hello("elsewhere.example.test"),
        ),
        (
            "no name at all",
            b"\x00\x01binary protocol\r\n\r\n".to_vec(),
        ),
        ("nothing", Vec::new()),
    ] {
        assert_eq!(exchange(p, &bytes).await, None, "{what} passed");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused connection reached the server"
    );
}

#[tokio::test]
async fn the_guard_keeps_names_off_loopback() {
    let (server, accepted) = echo_server().await;
    let p = proxy(server, POLICY, Policy::default_denials()).await;
    assert_eq!(exchange(p, &request("api.example.test")).await, None);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_address_rule_needs_no_name() {
    let (server, _) = echo_server().await;
    let policy = r#"{"allow": ["127.0.0.1", "api.example.test"], "deny": ["0.0.0.0/0"]}"#;
    let p = proxy(server, policy, Policy::default_denials()).await;
    let got = exchange(p, b"raw bytes").await.expect("refused");
    assert_eq!(got, b"echo:raw bytes");
}

#[tokio::test]
async fn check_names_the_reason() {
    let upstream =
        FakeUpstream::start(&[("api.example.test", &[Ipv4Addr::new(192, 0, 2, 1)])]).await;
    let proxy = Proxy {
        policy: PolicyHandle::new(serde_json::from_str::<Policy>(POLICY).unwrap()),
        resolver: Arc::new(Resolver::new(vec![upstream.addr])),
        original_dst: Arc::new(Fixed("192.0.2.1:443".parse().unwrap())),
        host_addrs: vec![IpAddr::from([203, 0, 113, 5])],
        guard: Policy::default_denials(),
    };
    let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
    let name = |s: &str| Some(s.to_string());
    assert_eq!(proxy.check(dst, name("api.example.test.")).await, Ok(()));
    assert_eq!(proxy.check(dst, None).await, Err(Refusal::NoName));
    assert_eq!(
        proxy.check(dst, name("other.test")).await,
        Err(Refusal::NameNotAllowed("other.test".into()))
    );
    assert_eq!(
        proxy
            .check("192.0.2.2:443".parse().unwrap(), name("api.example.test"))
            .await,
        Err(Refusal::NotTheNamesAddress("api.example.test".into()))
    );
    assert_eq!(
        proxy
            .check("203.0.113.5:443".parse().unwrap(), name("api.example.test"))
            .await,
        Err(Refusal::Guarded("api.example.test".into()))
    );
    assert_eq!(
        proxy
            .check(
                "169.254.169.254:80".parse().unwrap(),
                name("api.example.test")
            )
            .await,
        Err(Refusal::Guarded("api.example.test".into()))
    );
    // Cached: one lookup for the three that got that far.
    assert_eq!(upstream.queries(), 1);
}
