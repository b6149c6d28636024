//! The guest's NICs, addresses and routes set through rtnetlink, as
//! `ip link`, `ip addr` and `ip route` would (the guest has no `ip`).
//!
//! Messages are built and parsed with `netlink-packet-route` and sent on a
//! blocking `netlink-sys` socket: the crates libcontainer already links for
//! its own netlink calls, so nothing new is linked into the static agent,
//! and a handful of requests made once per VM needs no async client
//! (`rtnetlink`'s). The peer is the guest's kernel: it answers every
//! request, so the waits here end.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::Socket;

use super::config::{format_mac, Config, Route};

/// Receive buffer: a link dump's datagram fits with room to spare.
const RECV_BUF: usize = 64 * 1024;
/// Messages read while waiting for one answer before giving up: the
/// kernel sends one per link in a dump, and one ack per request.
const MAX_MESSAGES: usize = 4096;

/// Errors configuring the guest's network.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket: is CONFIG_NET in the guest kernel?")]
    Socket(#[source] std::io::Error),
    #[error("netlink: cannot {0} the kernel")]
    Io(&'static str, #[source] std::io::Error),
    #[error("netlink: the kernel's answer does not parse: {0}")]
    Decode(String),
    #[error("netlink: no answer to {0} among {MAX_MESSAGES} messages")]
    NoAnswer(String),
    #[error("the kernel refused to {0}")]
    Refused(String, #[source] std::io::Error),
    #[error("no NIC has MAC address {0} (the VM has: {1}): give the MAC the VMM gave the NIC")]
    UnknownMac(String, String),
    #[error("the guest has no loopback interface \"lo\"")]
    NoLoopback,
}

/// A NIC as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
}

/// The NIC with `mac` among `links`, or the error that lists theirs.
pub fn by_mac<'a>(links: &'a [Link], mac: &[u8; 6]) -> Result<&'a Link, LinkError> {
    // The loopback's "MAC" is all zeros; config.rs refuses that one.
    let nics = || links.iter().filter(|l| l.name != "lo");
    nics().find(|l| l.mac.as_ref() == Some(mac)).ok_or_else(|| {
        let known: Vec<String> = nics()
            .filter_map(|l| l.mac)
            .map(|m| format_mac(&m))
            .collect();
        LinkError::UnknownMac(format_mac(mac), known.join(", "))
    })
}

