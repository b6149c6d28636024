//! A sandbox's egress policy: what `--allow-out` and `--deny-out` say, parsed
//! and checked once, and the questions the host's enforcement asks of it.
//!
//! Allow rules are CIDRs, IP addresses, domains or `*.domain` wildcards; deny
//! rules are CIDRs or IP addresses only (a name cannot be denied: a tenant
//! would reach the same addresses under another name). An allow beats a deny
//! (as in E2B), and beats the default denials too: the host's own addresses,
//! loopback, link-local (incl. the cloud metadata address), RFC 1918, CGNAT,
//! `0.0.0.0/8`, multicast and broadcast, and their IPv6 counterparts, which
//! are denied even in `egress` mode unless allowed explicitly.
//!
//! The policy is written as JSON for `airlock-netfilter`:
//! `{"allow": ["192.0.2.0/24", "api.example.test", "*.x.test"], "deny": ["0.0.0.0/0"]}`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest domain name (RFC 1035, without the trailing dot).
const MAX_NAME: usize = 253;
/// The longest label of a domain name (RFC 1035).
const MAX_LABEL: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("--allow-out {0:?}: not a CIDR, IP address or domain name")]
    NotAnAddress(String),
    #[error(
        "--allow-out {0:?}: not a CIDR, IP address or domain name (a domain is letters, digits, \
         hyphens and dots, optionally starting with \"*.\")"
    )]
    BadDomain(String),
    #[error("{flag} {input:?}: the address has host bits set; write the network as {network}")]
    HostBits {
        flag: &'static str,
        input: String,
        network: IpNet,
    },
    #[error("--deny-out {0:?}: --deny-out takes a CIDR or IP address")]
    DenyDomain(String),
    #[error("--deny-out {0:?}: not a CIDR or IP address")]
    DenyNotAddress(String),
}

/// One `--allow-out` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AllowRule {
    /// A CIDR (an IP address is a /32 or /128).
    Net(IpNet),
    /// Exactly this name (lowercase, no trailing dot).
    Domain(String),
    /// Every name below this one: `Wildcard("example.com")` is `*.example.com`
    /// and matches `a.example.com`, `a.b.example.com`, not `example.com`.
    Wildcard(String),
}

impl FromStr for AllowRule {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        if let Some(net) = parse_net("--allow-out", s)? {
            return Ok(AllowRule::Net(net));
        }
        if looks_like_address(s) {
            return Err(PolicyError::NotAnAddress(s.to_string()));
        }
        let bad = || PolicyError::BadDomain(s.to_string());
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(base) => {
                // "*" counts as the first of the (at least) two labels.
                if !valid_name(base, 1) || base.len() + 2 > MAX_NAME {
                    return Err(bad());
                }
                Ok(AllowRule::Wildcard(base.to_string()))
            }
            None if valid_name(&name, 2) => Ok(AllowRule::Domain(name)),
            None => Err(bad()),
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Net(net) => write_net(f, net),
            AllowRule::Domain(name) => f.write_str(name),
            AllowRule::Wildcard(base) => write!(f, "*.{base}"),
        }
    }
}

impl Serialize for AllowRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AllowRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a `--deny-out` value: a CIDR or an IP address, never a name.
pub fn parse_deny(s: &str) -> Result<IpNet, PolicyError> {
    match parse_net("--deny-out", s)? {
        Some(net) => Ok(net),
        None if looks_like_address(s) => Err(PolicyError::DenyNotAddress(s.to_string())),
        None => Err(PolicyError::DenyDomain(s.to_string())),
    }
}

/// A CIDR or an address (as its host-length network); `None` if `s` is
/// neither; an error for a CIDR with host bits set, which names the network
/// the user probably meant.
fn parse_net(flag: &'static str, s: &str) -> Result<Option<IpNet>, PolicyError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(ip)));
    }
    let Ok(net) = s.parse::<IpNet>() else {
        return Ok(None);
    };
    if net.trunc() != net {
        return Err(PolicyError::HostBits {
            flag,
            input: s.to_string(),
            network: net.trunc(),
        });
    }
    Ok(Some(net))
}

