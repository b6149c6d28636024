//! The DNS forwarder end to end on 127.0.0.1: a client, the forwarder, and
//! a fake upstream server.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use airlock_net::filter::daemon::reload;
use airlock_net::filter::dns::Forwarder;
use airlock_net::filter::resolver::Resolver;
use airlock_net::filter::{netns, PolicyHandle};
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::net::UdpSocket;

use common::FakeUpstream;

const API: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

/// A forwarder on 127.0.0.1 whose policy is the JSON in a file (returned,
/// for reloads), asking `upstream`.
async fn forwarder(
    upstream: SocketAddr,
    policy_json: &str,
) -> (SocketAddr, PolicyHandle, tempfile::TempDir, Arc<Resolver>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.json");
    std::fs::write(&file, policy_json).unwrap();
    let policy = PolicyHandle::default();
    reload(&file, &policy);
    let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    let (udp, _tcp) = netns::bind(any, any).unwrap();
    let socket = UdpSocket::from_std(udp).unwrap();
    let addr = socket.local_addr().unwrap();
    let resolver = Arc::new(Resolver::new(vec![upstream]));
    let f = Forwarder {
        socket: Arc::new(socket),
        upstream: vec![upstream].into(),
        policy: policy.clone(),
        resolver: resolver.clone(),
    };
    tokio::spawn(f.serve());
    (addr, policy, dir, resolver)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().unwrap()
}

/// The forwarder's reply to a query for `name`, if one comes within 3 s.
async fn ask(forwarder: SocketAddr, id: u16, name: &str) -> Option<Vec<u8>> {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&query(id, name), forwarder).await.unwrap();
    let mut buf = vec![0; 4096];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    assert_eq!(from, forwarder);
    Some(buf[..n].to_vec())
}

fn addresses(reply: &[u8]) -> Vec<Ipv4Addr> {
    Packet::parse(reply)
        .unwrap()
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            simple_dns::rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

fn rcode(reply: &[u8]) -> RCODE {
    Packet::parse(reply).unwrap().rcode()
}

#[tokio::test]
async fn allowed_names_are_relayed_and_others_refused() {
    let upstream =
        FakeUpstream::start(&[("api.example.test", &[API]), ("other.test", &[OTHER])]).await;
    let closed = r#"{"allow": ["api.example.test"], "deny": ["0.0.0.0/0"]}"#;
    let (fwd, _, _dir, resolver) = forwarder(upstream.addr, closed).await;

    let reply = ask(fwd, 0x1111, "api.example.test").await.unwrap();
    assert_eq!(Packet::parse(&reply).unwrap().id(), 0x1111);
    assert_eq!(rcode(&reply), RCODE::NoError);
    assert_eq!(addresses(&reply), [API]);
    assert_eq!(reply, upstream.last_reply(), "not relayed verbatim");
    assert_eq!(upstream.queries(), 1);

    let reply = ask(fwd, 0x2222, "other.test").await.unwrap();
    assert_eq!(Packet::parse(&reply).unwrap().id(), 0x2222);
    assert_eq!(rcode(&reply), RCODE::Refused);
    assert!(addresses(&reply).is_empty());
    assert_eq!(upstream.queries(), 1, "a refused name reached the upstream");

    // The proxy's resolver learned the relayed answer: no lookup of its own.
    assert_eq!(resolver.addresses("api.example.test").await, [API]);
    assert_eq!(upstream.queries(), 1);
}

#[tokio::test]
async fn everything_is_relayed_when_ipv4_is_not_all_denied() {
    let upstream = FakeUpstream::start(&[("other.test", &[OTHER])]).await;
    let (fwd, _, _dir, _) = forwarder(upstream.addr, r#"{"allow": ["api.example.test"]}"#).await;
    let reply = ask(fwd, 7, "other.test").await.unwrap();
    assert_eq!(addresses(&reply), [OTHER]);
    // The upstream's NXDOMAIN is relayed as it is.
    let reply = ask(fwd, 8, "missing.test").await.unwrap();
    assert_eq!(rcode(&reply), RCODE::NameError);
}

#[tokio::test]
async fn malformed_queries_get_no_answer() {
    let upstream = FakeUpstream::start(&[]).await;
    let (fwd, _, _dir, _) = forwarder(upstream.addr, "{}").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(b"not a DNS message at all", fwd)
        .await
        .unwrap();
    let mut buf = [0; 512];
    let got = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await;
    assert!(got.is_err(), "a malformed query was answered");
    assert_eq!(upstream.queries(), 0);
}

#[tokio::test]
async fn a_reloaded_policy_applies_to_the_next_query() {
    let upstream =
        FakeUpstream::start(&[("api.example.test", &[API]), ("other.test", &[OTHER])]).await;
    let (fwd, policy, dir, _) = forwarder(
        upstream.addr,
        r#"{"allow": ["api.example.test"], "deny": ["0.0.0.0/0"]}"#,
    )
    .await;
    assert_eq!(
        rcode(&ask(fwd, 1, "other.test").await.unwrap()),
        RCODE::Refused
    );

    let file = dir.path().join("policy.json");
    std::fs::write(&file, r#"{"allow": ["*.test"], "deny": ["0.0.0.0/0"]}"#).unwrap();
    reload(&file, &policy);
    assert_eq!(
        addresses(&ask(fwd, 2, "other.test").await.unwrap()),
        [OTHER]
    );

    // A broken file leaves the policy in force.
    std::fs::write(&file, r#"{"allow": ["ex ample"]}"#).unwrap();
    reload(&file, &policy);
    assert_eq!(
        addresses(&ask(fwd, 3, "other.test").await.unwrap()),
        [OTHER]
    );

    std::fs::write(&file, r#"{"deny": ["0.0.0.0/0"]}"#).unwrap();
    reload(&file, &policy);
    assert_eq!(
        rcode(&ask(fwd, 4, "api.example.test").await.unwrap()),
        RCODE::Refused
    );
}
