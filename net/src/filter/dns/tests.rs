//! The forwarder's verdicts on single datagrams.

use simple_dns::{Name, Question, CLASS, QCLASS, QTYPE, TYPE};

use super::*;
use crate::policy::Policy;

fn query(id: u16, names: &[&str]) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    for name in names {
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
    }
    p.build_bytes_vec().unwrap()
}

fn handle(json: &str) -> PolicyHandle {
    PolicyHandle::new(serde_json::from_str::<Policy>(json).unwrap())
}

fn closed() -> PolicyHandle {
    handle(r#"{"allow": ["api.example.test", "*.wild.test"], "deny": ["0.0.0.0/0"]}"#)
}

#[test]
fn everything_is_forwarded_unless_all_of_ipv4_is_denied() {
    let open = handle(r#"{"allow": ["api.example.test"], "deny": ["198.51.100.0/24"]}"#);
    assert_eq!(
        judge(&query(1, &["other.test"]), &open),
        Verdict::Forward(None)
    );
    assert_eq!(
        judge(&query(1, &["api.example.test"]), &open),
        Verdict::Forward(Some("api.example.test".into()))
    );
    assert_eq!(
        judge(&query(1, &["x"]), &PolicyHandle::default()),
        Verdict::Forward(None)
    );
}

#[test]
fn allowed_names_are_forwarded_when_closed() {
    for name in [
        "api.example.test",
        "API.EXAMPLE.TEST",
        "a.wild.test",
        "a.b.wild.test",
    ] {
        assert_eq!(
            judge(&query(7, &[name]), &closed()),
            Verdict::Forward(Some(name.to_ascii_lowercase())),
            "{name}"
        );
    }
}

#[test]
fn other_names_are_refused_when_closed() {
    for name in [
        "other.test",
        "example.test",
        "wild.test",
        "api.example.test.evil",
        "api.example.test.a.b",
    ] {
        let q = query(0x4242, &[name]);
        let Verdict::Answer(reply) = judge(&q, &closed()) else {
            panic!("{name} not refused");
        };
        let reply = Packet::parse(&reply).unwrap();
        assert_eq!(reply.id(), 0x4242);
        assert!(reply.has_flags(PacketFlag::RESPONSE));
        assert!(reply.has_flags(PacketFlag::RECURSION_DESIRED));
        assert_eq!(reply.rcode(), RCODE::Refused);
        let [question] = &reply.questions[..] else {
            panic!("{name}: not one question");
        };
        assert_eq!(question.qname.to_string(), name);
        assert_eq!(question.qtype, QTYPE::TYPE(TYPE::A));
        assert!(reply.answers.is_empty());
    }
}

#[test]
fn a_label_holding_a_dot_matches_no_rule() {
    // One label "api.example" then "test": printed, it would read as an
    // allowed name.
    let labels = [
        simple_dns::Label::new_unchecked(&b"api.example"[..]),
        simple_dns::Label::new_unchecked(&b"test"[..]),
    ];
    let mut p = Packet::new_query(3);
    p.questions.push(Question::new(
        Name::new_with_labels(&labels),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let q = p.build_bytes_vec().unwrap();
    assert!(matches!(judge(&q, &closed()), Verdict::Answer(_)));
    assert_eq!(judge(&q, &PolicyHandle::default()), Verdict::Forward(None));
}

#[test]
fn malformed_messages_are_dropped() {
    let good = query(9, &["api.example.test"]);
    assert_eq!(judge(&[], &closed()), Verdict::Drop);
    assert_eq!(judge(&good[..11], &closed()), Verdict::Drop);
    assert_eq!(judge(&good[..good.len() - 1], &closed()), Verdict::Drop);
    assert_eq!(judge(b"GET / HTTP/1.1\r\n\r\n", &closed()), Verdict::Drop);
    assert_eq!(judge(&query(9, &[]), &closed()), Verdict::Drop);
    assert_eq!(
        judge(&query(9, &["a.test", "b.test"]), &closed()),
        Verdict::Drop
    );
    // A response, not a query.
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(judge(&response, &closed()), Verdict::Drop);
    // Counts that claim 65535 answer records.
    let mut huge = good.clone();
    huge[6] = 0xff;
    huge[7] = 0xff;
    assert_eq!(judge(&huge, &closed()), Verdict::Drop);
}

#[test]
fn no_panic_on_any_corruption() {
    let good = query(9, &["api.example.test"]);
    for i in 0..good.len() {
        for v in [0u8, 0x3f, 0xc0, 0xff] {
            let mut c = good.clone();
            c[i] = v;
            let _ = judge(&c, &closed());
        }
    }
}