/// Whether `s` was meant as an address rather than a name: it has a `/` or a
/// `:`, or its last label is all digits (no top-level domain is numeric), as
/// in `300.1.1.1`.
fn looks_like_address(s: &str) -> bool {
    let last = s.strip_suffix('.').unwrap_or(s).rsplit('.').next();
    s.contains(['/', ':'])
        || last.is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// An LDH name (lowercase) of at least `min_labels` labels, each 1..=63
/// characters, not starting or ending with a hyphen, at most 253 in all.
fn valid_name(name: &str, min_labels: usize) -> bool {
    let label_ok = |l: &str| {
        (1..=MAX_LABEL).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= MAX_NAME && name.split('.').all(label_ok) && name.split('.').count() >= min_labels
}

/// An address alone for a host-length network, else the CIDR.
fn write_net(f: &mut fmt::Formatter<'_>, net: &IpNet) -> fmt::Result {
    if net.prefix_len() == net.max_prefix_len() {
        write!(f, "{}", net.addr())
    } else {
        write!(f, "{net}")
    }
}

/// A sandbox's egress policy. `allow` beats `deny`, which adds to
/// [`Policy::default_denials`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    #[serde(default, with = "deny_serde")]
    pub deny: Vec<IpNet>,
}

/// `deny` as strings, read through [`parse_deny`] (so an address works too
/// and a CIDR with host bits set is refused, as on the command line).
mod deny_serde {
    use super::*;

    struct Net<'a>(&'a IpNet);

    impl fmt::Display for Net<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_net(f, self.0)
        }
    }

    pub fn serialize<S: Serializer>(deny: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(deny.iter().map(|n| Net(n).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| parse_deny(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

impl Policy {
    /// What egress denies unless an allow rule says otherwise (the host's own
    /// addresses come from the caller: see [`Policy::allows_ip`]).
    pub fn default_denials() -> Vec<IpNet> {
        [
            "0.0.0.0/8",         // "this network"
            "10.0.0.0/8",        // RFC 1918
            "100.64.0.0/10",     // CGNAT (incl. the sandbox's own link)
            "127.0.0.0/8",       // loopback
            "169.254.0.0/16",    // link-local, incl. 169.254.169.254 (cloud metadata)
            "172.16.0.0/12",     // RFC 1918
            "192.168.0.0/16",    // RFC 1918
            "224.0.0.0/4",       // multicast
            "240.0.0.0/4",       // reserved, incl. 255.255.255.255 (broadcast)
            "::/128",            // unspecified
            "::1/128",           // loopback
            "::ffff:0.0.0.0/96", // IPv4-mapped: IPv4 behind an IPv6 face
            "fc00::/7",          // unique local (ULA)
            "fe80::/10",         // link-local
            "ff00::/8",          // multicast
        ]
        .iter()
        .map(|s| s.parse().expect("a constant CIDR"))
        .collect()
    }

    /// The networks allowed by CIDR or address.
    pub fn allowed_nets(&self) -> impl Iterator<Item = &IpNet> {
        self.allow.iter().filter_map(|r| match r {
            AllowRule::Net(net) => Some(net),
            _ => None,
        })
    }

    /// Whether some allow rule is a domain or a wildcard (then TCP to denied
    /// destinations goes through the proxy).
    pub fn has_domains(&self) -> bool {
        self.allow.iter().any(|r| !matches!(r, AllowRule::Net(_)))
    }

    /// Whether `name` is allowed by a domain or wildcard rule; case-insensitive,
    /// a trailing dot ignored.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.allow.iter().any(|r| match r {
            AllowRule::Net(_) => false,
            AllowRule::Domain(d) => *d == name,
            AllowRule::Wildcard(base) => name
                .strip_suffix(base.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        })
    }

    /// Whether some deny rule covers all of IPv4 (`--deny-out 0.0.0.0/0`).
    pub fn denies_all_v4(&self) -> bool {
        let all = IpNet::from_str("0.0.0.0/0").expect("a constant CIDR");
        self.deny.iter().any(|n| n.contains(&all))
    }

    /// Whether the DNS forwarder answers `name`: every name, unless all of
    /// IPv4 is denied; then only allowed names (so DNS cannot be used to
    /// learn or exfiltrate).
    pub fn resolves(&self, name: &str) -> bool {
        self.allows_name(name) || !self.denies_all_v4()
    }

    /// Whether a connection to `ip` is allowed by address alone: an allow net
    /// beats the deny nets, the default denials and `host_addrs` (the host's
    /// own addresses). An IPv4-mapped IPv6 address is judged as its IPv4.
    pub fn allows_ip(&self, ip: IpAddr, host_addrs: &[IpAddr]) -> bool {
        let ip = ip.to_canonical();
        if self.allowed_nets().any(|n| n.contains(&ip)) {
            return true;
        }
        let denied = self.deny.iter().any(|n| n.contains(&ip))
            || Self::default_denials().iter().any(|n| n.contains(&ip))
            || host_addrs.iter().any(|h| h.to_canonical() == ip);
        !denied
    }
}

#[cfg(test)]
mod tests;
