//! The network's settings: `[network]` in the runtime config (the
//! defaults), and what one sandbox asks for (`--net`, `--allow-out`,
//! `--deny-out`), checked before anything is made.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{AllowRule, NetError, Policy, PolicyError};

/// A sandbox's network mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No NIC: the guest has only `lo`.
    #[default]
    None,
    /// Outbound TCP/UDP through NAT, under the sandbox's policy.
    Egress,
}

impl FromStr for NetMode {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        match s {
            "none" => Ok(Self::None),
            "egress" => Ok(Self::Egress),
            _ => Err(NetError::BadMode(s.into())),
        }
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Egress => "egress",
        })
    }
}

/// `[network]` in the runtime config.
///
/// ```toml
/// [network]
/// mode = "egress"            # default for run/create: "none"
/// allow_out = ["api.example.com", "*.pypi.org"]
/// deny_out = ["0.0.0.0/0"]
/// dns = ["192.0.2.53"]       # the filter's upstream; default: /etc/resolv.conf
/// veth_pool = "169.254.192.0/18"
/// mtu = 1500
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    pub mode: NetMode,
    /// The policy of sandboxes that give none of their own.
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    /// Resolvers the filter forwards the guest's DNS to (`IP` or
    /// `IP:PORT`); empty: the host's `/etc/resolv.conf`.
    pub dns: Vec<String>,
    /// The host-side /30s of the sandboxes' veths. Link-local by default:
    /// never routed, so it clashes with no network the host is on.
    pub veth_pool: Ipv4Net,
    /// The guest NIC's MTU.
    pub mtu: u32,
    /// The filter; default: `airlock-netfilter` beside this executable,
    /// else on $PATH.
    pub netfilter_binary: Option<std::path::PathBuf>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            mode: NetMode::None,
            allow_out: vec![],
            deny_out: vec![],
            dns: vec![],
            veth_pool: Ipv4Net::new(std::net::Ipv4Addr::new(169, 254, 192, 0), 18)
                .unwrap_or_default(),
            mtu: 1500,
            netfilter_binary: None,
        }
    }
}

impl NetworkSettings {
    /// Checks what config load can: the default policy, the resolvers,
    /// the pool and the MTU.
    pub fn validate(&self) -> Result<(), NetError> {
        policy(&self.allow_out, &self.deny_out)?;
        self.upstream_dns_listed()?;
        if super::record::slots(self.veth_pool) == 0 {
            return Err(NetError::Settings(format!(
                "veth_pool = {}: needs at least a /30",
                self.veth_pool
            )));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(NetError::Settings(format!(
                "mtu = {}: must be 576 to 9000",
                self.mtu
            )));
        }
        Ok(())
    }

    fn upstream_dns_listed(&self) -> Result<Vec<SocketAddr>, NetError> {
        self.dns
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        NetError::Settings(format!("dns = {s:?}: not an IP address or IP:PORT"))
                    })
            })
            .collect()
    }

    /// The filter's upstream resolvers: `dns`, else `/etc/resolv.conf`'s.
    pub fn upstream_dns(&self) -> Result<Vec<SocketAddr>, NetError> {
        let listed = self.upstream_dns_listed()?;
        if !listed.is_empty() {
            return Ok(listed);
        }
        let path = std::path::PathBuf::from("/etc/resolv.conf");
        let text = std::fs::read_to_string(&path).map_err(|e| NetError::io("read", path, e))?;
        let found: Vec<SocketAddr> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        if found.is_empty() {
            return Err(NetError::Settings(
                "no resolver: /etc/resolv.conf names no nameserver; set [network] dns".into(),
            ));
        }
        Ok(found)
    }
}

/// The policy of `--allow-out`/`--deny-out` entries.
pub fn policy(allow: &[String], deny: &[String]) -> Result<Policy, NetError> {
    Ok(Policy {
        allow: allow
            .iter()
            .map(|s| s.parse::<AllowRule>())
            .collect::<Result<Vec<_>, PolicyError>>()?,
        deny: deny
            .iter()
            .map(|s| airlock_net::policy::parse_deny(s))
            .collect::<Result<Vec<_>, PolicyError>>()?,
    })
}

/// What one sandbox asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetOptions {
    pub mode: NetMode,
    pub policy: Policy,
    /// A pod's network namespace from CNI (the shim's sandbox spec): the
    /// NIC joins it, whatever `mode` says.
    pub pod_netns: Option<std::path::PathBuf>,
}

impl NetOptions {
    /// The config's defaults.
    pub fn from_settings(settings: &NetworkSettings) -> Result<Self, NetError> {
        Ok(Self {
            mode: settings.mode,
            policy: policy(&settings.allow_out, &settings.deny_out)?,
            pod_netns: None,
        })
    }

    /// `--net`, `--allow-out` and `--deny-out` over the config's defaults:
    /// a sandbox that gives any policy entry gets its own policy alone.
    pub fn from_flags(
        settings: &NetworkSettings,
        mode: Option<&str>,
        allow: &[String],
        deny: &[String],
    ) -> Result<Self, NetError> {
        let mode = match mode {
            Some(m) => m.parse()?,
            None => settings.mode,
        };
        let policy = if allow.is_empty() && deny.is_empty() {
            policy(&settings.allow_out, &settings.deny_out)?
        } else {
            policy(allow, deny)?
        };
        if mode == NetMode::None && !(allow.is_empty() && deny.is_empty()) {
            return Err(NetError::Settings(
                "--allow-out and --deny-out need a network: add --net egress".into(),
            ));
        }
        Ok(Self {
            mode,
            policy,
            pod_netns: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bad_flags_are_named() {
        let set = NetworkSettings::default();
        let e = NetOptions::from_flags(&set, Some("bogus"), &[], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net \"bogus\": unknown network mode (use none or egress)"
        );
        let e =
            NetOptions::from_flags(&set, Some("egress"), &s(&["300.1.1.1/33"]), &[]).unwrap_err();
        assert!(e.to_string().contains("300.1.1.1/33"), "{e}");
        let e = NetOptions::from_flags(&set, Some("egress"), &s(&["ex ample"]), &[]).unwrap_err();
        assert!(e.to_string().contains("ex ample"), "{e}");
        let e = NetOptions::from_flags(&set, None, &s(&["192.0.2.1"]), &[]).unwrap_err();
        assert!(e.to_string().contains("--net egress"), "{e}");
    }

    #[test]
    fn flags_replace_the_configs_policy() {
        let set = NetworkSettings {
            mode: NetMode::Egress,
            deny_out: s(&["0.0.0.0/0"]),
            ..Default::default()
        };
        let o = NetOptions::from_flags(&set, None, &[], &[]).unwrap();
        assert_eq!((o.mode, o.policy.deny.len()), (NetMode::Egress, 1));
        let o = NetOptions::from_flags(&set, None, &s(&["api.example.test"]), &[]).unwrap();
        assert!(o.policy.deny.is_empty() && o.policy.allow.len() == 1);
    }

    #[test]
    fn settings_are_checked() {
        let mut set = NetworkSettings::default();
        set.validate().unwrap();
        set.dns = s(&["192.0.2.53", "198.51.100.53:5353"]);
        assert_eq!(
            set.upstream_dns().unwrap(),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "198.51.100.53:5353".parse().unwrap()
            ]
        );
        set.dns = s(&["resolver"]);
        assert!(set.validate().is_err());
        set.dns.clear();
        set.mtu = 100;
        assert!(set
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mtu = 100"));
    }
}
