//! The guest's network as the runtime describes it ([`GuestNetwork`]), and
//! the agent call that applies it: `ConfigureNetwork`, once per VM, before
//! the first container (the agent refuses it after). The agent checks every
//! field (INVALID_ARGUMENT names the bad one); this side only translates.

use airlock_protocol::{agent, NETWORK_CONFIG_VERSION};
use serde::{Deserialize, Serialize};

use super::{ctx, Sandbox, SandboxError};

/// The guest's network: its NICs, routes and DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub interfaces: Vec<GuestInterface>,
    pub routes: Vec<GuestRoute>,
    /// IPv4 or IPv6 literals, for the containers' `resolv.conf` (at most 3).
    pub nameservers: Vec<String>,
    /// DNS search domains (at most 6).
    pub search: Vec<String>,
    /// The VM's hostname, also in the containers' `hosts`; `None`: the
    /// sandbox id, as `CreateSandbox` set it.
    pub hostname: Option<String>,
}

/// A NIC of the guest, found by the MAC the VMM gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// "02:00:00:00:00:01".
    pub mac: String,
    /// The name it gets; "": "eth0".
    pub name: String,
    /// IPv4 addresses with prefix length, "10.0.0.2/24".
    pub addresses: Vec<String>,
    /// 68 to 65535; 0: the driver's.
    pub mtu: u32,
}

/// A route of the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// IPv4 CIDR; "" or "0.0.0.0/0": the default route.
    pub destination: String,
    /// IPv4 literal; "": on the device's link.
    pub gateway: String,
    /// A [`GuestInterface`]'s name; "": the kernel's choice by gateway.
    pub device: String,
}

impl GuestNetwork {
    /// The agent's request.
    pub fn request(&self) -> agent::ConfigureNetworkRequest {
        agent::ConfigureNetworkRequest {
            version: NETWORK_CONFIG_VERSION,
            interfaces: self
                .interfaces
                .iter()
                .map(|i| agent::Interface {
                    mac: i.mac.clone(),
                    name: i.name.clone(),
                    addresses: i.addresses.clone(),
                    mtu: i.mtu,
                    ..Default::default()
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| agent::Route {
                    destination: r.destination.clone(),
                    gateway: r.gateway.clone(),
                    device: r.device.clone(),
                    ..Default::default()
                })
                .collect(),
            nameservers: self.nameservers.clone(),
            search: self.search.clone(),
            hostname: self.hostname.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

impl Sandbox {
    /// Configures the guest's network: call it after the sandbox is
    /// created and before its first container.
    pub async fn configure_network(&self, net: &GuestNetwork) -> Result<(), SandboxError> {
        let req = net.request();
        self.call("ConfigureNetwork", |c| c.configure_network(ctx(), &req))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_every_field_and_the_version() {
        let net = GuestNetwork {
            interfaces: vec![GuestInterface {
                mac: "02:00:00:00:00:01".into(),
                name: "eth0".into(),
                addresses: vec!["10.0.0.2/24".into()],
                mtu: 1500,
            }],
            routes: vec![GuestRoute {
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            nameservers: vec!["10.0.0.1".into()],
            search: vec!["example.org".into()],
            hostname: None,
        };
        let req = net.request();
        assert_eq!(req.version, NETWORK_CONFIG_VERSION);
        assert_eq!(req.interfaces[0].mac, "02:00:00:00:00:01");
        assert_eq!(req.interfaces[0].addresses, ["10.0.0.2/24"]);
        assert_eq!(req.interfaces[0].mtu, 1500);
        assert_eq!(req.routes[0].gateway, "10.0.0.1");
        assert_eq!(req.nameservers, ["10.0.0.1"]);
        assert_eq!(req.search, ["example.org"]);
        assert_eq!(req.hostname, "");
        // JSON both ways, as a record would keep it.
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(serde_json::from_str::<GuestNetwork>(&json).unwrap(), net);
    }
}