/// Applies `config` to the guest: `lo` up with 127.0.0.1; each NIC found
/// by its MAC, renamed while down, its MTU set, its addresses added, then
/// up; then the routes. An empty `config` brings up `lo` alone.
pub fn apply(config: &Config) -> Result<(), LinkError> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let lo = links
        .iter()
        .find(|l| l.name == "lo")
        .ok_or(LinkError::NoLoopback)?;
    // Every NIC found before anything changes: an unknown MAC changes nothing.
    let nics = config
        .interfaces
        .iter()
        .map(|nic| by_mac(&links, &nic.mac).map(|link| (nic, link)))
        .collect::<Result<Vec<_>, _>>()?;
    nl.set_up(lo.index, true)?;
    // Bringing lo up gives it 127.0.0.1/8 already: EEXIST is success.
    match nl.add_address(lo.index, Ipv4Addr::LOCALHOST, 8, AddressScope::Host) {
        Err(LinkError::Refused(_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        other => other?,
    }
    let mut index_of = HashMap::new();
    for (nic, link) in nics {
        nl.set_up(link.index, false)?;
        if link.name != nic.name {
            nl.set_link(
                link.index,
                LinkAttribute::IfName(nic.name.clone()),
                "rename",
            )?;
        }
        if let Some(mtu) = nic.mtu {
            nl.set_link(link.index, LinkAttribute::Mtu(mtu), "set the MTU of")?;
        }
        for &(ip, len) in &nic.addresses {
            nl.add_address(link.index, ip, len, AddressScope::Universe)?;
        }
        nl.set_up(link.index, true)?;
        index_of.insert(nic.name.as_str(), link.index);
    }
    for route in &config.routes {
        let oif = route
            .device
            .as_deref()
            .and_then(|d| index_of.get(d))
            .copied();
        nl.add_route(route, oif)?;
    }
    Ok(())
}

/// A blocking rtnetlink socket.
struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Self, LinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(LinkError::Socket)?;
        socket.bind_auto().map_err(LinkError::Socket)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends `msg` with `flags`; returns its sequence number.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut bytes = vec![0; req.buffer_len()];
        req.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|e| LinkError::Io("send to", e))?;
        Ok(self.seq)
    }

    /// Reads the answers to request `seq`, handing each to `each` until it
    /// returns `Some`.
    fn receive<T>(
        &mut self,
        seq: u32,
        what: &dyn Fn() -> String,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Option<Result<T, LinkError>>,
    ) -> Result<T, LinkError> {
        let mut seen = 0usize;
        while seen < MAX_MESSAGES {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| LinkError::Io("receive from", e))?;
            let mut offset = 0usize;
            while offset < n && seen < MAX_MESSAGES {
                seen += 1;
                let bytes = self.buf.get(offset..n).unwrap_or_default();
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| LinkError::Decode(e.to_string()))?;
                let len = usize::try_from(msg.header.length).unwrap_or(usize::MAX);
                if len == 0 {
                    break;
                }
                // Messages are 4-byte aligned (NLMSG_ALIGN).
                offset = offset.saturating_add(len.saturating_add(3) & !3);
                if msg.header.sequence_number != seq {
                    continue;
                }
                if let Some(done) = each(msg.payload) {
                    return done;
                }
            }
        }
        Err(LinkError::NoAnswer(what()))
    }

    /// Sends `msg` and waits for the kernel's ack; a refusal names `what`.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<(), LinkError> {
        let seq = self.send(msg, flags | NLM_F_REQUEST | NLM_F_ACK)?;
        self.receive(seq, what, |payload| match payload {
            NetlinkPayload::Error(e) => Some(match e.code {
                None => Ok(()),
                Some(code) => Err(LinkError::Refused(
                    what(),
                    std::io::Error::from_raw_os_error(code.get().saturating_neg()),
                )),
            }),
            _ => None,
        })
    }

    /// Every link, with its index, name and MAC.
    fn links(&mut self) -> Result<Vec<Link>, LinkError> {
        let what = || "list the links".to_string();
        let seq = self.send(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut links = Vec::new();
        self.receive(seq, &what, |payload| match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                links.push(link(&m));
                None
            }
            NetlinkPayload::Done(_) => Some(Ok(())),
            NetlinkPayload::Error(e) => e.code.map(|code| {
                Err(LinkError::Refused(
                    what(),
                    std::io::Error::from_raw_os_error(code.get().saturating_neg()),
                ))
            }),
            _ => None,
        })?;
        Ok(links)
    }

    fn set_up(&mut self, index: u32, up: bool) -> Result<(), LinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        if up {
            m.header.flags = LinkFlags::Up;
        }
        let what = || format!("bring link {index} {}", if up { "up" } else { "down" });
        self.request(RouteNetlinkMessage::SetLink(m), 0, &what)
    }

    fn set_link(&mut self, index: u32, attr: LinkAttribute, verb: &str) -> Result<(), LinkError> {
        let what = || format!("{verb} link {index} ({attr:?})");
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(attr.clone());
        self.request(RouteNetlinkMessage::SetLink(m), 0, &what)
    }

    fn add_address(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        len: u8,
        scope: AddressScope,
    ) -> Result<(), LinkError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = len;
        m.header.scope = scope;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(ip.into()));
        m.attributes.push(AddressAttribute::Address(ip.into()));
        let what = || format!("add address {ip}/{len} to link {index}");
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &what,
        )
    }

    fn add_route(&mut self, route: &Route, oif: Option<u32>) -> Result<(), LinkError> {
        let (dst, len) = route.destination;
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Static;
        m.header.kind = RouteType::Unicast;
        // A route without a gateway reaches hosts on the link itself.
        m.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if len > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        if let Some(gw) = route.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        if let Some(oif) = oif {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        let what = || {
            let via = route
                .gateway
                .map(|g| format!(" via {g}"))
                .unwrap_or_default();
            let dev = route
                .device
                .as_deref()
                .map(|d| format!(" dev {d}"))
                .unwrap_or_default();
            format!("add route {dst}/{len}{via}{dev}")
        };
        self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &what,
        )
    }
}

/// The index, name and MAC of a link message.
fn link(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_message_gives_index_name_and_mac() {
        let mut m = LinkMessage::default();
        m.header.index = 2;
        m.attributes.push(LinkAttribute::IfName("enp0".into()));
        m.attributes
            .push(LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]));
        let l = link(&m);
        assert_eq!(
            l,
            Link {
                index: 2,
                name: "enp0".into(),
                mac: Some([2, 0, 0, 0, 0, 1])
            }
        );
        let lo = Link {
            index: 1,
            name: "lo".into(),
            mac: None,
        };
        let links = [lo.clone(), l];
        assert_eq!(by_mac(&links, &[2, 0, 0, 0, 0, 1]).unwrap().index, 2);
        let err = by_mac(&links, &[2, 0, 0, 0, 0, 9]).unwrap_err();
        // The loopback is no NIC, whatever its address.
        let zero = [Link {
            mac: Some([0; 6]),
            ..lo
        }];
        assert!(by_mac(&zero, &[0; 6]).is_err());
        assert_eq!(
            err.to_string(),
            "no NIC has MAC address 02:00:00:00:00:09 (the VM has: 02:00:00:00:00:01): \
             give the MAC the VMM gave the NIC"
        );
    }

    /// The dump, in this process's network namespace: every namespace has
    /// a loopback, whose "MAC" is all zeros.
    #[test]
    fn the_link_dump_finds_the_loopback() {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert!(lo.index > 0);
        assert!(matches!(lo.mac, None | Some([0, 0, 0, 0, 0, 0])));
    }
}
