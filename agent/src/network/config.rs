//! `ConfigureNetworkRequest` checked field by field into a [`Config`] of
//! parsed values, before anything in the guest changes. The request comes
//! from the host, but it is checked as if it were hostile: every list is
//! bounded, every string parsed, and a bad value is quoted in the error
//! cut to [`QUOTE_MAX`] characters.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use airlock_protocol::agent::ConfigureNetworkRequest;
use airlock_protocol::NETWORK_CONFIG_VERSION;

/// At most this many NICs, addresses per NIC, routes, nameservers
/// (glibc's `MAXNS`) and search domains (glibc's historical limit).
pub const MAX_INTERFACES: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ROUTES: usize = 64;
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCH: usize = 6;
/// The MTU range the kernel accepts for Ethernet (`ETH_MIN_MTU`, 64 KiB).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;
/// The name a NIC gets when the request names none.
pub const DEFAULT_NAME: &str = "eth0";
/// Bad values are quoted in errors up to this many characters.
const QUOTE_MAX: usize = 64;
/// `IFNAMSIZ` less the NUL.
const IFNAME_MAX: usize = 15;
/// A DNS name's longest text form, and the kernel's `HOST_NAME_MAX`.
const DOMAIN_MAX: usize = 253;
const HOSTNAME_MAX: usize = 64;

/// Errors in a `ConfigureNetworkRequest`; each names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "network configuration version {0}, this agent knows {NETWORK_CONFIG_VERSION}: \
         upgrade the guest image or the runtime"
    )]
    Version(u32),
    #[error("too many {0}: {1}, at most {2}")]
    TooMany(&'static str, usize, usize),
    #[error(
        "bad MAC address {0:?}: write six hex octets of a unicast address, \"02:00:00:00:00:01\""
    )]
    Mac(String),
    #[error("MAC address {0} is given twice")]
    DuplicateMac(String),
    #[error("bad interface name {0:?}: use 1-15 of [A-Za-z0-9_.-], not \"lo\", \".\" or \"..\"")]
    Name(String),
    #[error("interface name {0:?} is given twice")]
    DuplicateName(String),
    #[error("MTU {0} of {1} is out of range: use 68 to 65535, or 0 to keep the driver's")]
    Mtu(u32, String),
    #[error("bad address {0:?}: write an IPv4 address and prefix length, \"10.0.0.2/24\"")]
    Address(String),
    #[error("bad route destination {0:?}: write an IPv4 network, \"10.1.0.0/16\", or \"\" for the default route")]
    Destination(String),
    #[error("bad gateway {0:?}: write an IPv4 address, or \"\" for a route on the device")]
    Gateway(String),
    #[error("route to {0:?} names device {1:?}, which is none of the interfaces")]
    Device(String, String),
    #[error("route to {0:?} needs a gateway or a device")]
    Nowhere(String),
    #[error("bad nameserver {0:?}: write an IPv4 or IPv6 address")]
    Nameserver(String),
    #[error("bad search domain {0:?}: use 1-253 of [A-Za-z0-9_.-]")]
    Search(String),
    #[error("bad hostname {0:?}: use 1-64 of [A-Za-z0-9.-], not starting with '-' or '.'")]
    Hostname(String),
}

/// A checked NIC configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub mac: [u8; 6],
    pub name: String,
    /// Addresses and prefix lengths.
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// `None`: keep the driver's.
    pub mtu: Option<u32>,
}

/// A checked route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Network and prefix length; `0.0.0.0/0` is the default route.
    pub destination: (Ipv4Addr, u8),
    pub gateway: Option<Ipv4Addr>,
    /// One of the interfaces' names.
    pub device: Option<String>,
}

/// A checked network configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub hostname: Option<String>,
}

/// The first [`QUOTE_MAX`] characters of `s`.
fn quote(s: &str) -> String {
    s.chars().take(QUOTE_MAX).collect()
}

fn bounded<T>(what: &'static str, items: &[T], max: usize) -> Result<(), ConfigError> {
    if items.len() > max {
        return Err(ConfigError::TooMany(what, items.len(), max));
    }
    Ok(())
}

