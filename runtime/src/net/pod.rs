//! A pod's NIC: when containerd's CRI plugin hands the shim a network
//! namespace that CNI has set up, the VM's NIC joins it the way Kata's
//! default (`tcfilter`) does. A tap is opened in the pod's namespace and
//! joined to the CNI interface (`eth0`) with tc: everything arriving on
//! one is redirected out of the other (ingress qdisc, matchall, mirred).
//! The guest gets eth0's MAC, address, MTU and routes, so the pod IP that
//! CNI gave the pod is the VM's, reachable from the node and other pods as
//! with runc. CNI keeps owning the namespace and its veth; the teardown
//! removes only what was added here (the qdiscs; the tap goes with the
//! VMM).

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::netns::{run, Netns};
use super::{tap, GuestLink, NetError};

/// What was added to a pod's namespace, for the teardown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodLink {
    /// The pod's namespace (CNI's).
    pub netns: std::path::PathBuf,
    /// Its CNI interface, joined to the tap.
    pub iface: String,
}

/// The CNI interface of a pod's namespace, as `ip -j` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CniInterface {
    name: String,
    mac: String,
    mtu: u32,
    address: Ipv4Addr,
    prefix: u8,
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    family: String,
    local: Option<String>,
    prefixlen: Option<u8>,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
}

/// The first non-loopback interface with an IPv4 address: the one CNI
/// made (`eth0` by the CNI convention).
fn cni_interface(addr_json: &str) -> Result<CniInterface, NetError> {
    let links: Vec<IpLink> = serde_json::from_str(addr_json)
        .map_err(|e| NetError::Pod(format!("cannot parse `ip -j addr show`: {e}")))?;
    links
        .into_iter()
        .filter(|l| l.link_type != "loopback" && l.ifname != "lo")
        .find_map(|l| {
            let (address, prefix) = l.addr_info.iter().find_map(|a| {
                let addr = a.local.as_ref()?.parse::<Ipv4Addr>().ok()?;
                (a.family == "inet").then_some((addr, a.prefixlen?))
            })?;
            Some(CniInterface {
                name: l.ifname,
                mac: l.address?,
                mtu: l.mtu,
                address,
                prefix,
            })
        })
        .ok_or_else(|| {
            NetError::Pod(
                "the pod's network namespace has no interface with an IPv4 address (did CNI \
                 run?)"
                    .into(),
            )
        })
}

/// The default route's gateway in `ip -j route show`, if any.
fn default_gateway(route_json: &str) -> Result<Option<Ipv4Addr>, NetError> {
    let routes: Vec<IpRoute> = serde_json::from_str(route_json)
        .map_err(|e| NetError::Pod(format!("cannot parse `ip -j route show`: {e}")))?;
    Ok(routes
        .into_iter()
        .find(|r| r.dst == "default")
        .and_then(|r| r.gateway))
}

/// Joins a new tap to the CNI interface of the pod namespace `path`;
/// returns the tap, what the guest is to be told, and what to undo.
pub fn setup(path: &Path) -> Result<(OwnedFd, GuestLink, PodLink), NetError> {
    let ns = Netns::at(path);
    let iface = cni_interface(&ns.ip(&["-j", "addr", "show"], "list the pod's interfaces")?)?;
    let gateway = default_gateway(&ns.ip(&["-j", "route", "show"], "list the pod's routes")?)?;
    let tap = tap::open(&ns)?;
    let link = PodLink {
        netns: path.to_path_buf(),
        iface: iface.name.clone(),
    };
    let joined = ns.run_in(|| {
        let t = tap::TAP_NAME.to_string_lossy();
        let mtu = iface.mtu.max(68).to_string();
        run(
            super::netns::ip_command().args(["link", "set", &t, "mtu", &mtu, "up"]),
            "bring up the pod's tap",
        )?;
        for (from, to) in [(iface.name.as_str(), &*t), (&*t, iface.name.as_str())] {
            run(
                tc().args(["qdisc", "add", "dev", from, "ingress"]),
                "add an ingress qdisc (is sch_ingress available?)",
            )?;
            run(
                tc().args([
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "matchall",
                    "action", "mirred", "egress", "redirect", "dev", to,
                ]),
                "redirect between the pod's interface and the tap (are cls_matchall and act_mirred available?)",
            )?;
        }
        Ok(())
    });
    if let Err(e) = joined {
        teardown(&link);
        return Err(e);
    }
    let guest = GuestLink {
        mac: iface.mac,
        address: iface.address,
        prefix: iface.prefix,
        gateway,
        mtu: iface.mtu,
        nameservers: vec![],
    };
    Ok((tap, guest, link))
}

/// Removes what [`setup`] added to the pod's namespace, if it still
/// exists (containerd may have removed it already).
pub fn teardown(link: &PodLink) {
    if !link.netns.exists() {
        return;
    }
    let ns = Netns::at(&link.netns);
    let removed = ns.run_in(|| {
        // Deleting the CNI interface's ingress qdisc removes its filter;
        // the tap's goes with the tap.
        let _ = run(
            tc().args(["qdisc", "del", "dev", &link.iface, "ingress"]),
            "remove the pod interface's ingress qdisc",
        );
        Ok(())
    });
    if let Err(e) = removed {
        tracing::debug!("the pod's namespace {}: {e}", link.netns.display());
    }
}

fn tc() -> std::process::Command {
    std::process::Command::new(super::support::tool("tc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_interface_and_gateway_are_found() {
        let addrs = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
            "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
          {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"aa:bb:cc:00:11:22","mtu":1450,
            "addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64},{"family":"inet","local":"198.51.100.7","prefixlen":24}]}]"#;
        let i = cni_interface(addrs).unwrap();
        assert_eq!(
            i,
            CniInterface {
                name: "eth0".into(),
                mac: "aa:bb:cc:00:11:22".into(),
                mtu: 1450,
                address: "198.51.100.7".parse().unwrap(),
                prefix: 24
            }
        );
        let routes = r#"[{"dst":"default","gateway":"198.51.100.1","dev":"eth0"},{"dst":"198.51.100.0/24","dev":"eth0"}]"#;
        assert_eq!(
            default_gateway(routes).unwrap(),
            Some("198.51.100.1".parse().unwrap())
        );
        assert_eq!(default_gateway("[]").unwrap(), None);
    }

    #[test]
    fn a_namespace_without_cni_is_named() {
        let only_lo = r#"[{"ifname":"lo","link_type":"loopback","mtu":65536,"addr_info":[]}]"#;
        let e = cni_interface(only_lo).unwrap_err();
        assert!(e.to_string().contains("did CNI run?"), "{e}");
        assert!(cni_interface("not json").is_err());
    }
}
