//! The nftables rules that make a sandbox's network: its policy in its own
//! namespace (which the guest cannot reach: it only has the tap), and one
//! table in the host's namespace that forwards and masquerades its veth.
//!
//! Rules are written as nft's own language and loaded with `nft -f -`,
//! one transaction each: a ruleset is replaced whole (a policy update
//! never leaves a half-written table), and `nft list ruleset` shows
//! exactly what was loaded. The `nft` CLI is nftables' supported
//! interface; libnftnl bindings would only re-encode the same text.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use super::netns::Netns;
use super::NetError;

/// The sandbox namespace's table (`ip airlock`; `ip6 airlock` drops all).
pub const SANDBOX_TABLE: &str = "airlock";

/// What the sandbox namespace's rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRules {
    /// The tap (guest side).
    pub tap: String,
    /// The veth towards the host.
    pub uplink: String,
    /// The tap's address: the guest's gateway, where the filter listens.
    pub gateway: Ipv4Addr,
    /// The filter's DNS port on `gateway`.
    pub dns_port: u16,
    /// Destinations the policy allows by address (allow beats deny).
    pub allow: Vec<Ipv4Net>,
    /// Destinations denied: `--deny-out`, the defaults and the host's own
    /// addresses.
    pub deny: Vec<Ipv4Net>,
    /// The filter's proxy port, when the policy has domain rules: TCP to
    /// a denied destination goes there, to be let through by name.
    pub proxy_port: Option<u16>,
}

/// An nft set's elements (`{ a, b }`), or nothing for an empty set.
fn elements(nets: &[Ipv4Net]) -> String {
    if nets.is_empty() {
        return String::new();
    }
    let list: Vec<String> = nets.iter().map(|n| n.trunc().to_string()).collect();
    format!(" elements = {{ {} }};", list.join(", "))
}

impl SandboxRules {
    /// The ruleset: replaces the sandbox's tables whole.
    pub fn ruleset(&self) -> String {
        let (tap, up, gw) = (&self.tap, &self.uplink, self.gateway);
        let mut s = String::new();
        // Declared empty, then deleted: loads whether or not they exist.
        let _ = writeln!(
            s,
            "table ip {SANDBOX_TABLE} {{}}\ndelete table ip {SANDBOX_TABLE}"
        );
        let _ = writeln!(
            s,
            "table ip6 {SANDBOX_TABLE} {{}}\ndelete table ip6 {SANDBOX_TABLE}"
        );
        let _ = writeln!(s, "table ip {SANDBOX_TABLE} {{");
        let _ = writeln!(
            s,
            "  set allow {{ type ipv4_addr; flags interval; auto-merge;{} }}",
            elements(&self.allow)
        );
        let _ = writeln!(
            s,
            "  set deny {{ type ipv4_addr; flags interval; auto-merge;{} }}",
            elements(&self.deny)
        );
        // DNS to the gateway is the filter's; with domain rules, TCP to a
        // denied destination goes to the filter's proxy, which lets it
        // through only to an allowed name's own addresses.
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;"
        );
        let _ = writeln!(s, "    iifname \"{tap}\" ip daddr {gw} accept");
        if let Some(port) = self.proxy_port {
            let _ = writeln!(
                s,
                "    iifname \"{tap}\" meta l4proto tcp ip daddr != @allow ip daddr @deny dnat to {gw}:{port}"
            );
        }
        let _ = writeln!(s, "  }}");
        // The namespace itself serves the guest DNS (and the proxy) only.
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy drop;"
        );
        let _ = writeln!(
            s,
            "    iifname \"lo\" accept\n    ct state established,related accept"
        );
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" ip daddr {gw} udp dport {} accept",
            self.dns_port
        );
        if let Some(port) = self.proxy_port {
            let _ = writeln!(
                s,
                "    iifname \"{tap}\" ip daddr {gw} tcp dport {port} accept"
            );
        }
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" meta l4proto tcp reject with tcp reset"
        );
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" reject with icmp type admin-prohibited\n  }}"
        );
        // Out of the tap: allowed, then denied, then the rest (egress).
        // Into it: replies only; nothing from outside starts a connection.
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter; policy drop;"
        );
        let _ = writeln!(s, "    ct state established,related accept");
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" oifname \"{up}\" ip daddr @allow accept"
        );
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" ip daddr @deny meta l4proto tcp reject with tcp reset"
        );
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" ip daddr @deny reject with icmp type admin-prohibited"
        );
        let _ = writeln!(s, "    iifname \"{tap}\" oifname \"{up}\" accept");
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" reject with icmp type admin-prohibited\n  }}"
        );
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(s, "    oifname \"{up}\" masquerade\n  }}\n}}");
        // The guest has no IPv6; nothing of it crosses the namespace.
        let _ = writeln!(s, "table ip6 {SANDBOX_TABLE} {{");
        for hook in ["input", "forward"] {
            let _ = writeln!(
                s,
                "  chain {hook} {{ type filter hook {hook} priority filter; policy drop; iifname \"lo\" accept; }}"
            );
        }
        let _ = writeln!(s, "}}");
        s
    }
}