impl Config {
    /// Checks `req`; the first bad field is the error.
    pub fn parse(req: &ConfigureNetworkRequest) -> Result<Self, ConfigError> {
        if req.version != NETWORK_CONFIG_VERSION {
            return Err(ConfigError::Version(req.version));
        }
        bounded("interfaces", &req.interfaces, MAX_INTERFACES)?;
        bounded("routes", &req.routes, MAX_ROUTES)?;
        bounded("nameservers", &req.nameservers, MAX_NAMESERVERS)?;
        bounded("search domains", &req.search, MAX_SEARCH)?;
        let mut interfaces = Vec::with_capacity(req.interfaces.len());
        for i in &req.interfaces {
            let nic = interface(i)?;
            if interfaces.iter().any(|o: &Interface| o.mac == nic.mac) {
                return Err(ConfigError::DuplicateMac(quote(&i.mac)));
            }
            if interfaces.iter().any(|o: &Interface| o.name == nic.name) {
                return Err(ConfigError::DuplicateName(nic.name));
            }
            interfaces.push(nic);
        }
        let names: HashSet<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        let routes = req
            .routes
            .iter()
            .map(|r| route(r, &names))
            .collect::<Result<_, _>>()?;
        let nameservers = req
            .nameservers
            .iter()
            .map(|n| {
                n.parse::<IpAddr>()
                    .map_err(|_| ConfigError::Nameserver(quote(n)))
            })
            .collect::<Result<_, _>>()?;
        for s in &req.search {
            if !is_domain(s, DOMAIN_MAX) {
                return Err(ConfigError::Search(quote(s)));
            }
        }
        let hostname = match req.hostname.as_str() {
            "" => None,
            h if is_hostname(h) => Some(h.to_string()),
            h => return Err(ConfigError::Hostname(quote(h))),
        };
        Ok(Self {
            interfaces,
            routes,
            nameservers,
            search: req.search.clone(),
            hostname,
        })
    }
}

fn interface(i: &airlock_protocol::agent::Interface) -> Result<Interface, ConfigError> {
    // A NIC's address is unicast (the low bit of its first octet clear),
    // and not all zeros (the loopback's).
    let mac = parse_mac(&i.mac)
        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
        .ok_or_else(|| ConfigError::Mac(quote(&i.mac)))?;
    let name = match i.name.as_str() {
        "" => DEFAULT_NAME.to_string(),
        n if is_ifname(n) => n.to_string(),
        n => return Err(ConfigError::Name(quote(n))),
    };
    let mtu = match i.mtu {
        0 => None,
        m if MTU_RANGE.contains(&m) => Some(m),
        m => return Err(ConfigError::Mtu(m, name)),
    };
    bounded("addresses", &i.addresses, MAX_ADDRESSES)?;
    let addresses = i
        .addresses
        .iter()
        .map(|a| match parse_cidr(a) {
            Some((ip, len)) if len > 0 && !ip.is_unspecified() => Ok((ip, len)),
            _ => Err(ConfigError::Address(quote(a))),
        })
        .collect::<Result<_, _>>()?;
    Ok(Interface {
        mac,
        name,
        addresses,
        mtu,
    })
}

fn route(r: &airlock_protocol::agent::Route, names: &HashSet<&str>) -> Result<Route, ConfigError> {
    let destination = match r.destination.as_str() {
        "" => (Ipv4Addr::UNSPECIFIED, 0),
        d => match parse_cidr(d) {
            // Host bits set: the kernel refuses it ("invalid prefix").
            Some((ip, len)) if u32::from(ip) & !prefix_mask(len) == 0 => (ip, len),
            _ => return Err(ConfigError::Destination(quote(d))),
        },
    };
    let gateway = match r.gateway.as_str() {
        "" => None,
        g => Some(
            g.parse::<Ipv4Addr>()
                .map_err(|_| ConfigError::Gateway(quote(g)))?,
        ),
    };
    let device = match r.device.as_str() {
        "" => None,
        d if names.contains(d) => Some(d.to_string()),
        d => return Err(ConfigError::Device(quote(&r.destination), quote(d))),
    };
    if gateway.is_none() && device.is_none() {
        return Err(ConfigError::Nowhere(quote(&r.destination)));
    }
    Ok(Route {
        destination,
        gateway,
        device,
    })
}

/// The netmask of a prefix length up to 32.
fn prefix_mask(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// "02:00:00:00:00:01" (or with dashes, any case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for octet in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *octet = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The text form of a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// "10.0.0.2/24": an IPv4 address and a prefix length up to 32.
fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((ip.parse().ok()?, len))
}

