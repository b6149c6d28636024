//! The egress filter's parsers of what a tenant sends first: the proxy's
//! TLS ClientHello (SNI) and HTTP request (Host) readers, over every
//! prefix as a connection's bytes arrive, and the DNS forwarder's verdict
//! on a query, under a policy that names domains and denies all else.
//! Whatever the bytes, they must answer (a name, "more", or no) without
//! panicking, and a name they return must be one the bytes hold.

use airlock_net::filter::dns::judge;
use airlock_net::filter::{http, sni, PolicyHandle};
use airlock_net::policy::{parse_deny, Policy};

/// The whole input is a connection's first bytes, and a DNS query.
pub fn egress_first_bytes(data: &[u8]) {
    for end in [1, 5, 9, 43, data.len() / 2, data.len()] {
        let Some(prefix) = data.get(..end.min(data.len())) else {
            continue;
        };
        let _ = sni::sniff(prefix);
        let _ = http::sniff(prefix);
        for name in [sni::server_name(prefix), http::host(prefix)]
            .into_iter()
            .flatten()
        {
            let lower = String::from_utf8_lossy(prefix).to_ascii_lowercase();
            assert!(
                lower.contains(&name.to_ascii_lowercase()),
                "a name not in the bytes: {name:?}"
            );
        }
    }
    let mut policy = Policy::default();
    if let (Ok(allow), Ok(deny)) = ("*.example.test".parse(), parse_deny("0.0.0.0/0")) {
        policy.allow.push(allow);
        policy.deny.push(deny);
    }
    let _ = judge(data, &PolicyHandle::new(policy));
}