/// The host namespace's table for one sandbox: forwarding for its veth
/// (out: anything, the sandbox's own rules decided; in: replies only), its
/// masquerade, and nothing from it to the host itself.
pub fn host_ruleset(table: &str, veth: &str) -> String {
    format!(
        "table ip {table} {{}}\ndelete table ip {table}\n\
         table ip {table} {{\n\
         \x20 chain input {{ type filter hook input priority filter; policy accept; iifname \"{veth}\" drop; }}\n\
         \x20 chain forward {{ type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{veth}\" accept\n\
         \x20   oifname \"{veth}\" ct state established,related accept\n\
         \x20   oifname \"{veth}\" drop\n  }}\n\
         \x20 chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; iifname \"{veth}\" masquerade; }}\n\
         }}\n"
    )
}

/// Loads `ruleset` with `nft -f -`, in `ns` or in the host's namespace.
pub fn apply(ns: Option<&Netns>, ruleset: &str) -> Result<(), NetError> {
    match ns {
        // A child forked on a thread inside the namespace is inside it.
        Some(ns) => ns.run_in(|| load(ruleset)),
        None => load(ruleset),
    }
}

/// `nft -f -` with `ruleset` on its stdin, in this thread's namespace.
fn load(ruleset: &str) -> Result<(), NetError> {
    let mut cmd = Command::new(super::support::tool("nft"));
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| NetError::Spawn("nft (install nftables)".into(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| NetError::Spawn("nft".into(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::Spawn("nft".into(), e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: "load the nftables rules",
            command: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Deletes the host table `table`, if it exists.
pub fn delete_host_table(table: &str) -> Result<(), NetError> {
    apply(
        None,
        &format!("table ip {table} {{}}\ndelete table ip {table}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(proxy: Option<u16>) -> SandboxRules {
        SandboxRules {
            tap: "tap0".into(),
            uplink: "veth0".into(),
            gateway: Ipv4Addr::new(100, 96, 0, 1),
            dns_port: 53,
            allow: vec!["198.51.100.0/24".parse().unwrap()],
            deny: vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.1/32".parse().unwrap(),
            ],
            proxy_port: proxy,
        }
    }

    #[test]
    fn sets_hold_the_policy_and_allow_comes_first() {
        let s = rules(None).ruleset();
        assert!(s.contains("set allow { type ipv4_addr; flags interval; auto-merge; elements = { 198.51.100.0/24 }; }"), "{s}");
        assert!(s.contains("elements = { 10.0.0.0/8, 192.0.2.1/32 }"), "{s}");
        let allow = s.find("ip daddr @allow accept").unwrap();
        let deny = s.find("ip daddr @deny meta l4proto tcp reject").unwrap();
        assert!(allow < deny, "allow must beat deny:\n{s}");
        assert!(!s.contains("dnat"), "no proxy without domain rules:\n{s}");
    }

    #[test]
    fn domain_rules_send_denied_tcp_to_the_proxy() {
        let s = rules(Some(15001)).ruleset();
        assert!(
            s.contains(
                "meta l4proto tcp ip daddr != @allow ip daddr @deny dnat to 100.96.0.1:15001"
            ),
            "{s}"
        );
        assert!(
            s.contains("ip daddr 100.96.0.1 tcp dport 15001 accept"),
            "{s}"
        );
    }

    #[test]
    fn empty_sets_have_no_elements_and_hosts_bits_are_cleared() {
        assert_eq!(elements(&[]), "");
        assert_eq!(
            elements(&["192.0.2.7/24".parse().unwrap()]),
            " elements = { 192.0.2.0/24 };"
        );
    }

    #[test]
    fn host_table_forwards_only_replies_inward_and_drops_input() {
        let s = host_ruleset("airlock-abc", "alkabc");
        assert!(s.contains("iifname \"alkabc\" drop"));
        assert!(s.contains("oifname \"alkabc\" ct state established,related accept"));
        assert!(s.contains("oifname \"alkabc\" drop"));
        assert!(s.contains("iifname \"alkabc\" masquerade"));
    }
}
