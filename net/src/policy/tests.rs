//! The policy's parsing, matching and precedence.

use super::*;

fn rule(s: &str) -> AllowRule {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn policy(allow: &[&str], deny: &[&str]) -> Policy {
    Policy {
        allow: allow.iter().map(|s| rule(s)).collect(),
        deny: deny.iter().map(|s| parse_deny(s).unwrap()).collect(),
    }
}

#[test]
fn allow_rules_parse() {
    assert_eq!(rule("192.0.2.1"), AllowRule::Net(net("192.0.2.1/32")));
    assert_eq!(rule("192.0.2.0/24"), AllowRule::Net(net("192.0.2.0/24")));
    assert_eq!(rule("2001:db8::/32"), AllowRule::Net(net("2001:db8::/32")));
    assert_eq!(rule("2001:db8::1"), AllowRule::Net(net("2001:db8::1/128")));
    assert_eq!(
        rule("api.example.test"),
        AllowRule::Domain("api.example.test".into())
    );
    assert_eq!(
        rule("API.Example.TEST."),
        AllowRule::Domain("api.example.test".into())
    );
    assert_eq!(
        rule("*.example.test"),
        AllowRule::Wildcard("example.test".into())
    );
    assert_eq!(rule("*.test"), AllowRule::Wildcard("test".into()));
    assert_eq!(
        rule("a-b.c9.example"),
        AllowRule::Domain("a-b.c9.example".into())
    );
}

#[test]
fn allow_rules_round_trip() {
    for s in [
        "192.0.2.1",
        "192.0.2.0/24",
        "0.0.0.0/0",
        "2001:db8::/32",
        "2001:db8::1",
        "api.example.test",
        "*.example.test",
    ] {
        assert_eq!(rule(s).to_string(), s);
        assert_eq!(rule(&rule(s).to_string()), rule(s));
    }
}

#[test]
fn bad_allow_rules_have_clear_errors() {
    let err = |s: &str| s.parse::<AllowRule>().unwrap_err().to_string();
    assert_eq!(
        err("300.1.1.1/33"),
        r#"--allow-out "300.1.1.1/33": not a CIDR, IP address or domain name"#
    );
    assert_eq!(
        err("ex ample"),
        r#"--allow-out "ex ample": not a CIDR, IP address or domain name (a domain is letters, digits, hyphens and dots, optionally starting with "*.")"#
    );
    assert_eq!(
        err("300.1.1.1"),
        r#"--allow-out "300.1.1.1": not a CIDR, IP address or domain name"#
    );
    assert_eq!(
        err("192.0.2.1/24"),
        r#"--allow-out "192.0.2.1/24": the address has host bits set; write the network as 192.0.2.0/24"#
    );
    for bad in [
        "",
        "localhost",
        "*",
        "*.",
        "a.*.example.test",
        "*example.test",
        "**.example.test",
        "-a.example.test",
        "a-.example.test",
        "a..example.test",
        ".example.test",
        "exa_mple.test",
        "exämple.test",
        "example.test..",
    ] {
        assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn name_length_limits() {
    let label63 = "a".repeat(63);
    assert!(format!("{label63}.test").parse::<AllowRule>().is_ok());
    assert!(format!("{}.test", "a".repeat(64))
        .parse::<AllowRule>()
        .is_err());
    // 4 * 63 + 3 dots = 255 > 253.
    let long = [label63.as_str(); 4].join(".");
    assert!(long.parse::<AllowRule>().is_err());
    let fits = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(61));
    assert_eq!(fits.len(), 253);
    assert!(fits.parse::<AllowRule>().is_ok());
    // The wildcard's "*." counts.
    let base = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(60));
    assert!(format!("*.{base}").parse::<AllowRule>().is_err());
}

#[test]
fn deny_takes_addresses_only() {
    assert_eq!(parse_deny("0.0.0.0/0").unwrap(), net("0.0.0.0/0"));
    assert_eq!(parse_deny("198.51.100.7").unwrap(), net("198.51.100.7/32"));
    assert_eq!(parse_deny("::/0").unwrap(), net("::/0"));
    assert_eq!(
        parse_deny("example.com").unwrap_err().to_string(),
        r#"--deny-out "example.com": --deny-out takes a CIDR or IP address"#
    );
    assert_eq!(
        parse_deny("300.1.1.1/33").unwrap_err().to_string(),
        r#"--deny-out "300.1.1.1/33": not a CIDR or IP address"#
    );
    assert_eq!(
        parse_deny("10.1.2.3/8").unwrap_err().to_string(),
        r#"--deny-out "10.1.2.3/8": the address has host bits set; write the network as 10.0.0.0/8"#
    );
}

#[test]
fn names_match_exactly_or_below_a_wildcard() {
    let p = policy(&["api.example.test", "*.wild.test"], &[]);
    assert!(p.allows_name("api.example.test"));
    assert!(p.allows_name("API.Example.Test."));
    assert!(!p.allows_name("www.api.example.test"));
    assert!(!p.allows_name("example.test"));
    assert!(!p.allows_name("api.example.test.evil"));
    assert!(p.allows_name("a.wild.test"));
    assert!(p.allows_name("a.b.wild.test"));
    assert!(p.allows_name("A.WILD.TEST."));
    assert!(!p.allows_name("wild.test"));
    assert!(!p.allows_name(".wild.test"));
    assert!(!p.allows_name("notwild.test"));
    assert!(!p.allows_name(""));
    assert!(!policy(&["192.0.2.0/24"], &[]).allows_name("api.example.test"));
}

#[test]
fn domains_and_nets_are_told_apart() {
    let p = policy(&["192.0.2.0/24", "api.example.test"], &[]);
    assert!(p.has_domains());
    assert_eq!(p.allowed_nets().collect::<Vec<_>>(), [&net("192.0.2.0/24")]);
    assert!(!policy(&["192.0.2.0/24"], &[]).has_domains());
    assert!(policy(&["*.x.test"], &[]).has_domains());
}

#[test]
fn resolving_is_limited_only_when_all_of_ipv4_is_denied() {
    let open = policy(&["api.example.test"], &["198.51.100.0/24"]);
    assert!(!open.denies_all_v4());
    assert!(open.resolves("anything.test"));
    let closed = policy(&["api.example.test"], &["0.0.0.0/0"]);
    assert!(closed.denies_all_v4());
    assert!(closed.resolves("api.example.test"));
    assert!(!closed.resolves("anything.test"));
    // ::/0 is not all of IPv4.
    assert!(!policy(&[], &["::/0"]).denies_all_v4());
}

#[test]
fn defaults_are_denied() {
    let p = Policy::default();
    for denied in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.96.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fd00::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ] {
        assert!(!p.allows_ip(ip(denied), &[]), "{denied} allowed");
    }
    for allowed in [
        "192.0.2.1",
        "8.8.8.8",
        "172.32.0.1",
        "100.128.0.1",
        "2001:db8::1",
    ] {
        assert!(p.allows_ip(ip(allowed), &[]), "{allowed} denied");
    }
}

