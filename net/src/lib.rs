//! Airlock's egress policy and its enforcement on the host.
//!
//! [`policy`] is what `airlock run --net egress --allow-out/--deny-out` says;
//! [`filter`] is `airlock-netfilter`, which enforces its domain rules.
//!
//! # How domain rules hold against the tenant
//!
//! Everything is enforced on the host; the guest is trusted with nothing. An
//! address rule (CIDR or IP) is enforced by nft alone, in the sandbox's
//! network namespace. A domain rule (`api.example.test`, `*.example.test`)
//! cannot be, since packets carry addresses, not names; three things make it
//! hold against a tenant that runs its own resolver or connects to an IP
//! literal:
//!
//! 1. **DNS answers are filtered.** The guest's resolv.conf names its
//!    gateway, where `airlock-netfilter` forwards queries to the sandbox's
//!    upstream DNS. When the policy denies all of IPv4 (`--deny-out
//!    0.0.0.0/0`), only allowed names are forwarded; every other gets
//!    REFUSED, so DNS can be used neither to learn addresses nor to carry
//!    data out in query names. (Queries to other servers are ordinary
//!    traffic: UDP to a denied address is rejected by nft.)
//! 2. **TCP to denied destinations is proxied and checked twice.** When the
//!    policy has domain rules, nft redirects (DNAT) every TCP connection
//!    whose destination is denied (by `--deny-out` or the defaults) and not
//!    allowed by an address rule to the proxy. The proxy reads the first
//!    bytes: the name in the TLS ClientHello (SNI) or the HTTP Host header
//!    must be allowed, AND the connection's original destination (from
//!    conntrack) must be one of the addresses that name has, as the
//!    upstream DNS gave them (to the proxy's own lookup, or in an answer
//!    the forwarder relayed), never as the tenant says. An IP literal
//!    (no name, or an address as the name), another name, or an allowed
//!    name sent to an address that is not its own is refused with a reset.
//!    A name never opens the default denials (private, loopback,
//!    link-local and metadata, CGNAT, multicast) or the host's addresses:
//!    only an address rule does.
//! 3. **UDP is judged by address only.** It is never proxied: UDP to a
//!    denied destination is rejected by nft, whatever name it was for.
//!
//! What this does not stop: after the check, the connection is the
//! tenant's. A server or CDN that serves several names on the allowed
//! name's addresses can be asked for another one inside the connection (a
//! second HTTP request with another Host on a kept-alive connection, or an
//! HTTP/2 `:authority` inside TLS: "domain fronting"). Allowing a name
//! means trusting whoever serves it.

pub mod filter;
pub mod policy;