fn is_ifname(n: &str) -> bool {
    n.len() <= IFNAME_MAX
        && !matches!(n, "" | "." | ".." | "lo")
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn is_domain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn is_hostname(h: &str) -> bool {
    h.len() <= HOSTNAME_MAX
        && !h.starts_with(['-', '.'])
        && is_domain(h, HOSTNAME_MAX)
        && !h.contains('_')
}

#[cfg(test)]
mod tests {
    use airlock_protocol::agent;

    use super::*;

    fn request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            version: NETWORK_CONFIG_VERSION,
            interfaces: vec![agent::Interface {
                mac: "02:00:00:00:00:01".into(),
                addresses: vec!["10.0.0.2/24".into()],
                mtu: 1500,
                ..Default::default()
            }],
            routes: vec![agent::Route {
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            nameservers: vec!["10.0.0.1".into()],
            search: vec!["example.org".into()],
            hostname: "box".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_parses_with_its_defaults() {
        let c = Config::parse(&request()).unwrap();
        assert_eq!(c.interfaces[0].mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(c.interfaces[0].name, "eth0");
        assert_eq!(c.interfaces[0].mtu, Some(1500));
        assert_eq!(
            c.interfaces[0].addresses,
            [(Ipv4Addr::new(10, 0, 0, 2), 24)]
        );
        assert_eq!(c.routes[0].destination, (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(c.routes[0].gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert_eq!(format_mac(&c.interfaces[0].mac), "02:00:00:00:00:01");
    }

    fn refused(edit: impl FnOnce(&mut ConfigureNetworkRequest)) -> ConfigError {
        let mut req = request();
        edit(&mut req);
        Config::parse(&req).unwrap_err()
    }

    #[test]
    fn every_bad_field_is_refused_with_its_name() {
        use ConfigError as E;
        let nic = |r: &mut ConfigureNetworkRequest| r.interfaces[0].clone();
        type Edit = Box<dyn FnOnce(&mut ConfigureNetworkRequest)>;
        let cases: Vec<(Edit, ConfigError)> = vec![
            (Box::new(|r| r.version = 2), E::Version(2)),
            (
                Box::new(|r| r.interfaces[0].mac = "02:00:00:00:00".into()),
                E::Mac("02:00:00:00:00".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].mac = "02:00:00:00:00:0g".into()),
                E::Mac("02:00:00:00:00:0g".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].mac = "01:00:5e:00:00:01".into()),
                E::Mac("01:00:5e:00:00:01".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].mac = "00:00:00:00:00:00".into()),
                E::Mac("00:00:00:00:00:00".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].mtu = 67),
                E::Mtu(67, "eth0".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].mtu = 65536),
                E::Mtu(65536, "eth0".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].name = "lo".into()),
                E::Name("lo".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].name = "a/b".into()),
                E::Name("a/b".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].name = "x".repeat(16)),
                E::Name("x".repeat(16)),
            ),
            (
                Box::new(|r| r.interfaces[0].addresses = vec!["10.0.0.2".into()]),
                E::Address("10.0.0.2".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].addresses = vec!["10.0.0.2/33".into()]),
                E::Address("10.0.0.2/33".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].addresses = vec!["fd00::2/64".into()]),
                E::Address("fd00::2/64".into()),
            ),
            (
                Box::new(move |r| {
                    let mut twin = nic(r);
                    twin.name = "eth1".into();
                    r.interfaces.push(twin);
                }),
                E::DuplicateMac("02:00:00:00:00:01".into()),
            ),
            (
                Box::new(|r| r.routes[0].destination = "10.1.0.1/16".into()),
                E::Destination("10.1.0.1/16".into()),
            ),
            (
                Box::new(|r| r.routes[0].gateway = "10.0.0.256".into()),
                E::Gateway("10.0.0.256".into()),
            ),
            (
                Box::new(|r| r.routes[0].device = "eth9".into()),
                E::Device("".into(), "eth9".into()),
            ),
            (
                Box::new(|r| r.routes[0].gateway = String::new()),
                E::Nowhere("".into()),
            ),
            (
                Box::new(|r| r.nameservers = vec!["dns.example".into()]),
                E::Nameserver("dns.example".into()),
            ),
            (
                Box::new(|r| r.nameservers = vec!["1.1.1.1".into(); 4]),
                E::TooMany("nameservers", 4, 3),
            ),
            (
                Box::new(|r| r.search = vec!["a b".into()]),
                E::Search("a b".into()),
            ),
            (
                Box::new(|r| r.hostname = "-box".into()),
                E::Hostname("-box".into()),
            ),
            (
                Box::new(|r| r.interfaces[0].addresses = vec!["10.0.0.2/24".into(); 17]),
                E::TooMany("addresses", 17, 16),
            ),
            (
                Box::new(|r| r.routes = vec![r.routes[0].clone(); 65]),
                E::TooMany("routes", 65, 64),
            ),
        ];
        for (edit, want) in cases {
            assert_eq!(refused(edit), want);
        }
    }

    #[test]
    fn a_huge_bad_value_is_quoted_short() {
        let err = refused(|r| r.hostname = "-".repeat(1 << 20));
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn names_and_routes_relate() {
        let mut req = request();
        req.interfaces[0].name = "net0".into();
        req.interfaces[0].mtu = 0;
        req.routes.push(agent::Route {
            destination: "10.2.0.0/16".into(),
            device: "net0".into(),
            ..Default::default()
        });
        let c = Config::parse(&req).unwrap();
        assert_eq!(c.interfaces[0].mtu, None);
        assert_eq!(c.routes[1].destination, (Ipv4Addr::new(10, 2, 0, 0), 16));
        assert_eq!(c.routes[1].device.as_deref(), Some("net0"));
        // The default name, once taken, cannot be given again.
        req.interfaces.push(agent::Interface {
            mac: "02:00:00:00:00:02".into(),
            name: "net0".into(),
            ..Default::default()
        });
        assert_eq!(
            Config::parse(&req).unwrap_err(),
            ConfigError::DuplicateName("net0".into())
        );
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