#[test]
fn host_addresses_are_denied() {
    let host = [ip("203.0.113.5"), ip("2001:db8::5")];
    let p = Policy::default();
    assert!(!p.allows_ip(ip("203.0.113.5"), &host));
    assert!(!p.allows_ip(ip("::ffff:203.0.113.5"), &host));
    assert!(!p.allows_ip(ip("2001:db8::5"), &host));
    assert!(p.allows_ip(ip("203.0.113.6"), &host));
}

#[test]
fn allow_beats_deny_and_defaults() {
    let p = policy(
        &["198.51.100.0/25", "10.0.0.5", "203.0.113.5"],
        &["198.51.100.0/24", "0.0.0.0/0"],
    );
    assert!(p.allows_ip(ip("198.51.100.1"), &[]));
    assert!(!p.allows_ip(ip("198.51.100.200"), &[]));
    assert!(!p.allows_ip(ip("8.8.8.8"), &[]));
    assert!(p.allows_ip(ip("10.0.0.5"), &[]));
    assert!(!p.allows_ip(ip("10.0.0.6"), &[]));
    assert!(p.allows_ip(ip("203.0.113.5"), &[ip("203.0.113.5")]));
}

#[test]
fn json_form() {
    let json = r#"{"allow":["192.0.2.0/24","api.example.test","*.x.test"],"deny":["0.0.0.0/0"]}"#;
    let p: Policy = serde_json::from_str(json).unwrap();
    assert_eq!(
        p,
        policy(
            &["192.0.2.0/24", "api.example.test", "*.x.test"],
            &["0.0.0.0/0"]
        )
    );
    assert_eq!(serde_json::to_string(&p).unwrap(), json);
    let host: Policy =
        serde_json::from_str(r#"{"allow":["192.0.2.7"],"deny":["198.51.100.1"]}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&host).unwrap(),
        r#"{"allow":["192.0.2.7"],"deny":["198.51.100.1"]}"#
    );
    assert_eq!(
        serde_json::from_str::<Policy>("{}").unwrap(),
        Policy::default()
    );
    for bad in [
        r#"{"allow":["ex ample"]}"#,
        r#"{"deny":["example.com"]}"#,
        r#"{"deny":["10.1.2.3/8"]}"#,
        r#"{"allow":[],"other":1}"#,
    ] {
        assert!(serde_json::from_str::<Policy>(bad).is_err(), "{bad}");
    }
    let e = serde_json::from_str::<Policy>(r#"{"allow":["ex ample"]}"#).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a CIDR, IP address or domain name"),
        "{e}"
    );
}
