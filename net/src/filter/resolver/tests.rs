//! Reading A records (and CNAME chains) out of upstream answers.

use std::net::Ipv4Addr;

use simple_dns::rdata::{A, CNAME};
use simple_dns::ResourceRecord;

use super::*;

fn answer(qname: &str, records: &[(&str, RData<'static>, u32)]) -> Vec<u8> {
    let mut p = Packet::new_reply(5);
    p.questions.push(Question::new(
        Name::new_unchecked(qname),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    for (owner, rdata, ttl) in records {
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked(owner).into_owned(),
            CLASS::IN,
            *ttl,
            rdata.clone(),
        ));
    }
    p.build_bytes_vec().unwrap()
}

fn a(ip: [u8; 4]) -> RData<'static> {
    RData::A(A {
        address: u32::from(Ipv4Addr::from(ip)),
    })
}

fn cname(target: &'static str) -> RData<'static> {
    RData::CNAME(CNAME(Name::new_unchecked(target)))
}

#[test]
fn a_records_of_the_name() {
    let r = answer(
        "api.example.test",
        &[
            ("api.example.test", a([192, 0, 2, 1]), 300),
            ("api.example.test", a([192, 0, 2, 2]), 30),
            ("other.test", a([198, 51, 100, 1]), 30),
        ],
    );
    let (addrs, ttl) = a_records(&r, "api.example.test").unwrap();
    assert_eq!(
        addrs,
        [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
    );
    assert_eq!(ttl, Duration::from_secs(30));
}

#[test]
fn cname_chains_are_followed() {
    let r = answer(
        "API.example.test",
        &[
            ("api.example.test", cname("edge.cdn.test"), 100),
            ("edge.cdn.test", cname("node.cdn.test"), 50),
            ("node.cdn.test", a([192, 0, 2, 9]), 200),
            ("unrelated.cdn.test", a([192, 0, 2, 10]), 200),
        ],
    );
    let (addrs, ttl) = a_records(&r, "api.example.test").unwrap();
    assert_eq!(addrs, [Ipv4Addr::new(192, 0, 2, 9)]);
    assert_eq!(ttl, Duration::from_secs(50));
}

#[test]
fn a_cname_loop_ends() {
    let r = answer(
        "a.test",
        &[
            ("a.test", cname("b.test"), 1),
            ("b.test", cname("a.test"), 1),
        ],
    );
    assert_eq!(a_records(&r, "a.test").unwrap().0, Vec::<Ipv4Addr>::new());
}

#[test]
fn answers_to_another_question_or_errors_are_not_used() {
    let r = answer("other.test", &[("api.example.test", a([192, 0, 2, 1]), 30)]);
    assert_eq!(a_records(&r, "api.example.test"), None);
    let bytes = answer("api.example.test", &[]);
    let mut p = Packet::parse(&bytes).unwrap();
    *p.rcode_mut() = RCODE::NameError;
    assert_eq!(
        a_records(&p.build_bytes_vec().unwrap(), "api.example.test"),
        None
    );
    assert_eq!(a_records(b"junk", "api.example.test"), None);
    let query = Packet::new_query(1).build_bytes_vec().unwrap();
    assert_eq!(a_records(&query, "api.example.test"), None);
}

#[tokio::test]
async fn no_upstream_answer_is_no_address() {
    // A bound socket that never answers: the lookup gives up after 2 s.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = Resolver::new(vec![silent.local_addr().unwrap()]);
    let started = Instant::now();
    assert!(resolver.addresses("api.example.test").await.is_empty());
    assert!(started.elapsed() >= upstream::TIMEOUT);
}

#[tokio::test]
async fn relayed_answers_are_learned() {
    // No upstream at all: what `addresses` gives is what was learned.
    let resolver = Resolver::new(Vec::new());
    let first = answer(
        "api.example.test",
        &[("api.example.test", a([192, 0, 2, 1]), 30)],
    );
    let second = answer(
        "api.example.test",
        &[("api.example.test", a([192, 0, 2, 2]), 30)],
    );
    let other = answer("other.test", &[("other.test", a([192, 0, 2, 3]), 30)]);
    resolver.learn("api.example.test", &first);
    resolver.learn("api.example.test", &second);
    resolver.learn("api.example.test", &first);
    // An answer to another question teaches nothing about this name.
    resolver.learn("api.example.test", &other);
    assert_eq!(
        resolver.addresses("api.example.test").await,
        [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
    );
    assert!(resolver.addresses("other.test").await.is_empty());
}
